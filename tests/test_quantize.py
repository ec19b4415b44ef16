"""Quant presets on tiny random Llama and GPT-2 client graphs: ops, accuracy, gradients, size."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

from splitlm.errors import ExportError
from splitlm.export.arch import DEFAULT_TARGETS, Arch
from splitlm.export.graphs import ClientGraphs, export_client_graphs
from splitlm.export.lora import LoRAInputs, LoRASpec
from splitlm.export.quantize import (BLOCK, PRESETS, Q4_EMBEDDING_BLOCK, HQQWeightOnlyQuantConfig,
                                     asymmetric_4bit_blocks, drop_unused_initializers, integer_zero_points,
                                     matmul_nbits, pack_uint4, prepare_weights, quantize_graph)

FAMILIES = ("llama", "gpt2")
GRAPHS = ("head", "head_grad", "tail")
QUANTIZED = ("q8", "q4", "int8")
MATMUL_OP = {"q8": "MatMulNBits", "q4": "MatMulNBits", "int8": "MatMulInteger"}
EMBEDDING_OP = {"q8": "GatherBlockQuantized", "q4": "GatherBlockQuantized", "int8": "DequantizeLinear"}
# Per-token cosine of the head output against fp32, min over tokens, for a random tiny model
# (measured: q8 0.99994, q4 0.983, int8 0.9997).
MIN_HEAD_COSINE = {"q8": 0.999, "q4": 0.97, "int8": 0.995}
# Initializer bytes after / before (measured 0.27-0.29 for 8-bit, 0.20-0.223 for 4-bit): a byte or half
# a byte per weight, plus a scale (and a zero point) per block of 32; q4 also its float zero-point
# correction (`integer_zero_points`), 4 bytes a block.
MAX_WEIGHT_RATIO = {"q8": 0.30, "q4": 0.23, "int8": 0.30}
VOCAB, HIDDEN, BATCH, SEQ = 128, 64, 2, 12
ZP_CORRECTION_NODES = ("_block_sums", "_zp_correction")


def tiny_model(family: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if family == "llama":
        config = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2)
    else:
        config = GPT2Config(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=2, n_head=4, n_positions=64)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    for name, p in model.named_parameters():
        p.requires_grad_(False)
        if name.endswith(".bias"):  # nonzero, so GPT-2's addmm keeps its bias (Gemm with C)
            p.normal_(0, 0.02)
    return model


@pytest.fixture(scope="module")
def graphs(tmp_path_factory) -> dict[str, Path]:
    """family -> folder with head/head_grad/tail exported at cut 1, and `{graph}.{preset}.onnx`."""
    folders = {}
    for family in FAMILIES:
        model = tiny_model(family)
        arch = Arch.of(model)
        spec = LoRASpec(4, 8.0, DEFAULT_TARGETS[arch.family])
        lora = LoRAInputs(model, arch.target_modules(range(1), spec.targets), spec)
        folder = tmp_path_factory.mktemp(family)
        export_client_graphs(ClientGraphs(arch, 1, lora), folder, with_tail=True, max_seq=32)
        for graph in GRAPHS:
            for preset in PRESETS:
                quantize_graph(folder / f"{graph}.onnx", folder / f"{graph}.{preset}.onnx", preset=preset)
        folders[family] = folder
    return folders


def session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def feed_for(sess: ort.InferenceSession) -> dict[str, np.ndarray]:
    """Random inputs for any client graph: token ids, a right-padded mask, LoRA tensors, grads."""
    rng = np.random.default_rng(0)
    mask = np.ones((BATCH, SEQ), np.int64)
    mask[1, SEQ - 3:] = 0
    ids = rng.integers(0, VOCAB, (BATCH, SEQ))
    known = {"input_ids": ids, "labels": ids, "attention_mask": mask}
    feed = {}
    for i in sess.get_inputs():
        if i.name in known:
            feed[i.name] = known[i.name]
        else:  # LoRA tensors (r, in) / (out, r), activations and their gradients (B, T, H)
            shape = [BATCH, SEQ, HIDDEN] if i.name in ("hidden", "grad_hidden") else i.shape
            feed[i.name] = rng.standard_normal(shape).astype(np.float32) * 0.1
    return feed


def sessions(folder: Path, graph: str, preset: str) -> tuple[ort.InferenceSession, ort.InferenceSession]:
    """(fp32, quantized) sessions of one graph."""
    return session(folder / f"{graph}.onnx"), session(folder / f"{graph}.{preset}.onnx")


def run_both(folder: Path, graph: str, preset: str) -> tuple[list[np.ndarray], list[np.ndarray]]:
    ref, quant = sessions(folder, graph, preset)
    feed = feed_for(ref)
    return ref.run(None, feed), quant.run(None, feed)


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine along the last axis."""
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def weight_bytes(path: Path) -> int:
    """Bytes of the initializers, once each Transpose(W) is its own initializer as it is quantized."""
    model = onnx.load(path)
    prepare_weights(model.graph)
    drop_unused_initializers(model.graph)
    return sum(numpy_helper.to_array(t).nbytes for t in model.graph.initializer)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("preset", QUANTIZED)
def test_every_constant_weight_gets_a_quantized_op(graphs, family, preset):
    for graph in GRAPHS:
        model = onnx.load(graphs[family] / f"{graph}.{preset}.onnx")
        inits = {t.name: t for t in model.graph.initializer}
        ops = {n.op_type for n in model.graph.node}
        assert MATMUL_OP[preset] in ops, graph
        assert graph == "tail" or EMBEDDING_OP[preset] in ops, graph
        # q4's zero-point corrections (`integer_zero_points`) are quantization parameters, one
        # float per block like the scales, not weights
        float_weights = [n.name for n in model.graph.node if n.op_type in ("MatMul", "Gemm", "Gather")
                         and not n.name.endswith(ZP_CORRECTION_NODES)
                         and any(x in inits and inits[x].data_type == TensorProto.FLOAT
                                 and len(inits[x].dims) == 2 for x in n.input)]
        assert float_weights == [], f"{graph}: float weights left on {float_weights}"


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("preset", QUANTIZED)
def test_inputs_and_outputs_stay_float_and_unchanged(graphs, family, preset):
    def signature(values) -> list[tuple]:
        return [(v.name, v.type, v.shape) for v in values]

    for graph in GRAPHS:
        ref, quant = sessions(graphs[family], graph, preset)
        assert signature(quant.get_inputs()) == signature(ref.get_inputs())
        assert signature(quant.get_outputs()) == signature(ref.get_outputs())


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("preset", QUANTIZED)
def test_head_output_stays_close_to_fp32(graphs, family, preset):
    (ref,), (quant,) = run_both(graphs[family], "head", preset)
    per_token = cosine(ref, quant)  # (B, T)
    assert per_token.min() >= MIN_HEAD_COSINE[preset], per_token.min()


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("preset", QUANTIZED)
def test_lora_gradients_point_the_same_way_as_fp32(graphs, family, preset):
    ref, quant = run_both(graphs[family], "head_grad", preset)
    for r, q in zip(ref, quant):
        assert np.abs(r).max() > 0
        assert cosine(r.ravel(), q.ravel()) > 0.9


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("preset", QUANTIZED)
def test_tail_loss_and_gradient_stay_close_to_fp32(graphs, family, preset):
    (ref_loss, ref_grad), (loss, grad) = run_both(graphs[family], "tail", preset)
    assert abs(loss - ref_loss) < 0.01 * abs(ref_loss)
    assert cosine(ref_grad.ravel(), grad.ravel()) > 0.99


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("preset", QUANTIZED)
def test_weights_shrink_by_the_expected_factor(graphs, family, preset):
    for graph in GRAPHS:
        fp32, quant = graphs[family] / f"{graph}.onnx", graphs[family] / f"{graph}.{preset}.onnx"
        assert weight_bytes(quant) <= MAX_WEIGHT_RATIO[preset] * weight_bytes(fp32), graph
        assert quant.stat().st_size < fp32.stat().st_size


def test_fp32_preset_copies_the_graph(graphs):
    folder = graphs["llama"]
    for graph in GRAPHS:
        assert (folder / f"{graph}.fp32.onnx").read_bytes() == (folder / f"{graph}.onnx").read_bytes()


def test_unknown_preset_is_refused(tmp_path):
    with pytest.raises(ExportError, match="unknown quant preset 'q3'"):
        quantize_graph(tmp_path / "head.onnx", tmp_path / "out.onnx", preset="q3")


def shared_weight_graph(path: Path) -> None:
    """One (64, 64) table read five ways: x @ W, relu(x) @ W, x @ Transpose(W), and two Gathers."""
    w = np.random.default_rng(1).standard_normal((64, 64)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y1"]),
             helper.make_node("Relu", ["x"], ["rx"]),
             helper.make_node("MatMul", ["rx", "w"], ["y2"]),
             helper.make_node("Transpose", ["w"], ["wt"], perm=[1, 0]),
             helper.make_node("MatMul", ["x", "wt"], ["y3"]),
             helper.make_node("Gather", ["w", "ids"], ["y4"]),
             helper.make_node("Gather", ["w", "ids"], ["y5"])]
    floats = lambda name: helper.make_tensor_value_info(name, TensorProto.FLOAT, ["n", 64])  # noqa: E731
    inputs = [floats("x"), helper.make_tensor_value_info("ids", TensorProto.INT64, ["n"])]
    graph = helper.make_graph(nodes, "shared", inputs, [floats(f"y{i}") for i in range(1, 6)],
                              [numpy_helper.from_array(w, "w")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), path)


@pytest.mark.parametrize("preset", QUANTIZED)
def test_a_weight_shared_by_matmuls_and_gathers_is_quantized_per_layout(tmp_path, preset):
    shared_weight_graph(tmp_path / "shared.onnx")
    quantize_graph(tmp_path / "shared.onnx", tmp_path / "q.onnx", preset=preset)
    model = onnx.load(tmp_path / "q.onnx")
    onnx.checker.check_model(model)
    names = [t.name for t in model.graph.initializer]
    assert len(names) == len(set(names))
    weight_matmuls = {n.op_type for n in model.graph.node if not n.name.endswith(ZP_CORRECTION_NODES)}
    assert not {"MatMul", "Transpose"} & weight_matmuls
    # three copies at <= 8 bits plus scales: W and W.T for the MatMuls, W for the two Gathers
    assert sum(numpy_helper.to_array(t).nbytes for t in model.graph.initializer) < 3 * 64 * 64 * 1.25
    rng = np.random.default_rng(2)
    feed = {"x": rng.standard_normal((5, 64)).astype(np.float32), "ids": np.array([0, 3, 3, 63, 7])}
    refs, quants = session(tmp_path / "shared.onnx").run(None, feed), session(tmp_path / "q.onnx").run(None, feed)
    for ref, quant in zip(refs, quants):
        assert cosine(ref, quant).min() > 0.99


@pytest.mark.parametrize("preset", QUANTIZED)
def test_a_transpose_of_a_transpose_of_a_weight_is_quantized_too(tmp_path, preset):
    """A tied LM head's backward reads its table as Transpose(Transpose(W)): folded only halfway,
    that MatMul kept a float copy of the whole table in every quantized graph that trains through it."""
    w = np.random.default_rng(3).standard_normal((64, 96)).astype(np.float32)
    nodes = [helper.make_node("Transpose", ["w"], ["wt"], perm=[1, 0]),
             helper.make_node("MatMul", ["x", "wt"], ["y1"]),            # (n, 96) @ (96, 64)
             helper.make_node("Transpose", ["wt"], ["wtt"], perm=[1, 0]),
             helper.make_node("MatMul", ["y1", "wtt"], ["y2"])]          # (n, 64) @ (64, 96)
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 96])],
                              [helper.make_tensor_value_info("y2", TensorProto.FLOAT, ["n", 96])],
                              [numpy_helper.from_array(w, "w")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), tmp_path / "chain.onnx")
    quantize_graph(tmp_path / "chain.onnx", tmp_path / "q.onnx", preset=preset)
    model = onnx.load(tmp_path / "q.onnx")
    assert "Transpose" not in {n.op_type for n in model.graph.node}
    big_floats = [t.name for t in model.graph.initializer
                  if t.data_type == TensorProto.FLOAT and np.prod(t.dims) >= w.size // 8]
    assert big_floats == [], big_floats  # scales are 1/32 of a weight; a float weight is all of it
    x = np.random.default_rng(4).standard_normal((5, 96)).astype(np.float32)
    ref, quant = session(tmp_path / "chain.onnx").run(None, {"x": x})[0], session(tmp_path / "q.onnx").run(None, {"x": x})[0]
    assert cosine(ref, quant).min() > 0.98


@pytest.mark.parametrize("preset", QUANTIZED)
def test_row_slices_of_a_weight_are_quantized_as_their_own_weights(tmp_path, preset):
    """The train graph's chunked loss reads the LM head as Transpose(Slice(W)) and Slice(W), one
    pair per chunk: folded, each slice is a MatMul weight the quantizer sees; no float table stays."""
    w = np.random.default_rng(5).standard_normal((96, 64)).astype(np.float32)
    consts = [numpy_helper.from_array(np.array(v, np.int64), n) for n, v in
              (("s0", [0]), ("e0", [40]), ("s1", [40]), ("e1", [2 ** 62]), ("ax", [0]), ("st", [1]))]
    nodes = [helper.make_node("Slice", ["w", "s0", "e0", "ax", "st"], ["w0"]),
             helper.make_node("Slice", ["w", "s1", "e1", "ax"], ["w1"]),         # steps omitted, end clamped
             helper.make_node("Transpose", ["w0"], ["w0t"], perm=[1, 0]),
             helper.make_node("MatMul", ["x", "w0t"], ["l0"]),                   # (n, 64) @ (64, 40)
             helper.make_node("MatMul", ["l0", "w0"], ["y"]),                    # (n, 40) @ (40, 64)
             helper.make_node("Transpose", ["w1"], ["w1t"], perm=[1, 0]),
             helper.make_node("MatMul", ["x", "w1t"], ["l1"])]                   # (n, 64) @ (64, 56)
    outputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["n", d]) for n, d in (("y", 64), ("l1", 56))]
    graph = helper.make_graph(nodes, "slices", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 64])],
                              outputs, [numpy_helper.from_array(w, "w"), *consts])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), tmp_path / "slices.onnx")
    quantize_graph(tmp_path / "slices.onnx", tmp_path / "q.onnx", preset=preset)
    model = onnx.load(tmp_path / "q.onnx")
    assert not {"Slice", "Transpose"} & {n.op_type for n in model.graph.node}
    big_floats = [t.name for t in model.graph.initializer
                  if t.data_type == TensorProto.FLOAT and np.prod(t.dims) >= 40 * 64 // 8]
    assert big_floats == [], big_floats
    x = np.random.default_rng(6).standard_normal((5, 64)).astype(np.float32)
    for ref, quant in zip(session(tmp_path / "slices.onnx").run(None, {"x": x}), session(tmp_path / "q.onnx").run(None, {"x": x})):
        assert cosine(ref, quant).min() > 0.98


def test_uint4_packing_puts_the_first_value_in_the_low_nibble():
    assert pack_uint4(np.array([[1, 2], [3, 15]])) == bytes([0x21, 0xF3])
    assert pack_uint4(np.array([1, 2, 3])) == bytes([0x21, 0x03])  # an odd count ends in a half byte


def test_4bit_embedding_looks_up_what_its_codes_say_and_stays_within_a_step(tmp_path):
    """The hand-built q4 table on a tiny embedding (a ragged last block, an outlier column, a zero
    row): onnxruntime's lookups equal (code - zero point) * scale of the codes we computed (so the
    packing and the zero point layout are right), each value lands within a step of the float one
    (1.5 where an end code clipped it), and the table is closer to the float one than min/max
    round-to-nearest."""
    rng = np.random.default_rng(3)
    table = rng.standard_normal((9, 40)).astype(np.float32) * 0.1
    table[:, 5] *= 8
    table[4] = 0
    graph = helper.make_graph([helper.make_node("Gather", ["table", "ids"], ["y"], name="embed")], "embedding",
                              [helper.make_tensor_value_info("ids", TensorProto.INT64, ["n"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 40])],
                              [numpy_helper.from_array(table, "table")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), tmp_path / "emb.onnx")
    quantize_graph(tmp_path / "emb.onnx", tmp_path / "q4.onnx", preset="q4")
    model = onnx.load(tmp_path / "q4.onnx")
    onnx.checker.check_model(model)
    assert [n.op_type for n in model.graph.node] == ["GatherBlockQuantized", "Cast"]
    ids = np.array([8, 0, 4, 4, 1, 2, 3, 5, 6, 7])
    got = session(tmp_path / "q4.onnx").run(None, {"ids": ids})[0]

    codes, scales, zero_points = asymmetric_4bit_blocks(table)
    assert codes.shape == table.shape and scales.shape == zero_points.shape == (9, 3)
    block_of = np.arange(40) // Q4_EMBEDDING_BLOCK
    step = scales.astype(np.float16).astype(np.float32)[:, block_of]  # float16 scales in the graph
    expected = (codes.astype(np.float32) - zero_points[:, block_of]) * step
    np.testing.assert_allclose(got, expected[ids], rtol=2e-3, atol=1e-6)  # float16 output, cast back

    error = np.abs(expected - table)
    assert np.all(error[4] == 0)
    clipped = (codes == 0) | (codes == 15)  # the end codes may have cut a value short
    assert np.all(error[~clipped] <= step[~clipped] + 1e-6)
    assert np.all(error <= 1.5 * step + 1e-6)
    blocks = np.pad(table, ((0, 0), (0, 8))).reshape(9, 3, Q4_EMBEDDING_BLOCK)
    low, high = np.minimum(blocks.min(-1, keepdims=True), 0), np.maximum(blocks.max(-1, keepdims=True), 0)
    rtn_step = np.where(high > low, (high - low) / 15, 1)
    rtn_zero = np.round(-low / rtn_step)
    rtn = (np.clip(np.round(blocks / rtn_step + rtn_zero), 0, 15) - rtn_zero) * rtn_step
    assert (error ** 2).sum() < ((rtn.reshape(9, -1)[:, :40] - table) ** 2).sum()


@pytest.mark.parametrize("family", FAMILIES)
def test_q4_integer_zero_points_compute_the_same_product_as_hqqs_float_ones(graphs, family, tmp_path):
    """HQQ's float zero points, rewritten as integer ones plus a float correction, give the same
    head and gradients (float compute, 1e-5) and leave no float zero point; and the q4 preset's
    MatMulNBits all compute in int8 on those integer zero points."""
    for graph in ("head", "head_grad"):
        model = onnx.load(graphs[family] / f"{graph}.onnx")
        prepare_weights(model.graph)
        hqq = matmul_nbits(model, HQQWeightOnlyQuantConfig(block_size=BLOCK, bits=4))
        onnx.save(hqq, tmp_path / "float_zp.onnx")
        integer_zero_points(hqq.graph)
        drop_unused_initializers(hqq.graph)
        onnx.save(hqq, tmp_path / "int_zp.onnx")
        inits = {t.name: t for t in hqq.graph.initializer}
        nbits = [n for n in hqq.graph.node if n.op_type == "MatMulNBits"]
        assert nbits and all(inits[n.input[3]].data_type == TensorProto.UINT8 for n in nbits)
        assert sum(n.name.endswith("_zp_correction") for n in hqq.graph.node) == len(nbits)
        ref, got = session(tmp_path / "float_zp.onnx"), session(tmp_path / "int_zp.onnx")
        feed = feed_for(ref)
        for r, g in zip(ref.run(None, feed), got.run(None, feed)):
            np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5 * np.abs(r).max())

        preset = onnx.load(graphs[family] / f"{graph}.q4.onnx")
        inits = {t.name: t for t in preset.graph.initializer}
        for n in (n for n in preset.graph.node if n.op_type == "MatMulNBits"):
            attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
            assert attrs["accuracy_level"] == 4 and inits[n.input[3]].data_type == TensorProto.UINT8, n.name
