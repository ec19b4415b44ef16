"""How steps are collected into batches: the wait bound, closing early, and failures."""

from __future__ import annotations

import asyncio
import time

from splitlm.cloud_server.step_queue import BatchConfig, StepQueue


async def doubled(items: list) -> list:
    return [2 * x for x in items]


def run(coro):
    return asyncio.run(coro)


def test_steps_arriving_together_form_one_batch_without_waiting_the_bound():
    async def go():
        q = StepQueue(doubled, lock=asyncio.Lock(), cfg=BatchConfig(wait_s=5.0, max_devices=8), expected=lambda: 3)
        t = time.monotonic()
        results = await asyncio.gather(*(q.submit(x) for x in (1, 2, 3)))
        return results, q.batch_sizes, time.monotonic() - t
    results, sizes, took = run(go())
    assert results == [2, 4, 6] and sizes == [3]
    assert took < 2.5, "every expected device was in: the batch should not wait for the bound"


def test_a_batch_closes_at_the_bound_and_at_max_devices():
    async def go():
        q = StepQueue(doubled, lock=asyncio.Lock(), cfg=BatchConfig(wait_s=0.1, max_devices=2))
        first = asyncio.gather(q.submit(1), q.submit(2), q.submit(3))  # 2 + 1: max_devices splits them
        await first
        late = asyncio.create_task(q.submit(4))
        await asyncio.sleep(0.4)                                      # past the bound: 4 ran alone
        assert late.done()
        return q.batch_sizes
    assert run(go()) == [2, 1, 1]


def test_a_failed_batch_fails_each_of_its_steps_and_the_queue_goes_on():
    calls = []

    async def fails_once(items):
        calls.append(items)
        if len(calls) == 1:
            raise RuntimeError("body failed")
        return items

    async def go():
        q = StepQueue(fails_once, lock=asyncio.Lock(), cfg=BatchConfig(wait_s=0.05, max_devices=4), expected=lambda: 2)
        results = await asyncio.gather(q.submit("a"), q.submit("b"), return_exceptions=True)
        assert [str(r) for r in results] == ["body failed", "body failed"]
        return await q.submit("c")
    assert run(go()) == "c"


def test_batches_hold_the_body_lock():
    async def go():
        lock = asyncio.Lock()
        q = StepQueue(doubled, lock=lock, cfg=BatchConfig(wait_s=0.01), expected=lambda: 1)
        await lock.acquire()                      # e.g. a round end or a U-shape step holds the body
        step = asyncio.create_task(q.submit(1))
        await asyncio.sleep(0.1)
        assert not step.done()
        lock.release()
        return await step
    assert run(go()) == 2


def test_a_lone_step_waits_at_most_the_bound():
    wait_s = 0.05

    async def go():
        q = StepQueue(doubled, lock=asyncio.Lock(), cfg=BatchConfig(wait_s=wait_s, max_devices=8))
        t = time.monotonic()
        await q.submit(1)
        return time.monotonic() - t
    assert wait_s * 0.9 <= run(go()) < wait_s + 0.5
