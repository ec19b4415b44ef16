"""export/cost.py: FLOPs and bytes of a client graph, counted from the graph, against the formula."""

from __future__ import annotations

import json

import pytest

from splitlm.export.cost import graph_cost
from splitlm.export.quantize import quantize_graph

B, T = 2, 16


def head_flops(config: dict, *, cut: int, rank: int, batch: int, seq: int) -> int:
    """2 * tokens * (every projection's in*out + LoRA on q and v) + QK^T and AV, per block."""
    h, i = config["hidden_size"], config["intermediate_size"]
    heads, kv = config["num_attention_heads"], config["num_key_value_heads"]
    d = h // heads
    weights = h * h * 2 + h * kv * d * 2 + 3 * h * i
    lora = (h * rank + rank * h) + (h * rank + rank * kv * d)
    attention = 2 * 2 * batch * heads * seq * seq * d
    return cut * (2 * batch * seq * (weights + lora) + attention)


@pytest.fixture(scope="module")
def bundle(tiny_bundle):
    return tiny_bundle("device")


def test_head_flops_match_the_model_formula(bundle, tiny_llama):
    config = json.loads((tiny_llama / "config.json").read_text())
    m = bundle.manifest
    want = head_flops(config, cut=m.cut, rank=m.lora.rank, batch=B, seq=T)
    cost = graph_cost(bundle.file("head.onnx"), batch=B, seq=T)
    assert cost.flops == pytest.approx(want, rel=1e-3)  # rotary's tiny outer product is the rest
    assert cost.weight_bytes >= 4 * config["vocab_size"] * config["hidden_size"]  # the fp32 embedding
    assert cost.activation_bytes > 2 * 4 * B * T * config["hidden_size"]


def test_quantized_graphs_count_the_same_flops_and_fewer_weight_bytes(bundle, tmp_path):
    """q8 counts exactly fp32's FLOPs. q4 counts more, by at most 1/32: its integer zero points
    carry a float correction, one more MatMul of (M x K/32) by (K/32 x N) per 4-bit weight
    (export/quantize.py::integer_zero_points), 1/32 of that weight's own MatMul."""
    fp32 = graph_cost(bundle.file("head_grad.onnx"), batch=B, seq=T)
    for preset in ("q8", "q4"):
        out = tmp_path / f"head_grad.{preset}.onnx"
        quantize_graph(bundle.file("head_grad.onnx"), out, preset=preset)
        quant = graph_cost(out, batch=B, seq=T)
        if preset == "q8":
            assert quant.flops == pytest.approx(fp32.flops, rel=1e-6) and fp32.flops > 0
        else:
            assert fp32.flops < quant.flops <= fp32.flops * (1 + 1 / 32) * (1 + 1e-6), (quant.flops, fp32.flops)
        assert quant.weight_bytes < fp32.weight_bytes / 3


def test_flops_grow_with_the_batch(bundle):
    one = graph_cost(bundle.file("tail.onnx"), batch=1, seq=T)
    two = graph_cost(bundle.file("tail.onnx"), batch=2, seq=T)
    assert two.flops == 2 * one.flops > 0
