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
    """Row by row with dicts: the mixture of each device's top-k probabilities, its k best, as they are."""
    total = sum(n for _, _, n in reports)
    out_i, out_lp = [], []
    for row in range(reports[0][0].shape[0]):
        mix: dict[int, float] = {}
        for idx, val, n in reports:
            for t, lp in zip(idx[row], val[row]):
                mix[int(t)] = mix.get(int(t), 0.0) + np.exp(lp) * n / total
        best = sorted(mix.items(), key=lambda kv: -kv[1])[:k]
        out_i.append([t for t, _ in best])
        out_lp.append([np.log(q) for _, q in best])
    return np.array(out_i), np.array(out_lp)


def _logprobs(rng, rows, k, vocab):
    """Top-k log-probabilities of random full-vocabulary distributions, as topk.onnx gives them."""
    logits = rng.normal(size=(rows, vocab)) * 3
    logp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    idx = np.argsort(-logp, 1)[:, :k]
    return idx, np.take_along_axis(logp, idx, 1)


def test_topk_aggregation_equals_a_row_by_row_reference():
    rng = np.random.default_rng(0)
    reports = []
    for n in (1, 3, 2):
        idx, lp = _logprobs(rng, 50, 6, 40)
        reports.append((idx.astype(np.uint16), lp.astype(np.float32), n))
    got_i, got_lp = aggregate_topk(reports, k=4)
    want_i, want_lp = _reference_topk(reports, 4)
    np.testing.assert_allclose(got_lp, want_lp, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(np.sort(got_i, 1), np.sort(want_i, 1))  # ties may order differently
    mass = np.exp(got_lp).sum(1)
    assert (mass < 1).all() and (mass > 0.2).all()  # the rest stays with the tokens nobody kept


def test_topk_aggregation_weights_by_samples_and_keeps_the_rest():
    one = (np.array([[1, 2]]), np.log(np.array([[0.6, 0.1]])), 1)
    other = (np.array([[2, 3]]), np.log(np.array([[0.6, 0.3]])), 3)
    got_i, got_lp = aggregate_topk([one, other], k=1)
    assert got_i.tolist() == [[2]]   # 0.1/4 + 0.6*3/4 = 0.475 beats token 1's 0.15 and token 3's 0.225
    np.testing.assert_allclose(np.exp(got_lp), [[0.475]], rtol=1e-6)  # not renormalised to 1


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


# ---------------------------------------------------------------- robust aggregation

def _updates(rng, n, shapes=((4, 3), (5,))):
    return [{f"t{i}": rng.normal(size=s).astype(np.float32) for i, s in enumerate(shapes)} for _ in range(n)]


def test_median_and_trimmed_mean_equal_numpy_and_scipy():
    from scipy.stats import trim_mean

    from splitlm.cloud_server.aggregate import coordinate_median, trimmed_mean

    rng = np.random.default_rng(1)
    ups = _updates(rng, 7)
    for name in ups[0]:
        stacked = np.stack([u[name] for u in ups]).astype(np.float64)
        np.testing.assert_allclose(coordinate_median(ups)[name], np.median(stacked, axis=0), rtol=1e-6)
        for f in (0.0, 0.15, 0.2, 0.4):
            np.testing.assert_allclose(trimmed_mean(ups, f)[name], trim_mean(stacked, f, axis=0), rtol=1e-6, atol=1e-7)


def test_clip_scales_long_updates_to_the_bound_and_leaves_short_ones():
    from splitlm.cloud_server.aggregate import clip_update, update_norm

    u = {"a": np.full((3, 4), 2.0, np.float32), "b": np.full(4, -2.0, np.float32)}  # norm 2 * 4 = 8
    clipped, scale = clip_update(u, 2.0)
    assert scale == pytest.approx(0.25) and update_norm(clipped) == pytest.approx(2.0, rel=1e-6)
    np.testing.assert_allclose(clipped["a"], 0.5)
    same, scale = clip_update(u, 100.0)
    assert scale == 1.0 and all(np.array_equal(same[n], u[n]) for n in u)


@pytest.mark.parametrize("method", ["mean", "median", "trimmed:0.2"])
def test_one_huge_update_moves_the_aggregate_by_at_most_the_bound(method):
    from splitlm.cloud_server.aggregate import robust_update, update_norm

    rng = np.random.default_rng(2)
    honest = _updates(rng, 4)
    huge = {n: t * 1000 for n, t in _updates(rng, 1)[0].items()}
    reports = {f"h{i}": (u, 10) for i, u in enumerate(honest)} | {"mallory": (huge, 10 ** 6)}
    agg, info = robust_update(reports, clip=1.0, method=method)
    assert update_norm(agg) <= 1.0 + 1e-5
    assert info["mallory"]["clipped"] and info["mallory"]["norm"] > 1000
    assert info["mallory"]["scale"] == pytest.approx(1.0 / info["mallory"]["norm"], rel=1e-6)


def test_median_ignores_one_outlier_entirely_where_mean_does_not():
    from splitlm.cloud_server.aggregate import robust_update

    honest = {f"h{i}": ({"w": np.full(3, 0.1 * (i + 1), np.float32)}, 1) for i in range(3)}  # 0.1, 0.2, 0.3
    poisoned = honest | {"m": ({"w": np.full(3, 1e6, np.float32)}, 1), "n": ({"w": np.full(3, -1e6, np.float32)}, 1)}
    median, _ = robust_update(poisoned, method="median")
    np.testing.assert_allclose(median["w"], 0.2, rtol=1e-6)
    trimmed, _ = robust_update(poisoned, method="trimmed:0.2")   # drops 1 from each end of 5
    np.testing.assert_allclose(trimmed["w"], 0.2, rtol=1e-6)
    mean, _ = robust_update(poisoned, method="mean")
    assert abs(mean["w"][0] - 0.12) < 1e-3  # the two outliers cancel here only by luck


@pytest.mark.parametrize("text", ["trimmed:0.5", "trimmed", "mode", "median:0.1", "trimmed:x"])
def test_an_unknown_aggregator_is_a_clear_error(text):
    from splitlm.cloud_server.aggregate import parse_aggregator

    with pytest.raises(ValueError, match="expected mean, median or trimmed:F"):
        parse_aggregator(text)
