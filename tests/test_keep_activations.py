"""--keep-activations: the training step's forward keeps what its backward reads (head_saved.onnx),
and the backward (head_grad_kept.onnx) reads it instead of running the forward again."""

from __future__ import annotations

import collections
import os
import subprocess

import numpy as np
import onnx
import pytest

from splitlm.edge_client.fit import Costs, MemoryBudgetError, choose_way, measure
from splitlm.edge_client.optim import AdamW
from splitlm.edge_client.runtime import HeadRuntime
from splitlm.edge_client.data import Dataset
from splitlm.errors import BundleMismatch, ExportError
from splitlm.export.bundle import ExportOptions
from splitlm.export.whole_bundle import check_whole_options
from splitlm.manifest import Bundle

from .conftest import ServerProcess, edge_cmd, run_cli
from .test_split_training import BATCH, LR, SEQ, centralized_losses, data_dir, read_metrics, serve_args  # noqa: F401

KEPT = ("head_saved.onnx", "head_grad_kept.onnx")
# (family, labels, quant): Llama with its tail on the device (the U-shape holds the kept
# activations while the tail runs), GPT-2 4-bit (the new graphs go through the quantizer too)
SETUPS = [("llama", "device", "fp32"), ("gpt2", "server", "q4")]


@pytest.fixture(scope="module")
def kept_bundles(tiny_llama, tiny_gpt2, tmp_path_factory):
    made = {}
    for family, labels, quant in SETUPS:
        out = tmp_path_factory.mktemp("kept") / family
        model = {"llama": tiny_llama, "gpt2": tiny_gpt2}[family]
        r = run_cli("export", str(model), "--cut", "2", "--labels", labels, "--quant", quant, "--lora-rank", "4",
                    "--max-length", "128", "--keep-activations", "--out", str(out))
        assert r.returncode == 0, r.stderr
        made[family] = Bundle.open(out)
    return made


@pytest.fixture(params=[s[0] for s in SETUPS])
def kept(request, kept_bundles) -> Bundle:
    return kept_bundles[request.param]


def batch(bundle: Bundle, b: int, t: int, seed: int):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, bundle.manifest.model.vocab_size, (b, t), dtype=np.int64)
    mask = np.ones_like(ids)
    if b > 1:
        mask[-1, t // 2:] = 0  # a padded row
    grad = rng.standard_normal((b, t, bundle.manifest.model.hidden_size)).astype(np.float32)
    return ids, mask, grad


def moved_loras(bundle: Bundle, seed: int = 1) -> dict[str, np.ndarray]:
    """LoRA tensors away from their init (B is zero there, which would hide half the gradient)."""
    rng = np.random.default_rng(seed)
    return {k: v + 0.05 * rng.standard_normal(v.shape).astype(np.float32) for k, v in bundle.lora_init().items()}


def matmuls(path) -> int:
    return collections.Counter(n.op_type for n in onnx.load(str(path)).graph.node)["MatMul"]


@pytest.mark.parametrize("shape", [(3, 11), (1, 40)])
def test_kept_gradients_equal_the_recomputed_ones(kept, shape):
    """Not the tracing example's batch 2 x 16: the saved tensors' batch and sequence dims are dynamic."""
    plain, keep = HeadRuntime(kept, threads=1), HeadRuntime(kept, threads=1, keep_activations=True)
    ids, mask, grad = batch(kept, *shape, seed=0)
    loras = moved_loras(kept)
    np.testing.assert_allclose(keep.forward(ids, mask, loras), plain.forward(ids, mask, loras), rtol=0, atol=1e-6)
    assert keep.kept is not None and keep.kept.saved, "the forward kept nothing"
    want = plain.lora_grads(ids, mask, grad, loras)
    got = keep.lora_grads(ids, mask, grad, loras)
    assert keep.kept is None, "the kept activations must go once their backward ran"
    assert keep._head_grad is None, "the backward ran head_grad.onnx (the forward again), not the kept graph"
    assert got.keys() == want.keys()
    scale = max(float(np.abs(w).max()) for w in want.values())
    assert scale > 1e-3
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=0, atol=1e-5 * scale, err_msg=name)


def test_the_kept_backward_graph_has_no_forward_in_it(kept):
    """head_grad runs the head's forward and its backward; head_grad_kept the backward alone, with
    each layer's attention scores q k^T computed again (export/attention.py): of the forward's
    MatMuls at most one per layer and one more are left, and the embedding lookup is gone."""
    head, grad, kept_grad = (matmuls(kept.file(n)) for n in ("head.onnx", "head_grad.onnx", "head_grad_kept.onnx"))
    assert kept_grad <= grad - head + kept.manifest.cut + 1, (head, grad, kept_grad)
    graph = onnx.load(str(kept.file("head_grad_kept.onnx"))).graph
    tables = {t.name for t in graph.initializer if t.dims and t.dims[0] == kept.manifest.model.vocab_size}
    assert not [n.name for n in graph.node if n.op_type.startswith("Gather") and n.input[0] in tables]
    outputs = [o.name for o in onnx.load(str(kept.file("head_saved.onnx")), load_external_data=False).graph.output]
    inputs = {i.name for i in onnx.load(str(kept.file("head_grad_kept.onnx")), load_external_data=False).graph.input}
    assert outputs[0] == "hidden" and len(outputs) > 1 and set(outputs[1:]) <= inputs


def test_a_backward_that_is_not_the_kept_forwards_runs_the_forward_again(kept_bundles):
    bundle = kept_bundles["llama"]
    plain, keep = HeadRuntime(bundle, threads=1), HeadRuntime(bundle, threads=1, keep_activations=True)
    loras = moved_loras(bundle)
    a, b = batch(bundle, 2, 10, seed=1), batch(bundle, 2, 10, seed=2)
    keep.forward(a[0], a[1], loras)
    other = keep.lora_grads(b[0], b[1], b[2], loras)  # another batch's backward
    for name, value in plain.lora_grads(b[0], b[1], b[2], loras).items():
        np.testing.assert_allclose(other[name], value, rtol=0, atol=1e-6, err_msg=name)
    keep.forward(a[0], a[1], loras)
    AdamW(lr=1e-2).step(loras, plain.lora_grads(a[0], a[1], a[2], loras))  # the LoRA moves in place
    moved = keep.lora_grads(a[0], a[1], a[2], loras)
    for name, value in plain.lora_grads(a[0], a[1], a[2], loras).items():
        np.testing.assert_allclose(moved[name], value, rtol=0, atol=1e-6, err_msg=name)


def test_keeping_needs_a_bundle_exported_with_it(tiny_bundle):
    with pytest.raises(BundleMismatch, match="export it with --keep-activations"):
        HeadRuntime(tiny_bundle("server"), keep_activations=True)
    with pytest.raises(ExportError, match="--keep-activations only applies to --mode split"):
        check_whole_options(ExportOptions(mode="fedavg", keep_activations=True))


def test_the_memory_probe_counts_the_kept_activations(kept_bundles):
    """--max-memory's model: the kept activations, counted from the arrays, sit beside the tail."""
    bundle = kept_bundles["llama"]
    costs = measure(str(bundle.path), seq=64, chunk=16, threads=1, keep_activations=True)
    rt = HeadRuntime(bundle, threads=1, keep_activations=True)
    ids = np.ones((1, 48), np.int64)
    rt.forward(ids, np.ones_like(ids), bundle.lora_init())
    held = sum(x.nbytes for x in rt.kept.saved.values()) / 1e6
    assert held > 0 and costs.kept_mb(1, 48) == pytest.approx(held, rel=0.02)
    # the prediction: the tail's chunk and the kept activations together, against the step
    made = Costs(sessions_mb=100.0, a=0.1, b=0.0, tail_per_token=1.0, hidden_size=64, measured="clear_refs",
                 kept_a=0.5, kept_b=0.001)
    buffers = 4 * 2 * 48 * 64 * 4 / 1e6
    assert made.predict(2, 48, 16) == pytest.approx(100.0 + 1.15 * (16 + 2 * (0.5 * 48 + 0.001 * 48 ** 2)) + buffers)
    no_tail = Costs(**{**made.__dict__, "tail_per_token": 0.0})  # labels at the server: the step's peak holds them
    assert no_tail.predict(2, 48, 16) == pytest.approx(100.0 + 1.15 * 2 * 0.1 * 48 + buffers)


def test_a_device_keeping_activations_trains_as_a_centralized_fine_tune(tiny_llama, kept_bundles, data_dir, tmp_path):
    """A real `splitlm edge --keep-activations` against a real server, labels on the device."""
    bundle = kept_bundles["llama"]
    steps = 10
    server = ServerProcess(*serve_args(tiny_llama, bundle, "--steps-per-round", "10"))
    try:
        metrics = tmp_path / "m.jsonl"
        r = subprocess.run(edge_cmd(server.url, bundle.path, data_dir / "client-0.jsonl", "--steps", str(steps),
                                    "--batch-size", str(BATCH), "--seq-len", str(SEQ), "--lr", str(LR),
                                    "--metrics-out", str(metrics), "--keep-activations", "--threads", "1"),
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stdout + r.stderr
    finally:
        server.stop()
    split = [row["loss"] for row in read_metrics(metrics)]
    data = Dataset.from_file(data_dir / "client-0.jsonl", bundle, seq_len=SEQ, batch_size=BATCH, seed=0)
    np.testing.assert_allclose(split, centralized_losses(tiny_llama, bundle, data, steps=steps), rtol=1e-3)


PLAIN = Costs(sessions_mb=100.0, a=0.1, b=0.0, tail_per_token=1.0, hidden_size=64, measured="clear_refs")
KEEPING = Costs(**{**PLAIN.__dict__, "a": 0.12, "kept_a": 0.2})


@pytest.mark.parametrize("budget,batch,keep", [(1000, 4, True), (170, 4, False), (150, 3, False), (125, 1, False)])
def test_the_device_keeps_activations_only_when_that_fits_as_large_a_batch(budget, batch, keep):
    """Under 170 MB recompute fits batch 4 (159.4 MB predicted, chunk 32) and keeping only batch 1
    (it needs 236.7 MB for 4): a faster step is not bought with a smaller batch. 1000 MB fits both
    at batch 4, and keeping wins; 125 MB fits only recompute, at batch 1."""
    fit, kept = choose_way(PLAIN, KEEPING, budget_mb=budget, batch=4, seq=128, chunk=64)
    assert (fit.batch, kept) == (batch, keep)
    assert fit.predicted_mb == pytest.approx((KEEPING if keep else PLAIN).predict(batch, 128, fit.chunk))
    assert choose_way(PLAIN, None, budget_mb=1000, batch=4, seq=128, chunk=64)[1] is False
    with pytest.raises(MemoryBudgetError):
        choose_way(PLAIN, KEEPING, budget_mb=110, batch=4, seq=128, chunk=64)


def test_max_memory_probes_both_ways_and_says_which_it_chose(kept_bundles, data_dir):
    """Nothing listens on port 9: the client stops at its first connection, after the choice."""
    bundle = kept_bundles["llama"]
    cmd = edge_cmd("ws://127.0.0.1:9", bundle.path, data_dir / "client-0.jsonl", "--max-memory", "2000",
                   "--threads", "1", "--steps", "1", "--batch-size", "2", "--seq-len", "32", "--reconnect-tries", "0")
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert "--max-memory 2000 MB: batch 2 x 32 tokens, tail chunk 64, activations kept for the backward" in out.stdout, \
        out.stdout + out.stderr
    assert out.returncode == 2 and "nothing ever answered at ws://127.0.0.1:9" in out.stderr


@pytest.mark.parametrize("heads,kv_heads", [(6, 2), (4, 4)])
def test_recomputed_attention_equals_transformers_eager_attention(heads, kv_heads):
    """export/attention.py against transformers' Llama eager attention: output and the gradients
    of q, k, v with grouped keys and values (6 query heads on 2) and without, a padded row masked."""
    import torch
    from torch import nn
    from transformers.models.llama.modeling_llama import eager_attention_forward

    from splitlm.export.arch import causal_mask
    from splitlm.export.attention import recomputed_attention

    gen = torch.Generator().manual_seed(0)
    b, t, d = 2, 9, 16
    q = torch.randn(b, heads, t, d, generator=gen, requires_grad=True)
    k = torch.randn(b, kv_heads, t, d, generator=gen, requires_grad=True)
    v = torch.randn(b, kv_heads, t, d, generator=gen, requires_grad=True)
    keys = torch.ones(b, t, dtype=torch.int64)
    keys[1, 6:] = 0
    mask = causal_mask(keys, torch.float32)
    module = nn.Module()
    module.num_key_value_groups, module.training = heads // kv_heads, False
    grad = torch.randn(b, t, heads, d, generator=gen)

    def run(attention):
        out, _ = attention(module, q, k, v, mask, scaling=d ** -0.5)
        return out, torch.autograd.grad(out, (q, k, v), grad)
    (want, want_grads), (got, got_grads) = run(eager_attention_forward), run(recomputed_attention)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    for name, g, w in zip("qkv", got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-5, msg=name)
