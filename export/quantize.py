"""Weight quantization of the client graphs (head, head_grad, tail), one preset per bundle.

    fp32   the exported graph, copied as is
    q8     MatMulNBits 8-bit symmetric, block 32                + 8-bit GatherBlockQuantized embedding
    q4     MatMulNBits 4-bit asymmetric, block 32, HQQ, int8 compute + 4-bit GatherBlockQuantized embedding, block 16
    int8   quantize_dynamic: MatMulInteger (int8 weights per channel) + 8-bit Gather; MatMuls
           with K > N get 8-bit MatMulNBits instead (see `quantize_int8`)

q4 uses HQQ (a half-quadratic solver for scale and a float zero point per block): on SmolLM2-135M
cut at K=2 it reproduces the model's GGUF Q4_1 weights almost exactly, where round-to-nearest
with integer zero points (DEFAULT, RTN, k_quant) costs +3.5% perplexity on some text. Float zero
points keep onnxruntime's MatMulNBits on its float path (it dequantizes every block per run;
`accuracy_level=4` is ignored), so each is split into a rounded integer zero point and a float
correction that is exactly the difference (`integer_zero_points`), and q4 computes in int8.

Only frozen weights (initializers) are quantized: the LoRA tensors and the activations are graph
inputs and stay float. The quantizers only see a MatMul whose B is an initializer, so each graph
is first put in that form:

    Transpose(W), Slice(W)  -> a transposed or sliced initializer (the VJP's backward matmuls,
                               the train graph's LM head in chunks)
    Gemm(A, W, C)           -> MatMul(A, W) + C           (GPT-2's Conv1D is an addmm)

The MatMuls go through `onnxruntime.quantization`; the embeddings (GatherBlockQuantized) are
built here: onnxruntime's quantizer writes no 8-bit Gather, and its 4-bit one costs q4 too much
(see `gather_4bit`). A weight shared by several MatMuls (or Gathers) is stored once; a table both
gathered and multiplied (a tied embedding) gets one quantized copy per layout.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper
from onnxruntime.quantization import QuantType, quantize_dynamic
from onnxruntime.quantization.matmul_nbits_quantizer import (
    DefaultWeightOnlyQuantConfig,
    HQQWeightOnlyQuantConfig,
    MatMulNBitsQuantizer,
    WeightOnlyQuantConfig,
)

from splitlm.errors import ExportError

# The quantizer logs every node it visits at INFO.
logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)

PRESETS = ("fp32", "q8", "q4", "int8")
BLOCK = 32  # weights per quantization block, along the reduced axis (MatMul K, embedding hidden)
Q4_EMBEDDING_BLOCK = 16
MS_DOMAIN = "com.microsoft"
FLOATS = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16)


def quantize_graph(src: Path, dst: Path, *, preset: str, accuracy_level: int | None = None) -> None:
    """Write `src` quantized with `preset` to `dst`, as one self-contained .onnx file.

    `accuracy_level` (MatMulNBits' attribute; 4 = int8 compute), when given, is set on every
    MatMulNBits node afterwards; None keeps the preset's own choice."""
    if preset not in PRESETS:
        raise ExportError(f"unknown quant preset {preset!r}: choose from {', '.join(PRESETS)}")
    if preset == "fp32":
        shutil.copyfile(src, dst)
        return
    model = onnx.load(src)
    prepare_weights(model.graph)
    model = QUANTIZERS[preset](model)
    if accuracy_level is not None:
        set_accuracy_level(model.graph, accuracy_level)
    drop_unused_initializers(model.graph)
    onnx.save(model, dst)


# --- putting every constant weight behind a MatMul -----------------------------------------------

def prepare_weights(graph: onnx.GraphProto) -> None:
    """Fold Transpose and Slice of initializers, split Gemm and untie gathered tables, so that each frozen
    weight is a MatMul's constant B or a Gather's own table."""
    fold_constant_views(graph)
    split_gemms(graph)
    untie_gathered_matmul_weights(graph)
    name_nodes(graph)


def fold_constant_views(graph: onnx.GraphProto) -> None:
    """Replace each Transpose or Slice of an initializer (with constant starts, ends, axes, steps)
    by the initializer it computes, under its output name.

    Chains fold too (nodes come in topological order): the whole-model train and kd_grad graphs
    read the tied LM head's table as Transpose(Transpose(W)) in the backward, and the train graph's
    chunked loss reads it as Transpose(Slice(W)) per chunk. Left in place, that MatMul's B is no
    initializer, so a q8 or q4 bundle kept a float copy of the whole table there (SmolLM2: 113 MB,
    and onnxruntime's folded copy of it another 113 MB)."""
    inits = {t.name: t for t in graph.initializer}
    kept = []
    for node in graph.node:
        array = _folded(node, inits)
        if array is None:
            kept.append(node)
            continue
        folded = numpy_helper.from_array(np.ascontiguousarray(array), node.output[0])
        graph.initializer.append(folded)
        inits[folded.name] = folded
    replace_repeated(graph.node, kept)


def _folded(node: onnx.NodeProto, inits: dict) -> np.ndarray | None:
    """What a Transpose or Slice of constants computes, or None (not one, or not all constant)."""
    if node.op_type not in ("Transpose", "Slice") or not all(i in inits for i in node.input if i):
        return None
    array = numpy_helper.to_array(inits[node.input[0]])
    if node.op_type == "Transpose":
        return np.transpose(array, _attr(node, "perm", list(reversed(range(array.ndim)))))
    starts, ends, axes, steps = (numpy_helper.to_array(inits[i]) if i else None
                                 for i in [*node.input[1:], "", "", ""][:4])
    axes = range(len(starts)) if axes is None else axes
    steps = [1] * len(starts) if steps is None else steps
    index = [slice(None)] * array.ndim
    for start, end, axis, step in zip(starts, ends, axes, steps):
        index[int(axis)] = slice(int(start), int(end), int(step))  # numpy clamps as ONNX does
    return array[tuple(index)]


def split_gemms(graph: onnx.GraphProto) -> None:
    """Gemm(A, W[, C]) with a constant W -> MatMul(A, W) (+ Add C), W transposed if transB."""
    inits = {t.name: t for t in graph.initializer}
    nodes = []
    for node in graph.node:
        if not _is_plain_weight_gemm(node, inits):
            nodes.append(node)
            continue
        weight = node.input[1]
        if _attr(node, "transB", 0):
            weight = f"{weight}.T"
            array = np.ascontiguousarray(numpy_helper.to_array(inits[node.input[1]]).T)
            graph.initializer.append(numpy_helper.from_array(array, weight))
        nodes.extend(_matmul_plus_bias(node, weight))
    replace_repeated(graph.node, nodes)


def _is_plain_weight_gemm(node: onnx.NodeProto, inits: dict) -> bool:
    return (node.op_type == "Gemm" and node.input[1] in inits and not _attr(node, "transA", 0)
            and _attr(node, "alpha", 1.0) == 1.0 and _attr(node, "beta", 1.0) == 1.0)


def _matmul_plus_bias(gemm: onnx.NodeProto, weight: str) -> list[onnx.NodeProto]:
    has_bias = len(gemm.input) > 2 and gemm.input[2]
    product = f"{gemm.output[0]}.matmul" if has_bias else gemm.output[0]
    nodes = [helper.make_node("MatMul", [gemm.input[0], weight], [product], name=f"{gemm.name}.matmul")]
    if has_bias:
        bias = helper.make_node("Add", [product, gemm.input[2]], [gemm.output[0]], name=f"{gemm.name}.bias")
        nodes.append(bias)
    return nodes


def untie_gathered_matmul_weights(graph: onnx.GraphProto) -> None:
    """Give Gathers their own copy of a table that a MatMul also reads: the two are quantized in
    different layouts, and the quantizers would name both `<table>_Q<bits>`."""
    matmul_weights = {n.input[1] for n in graph.node if n.op_type == "MatMul"}
    inits = {t.name: t for t in graph.initializer}
    for node in graph.node:
        table = node.input[0]
        if node.op_type == "Gather" and table in inits and table in matmul_weights:
            node.input[0] = f"{table}.gather"
            if node.input[0] not in inits:
                inits[node.input[0]] = numpy_helper.from_array(numpy_helper.to_array(inits[table]), node.input[0])
                graph.initializer.append(inits[node.input[0]])


def name_nodes(graph: onnx.GraphProto) -> None:
    """Give every node a unique name: the quantizers select and exclude nodes by name."""
    seen: set[str] = set()
    for i, node in enumerate(graph.node):
        if not node.name or node.name in seen:
            node.name = f"{node.op_type.lower()}_{i}"
        seen.add(node.name)


def weight_nodes(graph: onnx.GraphProto, op_type: str) -> list[str]:
    """Names of `op_type` nodes whose weight (MatMul B, Gather data) is a 2-D float initializer."""
    inits = {t.name: t for t in graph.initializer}
    slot = {"MatMul": 1, "Gather": 0}[op_type]
    return [n.name for n in graph.node if n.op_type == op_type and n.input[slot] in inits
            and len(inits[n.input[slot]].dims) == 2 and inits[n.input[slot]].data_type in FLOATS]


def reducing_matmuls(graph: onnx.GraphProto) -> list[str]:
    """Weight MatMuls whose weight (K, N) has K > N."""
    dims = {t.name: t.dims for t in graph.initializer}
    weights = set(weight_nodes(graph, "MatMul"))
    return [n.name for n in graph.node if n.name in weights and dims[n.input[1]][0] > dims[n.input[1]][1]]


# --- presets ---------------------------------------------------------------------------------------

def nbits8(*, accuracy_level: int | None = None) -> DefaultWeightOnlyQuantConfig:
    """8-bit symmetric MatMulNBits. accuracy_level=4 computes in int8, about 2x faster on CPU, but
    costs SmolLM2 up to +0.22% perplexity (float compute: +0.06%), over q8's budget of 0.2%."""
    return DefaultWeightOnlyQuantConfig(block_size=BLOCK, bits=8, is_symmetric=True,
                                        accuracy_level=accuracy_level)


def quantize_q8(model: onnx.ModelProto) -> onnx.ModelProto:
    model = matmul_nbits(model, nbits8())
    quantize_gathers(model.graph, bits=8)  # symmetric blocks of 32
    return model


Q4_ACCURACY_LEVEL = 4
"""q4's MatMulNBits compute in int8 (MLAS's SQNBitGemm CompInt8 kernels), which onnxruntime only
runs with integer zero points: HQQ's float ones are rewritten by `integer_zero_points`.
SmolLM2 head cut at 2, batch 1 x 128, one thread, x86 with AVX512-VNNI, against PyTorch fp32
eager (33.8 ms) in the same run: HQQ with float zero points 66.9 ms (0.50x), round-to-nearest
with integer zero points and int8 compute 25.6 ms (1.32x; its training step 124 ms against 234);
HQQ made integer this way runs as fast (29-32 ms against 60-72 ms for float zero points, back to
back on a busy host), keeping HQQ's weights exactly. Still short of 2x PyTorch: MLAS's 4-bit int8
kernel does ~44 G multiply-adds/s at M=128 here, MatMulInteger's ~160 (profiled)."""


def quantize_q4(model: onnx.ModelProto) -> onnx.ModelProto:
    """HQQ for the MatMuls, its float zero points made integer (+ an exact float correction) so
    they compute in int8; our own 4-bit embedding (`gather_4bit`)."""
    model = matmul_nbits(model, HQQWeightOnlyQuantConfig(block_size=BLOCK, bits=4))
    integer_zero_points(model.graph)
    set_accuracy_level(model.graph, Q4_ACCURACY_LEVEL)
    gather_4bit(model)
    return model


def quantize_int8(model: onnx.ModelProto) -> onnx.ModelProto:
    """MatMulInteger, except where the input is wider than the output (K > N): those stay 8-bit
    weight-only, since per-tensor dynamic quantization of their inputs is what costs accuracy
    (the MLP down projection's outlier activations, the tail's peaked softmax gradient)."""
    model = matmul_nbits(model, nbits8(accuracy_level=4), nodes=reducing_matmuls(model.graph))
    nodes = weight_nodes(model.graph, "MatMul") + weight_nodes(model.graph, "Gather")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "int8.onnx"
        quantize_dynamic(model, out, op_types_to_quantize=["MatMul", "Gather"], nodes_to_quantize=nodes,
                         per_channel=True, weight_type=QuantType.QInt8)
        return onnx.load(out)


def set_accuracy_level(graph: onnx.GraphProto, level: int) -> None:
    """MatMulNBits' compute type on every such node: 0 its default, 1 fp32, 2 fp16, 3 bf16, 4 int8
    (the activations quantized per block of K on the fly: MLAS's int8 kernels, VNNI on x86, dot
    products on ARM)."""
    for node in graph.node:
        if node.op_type == "MatMulNBits":
            kept = [a for a in node.attribute if a.name != "accuracy_level"]
            replace_repeated(node.attribute, [*kept, helper.make_attribute("accuracy_level", level)])


def integer_zero_points(graph: onnx.GraphProto) -> None:
    """Each 4-bit MatMulNBits with float zero points (HQQ's) -> the same weights as integer zero
    points plus a small float correction, so that onnxruntime can run it on its int8 kernels.

    A weight is (q - z) * s per block of `block` rows of K, z a float. With z' = round(z) in 0..15,
    (q - z) * s = (q - z') * s + (z' - z) * s, so for an input x (..., K)

        x @ W = MatMulNBits(x; q, s, z') + sum_b(x) @ C,   sum_b(x) (..., K/block): x's block sums
                                                           C (K/block, N) = (z' - z) * s

    the same product in exact arithmetic (tests check 1e-5). The correction costs K/block * N
    float multiply-adds per row, 1/block of the MatMul's, and one float per block, like a scale.
    Nodes whose K is not a multiple of the block (a padded last block) are left as they are."""
    inits = {t.name: t for t in graph.initializer}
    nodes, sums = [], {}
    for node in graph.node:
        nodes.append(node)
        if not _float_zero_point_nbits(node, inits):
            continue
        k, n, block = (_attr(node, a, 0) for a in ("K", "N", "block_size"))
        blocks = k // block
        scales = numpy_helper.to_array(inits[node.input[2]]).astype(np.float32).reshape(n, blocks)
        zeros = numpy_helper.to_array(inits[node.input[3]]).astype(np.float32).reshape(n, blocks)
        rounded = np.clip(np.round(zeros), 0, 15)
        packed = np.zeros((n, -(-blocks // 2)), np.uint8)  # two blocks a byte, the first low
        packed[:, : (blocks + 1) // 2] = rounded[:, 0::2].astype(np.uint8)
        packed[:, : blocks // 2] |= rounded[:, 1::2].astype(np.uint8) << 4
        zp_name, c_name = f"{node.input[3]}_u4", f"{node.input[1]}_zp_correction"
        if zp_name not in inits:  # a weight shared by several MatMuls is converted once
            for t in (numpy_helper.from_array(packed.reshape(-1), zp_name),
                      numpy_helper.from_array(np.ascontiguousarray(((rounded - zeros) * scales).T), c_name)):
                inits[t.name] = t
                graph.initializer.append(t)
        node.input[3] = zp_name
        x, y = node.input[0], node.output[0]
        if (x, block) not in sums:  # x's block sums, shared by the MatMuls that read x
            sums[(x, block)] = _block_sums(graph, nodes, x, blocks, block, f"{node.name}_block_sums")
        node.output[0] = f"{y}_int_zp"
        corr = f"{y}_zp_correction"
        nodes += [helper.make_node("MatMul", [sums[(x, block)], c_name], [f"{corr}_rows"], name=f"{node.name}_zp_correction"),
                  helper.make_node("Shape", [node.output[0]], [f"{y}_shape"], name=f"{node.name}_shape"),
                  helper.make_node("Reshape", [f"{corr}_rows", f"{y}_shape"], [corr], name=f"{node.name}_zp_reshape"),
                  helper.make_node("Add", [node.output[0], corr], [y], name=f"{node.name}_zp_add")]
    replace_repeated(graph.node, nodes)


def _block_sums(graph: onnx.GraphProto, nodes: list, x: str, blocks: int, block: int, name: str) -> str:
    """Append the nodes that sum x (..., blocks * block) over each block: (rows, blocks)."""
    shape = f"{name}_shape"
    graph.initializer.append(numpy_helper.from_array(np.array([-1, blocks, block], np.int64), shape))
    axes = f"{name}_axes"
    graph.initializer.append(numpy_helper.from_array(np.array([2], np.int64), axes))
    nodes += [helper.make_node("Reshape", [x, shape], [f"{name}_blocks"], name=f"{name}_reshape"),
              helper.make_node("ReduceSum", [f"{name}_blocks", axes], [name], name=name, keepdims=0)]
    return name


def _float_zero_point_nbits(node: onnx.NodeProto, inits: dict) -> bool:
    if node.op_type != "MatMulNBits" or len(node.input) < 4 or node.input[3] not in inits:
        return False
    k, bits, block = _attr(node, "K", 0), _attr(node, "bits", 4), _attr(node, "block_size", 0)
    return bits == 4 and block > 0 and k % block == 0 and inits[node.input[3]].data_type in FLOATS


QUANTIZERS = {"q8": quantize_q8, "q4": quantize_q4, "int8": quantize_int8}


def matmul_nbits(model: onnx.ModelProto, config: WeightOnlyQuantConfig,
                 nodes: list[str] | None = None) -> onnx.ModelProto:
    """Run onnxruntime's MatMulNBitsQuantizer on `nodes` (default: every weight node of the
    config's op types)."""
    op_types = sorted(config.op_types_to_quantize)
    if nodes is None:
        nodes = [name for op in op_types for name in weight_nodes(model.graph, op)]
    chosen = set(nodes)
    excluded = [n.name for n in model.graph.node if n.op_type in op_types and n.name not in chosen]
    quantizer = MatMulNBitsQuantizer(model, block_size=BLOCK, nodes_to_exclude=excluded, algo_config=config)
    with warnings.catch_warnings():  # HQQ hands torch a read-only numpy array, and torch says so
        warnings.simplefilter("ignore", UserWarning)
        quantizer.process()
    return quantizer.model.model


# --- the quantized embeddings -----------------------------------------------------------------------

def gather_4bit(model: onnx.ModelProto) -> None:
    """Gather on a float table -> GatherBlockQuantized of `asymmetric_4bit_blocks`, float16 scales,
    then a Cast back to float.

    On SmolLM2-135M at K=2 the embedding is all of q4's error (HQQ is lossless on the GGUF's Q4_1
    MatMuls), and onnxruntime's own 4-bit Gather (min/max round-to-nearest, blocks of 32) cost up
    to +2.8% perplexity; this one at most +1.0% on the same texts. Blocks of 16 did most of that (a row has
    a few dims ~7x larger than the rest, and a block spends its 16 levels on such a dim); float16
    scales keep the table at about the size of 32-blocks with float32 ones (18.6 MB against 18.1).
    The layout is onnxruntime's quantizer's: UINT4 data (rows, cols) and zero points (rows,
    blocks), see `pack_uint4`, which need opset 21 and IR version 10."""
    if not weight_nodes(model.graph, "Gather"):
        return
    for opset in model.opset_import:
        if opset.domain in ("", "ai.onnx"):
            opset.version = max(opset.version, 21)
    if MS_DOMAIN not in {opset.domain for opset in model.opset_import}:
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    model.ir_version = max(model.ir_version, 10)
    quantize_gathers(model.graph, bits=4)


def quantize_gathers(graph: onnx.GraphProto, *, bits: int) -> None:
    inits = {t.name: t for t in graph.initializer}
    targets = set(weight_nodes(graph, "Gather"))
    nodes = []
    for node in graph.node:
        if node.name not in targets:
            nodes.append(node)
            continue
        if f"{node.input[0]}_Q{bits}" not in inits:  # a table shared by several Gathers is stored once
            for tensor in (_8bit_table if bits == 8 else _4bit_table)(inits[node.input[0]]):
                inits[tensor.name] = tensor
                graph.initializer.append(tensor)
        float16 = inits[f"{node.input[0]}_scales_Q{bits}"].data_type == onnx.TensorProto.FLOAT16
        nodes.extend(_gather_block_quantized(node, bits, float16))
    replace_repeated(graph.node, nodes)


def _8bit_table(table: onnx.TensorProto) -> list[onnx.TensorProto]:
    data, scales = symmetric_8bit_blocks(numpy_helper.to_array(table).astype(np.float32))
    return [numpy_helper.from_array(data, f"{table.name}_Q8"),
            numpy_helper.from_array(scales, f"{table.name}_scales_Q8")]


def _4bit_table(table: onnx.TensorProto) -> list[onnx.TensorProto]:
    codes, scales, zero_points = asymmetric_4bit_blocks(numpy_helper.to_array(table).astype(np.float32))
    if np.all((scales == 0) | ((scales >= 2.0**-14) & (scales <= 65504))):  # float16's normal range
        scales = scales.astype(np.float16)
    uint4 = onnx.TensorProto.UINT4
    return [helper.make_tensor(f"{table.name}_Q4", uint4, codes.shape, pack_uint4(codes), raw=True),
            numpy_helper.from_array(scales, f"{table.name}_scales_Q4"),
            helper.make_tensor(f"{table.name}_zero_points_Q4", uint4, zero_points.shape,
                               pack_uint4(zero_points), raw=True)]


def _gather_block_quantized(gather: onnx.NodeProto, bits: int, float16: bool) -> list[onnx.NodeProto]:
    """The op (its output is in the scales' type, so a Cast follows float16 scales)."""
    table, indices = gather.input
    inputs = [f"{table}_Q{bits}", indices, f"{table}_scales_Q{bits}"] + [f"{table}_zero_points_Q4"] * (bits == 4)
    attrs = {"bits": 8, "block_size": BLOCK} if bits == 8 else {"block_size": Q4_EMBEDDING_BLOCK}
    out = gather.output[0]
    node = helper.make_node("GatherBlockQuantized", inputs, [f"{out}_f16" if float16 else out],
                            name=f"{gather.name}_Q{bits}", domain=MS_DOMAIN,
                            gather_axis=_attr(gather, "axis", 0), quantize_axis=1, **attrs)
    cast = helper.make_node("Cast", [f"{out}_f16"], [out], name=f"{gather.name}_cast", to=onnx.TensorProto.FLOAT)
    return [node, cast] if float16 else [node]


def symmetric_8bit_blocks(table: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(rows, cols) floats -> uint8 codes (zero point 128, the op's default) and (rows, cols/BLOCK) scales."""
    rows, cols = table.shape
    if cols % BLOCK:
        raise ExportError(f"an 8-bit embedding needs a width divisible by {BLOCK}, got {cols}")
    blocks = table.reshape(rows, cols // BLOCK, BLOCK)
    scales = np.abs(blocks).max(axis=2) / 127.0  # (rows, cols / BLOCK)
    safe = np.where(scales == 0, 1.0, scales)[..., None]
    codes = np.clip(np.round(blocks / safe), -127, 127) + 128
    return codes.astype(np.uint8).reshape(rows, cols), scales.astype(table.dtype)


SCALE_FACTORS = np.arange(0.8, 1.201, 0.05)  # candidate steps, in units of min/max's (max - min) / 15


def asymmetric_4bit_blocks(table: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(rows, cols) floats -> codes (rows, cols), scales and zero points (rows, blocks), codes and
    zero points in 0..15; a value is (code - zero point) * scale. A short last block is zero-padded.

    Min/max round-to-nearest takes the step (max - min) / 15, the range widened to hold 0 (the zero
    point is an integer, so the rounded grid can miss an end of the range). Each block here rounds
    with a few steps around that one, rescales each result so that its error is orthogonal to the
    block (dequantized . x = x . x), and keeps the least squared error: 13% below min/max's on
    SmolLM2. The plain least-squares rescale is 1% lower still, but it shrinks every row by ~0.5%,
    all tokens alike, and that bias cost more perplexity than it won. Steps 0.6-1.05x did worse
    than 0.8-1.2x, in both.
    """
    rows, cols = table.shape
    blocks = -(-cols // Q4_EMBEDDING_BLOCK)
    padded = np.zeros((rows, blocks * Q4_EMBEDDING_BLOCK), np.float32)
    padded[:, :cols] = table
    codes = np.empty((rows, blocks, Q4_EMBEDDING_BLOCK), np.uint8)
    scales, zero_points = np.empty((rows, blocks), np.float32), np.empty((rows, blocks), np.uint8)
    for r in range(0, rows, 4096):  # bounds the temporaries at a few 10 MB
        rs = slice(r, r + 4096)
        codes[rs], scales[rs], zero_points[rs] = _fit_4bit(padded[rs].reshape(-1, blocks, Q4_EMBEDDING_BLOCK))
    return codes.reshape(rows, -1)[:, :cols], scales, zero_points


def _fit_4bit(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """x (..., block) -> codes (..., block), scales (...), zero points (...)."""
    low = np.minimum(x.min(-1, keepdims=True), 0)
    span = np.maximum(x.max(-1, keepdims=True), 0) - low
    xx = (x * x).sum(-1, keepdims=True)
    best = None
    for factor in SCALE_FACTORS:
        step = np.where(span == 0, 1, span * factor / 15)
        z = np.clip(np.round(-low / step), 0, 15)
        q = np.clip(np.round(x / step + z), 0, 15)
        xq = (x * (q - z)).sum(-1, keepdims=True)
        s = np.where(xq > 0, xx / np.where(xq > 0, xq, 1), 0)
        err = ((x - (q - z) * s) ** 2).sum(-1, keepdims=True)
        if best is None:
            best = [err, q, s, z]
        else:
            better = err < best[0]
            best = [np.where(better, new, old) for new, old in zip((err, q, s, z), best)]
    _, q, s, z = best
    return q.astype(np.uint8), s[..., 0], z[..., 0].astype(np.uint8)


def pack_uint4(values: np.ndarray) -> bytes:
    """Values 0..15, flattened row-major, two per byte, the first in the low nibble (ONNX's UINT4)."""
    flat = values.astype(np.uint8).ravel()
    if flat.size % 2:
        flat = np.append(flat, np.uint8(0))
    return (flat[0::2] | (flat[1::2] << 4)).astype(np.uint8).tobytes()


# --- graph housekeeping ------------------------------------------------------------------------------

def drop_unused_initializers(graph: onnx.GraphProto) -> None:
    used = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
    replace_repeated(graph.initializer, [t for t in graph.initializer if t.name in used])


def replace_repeated(field, items: list) -> None:
    """Set a repeated proto field (graph.node, graph.initializer) to `items`, which may be its own."""
    items = [type(x).FromString(x.SerializeToString()) for x in items]  # detached before clearing
    del field[:]
    field.extend(items)


def _attr(node: onnx.NodeProto, name: str, default):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default
