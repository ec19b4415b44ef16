"""`splitlm edge` with a fedavg or distill bundle: the device trains the whole model locally.

fedavg, one round (R = welcome.steps_per_round):
    hold the global of round r -> R local steps (train.onnx + AdamW) -> update{r, delta chunks}
    -> global{r + 1, delta=True, chunks} (add it: now the global of r + 1) | bye
distill, one round:
    R local steps -> top-k of the public set (topk.onnx) -> logits{r, row chunks}
    -> logits{r, the aggregate's top-k log-probs, row chunks} -> R KD steps (kd_grad.onnx) | bye

At the start, welcome.global_chunks `global` frames (delta=False) carry the global values; 0 means
the bundle's initial trainables are the global. Parameters travel with welcome.update_codec, logits
with welcome.codec; every frame stays under welcome.max_frame_bytes. The optimizer's moments live
on across rounds (local AdamW state, as in FedAvg with a stateful client optimizer).

Every local and KD step is one meter record (`phase`: "local" or "kd", with its `round`), a
round's exchange with the server is one more (`phase`: "exchange": its bytes, wait and compute),
and each round adds one `phase: "round"` line (the totals of its records) to the metrics file;
the closing `bye` is a last record.

Local, top-k and KD steps run in a worker thread, so the connection keeps answering the server's
pings through a long round (a SmolLM2 distill round computes for minutes; on the event loop it
missed the server's 60 s ping timeout and was cut every round).

A dropped link is retried as in split (`client.Reconnects`): the new welcome names the open round
and (fedavg) carries the global again, so a round cut short is trained again from the global; an
update the server already had for that round is replaced by the new one.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import sys

import numpy as np
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

from splitlm.errors import BadMessage, BundleMismatch
from splitlm.manifest import Bundle
from splitlm.protocol import FLOAT_CODECS, Bye, Global, Hello, Limits, Logits, Update, Welcome
from splitlm.public import PublicSet

from .client import EdgeConfig, Reconnects, recv_metered, send_metered
from .data import Dataset
from .local import LocalTrainer
from .meter import Meter, rss_peak_mb

FRAME_HEADROOM = 0.9   # of max_frame_bytes: msgpack keys, names and tensor headers fit in the rest
TENSOR_OVERHEAD = 256  # bytes a tensor costs beyond its data (name, dtype, shape, codec, scale)
SUMMED = ("compute_s", "wait_s", "cpu_s", "wall_s", "bytes_up", "bytes_down")


# ---------------------------------------------------------------- chunking (pure)

def chunk_tensors(tensors: dict[str, np.ndarray], *, max_frame_bytes: int) -> list[dict[str, np.ndarray]]:
    """Whole tensors grouped, in order, into frames of at most ~max_frame_bytes (f32 sizes: an
    upper bound for every codec). A tensor too large for one frame is a ValueError."""
    budget = int(max_frame_bytes * FRAME_HEADROOM)
    chunks: list[dict[str, np.ndarray]] = [{}]
    used = 0
    for name, array in tensors.items():
        size = array.size * 4 + len(name) + TENSOR_OVERHEAD
        if size > budget:
            raise ValueError(f"tensor {name} {array.shape} needs {size} bytes, over the frame budget of "
                             f"{budget} (max_frame_bytes {max_frame_bytes}); whole tensors cannot be split")
        if used + size > budget and chunks[-1]:
            chunks.append({})
            used = 0
        chunks[-1][name] = array
        used += size
    return chunks


def row_chunks(n_rows: int, *, bytes_per_row: int, max_frame_bytes: int) -> list[tuple[int, int]]:
    """[start, stop) runs of rows, each under ~max_frame_bytes."""
    per = max(1, int(max_frame_bytes * FRAME_HEADROOM - TENSOR_OVERHEAD * 2) // bytes_per_row)
    return [(s, min(s + per, n_rows)) for s in range(0, n_rows, per)] or [(0, 0)]


def index_dtype(vocab_size: int) -> np.dtype:
    """Top-k indices in 2 bytes where the vocabulary fits, else 4."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.int32)


class Chunks:
    """Collects the frames 0..chunks-1 of one message; `complete` once each arrived exactly once."""

    def __init__(self, kind: str, round: int):
        self.kind, self.round = kind, round
        self.total: int | None = None
        self.parts: dict[int, object] = {}

    def add(self, msg) -> None:
        if msg.round != self.round:
            raise ProtocolViolation(f"{self.kind}.round: expected {self.round}, got {msg.round}")
        if self.total is None:
            self.total = msg.chunks
        if msg.chunks != self.total or msg.chunk in self.parts:
            raise ProtocolViolation(f"{self.kind} chunk {msg.chunk}/{msg.chunks}: expected one of the "
                                    f"{self.total} chunks not yet received ({sorted(self.parts)} arrived)")
        self.parts[msg.chunk] = msg

    @property
    def complete(self) -> bool:
        return self.total is not None and len(self.parts) == self.total

    def messages(self) -> list:
        return [self.parts[i] for i in range(self.total or 0)]


class ProtocolViolation(BadMessage):
    """A valid frame that this session's rules do not allow here (round, chunk, rows, delta)."""


# ---------------------------------------------------------------- the client

class FederatedClient:
    """One device's fedavg or distill session; `run()` returns the meter's summary."""

    def __init__(self, cfg: EdgeConfig):
        self.cfg = cfg
        self.bundle = Bundle.open(cfg.bundle)
        m = self.manifest = self.bundle.manifest
        self.data = Dataset.from_file(cfg.data, self.bundle, seq_len=min(cfg.seq_len, m.max_length),
                                      batch_size=cfg.batch_size, seed=cfg.seed)
        self.trainer = LocalTrainer(self.bundle, lr=cfg.lr, threads=cfg.threads)
        self.public = PublicSet.from_bundle(self.bundle) if m.mode == "distill" else None
        self.meter = Meter(metrics_out=cfg.metrics_out)
        self.limits = Limits()
        self.codecs = ("f32", "f32")  # (activations / logits, parameters), from the welcome
        self._seq = itertools.count()
        self.round = 0
        self.step = 0       # local steps run, over all rounds: batch(step) of the private data
        self.kd_step = 0    # KD steps run: batch kd_step of the public set
        self.rounds: list[dict] = []
        self._round_start = 0  # index into meter.records where the open round began

    # ------------------------------------------------------------------ wire

    async def _send(self, ws: ClientConnection, msg) -> None:
        await send_metered(ws, msg, seq=next(self._seq), codecs=self.codecs, meter=self.meter)

    async def _recv(self, ws: ClientConnection, *expected: type):
        return await recv_metered(ws, limits=self.limits, expected=expected, meter=self.meter)

    def hello(self) -> Hello:
        m = self.manifest
        return Hello(client_id=self.cfg.client_id, model_hash=m.model.hash, cut=m.cut, labels=m.labels,
                     lora_rank=m.lora.rank, lora_alpha=m.lora.alpha, lora_targets=m.lora.targets,
                     codecs=FLOAT_CODECS, n_samples=self.data.n_samples, resume_step=None, mode=m.mode,
                     train=m.train, public_hash=self.public.sha256 if self.public else None,
                     public_seq_len=m.public["seq_len"] if self.public else None)

    def check_welcome(self, welcome: Welcome) -> None:
        m = self.manifest
        if welcome.mode != m.mode:
            raise BundleMismatch(f"the server runs mode {welcome.mode!r}, this bundle is a {m.mode!r} bundle")
        if welcome.steps_per_round < 1:
            raise ProtocolViolation(f"welcome.steps_per_round: expected >= 1 local steps, got {welcome.steps_per_round}")
        if m.mode == "distill" and not 1 <= welcome.topk <= m.topk:
            raise BundleMismatch(f"welcome.topk: this bundle computes top-k for k in 1..{m.topk}, the server "
                                 f"asks for {welcome.topk}")

    async def _join(self, ws: ClientConnection) -> Welcome:
        await self._send(ws, self.hello())
        welcome = await self._recv(ws, Welcome)
        self.check_welcome(welcome)
        self.codecs = (welcome.codec, welcome.update_codec)
        self.limits = Limits(max_frame_bytes=welcome.max_frame_bytes)
        self.round = welcome.round
        if welcome.global_chunks:
            got = await self._receive_global(ws, await self._recv(ws, Global), delta=False)
            if got != welcome.global_chunks:
                raise ProtocolViolation(f"global: the welcome announced {welcome.global_chunks} chunks, got {got}")
        return welcome

    async def _receive_global(self, ws: ClientConnection, first: Global, *, delta: bool) -> int:
        """`first` and the rest of its chunks: adopt the values (delta False) or add them (True).
        Returns the number of chunks; afterwards the client holds the global of `first.round`."""
        parts, msg = Chunks("global", first.round), first
        new = dict(self.trainer.params)  # the trainer's own arrays: deltas are added in place
        while True:
            if msg.delta != delta:
                raise ProtocolViolation(f"global.delta: expected {delta}, got {msg.delta}")
            parts.add(msg)
            with self.meter.compute():
                for name, array in msg.tensors.items():
                    if name not in new or array.shape != new[name].shape:
                        raise BundleMismatch(f"global tensor {name} {array.shape}: not a trainable of this "
                                             "bundle with that shape")
                    if delta:
                        new[name] += array
                    else:
                        new[name] = np.array(array, np.float32)
            if parts.complete:
                break
            msg = await self._recv(ws, Global)
        self.trainer.set_params(new, copy=False)
        self.round = first.round
        return len(parts.parts)

    # ------------------------------------------------------------------ a round

    def local_steps(self, n: int) -> float:
        loss = float("nan")
        for _ in range(n):
            with self.meter.compute():
                loss = self.trainer.train_step(self.data.batch(self.step))  # (B, T) batch of private data
            self.step += 1
            self.meter.end_step(step=self.step - 1, loss=loss, round=self.round, phase="local")
        return loss

    async def fedavg_round(self, ws: ClientConnection, welcome: Welcome) -> bool:
        """One round; False when the server said bye instead of closing it."""
        # Memory: trainables + their copy at the round start + AdamW's two moments; the trained
        # values turn into the delta in place, and the round's start becomes the trainables again.
        start = {n: a.copy() for n, a in self.trainer.params.items()}
        await asyncio.to_thread(self.local_steps, welcome.steps_per_round)  # the link answers pings meanwhile
        with self.meter.compute():
            delta = self.trainer.params
            for n in delta:
                delta[n] -= start[n]  # local - global at the round start
        self.trainer.set_params(start, copy=False)  # the next global is this round's start + the mean delta
        chunks = chunk_tensors(delta, max_frame_bytes=welcome.max_frame_bytes)
        for i, tensors in enumerate(chunks):
            await self._send(ws, Update(round=self.round, chunk=i, chunks=len(chunks), tensors=tensors,
                                        n_samples=self.data.n_samples))
        first = await self._recv(ws, Global, Bye)
        if isinstance(first, Bye):
            for n in delta:
                start[n] += delta[n]  # keep what we trained
        else:
            # delta: after the round closed. Values: the server had moved on (we were late) and resends them.
            await self._receive_global(ws, first, delta=first.delta)
        self._end_exchange()
        return not isinstance(first, Bye)

    async def distill_round(self, ws: ClientConnection, welcome: Welcome) -> bool:
        await asyncio.to_thread(self.local_steps, welcome.steps_per_round)
        with self.meter.compute():
            indices, values = await asyncio.to_thread(self.public_topk, welcome.topk)  # (N, k) each
        await self._send_logits(ws, indices, values, welcome)
        first = await self._recv(ws, Logits, Bye)
        if isinstance(first, Bye):
            self._end_exchange()
            return False
        t_idx, t_lp = await self._receive_logits(ws, first)
        self._end_exchange()
        await asyncio.to_thread(self.kd_steps, welcome.steps_per_round, t_idx, t_lp)
        self.round = max(first.round, self.round + 1)  # the aggregate may carry the next round's number
        return True

    def public_topk(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k of every public row, in row order: (indices (N, k), values (N, k) float32)."""
        pad = self.manifest.pad_token_id
        parts = [self.trainer.topk(batch, k) for _, batch in self.public.in_order(self.cfg.batch_size, pad_token_id=pad)]
        indices = np.concatenate([p[0] for p in parts]).astype(index_dtype(self.manifest.model.vocab_size))
        return indices, np.concatenate([p[1] for p in parts])

    async def _send_logits(self, ws: ClientConnection, indices: np.ndarray, values: np.ndarray, welcome) -> None:
        per_row = indices.shape[1] * (indices.dtype.itemsize + 4)
        runs = row_chunks(len(indices), bytes_per_row=per_row, max_frame_bytes=welcome.max_frame_bytes)
        for i, (s, e) in enumerate(runs):
            await self._send(ws, Logits(round=self.round, chunk=i, chunks=len(runs), start=s, indices=indices[s:e],
                                        values=values[s:e], n_samples=self.data.n_samples))

    async def _receive_logits(self, ws: ClientConnection, first: Logits) -> tuple[np.ndarray, np.ndarray]:
        """The aggregate's (N, k) indices and log-probs over every public row, from its chunks."""
        n = self.public.n_rows
        k = first.indices.shape[1]
        t_idx, t_lp = np.zeros((n, k), np.int32), np.zeros((n, k), np.float32)
        seen = np.zeros(n, bool)
        if first.round < self.round:
            raise ProtocolViolation(f"logits.round: expected the aggregate of round {self.round}, got {first.round}")
        parts, msg = Chunks("logits", first.round), first
        while True:
            parts.add(msg)
            s, e = msg.start, msg.start + len(msg.indices)
            if msg.indices.shape[1] != k or e > n or seen[s:e].any():
                raise ProtocolViolation(f"logits chunk {msg.chunk}: rows [{s}, {e}) with k={msg.indices.shape[1]} "
                                        f"do not fit the public set's {n} rows at k={k} (or repeat rows)")
            if msg.indices.size and (msg.indices.min() < 0 or msg.indices.max() >= self.manifest.model.vocab_size):
                raise ProtocolViolation(f"logits chunk {msg.chunk}: token ids must be in 0..{self.manifest.model.vocab_size - 1}")
            t_idx[s:e], t_lp[s:e], seen[s:e] = msg.indices, msg.values, True
            if parts.complete:
                break
            msg = await self._recv(ws, Logits)
        if not seen.all():
            raise ProtocolViolation(f"logits: the aggregate covers {int(seen.sum())} of the {n} public rows")
        return t_idx, t_lp

    def kd_steps(self, n: int, t_idx: np.ndarray, t_lp: np.ndarray) -> None:
        pad = self.manifest.pad_token_id
        order = Dataset(self.public.sequences, batch_size=self.cfg.batch_size, pad_token_id=pad, seed=self.cfg.seed)
        for _ in range(n):
            with self.meter.compute():
                seqs = order.indices(self.kd_step)
                batch = self.public.batch(seqs, pad_token_id=pad)  # (B, T)
                loss = self.trainer.distill_step(batch, self.public.rows(seqs, t_idx), self.public.rows(seqs, t_lp))
            self.kd_step += 1
            self.meter.end_step(step=self.kd_step - 1, loss=loss, round=self.round, phase="kd")

    # ------------------------------------------------------------------ the session

    def _close_round(self, round: int) -> dict:
        records = self.meter.records[self._round_start:]
        self._round_start = len(self.meter.records)
        line = {"round": round, "phase": "round", "steps": len(records),
                **{k: sum(r[k] for r in records) for k in SUMMED}, "rss_peak_mb": rss_peak_mb()}
        self.rounds.append(line)
        if self.cfg.metrics_out:
            with open(self.cfg.metrics_out, "a") as f:
                f.write(json.dumps(line) + "\n")
        return line

    async def session(self, ws: ClientConnection) -> None:
        welcome = await self._join(ws)
        self.link.joined()
        run_round = self.fedavg_round if self.manifest.mode == "fedavg" else self.distill_round
        while not welcome.rounds or self.round < welcome.rounds:
            round = self.round
            going_on = await run_round(ws, welcome)
            self._close_round(round)
            if not going_on:
                return
        try:
            await self._send(ws, Bye(reason="done"))
        except ConnectionClosed:
            pass  # the server said bye after the last round and closed first
        self.meter.end_step(step=self.step, loss=None, round=self.round, phase="bye")

    def _end_exchange(self) -> None:
        """The round's exchange with the server (bytes, waiting, top-k, applying): a record of its own."""
        self.meter.end_step(step=self.step - 1, loss=None, round=self.round, phase="exchange")

    async def run(self) -> dict:
        """Every round, reconnecting when the link drops: the server's welcome then says which round
        is open and (fedavg) sends the current global, so a round cut short is trained again from it."""
        self.link = Reconnects(self.cfg)
        await self.link.run(self.session, where=lambda: f"in round {self.round}")
        summary = self.meter.summary()  # its per-step means are over every record (local, kd, exchange, bye)
        summary = {"records": summary.pop("steps"), "local_steps": self.step, "kd_steps": self.kd_step,
                   "rounds": len(self.rounds), **summary}
        print(f"{self.cfg.client_id}: {self.manifest.mode} done after {len(self.rounds)} rounds", file=sys.stderr)
        return summary
