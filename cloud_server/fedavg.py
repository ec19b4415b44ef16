"""FedLLM: every device trains the whole model (its LoRA or every decoder weight) for R local
steps, uploads the delta, and the server applies the sample-weighted mean delta.

A round on the wire:
    server -> device   welcome{global_chunks = n}, then n x global{delta=false}: the global values
    device             R local steps from those values (the device's own numpy AdamW)
    device -> server   update{round, chunk i of n, tensors: local - global}  (whole tensors per chunk)
    server             mean delta (sample-weighted) -> through the update codec -> global += it
    server -> device   global{round + 1, delta=true} chunks to each reporter; bye after the last round

The server applies to its own global exactly the delta the devices decode (it runs the same codec
on it), so with a lossy update codec the two copies stay bit-identical. An update for an old round
(a straggler, or a device that joined mid-round) is answered with the current global values.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from splitlm.errors import BadMessage
from splitlm.protocol import Bye, Global, Hello, Limits, Update, Welcome, decode_tensor, encode_tensor

from .aggregate import apply_delta, chunk_names
from .global_model import GlobalModel
from .strategy import Conn, Rounds, ServeConfig, Strategy, refuse_mismatch
from .writer import RoundWriter


@dataclass
class PartialUpdate:
    """The chunks of one device's update that have arrived so far."""
    round: int
    chunks: int
    n_samples: int
    received: set[int] = field(default_factory=set)
    tensors: dict[str, np.ndarray] = field(default_factory=dict)


def accept_chunk(partial: PartialUpdate, msg: Update, shapes: dict[str, tuple]) -> None:
    """Add `msg`'s tensors to `partial`, or raise BadMessage saying what is wrong with the chunk."""
    if msg.chunks != partial.chunks:
        raise BadMessage(f"update.chunks: expected {partial.chunks} (as chunk {min(partial.received)} said), got {msg.chunks}")
    if msg.chunk in partial.received:
        raise BadMessage(f"update.chunk: chunk {msg.chunk} of round {msg.round} arrived twice")
    for name, t in msg.tensors.items():
        if name not in shapes:
            raise BadMessage(f"update.tensors: {name!r} is not a trainable tensor of this model")
        if tuple(t.shape) != shapes[name]:
            raise BadMessage(f"update.tensors[{name!r}]: expected shape {shapes[name]}, got {tuple(t.shape)}")
        if name in partial.tensors:
            raise BadMessage(f"update.tensors[{name!r}]: sent twice in round {msg.round}")
    partial.received.add(msg.chunk)
    partial.tensors.update({n: np.array(t, np.float32) for n, t in msg.tensors.items()})


class FedAvgStrategy(Strategy):
    mode = "fedavg"

    def __init__(self, model: GlobalModel, cfg: ServeConfig, *, eval_data: Path | None = None, log=print):
        super().__init__(cfg, log=log)
        self.model = model
        self.shapes = model.shapes()
        self.values = model.trainables()            # the global trainables, as every device holds them
        self.chunks = chunk_names(self.shapes, max_bytes=cfg.max_chunk_bytes)
        largest = max(int(np.prod(s)) * 4 for s in self.shapes.values())
        self.limits = Limits(max_frame_bytes=max(cfg.max_chunk_bytes, largest) + (1 << 20))
        self.partial: dict[str, PartialUpdate] = {}
        self.rounds = Rounds(deadline_s=cfg.round_deadline_s, close=self._close_round, min_reports=cfg.min_clients,
                             log=log)
        self.writer = RoundWriter(cfg.out)
        self.eval_batches = model.eval_batches(eval_data) if eval_data is not None else None
        self._bytes_at_round_start: dict[str, tuple[int, int]] = {}

    @property
    def round(self) -> int:
        return self.rounds.number

    def describe(self) -> str:
        return (f"model {self.model.path.name}, {self.mode} ({self.model.cfg.train}), {len(self.shapes)} tensors "
                f"in {len(self.chunks)} chunks, {self.cfg.steps_per_round} local steps a round, "
                f"update wire {self.cfg.update_codec}")

    # ------------------------------------------------------------------ joining

    def check_hello(self, hello: Hello) -> None:
        super().check_hello(hello)
        want = self.model.hello_fields()
        got = {"model_hash": hello.model_hash, "cut": hello.cut, "train": hello.train, "lora_rank": hello.lora_rank,
               "lora_alpha": float(hello.lora_alpha), "lora_targets": tuple(hello.lora_targets)}
        refuse_mismatch(want, got)
        if self.cfg.rounds and self.round >= self.cfg.rounds:
            raise BadMessage(f"this server has finished its {self.cfg.rounds} rounds")

    async def join(self, conn: Conn, hello: Hello) -> list:
        self.conns[conn.client_id] = conn
        self.log(f"client {conn.client_id} joined ({hello.n_samples} samples), round {self.round}")
        welcome = Welcome(session_id=conn.session_id, codec=self.cfg.codec, steps_per_round=self.cfg.steps_per_round,
                          round=self.round, step=0, max_frame_bytes=self.limits.max_frame_bytes, head_adapter={},
                          mode=self.mode, update_codec=self.cfg.update_codec, rounds=self.cfg.rounds,
                          topk=self.cfg.topk, global_chunks=len(self.chunks))
        return [welcome, *self.global_frames(self.values, delta=False)]

    def global_frames(self, tensors: dict[str, np.ndarray], *, delta: bool) -> list[Global]:
        return [Global(round=self.round, chunk=i, chunks=len(self.chunks), tensors={n: tensors[n] for n in names},
                       delta=delta) for i, names in enumerate(self.chunks)]

    # ------------------------------------------------------------------ updates

    async def handle(self, conn: Conn, msg) -> list:
        if not isinstance(msg, Update):
            raise BadMessage(f"unexpected {msg.kind!r} in fedavg: expected update or bye")
        if msg.round != self.round:
            self.log(f"client {conn.client_id}: update for round {msg.round}, the server is at {self.round}: "
                     "sending it the current global")
            self.partial.pop(conn.client_id, None)
            return self.global_frames(self.values, delta=False) if msg.chunk == 0 else []
        if msg.n_samples <= 0:
            raise BadMessage(f"update.n_samples: expected > 0 (the averaging weight), got {msg.n_samples}")
        partial = self.partial.get(conn.client_id)
        if partial is None or partial.round != msg.round:
            partial = self.partial[conn.client_id] = PartialUpdate(msg.round, msg.chunks, msg.n_samples)
        try:
            accept_chunk(partial, msg, self.shapes)
        except BadMessage:
            self.partial.pop(conn.client_id, None)  # the whole update is void; the device must send it again
            raise
        if len(partial.received) < partial.chunks:
            return []
        del self.partial[conn.client_id]
        missing = self.shapes.keys() - partial.tensors.keys()
        if missing:
            raise BadMessage(f"update: all {partial.chunks} chunks arrived without {len(missing)} tensors, "
                             f"e.g. {sorted(missing)[0]!r}")
        self.board.reported(conn)
        await self.rounds.report(conn.client_id, (partial.tensors, partial.n_samples, conn), set(self.conns))
        return []

    async def _close_round(self, reports: dict) -> None:
        finished = self.round - 1
        mean, updates = self.combine(finished, {cid: (t, n) for cid, (t, n, _) in reports.items()})
        delta = {n: self.through_codec(d) for n, d in mean.items()}   # what the devices will decode
        self.values = apply_delta(self.values, delta)
        loss, snapshot = await asyncio.get_running_loop().run_in_executor(None, self._apply_and_eval)
        metrics = self.round_metrics(finished, reports, eval_loss=loss) | {"updates": updates,
                                                                           "refused": self.take_refusals()}
        self.board.round_closed(metrics)
        self.writer.write(finished, lambda folder: self.model.save(folder, snapshot), metrics)
        self.log(f"round {finished} closed: {len(reports)} clients, {metrics['samples']} samples"
                 + (f", held-out loss {loss:.4f}" if loss is not None else ""))
        for cid in reports:
            conn = self.conns.get(cid)
            if conn is not None:
                for frame in self.global_frames(delta, delta=True):
                    await conn.send(frame)
        await self.finish_if_done()

    def _apply_and_eval(self) -> tuple[float | None, dict]:
        """Off the event loop: the new global into the model, its held-out loss, a snapshot to write."""
        self.model.set_trainables(self.values)
        loss = self.model.mean_loss(self.eval_batches) if self.eval_batches else None
        return loss, self.model.snapshot()

    def through_codec(self, x: np.ndarray) -> np.ndarray:
        return np.array(decode_tensor(encode_tensor(np.ascontiguousarray(x, np.float32), codec=self.cfg.update_codec,
                                                    where="global"), where="global"), np.float32)

    def round_metrics(self, round_: int, reports: dict, *, eval_loss: float | None) -> dict:
        clients = {}
        for cid, (_, n, conn) in reports.items():
            before = self._bytes_at_round_start.get(cid, (0, 0))
            clients[cid] = {"n_samples": n, "bytes_up": conn.bytes_in - before[0], "bytes_down": conn.bytes_out - before[1]}
            self._bytes_at_round_start[cid] = (conn.bytes_in, conn.bytes_out)
        return {"round": round_, "mode": self.mode, "train": self.model.cfg.train, "time": time.time(),
                "samples": int(sum(n for _, n, _ in reports.values())), "clients": clients, "eval_loss": eval_loss,
                "bytes_up": sum(c["bytes_up"] for c in clients.values()),
                "bytes_down": sum(c["bytes_down"] for c in clients.values())}

    async def finish_if_done(self) -> None:
        if self.cfg.rounds and self.round >= self.cfg.rounds:
            for conn in list(self.conns.values()):
                await conn.send(Bye(reason=f"finished: {self.cfg.rounds} rounds"))
            self.finished.set()

    # ------------------------------------------------------------------ leaving

    async def leave(self, conn: Conn) -> None:
        if self.conns.get(conn.client_id) is not conn:
            return
        del self.conns[conn.client_id]
        self.partial.pop(conn.client_id, None)  # a half-sent update is void
        self.log(f"client {conn.client_id} left")
        if not conn.said_bye and not self.finished.is_set():
            self.rounds.awaited.add(conn.client_id)
        if not self.finished.is_set():
            await self.rounds.maybe_close(set(self.conns))

    def begin_stop(self) -> None:
        self.finished.set()
        self.rounds.cancel_deadline()

    async def stop(self) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self.writer.drain)
        self.log(f"stopped at round {self.round}")
