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
