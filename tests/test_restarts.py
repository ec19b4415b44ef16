"""Crashes and dropped links lose no finished work and never apply a step twice.

Real server and edge processes on a tiny llama bundle: the server is killed with SIGKILL mid-round
and resumed from its round-end state; the edge client is killed mid-step and resumed from its
state file; a relay cuts the link once, right after the server applied a step. Each run must end
with the same per-step losses and the same final adapter as one uninterrupted run.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file
from websockets.asyncio.client import connect
from websockets.asyncio.server import serve
from websockets.exceptions import ConnectionClosed

from splitlm.cloud_server.state import (Progress, Resume, ServerState, StateError, load_state, save_state,
                                        server_resume)
from splitlm.demo import write_ledger_data
from splitlm.edge_client import state as edge_state
from splitlm.edge_client.state import EdgeState, Position, client_resume
from splitlm.protocol import Backward, Hidden, Limits, decode

from .conftest import edge_cmd, run_cli

STEPS, ROUND, BATCH, SEQ, LR = 40, 4, 2, 32, "1e-2"


# ---------------------------------------------------------------- processes

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`splitlm serve` on a fixed port (a restarted server comes back where clients look for it)."""

    def __init__(self, model: Path, labels: str, out: Path, port: int, *extra: str):
        self.lines: list[str] = []
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "splitlm.cli", "serve", str(model), "--cut", "2", "--labels", labels,
             "--lora-rank", "4", "--lr", LR, "--wire", "f32", "--steps-per-round", str(ROUND), "--out", str(out),
             "--port", str(port), "--threads", "1", *extra],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for line in self.proc.stdout:
            self.lines.append(line)
            if "listening on" in line:
                break
        else:
            raise RuntimeError("server did not start:\n" + self.log())
        self.reader = threading.Thread(target=lambda: self.lines.extend(self.proc.stdout), daemon=True)
        self.reader.start()

    def log(self) -> str:
        return "".join(self.lines)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=60)
        self.reader.join(timeout=10)


def start_edge(url: str, bundle, data: Path, work: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(edge_cmd(url, bundle.path, data, "--steps", str(STEPS), "--batch-size", str(BATCH),
                                     "--seq-len", str(SEQ), "--lr", LR, "--metrics-out", str(work / "m.jsonl"),
                                     "--reconnect-tries", "10", "--client-id", "edge", *extra),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(edge: subprocess.Popen) -> str:
    out, _ = edge.communicate(timeout=180)
    assert edge.returncode == 0, out
    return out


def records(work: Path) -> list[dict]:
    path = work / "m.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def wait_for_records(work: Path, n: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while len(records(work)) < n:
        assert time.monotonic() < deadline, f"fewer than {n} steps recorded"
        time.sleep(0.02)


def server_steps(log: str, client_id: str = "edge") -> list[int]:
    """The steps the server applied for `client_id`, in order, from its log."""
    return [int(m.group(1)) for m in re.finditer(rf"client {client_id}  step +(\d+)  loss", log)]


def result(work: Path) -> dict:
    """What a run leaves: the last loss recorded for each step, the final adapters."""
    losses = {}
    for r in records(work):
        losses[r["step"]] = r["loss"]  # a step redone after a rewind: its last record counts
    final = work / "out" / f"round-{STEPS // ROUND - 1:04d}"
    head = dict(np.load(final / "head_adapter.npz"))
    body = load_file(final / "adapter" / "adapter_model.safetensors")
    return {"losses": [losses.get(s) for s in range(STEPS)], "head": head, "body": body}


def assert_same_result(got: dict, want: dict) -> None:
    np.testing.assert_allclose(got["losses"], want["losses"], rtol=1e-3)
    for part in ("head", "body"):
        assert got[part].keys() == want[part].keys()
        for name in want[part]:
            np.testing.assert_allclose(got[part][name], want[part][name], rtol=1e-3, atol=1e-6, err_msg=name)


@pytest.fixture(scope="module")
def setup(tiny_llama, tiny_bundle, tmp_path_factory):
    data = tmp_path_factory.mktemp("data")
    write_ledger_data(data, clients=1, per_client=40, held_out=1)
    return tiny_llama, data / "client-0.jsonl"


def run_uninterrupted(model, bundle, data, work: Path) -> dict:
    server = Server(model, bundle.manifest.labels, work / "out", free_port())
    try:
        finish(start_edge(f"ws://127.0.0.1:{server.proc.args[server.proc.args.index('--port') + 1]}",
                          bundle, data, work))
    finally:
        server.stop()
    return result(work)


@pytest.fixture(scope="module")
def reference(setup, tiny_bundle, tmp_path_factory):
    """One uninterrupted run per label placement, the result every interrupted run must equal."""
    model, data = setup
    made = {}

    def get(labels: str) -> dict:
        if labels not in made:
            made[labels] = run_uninterrupted(model, tiny_bundle(labels), data, tmp_path_factory.mktemp(f"ref-{labels}"))
        return made[labels]
    return get


# ---------------------------------------------------------------- crashes

def test_a_server_killed_mid_round_resumes_from_its_last_round_end(setup, tiny_bundle, reference, tmp_path):
    model, data = setup
    bundle, port = tiny_bundle("server"), free_port()
    server = Server(model, "server", tmp_path / "out", port)
    edge = start_edge(f"ws://127.0.0.1:{port}", bundle, data, tmp_path)
    try:
        wait_for_records(tmp_path, ROUND + 2)  # round 0 closed and saved; round 1 under way
        server.proc.send_signal(signal.SIGKILL)
        server.proc.wait()
        server.reader.join(timeout=10)
        killed_at = server_steps(server.log())[-1]
        server = Server(model, "server", tmp_path / "out", port, "--resume")
        out = finish(edge)  # the client reconnected by itself
    finally:
        edge.kill()
        server.stop()
    resumed = re.search(r"resumed: round (\d+), (\d+) steps", server.log())
    round_, steps = int(resumed.group(1)), int(resumed.group(2))
    assert steps == round_ * ROUND and 1 <= round_ and steps <= killed_at + 1  # a round end, not later
    if killed_at + 1 > steps:  # the server lost steps the client had done: the client went back too
        # the client's next step: killed_at + 1, or killed_at if the backward of killed_at was lost with the server
        rewind = re.search(rf"at step (\d+), the server at {steps}: rewind", out)
        if rewind:
            assert int(rewind.group(1)) in (killed_at, killed_at + 1), out
        else:  # it had not yet received the backward of the first step after the saved round end
            assert killed_at == steps, out
    assert server_steps(server.log()) == list(range(steps, STEPS))  # the restored server did each once
    assert [r["step"] for r in records(tmp_path)][-(STEPS - steps):] == list(range(steps, STEPS))
    assert f"stopped after {STEPS} steps, round {STEPS // ROUND}" in server.log()  # the same counters
    assert_same_result(result(tmp_path), reference("server"))


def test_an_edge_client_killed_mid_step_resumes_from_its_state_file(setup, tiny_bundle, reference, tmp_path):
    model, data = setup
    bundle, port = tiny_bundle("server"), free_port()
    server = Server(model, "server", tmp_path / "out", port)
    url, state = f"ws://127.0.0.1:{port}", tmp_path / "edge.state.npz"
    edge = start_edge(url, bundle, data, tmp_path, "--state", str(state))
    try:
        wait_for_records(tmp_path, ROUND + 2)
        edge.send_signal(signal.SIGKILL)
        edge.wait()
        edge = start_edge(url, bundle, data, tmp_path, "--state", str(state), "--resume")
        finish(edge)
    finally:
        edge.kill()
        server.stop()
    assert server_steps(server.log()) == list(range(STEPS)), "the server applied every step once"
    assert f"stopped after {STEPS} steps, round {STEPS // ROUND}" in server.log()
    steps = [r["step"] for r in records(tmp_path)]
    assert sorted(set(steps)) == list(range(STEPS)) and steps == sorted(steps)
    assert_same_result(result(tmp_path), reference("server"))


# ---------------------------------------------------------------- a dropped link

class CuttingRelay:
    """A websocket relay that forwards frames both ways, and once cuts both links instead of
    passing on the first server frame for which `cut(message)` is true (the client never sees it)."""

    def __init__(self, upstream: str, *, cut):
        self.upstream, self.cut = upstream, cut
        self.cuts = 0
        self.port = free_port()
        self.loop = asyncio.new_event_loop()
        ready = threading.Event()
        threading.Thread(target=self._serve, args=(ready,), daemon=True).start()
        ready.wait(10)

    def _serve(self, ready: threading.Event) -> None:
        async def main():
            async with serve(self._relay, "127.0.0.1", self.port, max_size=None, compression=None):
                ready.set()
                await asyncio.Future()
        self.loop.run_until_complete(main())

    async def _relay(self, client) -> None:
        async with connect(self.upstream, max_size=None, compression=None) as server:
            async def up():
                async for frame in client:
                    await server.send(frame)

            async def down():
                async for frame in server:
                    _, msg = decode(frame, limits=Limits())
                    if not self.cuts and self.cut(msg):
                        self.cuts += 1
                        client.transport.abort()  # a dead link, no close handshake
                        server.transport.abort()
                        return
                    await client.send(frame)
            tasks = [asyncio.ensure_future(up()), asyncio.ensure_future(down())]
            try:
                await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            except ConnectionClosed:
                pass
            for t in tasks:
                t.cancel()


@pytest.mark.parametrize("labels,cut_on", [("server", Backward), ("device", Hidden)])
def test_a_dropped_link_reconnects_without_losing_or_doubling_a_step(setup, tiny_bundle, reference, tmp_path,
                                                                     labels, cut_on):
    """Cut before the backward: the server applied the step, the client re-applies the re-sent
    backward. Cut before `hidden` (U-shape): the server drops the pending step, both redo it."""
    model, data = setup
    bundle, port = tiny_bundle(labels), free_port()
    server = Server(model, labels, tmp_path / "out", port)
    relay = CuttingRelay(f"ws://127.0.0.1:{port}", cut=lambda msg: isinstance(msg, cut_on) and msg.step == ROUND + 1)
    try:
        out = finish(start_edge(f"ws://127.0.0.1:{relay.port}", bundle, data, tmp_path))
    finally:
        server.stop()
    assert relay.cuts == 1 and "link lost at step 5" in out, out
    assert ("apply_resent" in out) == (cut_on is Backward), out
    assert server_steps(server.log()) == list(range(STEPS)), "no lost or doubled step at the server"
    assert f"stopped after {STEPS} steps, round {STEPS // ROUND}" in server.log()
    assert [r["step"] for r in records(tmp_path)] == list(range(STEPS)), "nor at the client"
    assert_same_result(result(tmp_path), reference(labels))


# ---------------------------------------------------------------- flags

def test_resume_without_a_state_is_a_clear_error(tiny_llama, tiny_bundle, tmp_path):
    r = run_cli("serve", str(tiny_llama), "--cut", "2", "--out", str(tmp_path), "--resume")
    assert r.returncode == 2 and "--resume: no server-state.safetensors in" in r.stderr, r.stderr
    bundle = tiny_bundle("server")
    r = run_cli("edge", "ws://127.0.0.1:1", "--bundle", str(bundle.path), "--data", str(tmp_path / "x.txt"),
                "--resume")
    assert r.returncode == 2 and "--resume needs --state FILE" in r.stderr, r.stderr
    (tmp_path / "x.txt").write_text("some text to train on " * 20)
    r = run_cli("edge", "ws://127.0.0.1:1", "--bundle", str(bundle.path), "--data", str(tmp_path / "x.txt"),
                "--resume", "--state", str(tmp_path / "none.npz"))
    assert r.returncode == 2 and "no state file at" in r.stderr, r.stderr


def test_a_server_that_never_answered_is_a_clear_error_at_once(tiny_bundle, tmp_path):
    """Backoff is for a link that once worked; a wrong address or a server not started fails fast."""
    (tmp_path / "x.txt").write_text("some text to train on " * 20)
    url = f"ws://127.0.0.1:{free_port()}"
    t0 = time.monotonic()
    r = run_cli("edge", url, "--bundle", str(tiny_bundle("server").path), "--data", str(tmp_path / "x.txt"))
    assert time.monotonic() - t0 < 20, "no backoff before the first connection (8 tries would take 40 s)"
    assert r.returncode == 2 and f"nothing ever answered at {url}" in r.stderr, r.stderr
    assert "link lost" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


# ---------------------------------------------------------------- the resume rule

@pytest.mark.parametrize("server_next,client_next,cached,want", [
    (7, None, 6, Resume.FRESH),
    (7, 7, 6, Resume.GO_ON),
    (7, 6, 6, Resume.RESEND),     # applied 6, the backward was lost
    (4, 7, 3, Resume.REWIND),     # the server restarted from the round end at 4
    (0, 3, None, Resume.REWIND),  # a server that never saw this client: back to the start
])
def test_the_server_decides_how_a_reconnecting_client_goes_on(server_next, client_next, cached, want):
    assert server_resume(server_next=server_next, client_next=client_next, cached_step=cached) is want


@pytest.mark.parametrize("server_next,client_next,cached", [(7, 6, None), (7, 5, 6), (7, 2, 6)])
def test_a_client_older_than_the_server_is_refused(server_next, client_next, cached):
    with pytest.raises(StateError, match=f"the server is at step {server_next} for this client"):
        server_resume(server_next=server_next, client_next=client_next, cached_step=cached)


@pytest.mark.parametrize("client_next,server_next,snapshot,want", [
    (7, 7, 4, edge_state.Resume.GO_ON),
    (7, 8, 4, edge_state.Resume.APPLY_RESENT),
    (7, 4, 4, edge_state.Resume.REWIND),
])
def test_the_client_follows_the_server_step(client_next, server_next, snapshot, want):
    assert client_resume(client_next=client_next, server_next=server_next, snapshot_step=snapshot) is want


@pytest.mark.parametrize("client_next,server_next,snapshot", [(7, 0, 4), (7, 9, 4), (7, 4, None)])
def test_a_client_without_a_matching_snapshot_gives_a_clear_error(client_next, server_next, snapshot):
    with pytest.raises(edge_state.StateError, match=f"the server expects step {server_next}"):
        client_resume(client_next=client_next, server_next=server_next, snapshot_step=snapshot)


# ---------------------------------------------------------------- atomic state files

def edge_state_at(step: int) -> EdgeState:
    pos = Position(step=step, round=step // 4, exchange_due=False, loss=1.5,
                   lora={"a.lora_A": np.full((2, 3), step, np.float32)},
                   optim={"step": np.array(step), "exp_avg.a.lora_A": np.ones((2, 3), np.float32)})
    return EdgeState(meta={"client_id": "e"}, now=pos, snapshot=pos.copy())


def server_state_at(step: int) -> ServerState:
    import torch

    grad = np.full((1, 2, 3), 0.5, np.float32)
    return ServerState(config={"cut": 2}, round=step // 4, global_step=step, global_head={"h": np.ones(3, np.float32)},
                       progress={"e": Progress(step, [1.0], Backward(step=step - 1, grad=grad, loss=2.0))},
                       reports={"e": ({"h": np.zeros(3, np.float32)}, 5)}, awaited={"e"},
                       body={"body.w": torch.full((2,), float(step)), "adam.w.step": torch.tensor(3.0)})


class Crash(BaseException):
    """The process dies here."""


def crash_before_replace(monkeypatch) -> None:
    import splitlm.atomic

    def die(*_):
        raise Crash()
    monkeypatch.setattr(splitlm.atomic.os, "replace", die)


def test_a_crash_before_the_replace_leaves_the_old_edge_state(tmp_path, monkeypatch):
    path = tmp_path / "edge.npz"
    edge_state.save_state(path, edge_state_at(4))
    crash_before_replace(monkeypatch)
    with pytest.raises(Crash):
        edge_state.save_state(path, edge_state_at(5))
    (tmp_path / f".{path.name}.999.tmp").write_bytes(b"PK\x03\x04 torn")  # what a kill -9 mid-write leaves
    loaded = edge_state.load_state(path, meta={"client_id": "e"})
    assert loaded.now.step == 4 and loaded.snapshot.step == 4
    np.testing.assert_array_equal(loaded.now.lora["a.lora_A"], np.full((2, 3), 4, np.float32))
    assert int(loaded.now.optim["step"]) == 4


def test_a_crash_before_the_replace_leaves_the_old_server_state(tmp_path, monkeypatch):
    path = tmp_path / "server-state.safetensors"
    save_state(path, server_state_at(4))
    crash_before_replace(monkeypatch)
    with pytest.raises(Crash):
        save_state(path, server_state_at(5))
    loaded = load_state(path, config={"cut": 2})
    assert (loaded.round, loaded.global_step, loaded.awaited) == (1, 4, {"e"})
    assert loaded.progress["e"].step == 4 and loaded.progress["e"].last_backward.step == 3
    np.testing.assert_array_equal(loaded.progress["e"].last_backward.grad, np.full((1, 2, 3), 0.5, np.float32))
    assert loaded.reports["e"][1] == 5 and float(loaded.body["body.w"][0]) == 4.0


def test_a_torn_or_foreign_state_file_is_a_clear_error(tmp_path):
    torn = tmp_path / "torn.npz"
    torn.write_bytes(b"PK\x03\x04 half a zip")
    with pytest.raises(edge_state.StateError, match="not a readable edge state"):
        edge_state.load_state(torn, meta={})
    edge_state.save_state(tmp_path / "e.npz", edge_state_at(4))
    with pytest.raises(edge_state.StateError, match="client_id: state has 'e', this run 'f'"):
        edge_state.load_state(tmp_path / "e.npz", meta={"client_id": "f"})
    save_state(tmp_path / "s.safetensors", server_state_at(4))
    with pytest.raises(StateError, match="cut: state has 2, server runs 3"):
        load_state(tmp_path / "s.safetensors", config={"cut": 3})
