"""One enrolled device cannot hijack the average: with --clip-norm, a device that sends its adapter
scaled by 1,000 moves the global by at most the bound, a device that sends NaN is refused and
logged, and the honest devices' held-out loss still falls.

A real fedavg server (tiny model, --auth), two honest `splitlm edge` processes, and the two
attackers speaking the protocol over real sockets with their own valid credentials.
"""

from __future__ import annotations

import json
import subprocess
import threading

import numpy as np
from websockets.sync.client import connect

from splitlm.cloud_server.aggregate import update_norm
from splitlm.demo import write_ledger_data
from splitlm.edge_client.credential import Credential
from splitlm.protocol import Bye, Error, Global, Limits, Update, Welcome, decode, encode

from .conftest import ServerProcess, edge_cmd, run_cli
from .test_federated_robustness import hello

ROUNDS, LOCAL, CLIP = 3, 4, 2.0


def recv(ws):
    return decode(ws.recv(timeout=120), limits=Limits())[1]


def attacker(url, model, credential, *, scale: float, seen: list, errors: list) -> None:
    """Each round: update = (scale - 1) x the global it holds, i.e. its adapter = scale x the global.
    Records the norm of every delta the server broadcasts."""
    cred = Credential.load(credential)
    try:
        with connect(url, max_size=None, additional_headers={"Authorization": cred.header()}) as ws:
            ws.send(encode(hello(model, "fedavg", cred.client_id), seq=0))
            welcome = recv(ws)
            assert isinstance(welcome, Welcome), welcome
            glob = {}
            for _ in range(welcome.global_chunks):
                glob.update({n: np.array(t) for n, t in recv(ws).tensors.items()})
            for r in range(ROUNDS):
                delta = {n: (scale - 1) * t for n, t in glob.items()}
                ws.send(encode(Update(round=r, chunk=0, chunks=1, tensors=delta, n_samples=12), seq=r + 1))
                got = {}
                while len(got) < len(glob):
                    msg = recv(ws)
                    assert isinstance(msg, Global) and msg.delta and msg.round == r + 1, msg
                    got.update(msg.tensors)
                seen.append(update_norm(got))
                glob = {n: glob[n] + got[n] for n in glob}
    except Exception as e:  # noqa: BLE001 - surfaced by the test
        errors.append(e)


def nan_update_frame(model, names_shapes) -> bytes:
    """An update whose first value is NaN, patched in past the sender-side finite check."""
    tensors = {n: np.full(s, 7.0, np.float32) for n, s in names_shapes.items()}
    frame = bytearray(encode(Update(round=0, chunk=0, chunks=1, tensors=tensors, n_samples=12), seq=1))
    at = frame.index(np.float32(7.0).tobytes())
    frame[at:at + 4] = np.float32(np.nan).tobytes()
    return bytes(frame)


def test_a_scaled_and_a_nan_adapter_cannot_hijack_the_global(tiny_llama, tiny_whole_bundle, tmp_path):
    root, auth, creds = tmp_path, tmp_path / "auth", tmp_path / "creds"
    write_ledger_data(root, clients=2, per_client=12, held_out=8)
    for device in ("alice", "bob", "mallory", "nancy"):
        assert run_cli("enroll", device, "--auth", str(auth), "--out", str(creds / f"{device}.json")).returncode == 0
    bundle = tiny_whole_bundle("fedavg", "lora").path
    server = ServerProcess(str(tiny_llama), "--mode", "fedavg", "--lora-rank", "4", "--rounds", str(ROUNDS),
                           "--local-steps", str(LOCAL), "--min-clients", "3", "--auth", str(auth),
                           "--clip-norm", str(CLIP), "--out", str(root / "out"), "--eval", str(root / "eval.jsonl"))
    try:
        # nancy: a NaN update is refused with its reason; she leaves, and the round does not wait for her
        nancy = Credential.load(creds / "nancy.json")
        with connect(server.url, max_size=None, additional_headers={"Authorization": nancy.header()}) as ws:
            ws.send(encode(hello(tiny_llama, "fedavg", "nancy"), seq=0))
            welcome = recv(ws)
            shapes = {}
            for _ in range(welcome.global_chunks):
                shapes.update({n: t.shape for n, t in recv(ws).tensors.items()})
            ws.send(nan_update_frame(tiny_llama, shapes))
            reply = recv(ws)
            assert isinstance(reply, Error) and reply.code == "bad_message" and "expected finite values" in reply.message
            ws.send(encode(Bye(reason="giving up"), seq=2))

        seen, errors = [], []
        mallory = threading.Thread(target=attacker, args=(server.url, tiny_llama, creds / "mallory.json"),
                                   kwargs=dict(scale=1000.0, seen=seen, errors=errors))
        mallory.start()
        honest = [subprocess.Popen(edge_cmd(server.url, bundle, root / f"client-{i}.jsonl", "--batch-size", "2",
                                            "--seq-len", "32", "--lr", "1e-2", "--threads", "1",
                                            "--credential", str(creds / f"{name}.json")),
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                  for i, name in enumerate(("alice", "bob"))]
        for p in honest:
            out, _ = p.communicate(timeout=600)
            assert p.returncode == 0, out
        mallory.join(timeout=120)
        assert not errors, errors
        assert server.proc.wait(timeout=60) == 0, server.log()
    finally:
        if server.proc.poll() is None:
            server.stop()

    # the global moved at most CLIP a round, whatever mallory sent
    assert len(seen) == ROUNDS and max(seen) <= CLIP * (1 + 1e-5), seen
    metrics = [json.loads((root / "out" / f"round-{r:04d}" / "metrics.json").read_text()) for r in range(ROUNDS)]
    for m in metrics:
        assert m["updates"]["mallory"]["clipped"] and m["updates"]["mallory"]["norm"] > 100 * CLIP, m["updates"]
        assert set(m["updates"]) == {"alice", "bob", "mallory"}
    assert "expected finite values" in metrics[0]["refused"]["nancy"][0]
    assert "clipped mallory's update" in server.log()
    # and the honest devices still taught the global something
    losses = [m["eval_loss"] for m in metrics]
    print("held-out loss by round:", losses, "honest norms:",
          [(m["updates"]["alice"]["norm"], m["updates"]["bob"]["norm"]) for m in metrics])
    assert losses[-1] < losses[0] - 0.01, losses
