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
    q4 = tmp_path / "head_grad.q4.onnx"
    quantize_graph(bundle.file("head_grad.onnx"), q4, preset="q4")
    fp32 = graph_cost(bundle.file("head_grad.onnx"), batch=B, seq=T)
    quant = graph_cost(q4, batch=B, seq=T)
    assert quant.flops == pytest.approx(fp32.flops, rel=1e-6) and fp32.flops > 0
    assert quant.weight_bytes < fp32.weight_bytes / 3


def test_flops_grow_with_the_batch(bundle):
    one = graph_cost(bundle.file("tail.onnx"), batch=1, seq=T)
    two = graph_cost(bundle.file("tail.onnx"), batch=2, seq=T)
    assert two.flops == 2 * one.flops > 0
