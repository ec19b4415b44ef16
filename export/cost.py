"""What one run of a client graph costs, counted from the graph: FLOPs and bytes moved.

An energy stand-in a user can compare across devices without owning them. Shapes come from one
onnxruntime run of the graph at the given batch and sequence (`run_shapes`). Counted:

    flops          2*M*K*N for every MatMul, MatMulNBits, MatMulInteger and Gemm (attention's
                   activation-by-activation products included); elementwise ops are left out
                   (under 2% of a decoder block's multiply-adds)
    weight_bytes   every initializer read once per run, at its stored size (4-bit ones packed)
    activation_bytes  every node output written once and read once (2x its size): an upper
                   bound that ignores caches and the fusions onnxruntime makes
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

MATMULS = ("MatMul", "MatMulInteger", "MatMulNBits", "Gemm", "FusedMatMul")


@dataclass(frozen=True)
class GraphCost:
    flops: int
    weight_bytes: int
    activation_bytes: int

    @property
    def bytes_moved(self) -> int:
        return self.weight_bytes + self.activation_bytes

    def __add__(self, other: "GraphCost") -> "GraphCost":
        return GraphCost(self.flops + other.flops, self.weight_bytes + other.weight_bytes,
                         self.activation_bytes + other.activation_bytes)


def graph_cost(path: str | Path, *, batch: int, seq: int) -> GraphCost:
    """FLOPs and bytes of one run of the graph at `path` on a (batch, seq) input."""
    model = onnx.load(str(path))
    fix_dims(model.graph, batch=batch, seq=seq)
    shapes = run_shapes(model)
    sizes = {t.name: _nbytes(t) for t in model.graph.initializer}
    flops = sum(_matmul_flops(node, shapes) for node in model.graph.node)
    activations = sum(2 * math.prod(shapes[o][0]) * shapes[o][1] for node in model.graph.node
                      for o in node.output if o in shapes and o not in sizes)
    return GraphCost(int(flops), sum(sizes.values()), int(activations))


def fix_dims(graph: onnx.GraphProto, *, batch: int, seq: int) -> None:
    """Give every symbolic input dim a value: the first one `batch`, the others `seq`."""
    for value in graph.input:
        dims = value.type.tensor_type.shape.dim
        for i, dim in enumerate(dims):
            if dim.dim_param or not dim.HasField("dim_value"):
                dim.dim_value = batch if i == 0 else seq


def run_shapes(model: onnx.ModelProto) -> dict[str, tuple[tuple[int, ...], int]]:
    """name -> (shape, bytes per element) of every node output, from one onnxruntime run.

    Run rather than inferred: neither onnx's inference (no com.microsoft ops) nor onnxruntime's
    symbolic one (it stops at the exporter's ScatterND) gets through every client graph.
    """
    import onnxruntime as ort

    graph = model.graph
    known = {o.name for o in graph.output}
    for node in graph.node:
        graph.output.extend(onnx.ValueInfoProto(name=o) for o in node.output if o and o not in known)
        known.update(node.output)
    feed = {v.name: _dummy(v) for v in graph.input if v.name not in {t.name for t in graph.initializer}}
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # the graph as written
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return {n: (tuple(v.shape), v.dtype.itemsize) for n, v in zip(names, session.run(names, feed))
            if isinstance(v, np.ndarray)}


def _dummy(value: onnx.ValueInfoProto) -> np.ndarray:
    t = value.type.tensor_type
    shape = tuple(d.dim_value for d in t.shape.dim)
    dtype = onnx.helper.tensor_dtype_to_np_dtype(t.elem_type)
    if np.issubdtype(dtype, np.integer):
        return np.ones(shape, dtype)  # token 1, mask 1, label 1
    return np.full(shape, 1e-2, dtype)


def _nbytes(t: onnx.TensorProto) -> int:
    if t.HasField("raw_data"):
        return len(t.raw_data)
    return numpy_helper.to_array(t).nbytes


def _matmul_flops(node: onnx.NodeProto, shapes: dict) -> int:
    if node.op_type not in MATMULS or node.output[0] not in shapes:
        return 0
    out = shapes[node.output[0]][0]
    if node.op_type == "MatMulNBits":
        k = next(a.i for a in node.attribute if a.name == "K")
    elif node.input[0] in shapes:
        a = shapes[node.input[0]][0]
        trans_a = any(x.name == "transA" and x.i for x in node.attribute)
        k = a[-2] if trans_a else a[-1]
    else:
        return 0
    return 2 * math.prod(out) * k


def step_cost(bundle: str | Path, *, batch: int, seq: int, files=("head.onnx", "head_grad.onnx")) -> GraphCost:
    """One device training step: the sum over the graphs it runs."""
    total = GraphCost(0, 0, 0)
    for name in files:
        if (Path(bundle) / name).is_file():
            total = total + graph_cost(Path(bundle) / name, batch=batch, seq=seq)
    return total


