"""Body replicas past one machine on torch.distributed (gloo on CPUs, NCCL on GPUs).

`splitlm serve --replicas N --replica-rank R --dist-url tcp://HOST:PORT` starts replica R of N; each
is a whole split server (its own port, its own devices) and they keep ONE body adapter. A device
given every replica's URL (`splitlm edge URL1,URL2,...`) picks one by a stable hash of its client
id and fails over to the next when that one stops answering.

How the body stays one: gradients all-reduced at every step, in lockstep (DDP's semantics), not
adapters averaged at round ends. Why: a replicated run then IS the one-machine server with
`--batch-optimizer per-batch` over all the devices (same gradient, same AdamW state, same update,
up to float summation order), so nothing a device sees depends on which replica it landed on, and
that is testable exactly. Averaging adapters each round would let replicas drift for R steps,
average AdamW's moments in no principled way and equal a single server only in special cases; it
tolerates uneven load better, which lockstep pays for with a tick (below).

The tick (`Lockstep`, one asyncio task per replica; every collective runs on the body's worker
thread, never on the event loop). Each tick every replica proposes what it has (`Proposal`: steps
waiting, devices connected, whether its oldest step has waited `--batch-wait-ms`, its round's
reports) and one all-reduce sums the proposals; `decide` turns the sum into the same two yes/no on
every replica:

- step: when every connected device of every replica has a step waiting (at least
  `--min-clients`), or the oldest waited the bound, or `--batch-max-devices` are in. Then each
  replica runs its waiting steps as one body batch (possibly none), sums its devices' gradients,
  and a second all-reduce adds them and the device counts; each divides by the total count and
  makes the identical AdamW step. A replica with nothing waiting contributes a zero gradient with
  zero weight.
- round close: when every replica with devices has all its reports (at least `--min-clients` in
  all), or any replica's round deadline passed. A third all-reduce makes the sample-weighted FedAvg
  of the head adapters over all replicas' reports; every replica closes the round with it.

Nothing waits on a collective except the body thread, so pings and frames keep flowing.

When a replica dies its peers' next collective fails (gloo sees the closed connection in
milliseconds; a hung peer takes `--dist-timeout`). A survivor then goes on ALONE (`ReplicaGroup`
degrades to a group of one: the step in flight uses its own devices' gradient; it never rejoins),
its devices notice nothing, and the dead replica's devices reconnect to the next replica in their
list with their step (hello.resume_step): a replica that has not seen a client takes it at that
step (`SplitStrategy.join`), since the body already holds every step the client got a backward for
(a backward is sent only after its all-reduce). With more than two replicas, one death splits the
rest into lone servers (no regrouping: torch.distributed's elastic rendezvous is not used).

Not supported with replicas (refused at start): U-shape steps (`--labels device`), `--full`,
`--batch-optimizer per-device`, robust aggregation (`--aggregate`, `--clip-norm`: medians do not
sum across replicas), `--resume`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import astuple, dataclass, fields
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist

from .strategy import Rounds


@dataclass(frozen=True)
class ReplicaConfig:
    world: int = 1                     # --replicas: 1 is a plain server
    rank: int = 0                      # --replica-rank, 0..world-1
    dist_url: str = "tcp://127.0.0.1:29500"  # rank 0 listens there for the others (torch.distributed init_method)
    timeout_s: float = 60.0            # a collective a peer never joins fails after this long
    poll_s: float = 0.005              # a replica with nothing new joins the next tick after this long (idle: up to 10x)


def check_replicable(*, body_cfg, cfg, batching) -> None:
    """Refuse what replicas do not support (module docstring), saying what to use instead."""
    wrong = []
    if body_cfg.labels != "server":
        wrong.append("--labels device (a U-shape step holds one replica's body between two frames)")
    if body_cfg.full:
        wrong.append("--full (only LoRA bodies)")
    if batching.optimizer != "per-batch":
        wrong.append(f"--batch-optimizer {batching.optimizer} (replicas make one AdamW step on the mean over all "
                     "devices: per-batch)")
    if cfg.aggregate != "mean" or cfg.clip_norm is not None:
        wrong.append("--aggregate/--clip-norm (the head average is summed across replicas; medians do not sum)")
    if wrong:
        raise ValueError("--replicas does not support " + "; ".join(wrong))


class ReplicaGroup:
    """The process group, or after a peer's death a group of one. Blocking calls: the body thread's."""

    def __init__(self, cfg: ReplicaConfig, *, device: torch.device, log=print):
        self.cfg, self.device, self.log = cfg, device, log
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, init_method=cfg.dist_url, rank=cfg.rank, world_size=cfg.world,
                                timeout=timedelta(seconds=cfg.timeout_s))
        self.alive = True

    @property
    def world(self) -> int:
        return self.cfg.world if self.alive else 1

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        """The sum of every replica's `values` (same shape everywhere); alone: `values` itself."""
        if not self.alive:
            return values
        out = values.to(self.device, copy=True)
        try:
            dist.all_reduce(out)
        except (RuntimeError, dist.DistError) as e:  # a peer died or hung: go on alone, from our own values
            self.alive = False
            self.log(f"replica {self.cfg.rank}: lost the replica group ({type(e).__name__}: {str(e)[:160]}); "
                     "going on alone, devices of other replicas reconnect here")
            return values
        return out.to(values.device)

    def sum_tensors(self, tensors: list[torch.Tensor], weight: float) -> tuple[list[torch.Tensor], float]:
        """Every replica's `tensors` and `weight`, summed (one all-reduce of one flat buffer)."""
        flat = torch.cat([t.reshape(-1) for t in tensors] + [torch.tensor([weight], dtype=tensors[0].dtype,
                                                                          device=tensors[0].device)])
        total = self.sum(flat)
        out, at = [], 0
        for t in tensors:
            out.append(total[at:at + t.numel()].view_as(t))
            at += t.numel()
        return out, float(total[at])

    def broadcast(self, tensors: list[torch.Tensor]) -> None:
        """Replica 0's values into every replica's `tensors` (the body's start: one init for all)."""
        for t in tensors:
            buf = t.detach().to(self.device, copy=True)
            dist.broadcast(buf, src=0)
            with torch.no_grad():
                t.copy_(buf)


# ---------------------------------------------------------------- one tick's decision (pure)

@dataclass(frozen=True)
class Proposal:
    """One replica's view at a tick; added field by field over the replicas."""
    pending: int = 0     # steps waiting here (at most --batch-max-devices)
    connected: int = 0   # devices connected here
    overdue: int = 0     # 1: the oldest step waiting here has waited the batching bound
    reports: int = 0     # head adapters reported here in the open round
    stake: int = 0       # 1: this replica has devices in the open round (connected, awaited or reported)
    ready: int = 0       # 1: every device with a stake here has reported
    deadline: int = 0    # 1: the open round's deadline passed here

    def vector(self) -> torch.Tensor:
        return torch.tensor(astuple(self), dtype=torch.float64)

    @classmethod
    def of(cls, vector: torch.Tensor) -> Proposal:
        return cls(*(round(float(v)) for v in vector[:len(fields(cls))]))


def decide(total: Proposal, *, min_clients: int, max_devices: int) -> tuple[bool, bool]:
    """(run a step, close the round), from the replicas' summed proposals; the same on every replica."""
    step = total.pending > 0 and (total.pending >= max(total.connected, min_clients, 1) or total.overdue > 0
                                  or total.pending >= max_devices)
    close = total.reports > 0 and (total.deadline > 0 or (total.ready == total.stake
                                                          and total.reports >= max(min_clients, 1)))
    return step, close


# ---------------------------------------------------------------- rounds closed by the tick

class SyncedRounds(Rounds):
    """Rounds that never close on their own: a complete round or a passed deadline is proposed at the
    next tick, and the tick closes it on every replica at once (with the head averaged over all)."""

    def __init__(self, *, wake: Callable[[], None], **kw):
        super().__init__(**kw)
        self.wake, self.overdue = wake, False

    async def maybe_close(self, connected: set[str]) -> None:
        self.wake()

    async def _close_at_deadline(self, number: int) -> None:
        await asyncio.sleep(self._deadline_s)
        if self.number == number and self.reports:
            self.log(f"round {number}: deadline passed here with {len(self.reports)} reports")
            self.overdue = True
            self.wake()

    def proposal(self, connected: set[str]) -> dict:
        stake = bool(self.reports or connected or self.awaited)
        ready = bool(self.reports) and self.reports.keys() >= connected | self.awaited
        return {"reports": len(self.reports), "stake": int(stake), "ready": int(ready), "deadline": int(self.overdue)}

    async def close(self, **kw) -> None:
        self.overdue = False
        await super().close(**kw)


# ---------------------------------------------------------------- the tick

@dataclass
class _Waiting:
    arrived: float
    item: object
    future: asyncio.Future


class Lockstep:
    """In place of `StepQueue` on a replicated server: `submit(step)` -> that step's result, run at a
    tick every replica agrees on (module docstring). The strategy supplies the body work:

        run(fn, *args)         -> awaitable of fn(*args) on the body thread
        step(items, group)     -> per item (loss, dL/dh_K), after the synced optimizer step (body thread)
        head_sum(reports, group) -> the head adapter averaged over every replica's reports (body thread)
        close_round(head)      -> the strategy's round end with that head (event loop)
    """

    def __init__(self, group: ReplicaGroup, *, run: Callable[..., Awaitable], step: Callable, head_sum: Callable,
                 close_round: Callable[[dict], Awaitable[None]], rounds: SyncedRounds, lock: asyncio.Lock,
                 connected: Callable[[], set[str]], wait_s: float, max_devices: int, min_clients: int):
        self.group, self._run, self._step, self._head_sum, self._close_round = group, run, step, head_sum, close_round
        self.rounds, self._lock, self._connected = rounds, lock, connected
        self.wait_s, self.max_devices, self.min_clients = wait_s, max_devices, min_clients
        self._waiting: list[_Waiting] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self.ticks = 0
        self.batch_sizes: list[int] = []  # steps run here per synced step (0: a zero-weight contribution)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._loop())
            self._task.add_done_callback(self._ended)

    def _ended(self, task: asyncio.Task) -> None:
        """The tick never ends but by cancel (a clean stop); anything else would hang every device: say so."""
        if not task.cancelled() and task.exception() is not None:
            e = task.exception()
            self.group.log(f"replica {self.group.cfg.rank}: the tick failed ({type(e).__name__}: {e}); "
                           "no step will run here until this server restarts")
            for w in self._waiting:
                if not w.future.done():
                    w.future.set_exception(e)

    def wake(self) -> None:
        self._wake.set()

    async def submit(self, item):
        future = asyncio.get_running_loop().create_future()
        self._waiting.append(_Waiting(time.monotonic(), item, future))
        self.wake()
        return await future

    def _proposal(self, batch: list[_Waiting]) -> Proposal:
        connected = self._connected()
        overdue = bool(batch) and time.monotonic() - batch[0].arrived >= self.wait_s
        return Proposal(pending=len(batch), connected=len(connected), overdue=int(overdue),
                        **self.rounds.proposal(connected))

    async def _loop(self) -> None:
        poll = self.group.cfg.poll_s
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), poll)
            except asyncio.TimeoutError:
                pass
            self._wake.clear()
            batch = self._waiting[:self.max_devices]
            total = Proposal.of(await self._run(self.group.sum, self._proposal(batch).vector()))
            self.ticks += 1
            run_step, close = decide(total, min_clients=self.min_clients, max_devices=self.max_devices)
            idle = total.pending == 0 and total.reports == 0
            poll = min(poll * 2, 10 * self.group.cfg.poll_s) if idle else self.group.cfg.poll_s
            if run_step:
                del self._waiting[:len(batch)]
                await self._run_step(batch)
            if close:
                head = await self._run(self._head_sum, dict(self.rounds.reports), self.group)
                await self._close_round(head)

    async def _run_step(self, batch: list[_Waiting]) -> None:
        self.batch_sizes.append(len(batch))
        try:
            async with self._lock:
                results = await self._run(self._step, [w.item for w in batch], self.group)
        except Exception as e:
            for w in batch:
                if not w.future.done():
                    w.future.set_exception(e)
            return
        for w, result in zip(batch, results):
            if not w.future.done():
                w.future.set_result(result)

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()


def head_average(reports: dict[str, tuple[dict[str, np.ndarray], int]], names: list[str],
                 shapes: dict[str, tuple], group: ReplicaGroup) -> dict[str, np.ndarray]:
    """The sample-weighted mean of every replica's reported head adapters (FedAvg over all devices):
    each replica sums n_i * tensors_i of its own reports, one all-reduce adds the sums and the n_i."""
    sums = [torch.zeros(shapes[n], dtype=torch.float64) for n in names]
    weight = 0.0
    for tensors, n in reports.values():
        for s, name in zip(sums, names):
            s += n * torch.from_numpy(np.asarray(tensors[name], np.float64))
        weight += n
    sums, weight = group.sum_tensors(sums, weight)
    return {name: (s / weight).numpy().astype(np.float32) for name, s in zip(names, sums)}
