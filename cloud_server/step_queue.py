"""Collecting devices' body steps into batches: the first step waiting opens a batch, which closes
`wait_s` after that step arrived, or at once when `max_devices` steps are in it or every device
that could send one (`expected()`: the connected devices, at least `serve --min-clients`) has,
whichever comes first.

Steps that arrive while a batch runs wait in the queue and start the next one (they have already
waited, so it closes as soon as the body is free unless the bound has not passed). One consumer
task runs the batches one at a time, each under the body's lock (round ends and U-shape steps take
the same lock). A failed batch fails every step in it: each of those devices hears the error.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class BatchConfig:
    wait_s: float = 0.0               # 0: no batching, every step alone (the sequential server)
    max_devices: int = 8              # a batch closes at once when this many steps are waiting
    optimizer: str = "per-device"     # "per-device" or "per-batch" (see `batching`)


BATCH_OPTIMIZERS = ("per-device", "per-batch")


class StepQueue:
    def __init__(self, run_batch: Callable[[list], Awaitable[list]], *, lock: asyncio.Lock, cfg: BatchConfig,
                 expected: Callable[[], int] = lambda: 1 << 30):
        self._run_batch, self._lock, self.cfg, self._expected = run_batch, lock, cfg, expected
        self._queue: asyncio.Queue = asyncio.Queue()  # (arrival time, item, future)
        self._consumer: asyncio.Task | None = None
        self.batch_sizes: list[int] = []              # every batch run so far

    async def submit(self, item):
        """Run `item` in the next batch; returns its own result."""
        if self._consumer is None:
            self._consumer = asyncio.create_task(self._consume())
        future = asyncio.get_running_loop().create_future()
        await self._queue.put((time.monotonic(), item, future))
        return await future

    async def _consume(self) -> None:
        while True:
            batch = [await self._queue.get()]
            close_at = batch[0][0] + self.cfg.wait_s
            while len(batch) < min(self.cfg.max_devices, self._expected()):
                if not self._queue.empty():  # arrived while the last batch ran: no waiting
                    batch.append(self._queue.get_nowait())
                    continue
                left = close_at - time.monotonic()
                if left <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(self._queue.get(), left))
                except asyncio.TimeoutError:
                    break
            await self._run(batch)

    async def _run(self, batch: list) -> None:
        self.batch_sizes.append(len(batch))
        try:
            async with self._lock:
                results = await self._run_batch([item for _, item, _ in batch])
        except Exception as e:
            for _, _, future in batch:
                if not future.done():
                    future.set_exception(e)
            return
        for (_, _, future), result in zip(batch, results):
            if not future.done():
                future.set_result(result)

    def close(self) -> None:
        if self._consumer is not None:
            self._consumer.cancel()
