"""Body replicas on torch.distributed (gloo, loopback): real `splitlm serve --replicas 2` processes,
real `splitlm edge` processes. Two replicas keep one body adapter, the same as one server's."""

from __future__ import annotations

import re
import socket
import subprocess
import time

import numpy as np
import pytest
from safetensors.numpy import load_file

from splitlm.cloud_server.replicas import Proposal, decide
from splitlm.demo import write_ledger_data
from splitlm.edge_client.client import replica_order

from .conftest import ServerProcess, edge_cmd
from .test_split_training import BATCH, LR, read_metrics, serve_args

STEPS, PER_ROUND, SEQ = 6, 3, 32  # two rounds: the head average crosses replicas too


@pytest.fixture(scope="module")
def four_clients(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data")
    write_ledger_data(folder, clients=4, per_client=12, held_out=2)
    return [folder / f"client-{i}.jsonl" for i in range(4)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ids_on(urls: list[str], per_replica: int) -> dict[str, str]:
    """Client ids whose stable hash puts `per_replica` devices on each replica: id -> its replica's url."""
    got: dict[str, str] = {}
    for i in range(100):
        cid, home = f"dev-{i}", replica_order(",".join(urls), f"dev-{i}")[0]
        if sum(u == home for u in got.values()) < per_replica:
            got[cid] = home
        if len(got) == per_replica * len(urls):
            return got
    raise AssertionError("no ids spread evenly")


def replica_args(model, bundle, world: int, rank: int, port: int, out, *extra: str) -> list[str]:
    return serve_args(model, bundle, "--replicas", str(world), "--replica-rank", str(rank), "--dist-url",
                      f"tcp://127.0.0.1:{port}", "--dist-timeout", "20", "--out", str(out), *extra)


def run_devices(url: str, bundle, ids: list[str], data: list, out) -> list[list[float]]:
    """Device i (id ids[i]) trains on data[i] against `url` (one server, or the replicas' list); their losses."""
    out.mkdir()
    metrics = [out / f"{cid}.jsonl" for cid in ids]
    procs = [subprocess.Popen(edge_cmd(url, bundle.path, data[i],
                                       "--steps", str(STEPS), "--batch-size", str(BATCH), "--seq-len", str(SEQ),
                                       "--lr", str(LR), "--threads", "1", "--client-id", cid,
                                       "--metrics-out", str(m)),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i, (cid, m) in enumerate(zip(ids, metrics))]
    for p in procs:
        out, _ = p.communicate(timeout=120)
        assert p.returncode == 0, out
    return [[row["loss"] for row in read_metrics(m)] for m in metrics]


def body_adapter(out, round_: int) -> dict[str, np.ndarray]:
    tensors = load_file(str(out / f"round-{round_:04d}" / "adapter" / "adapter_model.safetensors"))
    return {k: v for k, v in tensors.items() if int(k.split(".layers.")[1].split(".")[0]) >= 2}


@pytest.mark.parametrize("total, want", [
    (Proposal(pending=3, connected=4), (False, False)),                 # one device still computing
    (Proposal(pending=4, connected=4), (True, False)),                  # every device of every replica in
    (Proposal(pending=1, connected=4, overdue=1), (True, False)),       # the oldest waited the bound
    (Proposal(pending=2, connected=2), (True, False)),
    (Proposal(reports=2, stake=2, ready=1, connected=4), (False, False)),  # one replica's devices still due
    (Proposal(reports=4, stake=2, ready=2), (False, True)),             # every replica has all its reports
    (Proposal(reports=1, stake=2, ready=1, deadline=1), (False, True)),  # a deadline passed on one replica
    (Proposal(connected=3), (False, False)),                            # idle
])
def test_a_tick_is_decided_by_the_sum_of_the_replicas_proposals(total, want):
    assert decide(total, min_clients=2, max_devices=8) == want


def test_two_replicas_keep_one_body_equal_to_one_server(tiny_llama, tiny_bundle, four_clients, tmp_path):
    bundle = tiny_bundle("server")
    common = ("--steps-per-round", str(PER_ROUND), "--rounds", str(STEPS // PER_ROUND), "--batch-wait-ms", "30000",
              "--min-clients", "4", "--no-status")
    port = free_port()
    replicas = ServerProcess.many(*(replica_args(tiny_llama, bundle, 2, r, port, tmp_path / f"r{r}", *common)
                                    for r in range(2)))
    single = ServerProcess(*serve_args(tiny_llama, bundle, "--out", str(tmp_path / "one"), "--batch-optimizer",
                                       "per-batch", *common))
    try:
        urls = [s.url for s in replicas]
        ids = ids_on(urls, per_replica=2)
        spread = run_devices(",".join(urls), bundle, list(ids), four_clients, tmp_path / "spread")
        alone = run_devices(single.url, bundle, list(ids), four_clients, tmp_path / "alone")
    finally:
        for s in (*replicas, single):
            s.stop()
    for s, url in zip(replicas, urls):  # each replica trained its own two devices
        assert sorted(cid for cid, home in ids.items() if home == url) == sorted(
            cid for cid in ids if f"client {cid} joined" in s.log())
    np.testing.assert_allclose(spread, alone, rtol=1e-4)
    last = STEPS // PER_ROUND - 1
    a, b, one = (body_adapter(tmp_path / d, last) for d in ("r0", "r1", "one"))
    assert a.keys() == one.keys() and a
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=0, atol=1e-6)   # one body on both replicas
        np.testing.assert_allclose(a[k], one[k], rtol=1e-3, atol=1e-5)  # and it is one server's


def test_a_dead_replica_costs_its_device_a_reconnect_not_its_progress(tiny_llama, tiny_bundle, four_clients,
                                                                      tmp_path):
    """Replica 1 is killed (SIGKILL) mid-run: replica 0 goes on alone, and replica 1's device moves
    to it and goes on from the step it had reached; every step of both devices is run exactly once.
    (--min-clients 2: the survivor's rounds wait for the moved device, whom it has never seen.)"""
    bundle = tiny_bundle("server")
    steps = 8
    port = free_port()
    replicas = ServerProcess.many(*(replica_args(tiny_llama, bundle, 2, r, port, tmp_path / f"r{r}",
                                                 "--steps-per-round", "4", "--rounds", "2", "--batch-wait-ms", "200",
                                                 "--min-clients", "2", "--no-status") for r in range(2)))
    urls = [s.url for s in replicas]
    ids = ids_on(urls, per_replica=1)
    moved = next(cid for cid, url in ids.items() if url == urls[1])
    metrics = {cid: tmp_path / f"{cid}.jsonl" for cid in ids}
    procs = [subprocess.Popen(edge_cmd(",".join(urls), bundle.path, four_clients[i], "--steps", str(steps),
                                       "--batch-size", str(BATCH), "--seq-len", str(SEQ), "--lr", str(LR),
                                       "--threads", "1", "--client-id", cid, "--metrics-out", str(metrics[cid])),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i, cid in enumerate(ids)]
    try:
        deadline = time.monotonic() + 60
        while f"client {moved}  step    2" not in replicas[1].log():  # its third step is done there
            assert time.monotonic() < deadline, replicas[1].log()
            time.sleep(0.05)
        replicas[1].proc.kill()
        for p in procs:
            out, _ = p.communicate(timeout=90)
            assert p.returncode == 0, out + "\nreplica 0:\n" + replicas[0].log()
    finally:
        for s in replicas:
            s.proc.kill()
            s.proc.wait()
    survivor = replicas[0].log()
    assert "lost the replica group" in survivor
    taken = re.search(rf"client {moved}: taken over from another replica at its step (\d+)", survivor)
    assert taken and int(taken.group(1)) >= 3, survivor  # it went on from where it was, not from 0
    for cid, m in metrics.items():
        rows = read_metrics(m)
        assert [r["step"] for r in rows] == list(range(steps)), (cid, rows)  # each step once, none lost or redone
        assert all(np.isfinite(r["loss"]) for r in rows)
    assert (tmp_path / "r0" / "round-0001" / "adapter").is_dir()  # the survivor closed the last round
