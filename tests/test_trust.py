"""Only enrolled devices get in, over TLS, and each refusal says why, while an enrolled device
trains on with no lost or doubled step.

One real server (split, tiny model, `--auth` + `--tls-cert`) and one honest `splitlm edge` process
over wss://; the tests speak to it as strangers, thieves and replayers over real sockets.
"""

from __future__ import annotations

import json
import ssl
import subprocess
import time
import urllib.error
import urllib.request

import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from splitlm.demo import write_ledger_data
from splitlm.edge_client.credential import Credential
from splitlm.protocol import Error, Limits, Welcome, decode, encode

from .conftest import ServerProcess, edge_cmd, run_cli
from .test_server_robustness import forward_frame, hello_for

GOOD_STEPS = 120


def recv(ws):
    return decode(ws.recv(timeout=30), limits=Limits())[1]


@pytest.fixture(scope="module")
def trusted(tiny_llama, tiny_bundle, tmp_path_factory):
    """A TLS + auth server, devices alice (an edge process, training), bob and carol (revoked)."""
    root = tmp_path_factory.mktemp("trust")
    auth, creds = root / "auth", root / "creds"
    for device in ("alice", "bob", "carol"):
        done = run_cli("enroll", device, "--auth", str(auth), "--out", str(creds / f"{device}.json"))
        assert done.returncode == 0, done.stderr
    done = run_cli("enroll", "carol", "--auth", str(auth), "--revoke")
    assert done.returncode == 0 and "revoked carol" in done.stdout, done.stderr
    for device in ("alice", "dave"):  # a server elsewhere
        done = run_cli("enroll", device, "--auth", str(root / "elsewhere"), "--out", str(creds / f"{device}-elsewhere.json"))
        assert done.returncode == 0, done.stderr
    done = run_cli("certs", "--out", str(root / "tls"), "--host", "localhost", "127.0.0.1")
    assert done.returncode == 0, done.stderr
    assert oct((root / "tls" / "server.key").stat().st_mode & 0o777) == "0o600"
    assert oct((creds / "bob.json").stat().st_mode & 0o777) == "0o600"
    assert "PRIVATE" not in "".join(p.read_text() for p in auth.rglob("*.pub"))  # public keys only at the server

    bundle = tiny_bundle("server")
    write_ledger_data(root, clients=1, per_client=40, held_out=1)
    server = ServerProcess(str(tiny_llama), "--cut", "2", "--lora-rank", "4", "--wire", "f32", "--max-seq-len", "64",
                           "--steps-per-round", "1000", "--auth", str(auth), "--tls-cert", str(root / "tls/server.pem"),
                           "--tls-key", str(root / "tls/server.key"), "--max-attempts", "20")
    assert server.url.startswith("wss://")
    metrics = root / "alice.jsonl"
    good = subprocess.Popen(edge_cmd(server.url, bundle.path, root / "client-0.jsonl", "--steps", str(GOOD_STEPS),
                                     "--batch-size", "2", "--seq-len", "32", "--credential", str(creds / "alice.json"),
                                     "--ca", str(root / "tls/ca.pem"), "--metrics-out", str(metrics), "--threads", "1"),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    while not (metrics.exists() and metrics.read_text()) and time.monotonic() < deadline:
        time.sleep(0.05)  # the attacks below start once alice is mid-training
    tls = ssl.create_default_context(cafile=str(root / "tls/ca.pem"))
    yield dict(server=server, bundle=bundle, good=good, metrics=metrics, creds=creds, tls=tls, root=root)
    good.kill()
    server.stop()


def refused_with(t, status: int, words: str, *, header: str | None = None, **kw) -> None:
    with pytest.raises(InvalidStatus) as caught:
        connect(t["server"].url, ssl=t["tls"], additional_headers={"Authorization": header} if header else None,
                open_timeout=60, **kw)
    response = caught.value.response
    assert response.status_code == status, response
    assert words in response.body.decode(), response.body


def test_no_credential_is_refused_before_the_upgrade(trusted):
    refused_with(trusted, 401, "no Authorization header: this server admits enrolled devices only")


def test_a_credential_from_another_enrolment_is_refused(trusted):
    wrong = Credential.load(trusted["creds"] / "alice-elsewhere.json")
    refused_with(trusted, 401, "device 'alice': the signature does not verify against its enrolled key",
                 header=wrong.header())


def test_an_unknown_device_or_a_foreign_scheme_is_refused(trusted):
    dave = Credential.load(trusted["creds"] / "dave-elsewhere.json")
    refused_with(trusted, 403, "no device 'dave' is enrolled on this server", header=dave.header())
    refused_with(trusted, 401, "Authorization: expected the SplitLM-Ed25519 scheme", header="Bearer abc")


def test_a_revoked_device_is_refused_and_says_so(trusted):
    cmd = edge_cmd(trusted["server"].url, trusted["bundle"].path, trusted["root"] / "client-0.jsonl", "--steps", "2",
                   "--credential", str(trusted["creds"] / "carol.json"), "--ca", str(trusted["root"] / "tls/ca.pem"))
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "refused this device (HTTP 403): device 'carol': its credential was revoked" in done.stderr, done.stderr


def test_a_valid_credential_claiming_another_id_is_refused(trusted):
    bob = Credential.load(trusted["creds"] / "bob.json")
    with connect(trusted["server"].url, ssl=trusted["tls"], additional_headers={"Authorization": bob.header()}) as ws:
        ws.send(encode(hello_for(trusted["bundle"], client_id="alice"), seq=0))
        reply = recv(ws)
    assert isinstance(reply, Error) and reply.code == "identity"
    assert "hello.client_id 'alice': this connection's credential is for 'bob'" in reply.message


def test_a_replayed_or_stale_handshake_is_refused(trusted):
    bob = Credential.load(trusted["creds"] / "bob.json")
    header = bob.header()
    with connect(trusted["server"].url, ssl=trusted["tls"], additional_headers={"Authorization": header},
                 max_size=None) as ws:
        ws.send(encode(hello_for(trusted["bundle"], client_id="bob"), seq=0))
        assert isinstance(recv(ws), Welcome)   # the first use of the header is bob's session
        ws.send(forward_frame(trusted["bundle"]))
        assert recv(ws).kind == "backward"
    refused_with(trusted, 401, "device 'bob': replayed handshake", header=header)
    refused_with(trusted, 401, "s from the server's clock (allowed ±60 s): a stale or replayed handshake",
                 header=bob.header(now=time.time() - 600))


def test_plain_ws_to_the_tls_server_is_refused_with_a_hint(trusted):
    url = trusted["server"].url.replace("wss://", "ws://")
    cmd = edge_cmd(url, trusted["bundle"].path, trusted["root"] / "client-0.jsonl", "--steps", "2",
                   "--credential", str(trusted["creds"] / "bob.json"))
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "did not answer in plain HTTP: it probably speaks TLS; connect with wss://" in done.stderr, done.stderr


def test_a_public_listen_without_tls_and_auth_needs_insecure(tiny_llama, tmp_path):
    done = run_cli("serve", str(tiny_llama), "--cut", "2", "--host", "0.0.0.0", "--port", "0", timeout=60)
    assert done.returncode == 2
    assert ("--host 0.0.0.0 is reachable beyond this machine, and this server has no TLS (--tls-cert/--tls-key) "
            "and no --auth") in done.stderr, done.stderr
    assert "pass --insecure to accept that" in done.stderr


def test_alice_trained_every_step_exactly_once(trusted):
    """Runs last in this module: after every refusal above."""
    out, _ = trusted["good"].communicate(timeout=300)
    assert trusted["good"].returncode == 0, out
    steps = [json.loads(line)["step"] for line in trusted["metrics"].read_text().splitlines()]
    assert steps == list(range(GOOD_STEPS))
    time.sleep(0.5)
    lines = trusted["server"].log().splitlines()
    alice = [int(line.split("step")[2].split()[0]) for line in lines if "client alice  step" in line]
    assert alice == list(range(GOOD_STEPS))
    refusals = [i for i, line in enumerate(lines) if "refused a" in line]
    first, last = (i for i, line in enumerate(lines) if "client alice  step" in line and
                   int(line.split("step")[2].split()[0]) in (0, GOOD_STEPS - 1))
    assert sum(first < i < last for i in refusals) >= 5, "the refusals overlapped alice's training"


def test_an_idle_connection_is_closed_and_frees_its_slot(tiny_llama, tiny_bundle):
    from websockets.exceptions import ConnectionClosed

    bundle = tiny_bundle("server")
    server = ServerProcess(str(tiny_llama), "--cut", "2", "--lora-rank", "4", "--max-clients", "1",
                           "--idle-timeout", "1")
    try:
        sleepy = connect(server.url, max_size=None)
        sleepy.send(encode(hello_for(bundle, client_id="sleepy"), seq=0))
        assert isinstance(recv(sleepy), Welcome)  # it holds the only slot, and says nothing more
        t0 = time.monotonic()
        with pytest.raises(ConnectionClosed):
            sleepy.recv(timeout=30)
        assert time.monotonic() - t0 < 10
        with connect(server.url, max_size=None) as ws:  # the slot is free again
            ws.send(encode(hello_for(bundle, client_id="next"), seq=0))
            assert isinstance(recv(ws), Welcome)
        assert "client sleepy: sent nothing for 1 s (idle); closed" in server.log()
    finally:
        server.stop()


def test_the_status_page_is_behind_the_same_gate(trusted):
    page = trusted["server"].url.replace("wss://", "https://") + "/status.json"
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(page, context=trusted["tls"], timeout=30)
    assert refused.value.code == 401
    assert "no Authorization header: this server admits enrolled devices only" in refused.value.read().decode()
    done = run_cli("status", trusted["server"].url, "--credential", str(trusted["creds"] / "bob.json"),
                   "--ca", str(trusted["root"] / "tls/ca.pem"))
    assert done.returncode == 0, done.stderr
    alice = next(d for d in json.loads(done.stdout)["devices"] if d["client_id"] == "alice")
    assert alice["steps"] >= 1 and alice["bytes_in"] > 0
