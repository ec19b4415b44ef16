"""KD-FedLLM: devices train locally, then share only their top-k logits on a public set; the
server aggregates them, distills its own global model toward the aggregate, and sends it back for
the devices to distill toward. No weights cross the wire, so device and server models may differ in
size as long as they share the tokenizer.

A round on the wire:
    device             R local steps on its private data (as in fedavg)
    device -> server   logits{round, chunk i of n, start, indices (N, k), values (N, k) log-probabilities}
                       covering every public row once (row i = token i of the packed public set)
    server             aggregate_topk (sample-weighted mixture over the union, its top k) ->
                       R KD steps of the global model on the public set -> held-out loss
    server -> device   logits{the same round, ..., values = aggregate log-probabilities} to each reporter
    device             KD steps toward the aggregate, then the next round; bye after the last

Bytes a round, each way: public tokens x k x (value bytes + index bytes) plus frame headers.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from splitlm.errors import BadMessage, BundleMismatch
from splitlm.manifest import sha256_file
from splitlm.protocol import Hello, Limits, Logits, Welcome
from splitlm.public import PublicSet, default_public

from .aggregate import aggregate_topk
from .fedavg import FedAvgStrategy
from .global_model import GlobalModel
from .strategy import Conn, ServeConfig, Strategy


LOGPROB_SLACK = 1e-2  # f16 on the wire rounds a log-probability near 0 by ~5e-4


@dataclass
class PartialLogits:
    """One device's top-k rows for the open round, as they arrive."""
    round: int
    chunks: int
    n_samples: int
    indices: np.ndarray
    values: np.ndarray
    received: set[int] = field(default_factory=set)
    rows: np.ndarray = None  # (n_rows,) bool: rows filled so far

    def add(self, msg: Logits, *, vocab: int) -> None:
        n = msg.indices.shape[0]
        if msg.chunks != self.chunks:
            raise BadMessage(f"logits.chunks: expected {self.chunks} (as the round's first chunk said), got {msg.chunks}")
        if msg.chunk in self.received:
            raise BadMessage(f"logits.chunk: chunk {msg.chunk} of round {msg.round} arrived twice")
        if msg.start + n > len(self.rows):
            raise BadMessage(f"logits: rows {msg.start}..{msg.start + n - 1} are past the public set's {len(self.rows)} rows")
        if msg.indices.shape[1] != self.indices.shape[1]:
            raise BadMessage(f"logits.indices: expected k = {self.indices.shape[1]} columns, got {msg.indices.shape[1]}")
        lo, hi = int(msg.indices.min(initial=0)), int(msg.indices.max(initial=0))
        if lo < 0 or hi >= vocab:
            raise BadMessage(f"logits.indices: expected token ids in 0..{vocab - 1}, got {lo if lo < 0 else hi}")
        row_mass = np.exp(np.asarray(msg.values, np.float64)).sum(axis=1).max(initial=0.0)
        if row_mass > 1 + LOGPROB_SLACK:  # a value over log(1 + slack) is such a row too
            raise BadMessage(f"logits.values: expected log-probabilities over the whole vocabulary (each <= 0, "
                             f"a row's probabilities summing to <= 1), got a row summing to {row_mass:.4g}")
        if self.rows[msg.start:msg.start + n].any():
            raise BadMessage(f"logits: rows {msg.start}..{msg.start + n - 1} overlap rows already sent")
        self.received.add(msg.chunk)
        self.rows[msg.start:msg.start + n] = True
        self.indices[msg.start:msg.start + n] = msg.indices
        self.values[msg.start:msg.start + n] = msg.values


class DistillStrategy(FedAvgStrategy):
    mode = "distill"

    def __init__(self, model: GlobalModel, cfg: ServeConfig, *, public: Path | None = None,
                 public_seq_len: int = 128, device_model_hash: str | None = None, eval_data: Path | None = None,
                 log=print):
        super().__init__(model, cfg, eval_data=eval_data, log=log)
        self.device_model_hash = device_model_hash or model.model_hash  # the devices' model may be another one
        from transformers import AutoTokenizer

        self.public_path = public or default_public()
        tok = AutoTokenizer.from_pretrained(model.path)
        eos = tok.eos_token_id if tok.eos_token_id is not None else 0
        self.pad = tok.pad_token_id if tok.pad_token_id is not None else eos
        self.public = PublicSet.from_text(self.public_path.read_text(encoding="utf-8"),
                                          tokenizer_file=Path(model.path) / "tokenizer.json", seq_len=public_seq_len,
                                          eos_id=eos, sha256=sha256_file(self.public_path))
        self.public_hash, self.public_seq_len, self.n_rows = self.public.sha256, public_seq_len, self.public.n_rows
        row_bytes = cfg.topk * 8
        self.limits = Limits(max_frame_bytes=max(cfg.max_chunk_bytes, row_bytes * 4096) + (1 << 20))
        self.partial_logits: dict[str, PartialLogits] = {}
        self.kd_step = 0

    def describe(self) -> str:
        return (f"model {self.model.path.name}, distill ({self.model.cfg.train}), public set {self.public_path.name}: "
                f"{self.n_rows} tokens, top-{self.cfg.topk}, {self.cfg.steps_per_round} local and KD steps a round")

    def check_hello(self, hello: Hello) -> None:
        Strategy.check_hello(self, hello)  # mode and codecs; not fedavg's: the devices' model may be another one
        if hello.public_hash != self.public_hash:
            raise BundleMismatch(f"hello.public_hash: this server distills on {self.public_path.name} "
                                 f"(sha256 {self.public_hash[:12]}...), the bundle names {str(hello.public_hash)[:12]}...")
        if hello.public_seq_len != self.public_seq_len:  # same text, other packing: row i would be another token
            raise BundleMismatch(f"hello.public_seq_len: this server packs the public set into sequences of "
                                 f"{self.public_seq_len} tokens, the bundle into {hello.public_seq_len} "
                                 f"(serve --public-seq-len {hello.public_seq_len} matches it)")
        if hello.model_hash != self.device_model_hash:  # it fixes the tokenizer, which both sides must share
            raise BundleMismatch("hello.model_hash: the bundle was exported from another model than the devices' "
                                 "model this server expects (serve --device-model FOLDER names it)")

    async def join(self, conn: Conn, hello: Hello) -> list:
        self.conns[conn.client_id] = conn
        self.log(f"client {conn.client_id} joined ({hello.n_samples} samples), round {self.round}")
        return [Welcome(session_id=conn.session_id, codec=self.cfg.codec, steps_per_round=self.cfg.steps_per_round,
                        round=self.round, step=0, max_frame_bytes=self.limits.max_frame_bytes, head_adapter={},
                        mode=self.mode, update_codec=self.cfg.update_codec, rounds=self.cfg.rounds,
                        topk=self.cfg.topk, global_chunks=0)]

    async def handle(self, conn: Conn, msg) -> list:
        if not isinstance(msg, Logits):
            raise BadMessage(f"unexpected {msg.kind!r} in distill: expected logits or bye")
        if msg.round != self.round:
            raise BadMessage(f"logits.round: the server is at round {self.round}, got {msg.round}")
        if msg.n_samples <= 0:
            raise BadMessage(f"logits.n_samples: expected > 0 (the averaging weight), got {msg.n_samples}")
        k = self.cfg.topk
        partial = self.partial_logits.get(conn.client_id)
        if partial is None or partial.round != msg.round:
            partial = self.partial_logits[conn.client_id] = PartialLogits(
                msg.round, msg.chunks, msg.n_samples, np.zeros((self.n_rows, k), np.int64),
                np.zeros((self.n_rows, k), np.float32), rows=np.zeros(self.n_rows, bool))
        try:
            partial.add(msg, vocab=self.model.vocab_size)
        except BadMessage:
            self.partial_logits.pop(conn.client_id, None)
            raise
        if len(partial.received) < partial.chunks:
            return []
        del self.partial_logits[conn.client_id]
        if not partial.rows.all():
            raise BadMessage(f"logits: all {partial.chunks} chunks arrived but {int((~partial.rows).sum())} of "
                             f"{self.n_rows} public rows are missing")
        self.board.reported(conn)
        await self.rounds.report(conn.client_id, (partial.indices, partial.values, partial.n_samples, conn),
                                 set(self.conns))
        return []

    async def _close_round(self, reports: dict) -> None:
        finished = self.round - 1
        idx, logp = aggregate_topk([(i, v, n) for i, v, n, _ in reports.values()], k=self.cfg.topk)
        kd_loss, loss, snapshot = await asyncio.get_running_loop().run_in_executor(None, self._distill, idx, logp)
        reports3 = {cid: (None, n, conn) for cid, (_, _, n, conn) in reports.items()}
        metrics = self.round_metrics(finished, reports3, eval_loss=loss) | {"kd_loss": kd_loss, "public_rows": self.n_rows}
        self.board.round_closed(metrics)
        self.writer.write(finished, lambda folder: self.model.save(folder, snapshot), metrics)
        self.log(f"round {finished} closed: {len(reports)} clients, server KD loss {kd_loss:.4f}"
                 + (f", held-out loss {loss:.4f}" if loss is not None else ""))
        wire_idx = idx.astype(np.uint16) if self.model.vocab_size <= 1 << 16 else idx
        for cid in reports:
            conn = self.conns.get(cid)
            if conn is not None:
                for frame in self.logit_frames(finished, wire_idx, logp):
                    await conn.send(frame)
        await self.finish_if_done()

    def logit_frames(self, round_: int, idx: np.ndarray, logp: np.ndarray) -> list[Logits]:
        """The aggregate of round `round_` in row chunks under max_chunk_bytes."""
        rows = max(1, self.cfg.max_chunk_bytes // (idx.shape[1] * (idx.itemsize + 4)))
        starts = list(range(0, self.n_rows, rows))
        return [Logits(round=round_, chunk=i, chunks=len(starts), start=s, indices=idx[s:s + rows],
                       values=logp[s:s + rows], n_samples=1) for i, s in enumerate(starts)]

    def _distill(self, idx: np.ndarray, logp: np.ndarray) -> tuple[float, float | None, dict]:
        """R KD steps of the global model on the public set, sequences in a fixed cycle, batch 8;
        then its held-out loss and a snapshot to write (off the event loop: a copy of the model)."""
        losses = []
        n_seq = len(self.public.sequences)
        for _ in range(self.cfg.steps_per_round):
            seqs = [(self.kd_step * 8 + j) % n_seq for j in range(min(8, n_seq))]
            self.kd_step += 1
            batch = self.public.batch(seqs, pad_token_id=self.pad)                          # (B, T)
            rows = np.concatenate([np.arange(self.public.offsets[s], self.public.offsets[s + 1]) for s in seqs])
            losses.append(self.model.distill_step(batch, idx[rows], logp[rows]))
        loss = self.model.mean_loss(self.eval_batches) if self.eval_batches else None
        return float(np.mean(losses)), loss, self.model.snapshot()

    async def leave(self, conn: Conn) -> None:
        self.partial_logits.pop(conn.client_id, None)
        await super().leave(conn)
