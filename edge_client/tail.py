"""The device's loss in pieces: tail.onnx run over chunks of the batch, never one full logits tensor.

tail.onnx turns hidden_N (B, T, H) into full-vocabulary logits (B, T, V) and their gradient: for
SmolLM2 (V = 49,152) a 1 x 512 batch peaked near 860 MB. The loss is a mean of per-token
cross-entropies, so it splits exactly: run the same graph on windows of at most `chunk_tokens`
hidden rows and add up

    loss = sum_c loss_c * n_c / N          dL/dh = sum_c dloss_c/dh * n_c / N

where n_c counts the labels window c predicts and N all of them. Label t is predicted by hidden
position t-1 (labels are aligned with input_ids), so a window of hidden positions [a-1, b) predicts
labels [a, b); its last row predicts nothing inside it and gets a zero gradient there. Windows
split a long row along the sequence, or hold whole rows when they fit. Written here rather than
as a graph because the graph already exists and is exact per window; onnxruntime has no fused
chunked cross-entropy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

IGNORE_INDEX = -100
MIN_WINDOW = 3  # tail.onnx's shortest sequence (two predicted positions)

TailFn = Callable[[np.ndarray, np.ndarray, np.ndarray], tuple[float, np.ndarray]]


@dataclass(frozen=True)
class Window:
    rows: slice      # batch rows
    first: int       # first label it predicts (>= 1); its hidden rows are [first - 1, last)
    last: int        # one past the last label it predicts

    @property
    def hidden(self) -> slice:
        return slice(self.first - 1, self.last)


def windows(batch: int, seq: int, chunk_tokens: int) -> list[Window]:
    """Windows of at most ~chunk_tokens hidden positions covering labels 1..seq-1 of every row."""
    if chunk_tokens < MIN_WINDOW:
        raise ValueError(f"tail chunk must be at least {MIN_WINDOW} tokens, got {chunk_tokens}")
    if seq <= chunk_tokens:
        per = max(1, chunk_tokens // seq)
        return [Window(slice(r, min(r + per, batch)), 1, seq) for r in range(0, batch, per)]
    step = chunk_tokens - 1  # labels per window
    bounds = list(range(1, seq, step)) + [seq]
    if bounds[-1] - bounds[-2] < MIN_WINDOW - 1:  # a last window too short for the graph joins the one before
        del bounds[-2]
    return [Window(slice(r, r + 1), a, b) for r in range(batch) for a, b in zip(bounds, bounds[1:])]


def kept(labels: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
    """(B, T) bool: labels that count in the loss, as tail.onnx counts them (mask 1, not -100)."""
    return (attention_mask == 1) & (labels != IGNORE_INDEX)


def chunked_tail(tail: TailFn, hidden: np.ndarray, labels: np.ndarray, attention_mask: np.ndarray,
                 chunk_tokens: int) -> tuple[float, np.ndarray]:
    """(mean loss, dL/dhidden (B, T, H)) of `tail` over the whole batch, `chunk_tokens` at a time."""
    counts = kept(labels, attention_mask)
    total = int(counts[:, 1:].sum())
    grad = np.zeros(hidden.shape, np.float32)  # (B, T, H)
    if total == 0:
        return 0.0, grad
    loss = 0.0
    for w in windows(*labels.shape, chunk_tokens):
        n = int(counts[w.rows, w.first:w.last].sum())
        if n == 0:
            continue
        part_loss, part_grad = tail(np.ascontiguousarray(hidden[w.rows, w.hidden]),
                                    np.ascontiguousarray(labels[w.rows, w.hidden]),
                                    np.ascontiguousarray(attention_mask[w.rows, w.hidden]))
        loss += float(part_loss) * n / total
        grad[w.rows, w.first - 1:w.last - 1] += part_grad[:, :-1] * np.float32(n / total)
    return loss, grad
