"""What this CPU allows the device's speed goals: the head's weight MatMuls through each kernel a
preset uses, against PyTorch's, on the head's own weights and shapes, in one run.

    python bench/bench_kernels.py /tmp/smol-fp32-dev [--out bench/results/kernels.json]

Issue 11's goals are ratios to PyTorch fp32 eager on the same head (batch 1 x 128, one thread):
the q4 forward 2x, a preset within 0.2% perplexity 3x, the training step 2x. Most of the head's
time is its weight MatMuls (q, k, v, o, gate, up, down in each layer), so each goal is bounded by
how fast the preset's kernel runs them. For every 2-D weight MatMul of the fp32 bundle's
head.onnx, a one-node graph with that weight goes through `export/quantize.py`'s preset (the
same code `splitlm export --quant` runs, corrections and all) and is timed at M = 128 rows:

    torch    torch.nn.functional.linear, fp32 (what PyTorch eager's nn.Linear runs)
    fp32     onnxruntime MatMul
    q8       MatMulNBits 8-bit, float compute            q8-acc4  the same, int8 compute
    q4       MatMulNBits 4-bit, HQQ, integer zero points + correction, int8 compute (the preset)
    int8     MatMulInteger per channel (DynamicQuantizeMatMul); K > N: 8-bit MatMulNBits, int8 compute
    int8-all MatMulInteger for every weight (no preset: the int8 preset keeps K > N off it for accuracy)

The ceilings: PyTorch's head forward over a kernel's time for all the head's weight MatMuls
(the speed-up if the embedding, norms, attention, rotary and LoRA cost nothing); for the training
step, PyTorch's forward + backward + AdamW over 3x that time (head_grad runs the forward again,
then one input-gradient MatMul per weight of the same size) and over 2x (the forward's
activations kept instead: `--keep-activations`). A goal above its ceiling cannot be met on this CPU
with these kernels, whatever the rest of the graph does.

The last line is one JSON object with every number.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).parent))

import numpy as np  # noqa: E402

from bench_device import median_ms, torch_times  # noqa: E402  the timing loop; PyTorch's whole head, the baseline

M = 128  # rows: batch 1 x 128 tokens, as bench_device.py
REPEAT = 30
KERNELS = {  # name -> (preset, MatMulNBits accuracy_level or None)
    "fp32": ("fp32", None), "q8": ("q8", None), "q8-acc4": ("q8", 4), "q4": ("q4", None), "int8": ("int8", None),
    "int8-all": (None, None),  # no preset: MatMulInteger for every weight, K > N too (the fastest int8 kernel)
}
GOALS = {"q4 forward": ("q4", "forward", 2.0), "<=0.2% preset forward": (None, "forward", 3.0),
         "training step": (None, "step", 2.0)}
CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "asimddp", "i8mm")


def cpu() -> dict:
    """The CPU's model name and the flags that decide MLAS's int8 kernels (x86 VNNI/AMX, ARM sdot/i8mm)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {"machine": platform.machine(), "model": platform.processor(), "flags": []}
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    words = set((fields.get("flags") or fields.get("Features") or "").split())
    return {"machine": platform.machine(), "model": fields.get("model name", fields.get("CPU part", "?")),
            "flags": [f for f in CPU_FLAGS if f in words]}


def head_weights(head: Path) -> list[tuple[str, np.ndarray]]:
    """(node name, (K, N) float32) of every MatMul in `head` whose B is a 2-D float initializer
    (the quantizer's own `weight_nodes`), in graph order: a weight used twice is timed twice, as
    the graph runs it."""
    import onnx
    from onnx import numpy_helper

    from splitlm.export.quantize import weight_nodes

    graph = onnx.load(head).graph
    inits = {t.name: t for t in graph.initializer}
    names = set(weight_nodes(graph, "MatMul"))
    return [(n.name, numpy_helper.to_array(inits[n.input[1]])) for n in graph.node if n.name in names]


def one_matmul(weight: np.ndarray, path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    k, n = weight.shape
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"], name="weight")], "one_matmul",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [M, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [M, n])],
        [numpy_helper.from_array(weight, "W")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]), path)


def ort_ms(path: Path, x: np.ndarray) -> float:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return median_ms(lambda: session.run(None, {"x": x}), REPEAT)


def torch_ms(weight: np.ndarray, x: np.ndarray) -> float:
    import torch

    w = torch.from_numpy(np.ascontiguousarray(weight.T))  # nn.Linear's (out, in)
    xt = torch.from_numpy(x)
    with torch.no_grad():
        return median_ms(lambda: torch.nn.functional.linear(xt, w), REPEAT)


def kernel_times(head: Path) -> list[dict]:
    """Per weight MatMul: its shape and each kernel's median ms at M rows."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from splitlm.export.quantize import quantize_graph

    rng = np.random.default_rng(0)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, weight) in enumerate(head_weights(head)):
            x = rng.standard_normal((M, weight.shape[0])).astype(np.float32)
            src = Path(tmp) / f"w{i}.onnx"
            one_matmul(weight, src)
            row = {"name": name, "k": weight.shape[0], "n": weight.shape[1], "ms": {"torch": torch_ms(weight, x)}}
            for kernel, (preset, level) in KERNELS.items():
                dst = Path(tmp) / f"w{i}.{kernel}.onnx"
                if preset is None:
                    quantize_dynamic(src, dst, per_channel=True, weight_type=QuantType.QInt8)
                else:
                    quantize_graph(src, dst, preset=preset, accuracy_level=level)
                row["ms"][kernel] = ort_ms(dst, x)
            rows.append(row)
            print(f"  {name:40s} {row['k']:5d} x {row['n']:<5d} " +
                  " ".join(f"{k} {v:5.2f}" for k, v in row["ms"].items()), file=sys.stderr, flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("fp32", type=Path, help="an fp32 bundle (its head.onnx's weights are timed)")
    ap.add_argument("--out", type=Path, help="also write the JSON here")
    args = ap.parse_args()
    import torch


    torch.set_num_threads(1)
    ids = np.random.default_rng(0).integers(0, 49152, (1, M), dtype=np.int64)
    base = torch_times(args.fp32, ids)
    rows = kernel_times(args.fp32 / "head.onnx")
    macs = sum(r["k"] * r["n"] * M for r in rows)
    total = {k: sum(r["ms"][k] for r in rows) for k in ["torch", *KERNELS]}
    result = {"cpu": cpu(), "rows": M, "torch_head": base, "weight_matmuls": len(rows), "macs": macs,
              "kernels": {}, "goals": {}}
    info = result["cpu"]
    print(f"{info['model']} ({info['machine']}; {', '.join(info['flags']) or 'no AVX2/VNNI/sdot flags'}), one thread, "
          f"M = {M}; PyTorch fp32 eager head: forward {base['forward_ms']:.1f} ms, forward + backward + AdamW "
          f"{base['train_ms']:.1f} ms; its {len(rows)} weight MatMuls ({macs / 1e9:.2f} G multiply-adds) take "
          f"{total['torch']:.1f} ms of the forward in torch.nn.functional.linear")
    print(f"  {'kernel':8s} {'weights ms':>10s} {'G MAC/s':>8s} {'x torch':>8s} {'forward ceiling':>16s} "
          f"{'step ceiling (recompute / keep)':>32s}")
    for k, ms in total.items():
        r = {"ms": ms, "gmacs": macs / ms / 1e6, "x_torch_matmul": total["torch"] / ms,
             "forward_ceiling": base["forward_ms"] / ms, "step_ceiling_recompute": base["train_ms"] / (3 * ms),
             "step_ceiling_keep": base["train_ms"] / (2 * ms)}
        result["kernels"][k] = r
        print(f"  {k:8s} {ms:10.2f} {r['gmacs']:8.1f} {r['x_torch_matmul']:7.2f}x {r['forward_ceiling']:15.2f}x "
              f"{r['step_ceiling_recompute']:21.2f}x / {r['step_ceiling_keep']:.2f}x")
    # Forward within 0.2% PPL: any kernel but q4 (int8 met it on earlier hosts, +0.88% here), so
    # the ceiling is an upper bound; the step: any kernel, activations kept.
    within = ("fp32", "q8", "q8-acc4", "int8", "int8-all")
    for goal, (kernel, what, target) in GOALS.items():
        if what == "forward":
            names = [kernel] if kernel else list(within)
            best = max(names, key=lambda k: result["kernels"][k]["forward_ceiling"])
            ceiling = result["kernels"][best]["forward_ceiling"]
        else:
            best = max(total, key=lambda k: result["kernels"][k]["step_ceiling_keep"])
            ceiling = result["kernels"][best]["step_ceiling_keep"]
        result["goals"][goal] = {"target": target, "best_kernel": best, "ceiling": ceiling, "reachable": ceiling >= target}
        print(f"  goal: {goal} at {target:.0f}x PyTorch: ceiling {ceiling:.2f}x ({best}) -> "
              f"{'reachable at best' if ceiling >= target else 'NOT reachable on this CPU'}")
    line = json.dumps(result)
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(line)


if __name__ == "__main__":
    main()
