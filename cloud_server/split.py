"""Split learning (SplitFed): the server runs blocks K..N of every client's step; client LoRA is
averaged every R steps.

Body steps run on one worker thread, one at a time in arrival order, so pings and other clients
keep flowing while the body computes. With batching (`BatchConfig.wait_s` > 0) labels-at-server
steps from different clients that arrive within that bound run as one body batch (`step_queue`,
`batching`); U-shape steps stay one at a time. A U-shape step holds the body from `forward` to `tail_grad`
(no other step may move the weights in between); a client that vanishes or stalls mid-step loses
that step, releases the body, and nobody else is disturbed.

Replicas (`replicas`): with a `ReplicaGroup` the steps and round ends run at ticks every replica
agrees on (`replicas.Lockstep` in place of the step queue; `replicas.SyncedRounds` in place of
`Rounds`), gradients and the head average summed over replicas; a device new here that comes with
a step was another replica's and goes on at that step.

Rounds: after R steps each client sends `adapter`; the round closes when every connected client
(and each one whose link dropped, until it is back) has reported or the deadline passes; the
sample-weighted mean goes back to the reporters as `adapter_global`, and the round's results are
written under `out` by the round writer.

Restarts (see `state`): with `save_state` the whole state goes to OUT/server-state.safetensors at
every round end and on a clean shutdown, and `restore` continues from it. Progress is kept per
client_id, so a client that reconnects (hello.resume_step = the step it runs next) goes on where it
was: the same step, its lost backward re-sent, or back to the round end the server restarted from.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import numpy as np

from splitlm.errors import BadMessage
from splitlm.protocol import (Adapter, AdapterGlobal, Backward, Forward, Hello, Hidden, Limits, TailGrad, Welcome)

from .aggregate import apply_delta, subtract
from .batching import StepInput
from .body import Body, PendingStep
from .replicas import Lockstep, ReplicaGroup, SyncedRounds, check_replicable, head_average
from .state import (STATE_FILE, Progress, Resume, ServerState, StateError, describe_resume, save_state,
                    server_resume)
from .step_queue import BatchConfig, StepQueue
from .strategy import Conn, Rounds, ServeConfig, Strategy
from .writer import RoundWriter


def frame_limit(cfg: ServeConfig, hidden_size: int) -> int:
    """Largest valid frame: an f32 (B, T, H) tensor plus int64 mask and labels, plus headers."""
    b, t = cfg.max_batch, cfg.max_seq_len
    return b * t * hidden_size * 4 + 2 * b * t * 8 + 64 * 1024


class SplitStrategy(Strategy):
    mode = "split"

    def __init__(self, body: Body, cfg: ServeConfig, *, batching: BatchConfig = BatchConfig(),
                 replicas: ReplicaGroup | None = None, log=print):
        super().__init__(cfg, log=log)
        if batching.wait_s > 0 and batching.optimizer == "per-device" and body.cfg.full:
            raise ValueError("per-device batching recovers LoRA gradients per device; with --full use per-batch")
        if replicas is not None:
            check_replicable(body_cfg=body.cfg, cfg=cfg, batching=batching)
        self.body = body
        self.limits = Limits(max_frame_bytes=max(frame_limit(cfg, body.hidden_size), cfg.max_chunk_bytes + (1 << 20)),
                             hidden_size=body.hidden_size, max_batch=cfg.max_batch, max_seq_len=cfg.max_seq_len)
        self.progress: dict[str, Progress] = {}                  # by client_id
        self.pending: dict[str, tuple[int, PendingStep]] = {}    # by client_id: a U-shape step in flight
        self.global_step = 0
        self.global_head: dict[str, np.ndarray] = {}
        self.rounds = Rounds(deadline_s=cfg.round_deadline_s, close=self._close_round, min_reports=cfg.min_clients,
                             log=log)
        self.writer = RoundWriter(cfg.out)
        self._initial_head = body.lora_tensors(head=True)
        self._head_shapes = {n: v.shape for n, v in self._initial_head.items()}
        if cfg.clip_norm is not None or cfg.aggregate != "mean":
            self.global_head = dict(self._initial_head)  # the reference updates are measured from, sent in the welcome
        self._body_lock = asyncio.Lock()
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="body")
        self.batching = batching
        self.steps = (StepQueue(self._body_batch, lock=self._body_lock, cfg=batching,
                                 expected=lambda: max(len(self.conns), cfg.min_clients))
                      if batching.wait_s > 0 and body.cfg.labels == "server" else None)
        self.replicas = replicas
        if replicas is not None:
            self._replicate(replicas)
        self.stopping = False

    def _replicate(self, group: ReplicaGroup) -> None:
        """Steps and round ends at ticks every replica agrees on (see `replicas`), from replica 0's body init."""
        group.broadcast(self.body.optimizer.param_groups[0]["params"])
        names = sorted(self._head_shapes)
        self.rounds = SyncedRounds(wake=lambda: self.steps.wake(), deadline_s=self.cfg.round_deadline_s,
                                   close=self._close_round, min_reports=self.cfg.min_clients, log=self.log)
        self.steps = Lockstep(group, run=self._run, rounds=self.rounds, lock=self._body_lock,
                              connected=lambda: set(self.conns),
                              step=lambda items, g: self.body.step_batch(items, per_device=False, reduce=g.sum_tensors),
                              head_sum=lambda reports, g: head_average(reports, names, self._head_shapes, g),
                              close_round=lambda head: self.rounds.close(head=head), wait_s=self.batching.wait_s,
                              max_devices=self.batching.max_devices, min_clients=self.cfg.min_clients)

    @property
    def round(self) -> int:
        return self.rounds.number

    async def _run(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._worker, fn, *args)

    def recv_timeout(self, conn: Conn) -> float | None:
        """A U-shape step in flight waits this long for the client's tail_grad (it holds the body)."""
        conn.busy = conn.client_id in self.pending
        return self.cfg.step_timeout_s if conn.busy else super().recv_timeout(conn)

    def describe(self) -> str:
        b = self.body.cfg
        body = f"body on {self.body.device}" + ("" if b.quant == "none" else f" in {b.quant}")
        batches = (f", batches of up to {self.batching.max_devices} devices within {self.batching.wait_s * 1000:g} ms "
                   f"({self.batching.optimizer} optimizer steps)" if self.steps is not None else "")
        if self.replicas is not None:
            r = self.replicas.cfg
            batches = (f", replica {r.rank} of {r.world} ({r.dist_url}): gradients all-reduced each step, batches "
                       f"of all replicas' devices within {self.batching.wait_s * 1000:g} ms")
        return (f"model {self.body.path.name}, split at {b.cut}, labels at the {b.labels}, wire {self.cfg.codec}, "
                f"{body}{batches}")

    # ------------------------------------------------------------------ joining

    def check_hello(self, hello: Hello) -> None:
        super().check_hello(hello)
        self.body.check_hello(hello)

    async def join(self, conn: Conn, hello: Hello) -> list:
        progress = (self.progress.get(hello.client_id) if hello.resume_step is not None else None) or self._newcomer(hello)
        last = progress.last_backward
        try:
            plan = server_resume(server_next=progress.step, client_next=hello.resume_step,
                                 cached_step=None if last is None else last.step)
        except StateError as e:
            raise BadMessage(str(e)) from e
        self.progress[hello.client_id] = progress
        self.conns[conn.client_id] = conn
        self.log(f"client {conn.client_id} joined ({hello.n_samples} samples), round {self.round}; "
                 + describe_resume(plan, server_next=progress.step, client_next=hello.resume_step))
        welcome = Welcome(session_id=conn.session_id, codec=self.cfg.codec, steps_per_round=self.cfg.steps_per_round,
                          round=self.round, step=progress.step, max_frame_bytes=self.limits.max_frame_bytes,
                          head_adapter=self.global_head, mode=self.mode, update_codec=self.cfg.update_codec,
                          rounds=self.cfg.rounds)
        return [welcome, last] if plan is Resume.RESEND else [welcome]

    def _newcomer(self, hello: Hello) -> Progress:
        """A client this server has no progress for. A replica takes one that comes with a step from
        another replica at that step: the synced body already holds every step it got a backward for."""
        if self.replicas is None or hello.resume_step is None:
            return Progress()
        self.log(f"client {hello.client_id}: taken over from another replica at its step {hello.resume_step}")
        return Progress(step=hello.resume_step)

    # ------------------------------------------------------------------ training steps

    async def handle(self, conn: Conn, msg) -> list:
        handler = {Forward: self.on_forward, TailGrad: self.on_tail_grad, Adapter: self.on_adapter}.get(type(msg))
        if handler is None:
            raise BadMessage(f"unexpected {msg.kind!r} during split training: expected forward, tail_grad, adapter or bye")
        return await handler(conn, msg)

    async def on_forward(self, conn: Conn, msg: Forward) -> list:
        progress = self.progress[conn.client_id]
        if msg.step != progress.step or conn.client_id in self.pending:
            raise BadMessage(f"forward.step: expected {progress.step}, got {msg.step}")
        wants_labels = self.body.cfg.labels == "server"
        if wants_labels != (msg.labels is not None):
            where = "at the server: forward must carry them" if wants_labels else "on the device: forward must not carry them"
            raise BadMessage(f"forward.labels: this server keeps labels {where}")
        if not wants_labels:
            await self._body_lock.acquire()  # released by tail_grad, or when the client goes
            try:
                h_n, pending = await self._run(self.body.forward_u, msg.hidden, msg.attention_mask)
            except BaseException:
                self._body_lock.release()
                raise
            self.pending[conn.client_id] = (msg.step, pending)
            return [Hidden(step=msg.step, hidden=h_n)]
        if self.steps is not None:
            loss, grad = await self.steps.submit(StepInput(msg.hidden, msg.attention_mask, msg.labels))
        else:
            async with self._body_lock:
                loss, grad = await self._run(self.body.step, msg.hidden, msg.attention_mask, msg.labels)
        return [self._finish_step(conn, loss, grad)]

    async def _body_batch(self, steps: list[StepInput]) -> list[tuple[float, np.ndarray]]:
        """Under the body lock: one device alone is the plain step, several are one body batch."""
        if len(steps) == 1:
            s = steps[0]
            return [await self._run(self.body.step, s.hidden, s.mask, s.labels)]
        per_device = self.batching.optimizer == "per-device"
        return await self._run(partial(self.body.step_batch, steps, per_device=per_device))

    async def on_tail_grad(self, conn: Conn, msg: TailGrad) -> list:
        step, pending = self.pending.get(conn.client_id, (None, None))
        if step != msg.step:
            raise BadMessage(f"tail_grad.step: no pending step {msg.step}")
        expected = tuple(pending.h_n.shape)
        if msg.grad.shape != expected:
            raise BadMessage(f"tail_grad.grad: expected shape {expected}, got {msg.grad.shape}")
        try:
            grad = await self._run(self.body.backward_u, pending, msg.grad)
        finally:
            self._release(conn.client_id)
        return [self._finish_step(conn, msg.loss, grad)]

    def _release(self, client_id: str) -> None:
        if self.pending.pop(client_id, None) is not None:
            self._body_lock.release()

    def _finish_step(self, conn: Conn, loss: float, grad: np.ndarray) -> Backward:
        progress = self.progress[conn.client_id]
        step = progress.step
        progress.step += 1
        progress.losses.append(loss)
        progress.last_backward = Backward(step=step, grad=grad, loss=loss)  # re-sent if it gets lost
        self.global_step += 1
        self.board.step(conn, step, loss)
        self.log(f"step {self.global_step:5d}  client {conn.client_id}  step {step:4d}  loss {loss:.4f}")
        return progress.last_backward

    # ------------------------------------------------------------------ rounds

    async def on_adapter(self, conn: Conn, msg: Adapter) -> list:
        if conn.client_id in self.pending:
            raise BadMessage(f"adapter: expected tail_grad for step {self.pending[conn.client_id][0]} first")
        shapes = {n: t.shape for n, t in msg.tensors.items()}
        if shapes != self._head_shapes:
            raise BadMessage(f"adapter.tensors: expected {self._head_shapes}, got {shapes}")
        if msg.n_samples <= 0:
            raise BadMessage(f"adapter.n_samples: expected > 0 (the averaging weight), got {msg.n_samples}")
        if msg.round != self.round:  # late for a closed round: hand it the current average
            return [AdapterGlobal(round=self.round, tensors=self.global_head)]
        report = ({n: np.array(t) for n, t in msg.tensors.items()}, msg.n_samples)
        await self.rounds.report(conn.client_id, report, set(self.conns))
        return []

    async def _close_round(self, reports: dict, *, head: dict[str, np.ndarray] | None = None) -> None:
        """`head`: the new global head when it was averaged elsewhere (over every replica's reports)."""
        finished = self.round - 1
        self.global_head, updates = (head, {}) if head is not None else self._combine_heads(finished, reports)
        metrics = self._round_metrics(finished, reports) | {"updates": updates, "refused": self.take_refusals()}
        self.board.round_closed(metrics)
        async with self._body_lock:  # no step in flight: body and counters in the state agree
            snapshot, body_state = await self._run(self._snapshot)
        state = self._state(body_state)
        self.writer.write(finished, lambda folder: self._fill_round(folder, snapshot), metrics)
        # the state is the durable round end: the reporters hear of the new round only once it is on disk
        await asyncio.wrap_future(self.writer.run(self._write_state, state))
        self.log(f"round {finished} closed: {len(reports)} clients, {metrics['samples']} samples, "
                 f"mean loss {metrics['mean_loss']:.4f}")
        for cid in reports:
            conn = self.conns.get(cid)
            if conn is not None:
                await conn.send(AdapterGlobal(round=self.round, tensors=self.global_head))
        if self.cfg.rounds and self.round >= self.cfg.rounds:
            self.finished.set()

    def _combine_heads(self, round_: int, reports: dict) -> tuple[dict[str, np.ndarray], dict]:
        """The new global head LoRA from the reported ones. Plain FedAvg averages the values; with a
        clip or a robust aggregator each report becomes an update from the round's global first."""
        if self.cfg.clip_norm is None and self.cfg.aggregate == "mean":
            return self.combine(round_, reports)
        ref = self.global_head or self._initial_head
        agg, info = self.combine(round_, {cid: (subtract(t, ref), n) for cid, (t, n) in reports.items()})
        return apply_delta(ref, agg), info

    def _snapshot(self):
        """On the body's thread: the averaged head goes into the model, then copies of what is written."""
        self.body.set_head_adapter(self.global_head)
        body_state = self.body.training_state() if self.cfg.save_state and self.cfg.out is not None else None
        return self.body.snapshot(), body_state

    def _fill_round(self, folder: Path, snapshot) -> None:
        self.body.save_snapshot(folder, snapshot)
        np.savez(folder / "head_adapter.npz", **snapshot.head)

    def _round_metrics(self, round_: int, reports: dict) -> dict:
        per_client = {}
        for cid in reports:
            progress = self.progress.get(cid)
            if progress is not None and progress.losses:
                recent = progress.losses[-self.cfg.steps_per_round:]
                per_client[cid] = {"steps": progress.step, "mean_loss": float(np.mean(recent))}
                progress.losses.clear()
        losses = [c["mean_loss"] for c in per_client.values()]
        return {"round": round_, "mode": self.mode, "global_step": self.global_step, "clients": per_client,
                "time": time.time(), "samples": int(sum(n for _, n in reports.values())),
                "mean_loss": float(np.mean(losses)) if losses else float("nan")}

    # ------------------------------------------------------------------ state (see `state`)

    @property
    def state_path(self) -> Path | None:
        return self.cfg.out / STATE_FILE if self.cfg.out is not None else None

    def state_config(self) -> dict:
        """What a saved state must have been saved with to be resumed here."""
        b = self.body.cfg
        return {"model_hash": self.body.model_hash, "cut": b.cut, "labels": b.labels, "lora_rank": b.lora_rank,
                "lora_alpha": float(b.lora_alpha), "lora_targets": list(self.body.targets), "full": b.full,
                "steps_per_round": self.cfg.steps_per_round}

    def _state(self, body_state) -> ServerState:
        """The counters, reports and adapters now, with the body's tensors taken on its thread."""
        progress = {cid: Progress(p.step, list(p.losses), p.last_backward) for cid, p in self.progress.items()}
        state = ServerState(config=self.state_config(), round=self.round, global_step=self.global_step,
                            global_head=dict(self.global_head), progress=progress, reports=dict(self.rounds.reports),
                            awaited=self.rounds.awaited | set(self.conns))
        state.body = body_state
        return state

    def _write_state(self, state: ServerState) -> None:
        if self.cfg.save_state and self.state_path is not None and state.body is not None:
            save_state(self.state_path, state)

    async def stop(self) -> None:
        """A clean shutdown: write the state once no body step is in flight, and wait for the writer."""
        if self.steps is not None:
            self.steps.close()
        async with self._body_lock:
            body_state = await self._run(
                lambda: self.body.training_state() if self.cfg.save_state and self.cfg.out is not None else None)
        self._write_state(self._state(body_state))
        await asyncio.get_running_loop().run_in_executor(None, self.writer.drain)
        self.log(f"stopped after {self.global_step} steps, round {self.round}")

    def begin_stop(self) -> None:
        """Before a clean shutdown drops everyone: those connected now are awaited by the saved round,
        and their leaving does not close it."""
        self.stopping = True
        self.rounds.awaited |= set(self.conns)
        self.rounds.cancel_deadline()

    def restore(self, state: ServerState) -> None:
        """Continue from `state` (loaded with `state.load_state(path, config=self.state_config())`)."""
        self.body.load_training_state(state.body)
        self.global_head = state.global_head
        if self.global_head:
            self.body.set_head_adapter(self.global_head)
        self.rounds.number, self.global_step = state.round, state.global_step
        self.progress, self.rounds.reports, self.rounds.awaited = state.progress, state.reports, state.awaited
        self.log(f"resumed: round {self.round}, {self.global_step} steps, clients "
                 + ", ".join(f"{cid} at step {p.step}" for cid, p in sorted(self.progress.items()))
                 + f"; {len(self.rounds.reports)} reported this round")

    def start(self) -> None:
        """Once listening: a restored round that already has reports closes at the deadline even if nobody returns;
        replicas start ticking."""
        self.rounds.start_deadline()
        if self.replicas is not None:
            self.steps.start()

    # ------------------------------------------------------------------ leaving

    async def leave(self, conn: Conn) -> None:
        if self.conns.get(conn.client_id) is not conn:
            return
        del self.conns[conn.client_id]
        self._release(conn.client_id)  # a step that never completed: the body was not touched
        stepped = self.progress[conn.client_id].step
        self.log(f"client {conn.client_id} left after {stepped} steps")
        # a lost link: it may be back before the deadline. One that never ran a step owes the round
        # nothing (else any device could stall every round to its deadline by joining and vanishing)
        if not conn.said_bye and not self.stopping and stepped > 0:
            self.rounds.awaited.add(conn.client_id)
        if not self.stopping:
            await self.rounds.maybe_close(set(self.conns))
