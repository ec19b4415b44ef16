"""edge_client.runtime (the bundle's onnxruntime sessions, sharing weights) and edge_client.meter."""

from __future__ import annotations

import dataclasses
import json
import time

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from splitlm.edge_client.data import IGNORE_INDEX
from splitlm.edge_client.meter import Meter
from splitlm.edge_client.optim import AdamW
from splitlm.edge_client.runtime import HeadRuntime, read_initializers
from splitlm.errors import BundleMismatch, SplitLMError
from splitlm.manifest import Bundle

B, T = 2, 12


@pytest.fixture(scope="module")
def bundle(tiny_bundle) -> Bundle:
    """A tiny fp32 bundle with labels on the device: head, head_grad and tail."""
    return tiny_bundle("device")


@pytest.fixture(scope="module")
def runtime(bundle) -> HeadRuntime:
    return HeadRuntime(bundle)


def plain_session(bundle: Bundle, name: str) -> ort.InferenceSession:
    return ort.InferenceSession(str(bundle.file(name)), providers=["CPUExecutionProvider"])


def tokens(bundle: Bundle, seed: int = 0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, bundle.manifest.model.vocab_size, (B, T)).astype(np.int64)
    mask = np.ones((B, T), np.int64)
    mask[1, T - 4:] = 0  # a right-padded row
    return ids, mask


def loras(bundle: Bundle, seed: int = 1) -> dict[str, np.ndarray]:
    """Nonzero A and B, so every gradient is nonzero."""
    rng = np.random.default_rng(seed)
    return {n: (rng.standard_normal(s) * 0.1).astype(np.float32) for n, s in bundle.manifest.lora.tensors.items()}


# --- the sessions ------------------------------------------------------------------------------

def test_forward_matches_a_plain_onnxruntime_session(bundle, runtime):
    ids, mask = tokens(bundle)
    lora = loras(bundle)
    hidden = runtime.forward(ids, mask, lora)
    feed = {"input_ids": ids, "attention_mask": mask, **lora}
    (expected,) = plain_session(bundle, "head.onnx").run(["hidden"], feed)
    assert hidden.shape == (B, T, bundle.manifest.model.hidden_size) and hidden.dtype == np.float32
    np.testing.assert_allclose(hidden, expected, rtol=1e-5, atol=1e-6)


def test_lora_grads_match_a_plain_session_and_come_back_by_name(bundle, runtime):
    ids, mask = tokens(bundle)
    lora = loras(bundle)
    g = np.random.default_rng(2).standard_normal((B, T, bundle.manifest.model.hidden_size)).astype(np.float32)
    grads = runtime.lora_grads(ids, mask, g, lora)
    names = list(bundle.manifest.lora.tensors)
    expected = plain_session(bundle, "head_grad.onnx").run(
        [f"grad.{n}" for n in names], {"input_ids": ids, "attention_mask": mask, "grad_hidden": g, **lora})
    assert list(grads) == names
    for name, want in zip(names, expected):
        assert grads[name].shape == bundle.manifest.lora.tensors[name] and np.abs(grads[name]).max() > 0
        np.testing.assert_allclose(grads[name], want, rtol=1e-4, atol=1e-6)


def test_tail_matches_a_plain_session(bundle, runtime):
    ids, mask = tokens(bundle)
    labels = np.where(mask == 1, ids, IGNORE_INDEX)
    hidden = np.random.default_rng(3).standard_normal((B, T, bundle.manifest.model.hidden_size)).astype(np.float32)
    loss, grad = runtime.tail(hidden, labels, mask)
    want_loss, want_grad = plain_session(bundle, "tail.onnx").run(
        ["loss", "grad_hidden"], {"hidden": hidden, "labels": labels, "attention_mask": mask})
    assert isinstance(loss, float) and grad.shape == hidden.shape
    assert loss == pytest.approx(float(want_loss), rel=1e-6)
    np.testing.assert_allclose(grad, want_grad, rtol=1e-5, atol=1e-7)


def test_the_sessions_hold_one_copy_of_the_shared_weights(bundle, runtime):
    head = read_initializers(bundle.file("head.onnx").read_bytes())
    assert any(t.nbytes >= 1 << 16 for t in head)  # the tiny embedding, 320 x 64 floats, is shared
    pool = runtime.pool
    assert pool.served > pool.nbytes  # head_grad got the head's weights from the pool, not a copy
    plain = HeadRuntime(bundle, share_weights=False)
    ids, mask = tokens(bundle)
    lora = loras(bundle)
    np.testing.assert_array_equal(runtime.forward(ids, mask, lora), plain.forward(ids, mask, lora))


def test_read_initializers_agrees_with_the_onnx_package(bundle):
    for name in ("head.onnx", "head_grad.onnx", "tail.onnx"):
        raw = bundle.file(name).read_bytes()
        ours = {t.name: t for t in read_initializers(raw)}
        model = onnx.load(bundle.file(name))
        assert list(ours) == [t.name for t in model.graph.initializer]
        for t in model.graph.initializer:
            mine = ours[t.name]
            assert (mine.data_type, mine.dims) == (t.data_type, tuple(t.dims))
            if mine.data:
                assert raw[mine.data[0]:mine.data[1]] == t.raw_data


def test_threads_reach_every_session(bundle):
    rt = HeadRuntime(bundle, threads=1)
    for session in (rt.head, rt.head_grad, rt.tail_session):
        assert session.get_session_options().intra_op_num_threads == 1


def test_tail_without_tail_onnx_is_a_clear_error(bundle):
    server_labels = Bundle(bundle.path, dataclasses.replace(bundle.manifest, labels="server"))
    rt = HeadRuntime(server_labels)
    assert not rt.has_tail
    hidden = np.zeros((1, 4, bundle.manifest.model.hidden_size), np.float32)
    with pytest.raises(BundleMismatch, match="no tail.onnx.*--labels device"):
        rt.tail(hidden, np.zeros((1, 4), np.int64), np.ones((1, 4), np.int64))


def test_lora_tensors_that_do_not_match_the_bundle_are_refused(bundle, runtime):
    ids, mask = tokens(bundle)
    lora = loras(bundle)
    name = next(iter(lora))
    with pytest.raises(BundleMismatch, match=f"missing \\['{name}'\\]"):
        runtime.forward(ids, mask, {n: a for n, a in lora.items() if n != name})
    with pytest.raises(BundleMismatch, match=f"LoRA tensor {name}: expected shape"):
        runtime.forward(ids, mask, {**lora, name: lora[name].T})


def test_misshapen_inputs_get_our_message(bundle, runtime):
    ids, mask = tokens(bundle)
    lora = loras(bundle)
    with pytest.raises(ValueError, match="one shape"):
        runtime.forward(ids, mask[:, :-1], lora)
    with pytest.raises(ValueError, match="sequence length must be in 3..128"):
        runtime.forward(np.zeros((1, 129), np.int64), np.ones((1, 129), np.int64), lora)
    with pytest.raises(ValueError, match="grad_hidden: expected shape"):
        runtime.lora_grads(ids, mask, np.zeros((B, T, 3), np.float32), lora)


def test_head_and_tail_train_end_to_end_and_the_loss_falls(bundle, runtime):
    """forward -> tail -> head_grad -> AdamW, with no body between: loss(tail(head(x))) must fall."""
    ids, mask = tokens(bundle)
    labels = np.where(mask == 1, ids, IGNORE_INDEX)
    lora, opt = bundle.lora_init(), AdamW(lr=1e-2)
    losses = []
    for _ in range(8):
        hidden = runtime.forward(ids, mask, lora)  # (B, T, H)
        loss, grad = runtime.tail(hidden, labels, mask)
        opt.step(lora, runtime.lora_grads(ids, mask, grad, lora))
        losses.append(loss)
    assert losses[-1] < losses[0] - 0.05, losses


# --- the meter ---------------------------------------------------------------------------------

def test_meter_records_every_field_of_a_step(tmp_path):
    meter = Meter(metrics_out=tmp_path / "metrics.jsonl")
    with meter.compute():
        sum(i * i for i in range(200_000))  # CPU work
    with meter.wait():
        time.sleep(0.05)
    meter.count_up(100)
    meter.count_up(20)
    meter.count_down(7)
    record = meter.end_step(step=3, loss=2.5)
    assert set(record) == {"step", "loss", "compute_s", "wait_s", "cpu_s", "wall_s", "bytes_up", "bytes_down",
                           "rss_peak_mb"}
    assert (record["step"], record["loss"], record["bytes_up"], record["bytes_down"]) == (3, 2.5, 120, 7)
    assert record["compute_s"] > 0 and 0.04 < record["wait_s"] < 1
    assert record["cpu_s"] > 0 and record["wall_s"] >= record["compute_s"] + record["wait_s"]
    assert record["cpu_s"] < record["wall_s"]  # sleeping is not CPU time
    assert 10 < record["rss_peak_mb"] < 100_000


def test_meter_appends_one_json_line_per_step_and_starts_each_step_afresh(tmp_path):
    path = tmp_path / "metrics.jsonl"
    meter = Meter(metrics_out=path)
    for step in range(3):
        meter.count_up(10 * (step + 1))
        meter.end_step(step=step, loss=1.0 / (step + 1))
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["step"] for r in lines] == [0, 1, 2] and [r["bytes_up"] for r in lines] == [10, 20, 30]
    assert lines == meter.records


def test_meter_makes_its_folder_and_refuses_an_unwritable_path_before_any_step(tmp_path):
    nested = tmp_path / "runs" / "a" / "metrics.jsonl"
    Meter(metrics_out=nested).end_step(step=0, loss=1.0)
    assert json.loads(nested.read_text())["step"] == 0
    (tmp_path / "file").write_text("")
    with pytest.raises(SplitLMError, match=r"--metrics-out .*file/metrics.jsonl: cannot write there \(its folder is a file\)"):
        Meter(metrics_out=tmp_path / "file" / "metrics.jsonl")


def test_meter_summary_has_totals_and_per_step_means():
    meter = Meter()
    for step in range(4):
        meter.count_down(100)
        meter.end_step(step=step, loss=4.0 - step)
    s = meter.summary()
    assert (s["steps"], s["first_loss"], s["last_loss"]) == (4, 4.0, 1.0)
    assert (s["bytes_down_total"], s["bytes_down_per_step"]) == (400, 100)
    assert {"compute_s_total", "wait_s_per_step", "cpu_s_total", "rss_peak_mb"} <= set(s)
    assert Meter().summary() == {"steps": 0}
