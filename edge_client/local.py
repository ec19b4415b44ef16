"""The device's whole-model trainer for `--mode fedavg` and `--mode distill` (no torch).

    train_step(batch)                         train.onnx  -> loss, grads  -> numpy AdamW
    topk(batch, k)                            topk.onnx   -> (indices (N, k) int32, values (N, k) float32)
    distill_step(batch, t_idx, t_logprobs)    kd_grad.onnx -> kd loss, grads -> numpy AdamW

`params` are the bundle's trainables (LoRA tensors, or every block weight for `--train full`),
float32, by graph input name. The sessions share one copy of each frozen weight
(`runtime.WeightPool`): train, topk and kd_grad embed the same embedding and blocks.

Rows of a top-k answer: each position with attention_mask 1, in (sequence, position) order;
`splitlm.public.PublicSet` numbers them over the whole public set.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from splitlm.data import Batch
from splitlm.errors import BundleMismatch
from splitlm.manifest import Bundle, ordered_tensors
from .optim import AdamW
from .runtime import WHOLE_MODEL_ORDER, WeightPool, open_session


class LocalTrainer:
    """Local training of the whole model over one fedavg / distill bundle's sessions."""

    def __init__(self, bundle: Bundle | str | Path, *, lr: float = 1e-3, threads: int = 0,
                 share_weights: bool = True, mem_arena: bool = False):
        self.bundle = bundle if isinstance(bundle, Bundle) else Bundle.open(bundle)
        m = self.manifest = self.bundle.manifest
        if m.mode not in ("fedavg", "distill"):
            raise BundleMismatch(f"bundle {self.bundle.path}: expected a fedavg or distill bundle, got mode "
                                 f"{m.mode!r}; export it with --mode fedavg or --mode distill")
        self.pool = WeightPool() if share_weights else None

        def session(name: str):
            return open_session(self.bundle, name, pool=self.pool, threads=threads, mem_arena=mem_arena,
                                order=WHOLE_MODEL_ORDER)

        self.train_session = session("train.onnx")
        self.topk_session = session("topk.onnx") if m.mode == "distill" else None
        self.kd_session = session("kd_grad.onnx") if m.mode == "distill" else None
        self.params = self.bundle.trainables_init()
        self.optim = AdamW(lr=lr)
        self._grad_names = [f"grad.{n}" for n in m.trainables]

    # ------------------------------------------------------------------ parameters

    def set_params(self, params: dict[str, np.ndarray], *, copy: bool = True) -> None:
        """Adopt these trainables (float32; copied unless `copy` is False and they are writable
        float32 already); the optimizer's moments stay."""
        self.params = {n: np.array(a, np.float32, copy=copy or None) for n, a in self.check(params).items()}

    def check(self, params: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """`params` in manifest order, or BundleMismatch naming what differs."""
        return ordered_tensors(params, self.manifest.trainables, what="trainable")

    # ------------------------------------------------------------------ steps

    def train_step(self, batch: Batch) -> float:
        """One step of next-token training on `batch`; returns its loss (before the update)."""
        feed = {**_tokens(batch), "labels": batch.labels, **self.params}  # (B, T) each + trainables
        loss, *grads = self.train_session.run(["loss", *self._grad_names], feed)
        self.optim.step(self.params, dict(zip(self.manifest.trainables, grads)))
        return float(loss)

    def topk(self, batch: Batch, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The k largest logits at each mask==1 position: (indices (N, k) int32, values (N, k) float32)."""
        if not 1 <= k <= self.manifest.topk:
            raise ValueError(f"top-k: k must be in 1..{self.manifest.topk} for this bundle, got {k}")
        values, indices = self._distill_session(self.topk_session).run(
            ["topk_values", "topk_indices"], {**_tokens(batch), **self.params})  # (B, T, k_max) each
        keep = batch.attention_mask.astype(bool)  # (B, T): rows in (sequence, position) order
        return np.ascontiguousarray(indices[keep][:, :k], np.int32), np.ascontiguousarray(values[keep][:, :k])

    def distill_step(self, batch: Batch, teacher_indices: np.ndarray, teacher_logprobs: np.ndarray) -> float:
        """One KD step toward the teacher's (B, T, k) top-k; returns the KD loss (before the update)."""
        shape = (*batch.input_ids.shape, teacher_indices.shape[-1])
        if teacher_indices.shape != shape or teacher_logprobs.shape != shape:
            raise ValueError(f"distill step: expected teacher indices and log-probs of shape {shape}, "
                             f"got {teacher_indices.shape} and {teacher_logprobs.shape}")
        feed = {**_tokens(batch), "teacher_indices": np.ascontiguousarray(teacher_indices, np.int32),
                "teacher_logprobs": np.ascontiguousarray(teacher_logprobs, np.float32), **self.params}
        loss, *grads = self._distill_session(self.kd_session).run(["kd_loss", *self._grad_names], feed)
        self.optim.step(self.params, dict(zip(self.manifest.trainables, grads)))
        return float(loss)

    def _distill_session(self, session):
        if session is None:
            raise BundleMismatch(f"bundle {self.bundle.path} is a {self.manifest.mode} bundle: it has no "
                                 "top-k or KD graphs; export it with --mode distill")
        return session


def _tokens(batch: Batch) -> dict[str, np.ndarray]:
    return {"input_ids": np.ascontiguousarray(batch.input_ids, np.int64),
            "attention_mask": np.ascontiguousarray(batch.attention_mask, np.int64)}
