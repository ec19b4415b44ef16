"""The device's own memory: the meter's peak is the process's own, not a parent's."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from splitlm.edge_client.meter import rss_peak_mb, vm_hwm_kib

PARENT_MB = 800

# One training step of the device code in a fresh process; prints its meter record and ru_maxrss.
DEVICE_STEP = """
import json, resource, sys
import numpy as np
import pytest
from splitlm.edge_client.meter import Meter
from splitlm.edge_client.runtime import HeadRuntime
rt = HeadRuntime(sys.argv[1], threads=1)
ids = np.ones((1, 16), np.int64); mask = np.ones_like(ids); loras = rt.bundle.lora_init()
meter = Meter()
with meter.compute():
    hidden = rt.forward(ids, mask, loras)
    rt.lora_grads(ids, mask, np.full_like(hidden, 1e-3), loras)
record = meter.end_step(step=0, loss=None)
print(json.dumps({"rss_peak_mb": record["rss_peak_mb"],
                  "ru_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e6}))
"""


def test_a_device_started_by_a_large_parent_reports_its_own_peak(tiny_bundle):
    bundle = tiny_bundle("device")  # the one the other device tests use
    ballast = np.ones(PARENT_MB * 1_000_000 // 8)  # 800 MB touched in this (the parent) process
    assert rss_peak_mb() > PARENT_MB
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", DEVICE_STEP, str(bundle.path)], capture_output=True, text=True,
                         env=env, check=True, timeout=120)
    del ballast
    child = json.loads(out.stdout.strip().splitlines()[-1])
    assert child["ru_maxrss_mb"] > PARENT_MB  # what the meter used to report: the parent's peak
    assert 10 < child["rss_peak_mb"] < 250, child  # numpy + onnxruntime + a tiny bundle


def test_vm_hwm_is_read_from_a_status_file_and_absent_files_give_none(tmp_path):
    status = tmp_path / "status"
    status.write_text("Name:\tpython\nVmPeak:\t  900 kB\nVmHWM:\t   12345 kB\nVmRSS:\t 100 kB\n")
    assert vm_hwm_kib(status) == 12345
    assert vm_hwm_kib(tmp_path / "missing") is None
    own = vm_hwm_kib(Path("/proc/self/status")) * 1024 / 1e6
    assert abs(rss_peak_mb() - own) < 5  # on Linux the meter reads exactly this


# --- the runtime's memory choices keep its outputs exact -----------------------------------------

def quantized_copy(bundle, out: Path, preset: str) -> "Bundle":
    """The tiny bundle with its graphs quantized as `splitlm export --quant preset` does."""
    import dataclasses
    import shutil

    from splitlm.export.bundle import TAIL_ACCURACY_LEVEL, tail_preset
    from splitlm.export.quantize import quantize_graph
    from splitlm.manifest import Bundle

    shutil.copytree(bundle.path, out)
    for name in ("head.onnx", "head_grad.onnx", "tail.onnx"):
        tail = name == "tail.onnx"
        quantize_graph(bundle.file(name), out / name, preset=tail_preset(preset) if tail else preset,
                       accuracy_level=TAIL_ACCURACY_LEVEL if tail else None)
    return Bundle(out, dataclasses.replace(bundle.manifest, quant=preset))


def test_a_q4_runtime_shares_its_4bit_embedding_and_matches_plain_sessions(tiny_bundle, tmp_path, monkeypatch):
    import onnxruntime as ort

    from splitlm.edge_client import runtime

    q4 = quantized_copy(tiny_bundle("device"), tmp_path / "q4", "q4")
    monkeypatch.setattr(runtime, "SHARE_MIN_BYTES", 512)  # the tiny 4-bit embedding is 10 kB
    rt = runtime.HeadRuntime(q4, threads=1, tail_chunk=None)
    assert {key[0] for key in rt.pool.values} >= {21}  # a packed uint4 tensor, held once for both graphs
    rng = np.random.default_rng(0)
    ids = rng.integers(0, q4.manifest.model.vocab_size, (2, 12)).astype(np.int64)
    mask = np.ones_like(ids)
    loras = {n: (rng.standard_normal(s) * 0.1).astype(np.float32) for n, s in q4.manifest.lora.tensors.items()}
    plain = {n: ort.InferenceSession(str(q4.file(n)), providers=["CPUExecutionProvider"])
             for n in ("head.onnx", "head_grad.onnx", "tail.onnx")}
    feed = {"input_ids": ids, "attention_mask": mask, **loras}
    np.testing.assert_allclose(rt.forward(ids, mask, loras), plain["head.onnx"].run(["hidden"], feed)[0],
                               rtol=1e-5, atol=1e-6)
    g = rng.standard_normal((2, 12, q4.manifest.model.hidden_size)).astype(np.float32)
    names = list(q4.manifest.lora.tensors)
    want = plain["head_grad.onnx"].run([f"grad.{n}" for n in names], {**feed, "grad_hidden": g})
    got = rt.lora_grads(ids, mask, g, loras)
    for name, w in zip(names, want):
        np.testing.assert_allclose(got[name], w, rtol=1e-4, atol=1e-6)
    loss, grad = rt.tail(g, ids, mask)
    want_loss, want_grad = plain["tail.onnx"].run(["loss", "grad_hidden"],
                                                  {"hidden": g, "labels": ids, "attention_mask": mask})
    assert loss == pytest.approx(float(want_loss), rel=1e-6)
    np.testing.assert_allclose(grad, want_grad, rtol=1e-5, atol=1e-7)


def test_head_grad_frees_buffers_early_and_gives_the_same_gradients(tiny_bundle):
    from splitlm.edge_client.runtime import HeadRuntime

    bundle = tiny_bundle("device")
    lean, reusing = HeadRuntime(bundle, threads=1), HeadRuntime(bundle, threads=1, grad_mem_reuse=True)
    assert not lean.head_grad.get_session_options().enable_mem_reuse  # the step's peak is here
    assert lean.head.get_session_options().enable_mem_reuse           # the forward keeps its speed
    assert reusing.head_grad.get_session_options().enable_mem_reuse
    rng = np.random.default_rng(1)
    ids = rng.integers(0, bundle.manifest.model.vocab_size, (2, 16)).astype(np.int64)
    mask = np.ones_like(ids)
    loras = {n: (rng.standard_normal(s) * 0.1).astype(np.float32) for n, s in bundle.manifest.lora.tensors.items()}
    g = rng.standard_normal((2, 16, bundle.manifest.model.hidden_size)).astype(np.float32)
    want = reusing.lora_grads(ids, mask, g, loras)
    for name, got in lean.lora_grads(ids, mask, g, loras).items():
        np.testing.assert_array_equal(got, want[name])
