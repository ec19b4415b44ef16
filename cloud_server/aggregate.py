"""Aggregation math, as pure numpy functions (Flower's split: the policy lives elsewhere)."""

from __future__ import annotations

import numpy as np


def weighted_average(reports: list[tuple[dict[str, np.ndarray], int]]) -> dict[str, np.ndarray]:
    """FedAvg: the sample-weighted mean of each tensor over the clients' reports.

    `reports` is a list of (tensors, n_samples); every report must carry the same names and shapes.
    """
    if not reports:
        raise ValueError("weighted_average needs at least one report")
    total = sum(n for _, n in reports)
    if total <= 0:
        raise ValueError(f"weighted_average: sample counts must add up to > 0, got {total}")
    names = reports[0][0].keys()
    for tensors, _ in reports[1:]:
        if tensors.keys() != names:
            raise ValueError(f"reports name different tensors: {sorted(names)} vs {sorted(tensors)}")
    return {name: sum(np.asarray(t[name], np.float64) * (n / total) for t, n in reports).astype(np.float32)
            for name in names}


def apply_delta(values: dict[str, np.ndarray], delta: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """FedAvg's server step with a server learning rate of 1: global + mean delta, in float32."""
    if delta.keys() != values.keys():
        raise ValueError(f"delta names {sorted(delta)[:3]}... do not match the global's {sorted(values)[:3]}...")
    return {n: (np.asarray(values[n], np.float32) + np.asarray(delta[n], np.float32)).astype(np.float32)
            for n in values}


def chunk_names(shapes: dict[str, tuple[int, ...]], *, max_bytes: int, itemsize: int = 4) -> list[list[str]]:
    """Split tensor names, in order, into runs of whole tensors of at most `max_bytes` each
    (a tensor larger than that travels alone). The unit of `update` and `global` frames."""
    chunks: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        n = int(np.prod(shape, dtype=np.int64)) * itemsize
        if chunks[-1] and size + n > max_bytes:
            chunks.append([])
            size = 0
        chunks[-1].append(name)
        size += n
    return chunks if chunks[0] else []


def aggregate_topk(reports: list[tuple[np.ndarray, np.ndarray, int]], *, k: int
                   ) -> tuple[np.ndarray, np.ndarray]:
    """KD-FedLLM's aggregation of the devices' top-k logits on the public set.

    `reports` is a list of (indices (N, k_c), logits (N, k_c), n_samples). Each device's top-k
    logits become a distribution over its k tokens (softmax over those k: the renormalised top-k);
    the sample-weighted mixture of those distributions is taken over the union of indices, and
    its k most probable tokens, renormalised, are returned as (indices (N, k) int32,
    log-probabilities (N, k) float32), most probable first.
    """
    if not reports:
        raise ValueError("aggregate_topk needs at least one report")
    total = sum(n for _, _, n in reports)
    if total <= 0:
        raise ValueError(f"aggregate_topk: sample counts must add up to > 0, got {total}")
    rows = reports[0][0].shape[0]
    for idx, val, _ in reports:
        if idx.shape != val.shape or idx.shape[0] != rows or idx.shape[1] < k:
            raise ValueError(f"aggregate_topk: every report needs (N={rows}, >= k={k}) indices and values, "
                             f"got {idx.shape} and {val.shape}")
    idx = np.concatenate([np.asarray(i, np.int64) for i, _, _ in reports], axis=1)              # (N, sum k_c)
    prob = np.concatenate([_softmax(np.asarray(v, np.float64)) * (n / total) for _, v, n in reports], axis=1)
    vocab = int(idx.max()) + 1
    keys, inverse = np.unique((np.arange(rows)[:, None] * vocab + idx).ravel(), return_inverse=True)
    mass = np.bincount(inverse, weights=prob.ravel())                  # one entry per (row, token) named
    row, token = keys // vocab, keys % vocab
    order = np.lexsort((-mass, row))                                   # by row, most probable first
    row, token, mass = row[order], token[order], mass[order]
    rank = np.arange(len(row)) - np.searchsorted(row, row)             # position within its row
    keep = rank < k                                                    # every row names >= k tokens
    top_i, top_p = token[keep].reshape(rows, k), mass[keep].reshape(rows, k)
    logp = np.log(top_p) - np.log(top_p.sum(axis=1, keepdims=True))
    return top_i.astype(np.int32), logp.astype(np.float32)


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)
