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
    """KD-FedLLM's aggregation of the devices' top-k on the public set.

    `reports` is a list of (indices (N, k_c), log-probabilities (N, k_c), n_samples); each row's
    log-probabilities are over the whole vocabulary (what topk.onnx returns), so they sum to at
    most 1 and the rest is the device's mass on tokens it did not name. The sample-weighted mixture
    of the devices' distributions is taken over the union of the named tokens (a device that did
    not name a token counts 0 for it: a lower bound on the true mixture); its k most probable
    tokens are returned as (indices (N, k) int32, log-probabilities (N, k) float32), most probable
    first and not renormalised: 1 - their sum is the mass `kd_loss` keeps in its rest bucket.
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
    prob = np.concatenate([np.exp(np.asarray(v, np.float64)) * (n / total) for _, v, n in reports], axis=1)
    vocab = int(idx.max()) + 1
    keys, inverse = np.unique((np.arange(rows)[:, None] * vocab + idx).ravel(), return_inverse=True)
    mass = np.bincount(inverse, weights=prob.ravel())                  # one entry per (row, token) named
    row, token = keys // vocab, keys % vocab
    order = np.lexsort((-mass, row))                                   # by row, most probable first
    row, token, mass = row[order], token[order], mass[order]
    rank = np.arange(len(row)) - np.searchsorted(row, row)             # position within its row
    keep = rank < k                                                    # every row names >= k tokens
    top_i, top_p = token[keep].reshape(rows, k), mass[keep].reshape(rows, k)
    return top_i.astype(np.int32), np.log(top_p).astype(np.float32)


# ---------------------------------------------------------------- robust aggregation
# An update is one device's change to the global: {name: delta}. Every function below takes the
# updates of one round, all relative to the same global, and treats the update as one flat vector
# over every tensor (LoRA's A and B factors side by side; see `robust_update` for why that is
# sound for B·A).

AGGREGATORS = ("mean", "median", "trimmed")


def update_norm(update: dict[str, np.ndarray]) -> float:
    """The L2 norm of an update over all its tensors, as one vector."""
    return float(np.sqrt(sum(np.sum(np.square(np.asarray(t, np.float64))) for t in update.values())))


def clip_update(update: dict[str, np.ndarray], bound: float) -> tuple[dict[str, np.ndarray], float]:
    """`update` scaled down to L2 norm `bound` if it is longer (DP-FedAvg's clip), and the scale
    applied (1.0: untouched)."""
    if not bound > 0:
        raise ValueError(f"clip_update: bound must be > 0, got {bound}")
    norm = update_norm(update)
    scale = 1.0 if norm <= bound else bound / norm
    return {n: (np.asarray(t, np.float64) * scale).astype(np.float32) for n, t in update.items()}, scale


def coordinate_median(updates: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Each coordinate's median over the updates (Yin et al. 2018); unweighted."""
    _same_names(updates)
    return {n: np.median(np.stack([np.asarray(u[n], np.float64) for u in updates]), axis=0).astype(np.float32)
            for n in updates[0]}


def trimmed_mean(updates: list[dict[str, np.ndarray]], fraction: float) -> dict[str, np.ndarray]:
    """Each coordinate's mean after dropping its `fraction` lowest and `fraction` highest values
    (int(fraction x n) from each end, as scipy.stats.trim_mean); unweighted."""
    if not 0 <= fraction < 0.5:
        raise ValueError(f"trimmed_mean: fraction must be in [0, 0.5), got {fraction}")
    _same_names(updates)
    cut = int(fraction * len(updates))
    out = {}
    for n in updates[0]:
        stacked = np.sort(np.stack([np.asarray(u[n], np.float64) for u in updates]), axis=0)  # (clients, ...)
        out[n] = stacked[cut:len(updates) - cut].mean(axis=0).astype(np.float32)
    return out


def parse_aggregator(text: str) -> tuple[str, float]:
    """'mean', 'median' or 'trimmed:F' (0 <= F < 0.5) -> (name, fraction); ValueError otherwise."""
    name, _, arg = text.partition(":")
    if name in ("mean", "median") and not arg:
        return name, 0.0
    if name == "trimmed":
        try:
            fraction = float(arg)
        except ValueError:
            fraction = -1.0
        if 0 <= fraction < 0.5:
            return name, fraction
    raise ValueError(f"expected mean, median or trimmed:F with 0 <= F < 0.5 (e.g. trimmed:0.2), got {text!r}")


def robust_update(updates: dict[str, tuple[dict[str, np.ndarray], int]], *, clip: float | None = None,
                  method: str = "mean") -> tuple[dict[str, np.ndarray], dict[str, dict]]:
    """One round's aggregate update, and what happened to each client's.

    `updates` maps client id -> (update relative to the round's global, n_samples). Each update is
    clipped to norm `clip` (None: not clipped), then combined by `method` ('mean': sample-weighted,
    'median', 'trimmed:F': unweighted, so no device buys weight by claiming samples). The aggregate
    is clipped to `clip` again: a mean of clipped updates is within the bound already, a
    coordinate-wise median or trimmed mean need not be. So the global moves at most `clip` a round.

    LoRA: the update is (ΔA, ΔB) of every module, one vector. Every device starts the round from the
    same global (A, B), so their factors share one basis and combining them factor by factor is
    meaningful; and a bound on the factors bounds what matters, the product:
    ||B'A' - BA|| <= ||ΔB|| ||A|| + ||B|| ||ΔA|| + ||ΔB|| ||ΔA||.
    """
    if not updates:
        raise ValueError("robust_update needs at least one update")
    name, fraction = parse_aggregator(method)
    info, clipped = {}, {}
    for cid, (update, n) in updates.items():
        norm = update_norm(update)
        clipped[cid], scale = clip_update(update, clip) if clip else (update, 1.0)
        info[cid] = {"norm": norm, "clipped": scale < 1.0, "scale": scale}
    if name == "mean":
        agg = weighted_average([(clipped[cid], n) for cid, (_, n) in updates.items()])
    elif name == "median":
        agg = coordinate_median(list(clipped.values()))
    else:
        agg = trimmed_mean(list(clipped.values()), fraction)
    if clip:
        agg, _ = clip_update(agg, clip)
    return agg, info


def subtract(values: dict[str, np.ndarray], reference: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """values - reference, tensor by tensor, in float32 (a device's LoRA as an update to the global)."""
    if values.keys() != reference.keys():
        raise ValueError(f"names {sorted(values)[:3]}... do not match the reference's {sorted(reference)[:3]}...")
    return {n: (np.asarray(values[n], np.float32) - np.asarray(reference[n], np.float32)) for n in values}


def _same_names(updates: list[dict[str, np.ndarray]]) -> None:
    if not updates:
        raise ValueError("needs at least one update")
    names = updates[0].keys()
    for u in updates[1:]:
        if u.keys() != names:
            raise ValueError(f"updates name different tensors: {sorted(names)} vs {sorted(u)}")
