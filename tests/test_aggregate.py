"""The aggregation math (pure numpy) against brute-force references, and the chunk rules."""

from __future__ import annotations

import re

import numpy as np
import pytest

from splitlm.cloud_server.aggregate import (aggregate_topk, apply_delta, chunk_names, weighted_average)
from splitlm.cloud_server.fedavg import PartialUpdate, accept_chunk
from splitlm.errors import BadMessage
from splitlm.protocol import Update


def _reference_topk(reports, k):
    """Row by row with dicts: the mixture of each device's renormalised top-k, its k best, renormalised."""
    total = sum(n for _, _, n in reports)
    out_i, out_lp = [], []
    for row in range(reports[0][0].shape[0]):
        mix: dict[int, float] = {}
        for idx, val, n in reports:
            p = np.exp(val[row] - val[row].max())
            p /= p.sum()
            for t, q in zip(idx[row], p):
                mix[int(t)] = mix.get(int(t), 0.0) + q * n / total
        best = sorted(mix.items(), key=lambda kv: -kv[1])[:k]
        mass = sum(q for _, q in best)
        out_i.append([t for t, _ in best])
        out_lp.append([np.log(q / mass) for _, q in best])
    return np.array(out_i), np.array(out_lp)


def test_topk_aggregation_equals_a_row_by_row_reference():
    rng = np.random.default_rng(0)
    reports = []
    for n in (1, 3, 2):
        idx = np.stack([rng.choice(40, size=6, replace=False) for _ in range(50)])   # (N, k) distinct per row
        reports.append((idx.astype(np.uint16), rng.normal(size=(50, 6)).astype(np.float32) * 3, n))
    got_i, got_lp = aggregate_topk(reports, k=4)
    want_i, want_lp = _reference_topk(reports, 4)
    np.testing.assert_allclose(got_lp, want_lp, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(np.sort(got_i, 1), np.sort(want_i, 1))  # ties may order differently
    np.testing.assert_allclose(np.exp(got_lp).sum(1), 1.0, rtol=1e-5)


def test_topk_aggregation_weights_by_samples():
    idx = np.array([[1, 2]])
    one = (idx, np.log(np.array([[0.9, 0.1]])), 1)
    other = (np.array([[2, 3]]), np.log(np.array([[0.9, 0.1]])), 3)
    got_i, got_lp = aggregate_topk([one, other], k=1)
    assert got_i.tolist() == [[2]]   # 0.1/4 + 0.9*3/4 = 0.7 beats token 1's 0.225
    np.testing.assert_allclose(got_lp, [[0.0]], atol=1e-6)


def test_topk_aggregation_refuses_mismatched_reports():
    with pytest.raises(ValueError, match="N=2"):
        aggregate_topk([(np.zeros((2, 3), int), np.zeros((2, 3)), 1), (np.zeros((3, 3), int), np.zeros((3, 3)), 1)], k=2)
    with pytest.raises(ValueError, match="> 0"):
        aggregate_topk([(np.zeros((2, 3), int), np.zeros((2, 3)), 0)], k=2)


def test_weighted_average_with_no_samples_is_refused_not_zero():
    with pytest.raises(ValueError, match="add up to > 0, got 0"):
        weighted_average([({"w": np.ones(2, np.float32)}, 0)])


def test_apply_delta_adds_and_checks_names():
    out = apply_delta({"a": np.ones(3, np.float32)}, {"a": np.full(3, 0.5, np.float32)})
    np.testing.assert_array_equal(out["a"], [1.5, 1.5, 1.5])
    with pytest.raises(ValueError, match="do not match"):
        apply_delta({"a": np.ones(3, np.float32)}, {"b": np.ones(3, np.float32)})


@pytest.mark.parametrize("max_bytes,want", [
    (100, [["a"], ["b"], ["c", "d"]]),     # b (1200 bytes) travels alone
    (10_000, [["a", "b", "c", "d"]]),
    (40, [["a"], ["b"], ["c", "d"]]),
])
def test_chunks_hold_whole_tensors_in_order_under_the_bound(max_bytes, want):
    shapes = {"a": (10,), "b": (300,), "c": (5,), "d": (1,)}
    assert chunk_names(shapes, max_bytes=max_bytes) == want


def _update(chunk, chunks, **tensors):
    return Update(round=0, chunk=chunk, chunks=chunks, tensors={k: np.asarray(v, np.float32) for k, v in tensors.items()},
                  n_samples=4)


@pytest.mark.parametrize("second,message", [
    (_update(0, 2, b=np.zeros(2)), "chunk 0 of round 0 arrived twice"),
    (_update(1, 3, b=np.zeros(2)), "update.chunks: expected 2"),
    (_update(1, 2, c=np.zeros(2)), "'c' is not a trainable tensor"),
    (_update(1, 2, b=np.zeros(3)), "expected shape (2,), got (3,)"),
    (_update(1, 2, a=np.zeros(2)), "['a']: sent twice"),
])
def test_a_bad_update_chunk_is_refused_with_what_is_wrong(second, message):
    partial = PartialUpdate(round=0, chunks=2, n_samples=4)
    shapes = {"a": (2,), "b": (2,)}
    accept_chunk(partial, _update(0, 2, a=np.ones(2)), shapes)
    with pytest.raises(BadMessage, match=re.escape(message)):
        accept_chunk(partial, second, shapes)
