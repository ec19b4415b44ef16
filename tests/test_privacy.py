"""Labels on the device: no token id and no label ever crosses the socket.

A recording relay sits between a real edge-client process and a real server process and keeps
every frame in both directions; the test then looks for the client's tokens in all of them.
"""

from __future__ import annotations

import asyncio
import subprocess
import threading

import numpy as np
import pytest
from websockets.asyncio.client import connect
from websockets.asyncio.server import serve

from splitlm.demo import write_ledger_data
from splitlm.edge_client.data import Dataset
from splitlm.protocol import Forward, Limits, decode

from .conftest import ServerProcess, edge_cmd

STEPS = 6


class RecordingRelay:
    """ws://127.0.0.1:PORT -> upstream, recording (direction, frame) for every frame."""

    def __init__(self, upstream: str):
        self.upstream, self.frames, self.url = upstream, [], None
        self._ready, self._stop = threading.Event(), None
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)
        self._thread.start()
        assert self._ready.wait(30)

    async def _main(self):
        self._stop = asyncio.Event()
        async with serve(self._handler, "127.0.0.1", 0, max_size=None) as server:
            self.url = "ws://127.0.0.1:%d" % next(iter(server.sockets)).getsockname()[1]
            self._loop = asyncio.get_running_loop()
            self._ready.set()
            await self._stop.wait()

    async def _handler(self, client):
        async with connect(self.upstream, max_size=None) as up:
            async def pump(src, dst, direction):
                async for frame in src:
                    self.frames.append((direction, frame))
                    await dst.send(frame)
                await dst.close()
            await asyncio.gather(pump(client, up, "up"), pump(up, client, "down"), return_exceptions=True)

    def close(self):
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)


@pytest.fixture(scope="module")
def recorded(tiny_llama, tiny_bundle, tmp_path_factory):
    bundle = tiny_bundle("device")
    bundle_dir = bundle.path
    data = tmp_path_factory.mktemp("data")
    write_ledger_data(data, clients=1, per_client=12, held_out=1)
    server = ServerProcess(str(tiny_llama), "--cut", "2", "--labels", "device", "--lora-rank", "4",
                           "--wire", "f32", "--steps-per-round", "3")
    relay = RecordingRelay(server.url)
    try:
        r = subprocess.run(edge_cmd(relay.url, bundle_dir, data / "client-0.jsonl", "--steps", str(STEPS),
                                    "--batch-size", "2", "--seq-len", "32"), capture_output=True, text=True,
                           timeout=300)
        assert r.returncode == 0, r.stdout + r.stderr
    finally:
        relay.close()
        server.stop()
    dataset = Dataset.from_file(data / "client-0.jsonl", bundle, seq_len=32, batch_size=2, seed=0)
    return relay.frames, [dataset.batch(s) for s in range(STEPS)]


def test_every_step_crossed_the_wire(recorded):
    frames, _ = recorded
    kinds = [decode(f, limits=Limits())[1].kind for _, f in frames]
    for kind in ("forward", "hidden", "tail_grad", "backward"):
        assert kinds.count(kind) == STEPS, kinds
    assert kinds.count("adapter") == STEPS // 3


def test_no_forward_carries_labels(recorded):
    frames, _ = recorded
    forwards = [m for _, m in (decode(f, limits=Limits()) for _, f in frames) if isinstance(m, Forward)]
    assert forwards and all(m.labels is None for m in forwards)


@pytest.mark.parametrize("dtype", [np.int64, np.int32, np.int16])
def test_no_token_id_sequence_appears_in_any_frame(recorded, dtype):
    """Every run of 4 consecutive token ids, in any common integer width, is absent from every frame."""
    frames, batches = recorded
    blob = b"".join(f for _, f in frames)
    searched = 0
    for batch in batches:
        for row, mask in zip(batch.input_ids, batch.attention_mask):
            ids = row[mask.astype(bool)].astype(dtype)
            for i in range(0, len(ids) - 4, 4):
                assert ids[i:i + 4].tobytes() not in blob
                searched += 1
    assert searched > 20
