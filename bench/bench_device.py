"""The device, measured in one run: speed against PyTorch, memory, and FLOPs/bytes per step.

    splitlm export default --cut 2 --quant fp32 --labels device --max-length 512 --keep-activations --out /tmp/smol-fp32-dev
    python bench/bench_device.py /tmp/smol-fp32-dev [--variants fp32 q8 q4 int8 q4-acc4 q8-acc4] [--ppl] [--arena]

The quantized bundles are derived from the fp32 one (its graphs through export/quantize.py, as
`splitlm export --quant` does) and cached beside it. Everything runs on one thread (torch and
onnxruntime). Printed, each against a baseline measured in the same run:

  speed   head forward (batch 1 x 128) per variant vs PyTorch fp32 eager on the same head
          (transformers' modules with the LoRA inputs, no_grad); a training step (head forward +
          head_grad + numpy AdamW) vs PyTorch forward + backward + AdamW on the same LoRA tensors;
          the q4 step again with head_grad's buffer reuse on; each step again with the forward's
          activations kept (bundles exported with --keep-activations); --arena: the device with
          onnxruntime's memory arena on (fewer page faults, more memory held)
  memory  peak RSS (VmHWM) of fresh processes, batch 1 x 512: the q4 training step; labels on
          the device (forward, tail, head_grad) with the tail in one run vs chunked; each also
          with head_grad's buffer reuse on (the runtime before it was turned off there), and with
          the activations kept
  cost    FLOPs and bytes moved of one training step, counted from the graphs (export/cost.py)
  --ppl   perplexity change of each variant's head on Python's LICENSE text (export/fidelity.py)

The last line is one JSON object with every number.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402

VARIANTS = {  # name -> (preset, MatMulNBits accuracy_level or None)
    "fp32": ("fp32", None), "q8": ("q8", None), "q4": ("q4", None), "int8": ("int8", None),
    "q4-acc4": ("q4", 4), "q8-acc4": ("q8", 4),
}
SEQ, REPEAT = 128, 20
LICENSE = Path(sys.base_prefix) / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "LICENSE.txt"


def derive(fp32: Path, variant: str) -> Path:
    """The fp32 bundle's graphs quantized as `variant`, in a folder beside it (made once)."""
    from splitlm.export.bundle import TAIL_ACCURACY_LEVEL, tail_preset
    from splitlm.export.quantize import quantize_graph
    from splitlm.manifest import MANIFEST, Manifest, sha256_file

    preset, level = VARIANTS[variant]
    out = fp32.with_name(f"{fp32.name}.{variant}")
    if variant == "fp32" or (out / MANIFEST).is_file():
        return fp32 if variant == "fp32" else out
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(fp32, tmp)
    manifest = Manifest.from_json((fp32 / MANIFEST).read_text())
    for name in (n for n in manifest.files if n.endswith(".onnx")):  # the bundle's graphs, as its manifest lists them
        tail = name == "tail.onnx"
        quantize_graph(fp32 / name, tmp / name, preset=tail_preset(preset) if tail else preset,
                       accuracy_level=TAIL_ACCURACY_LEVEL if tail else level)
    files = {n: sha256_file(tmp / n) for n in manifest.files}
    import dataclasses
    (tmp / MANIFEST).write_text(dataclasses.replace(manifest, quant=preset, files=files).to_json())
    tmp.rename(out)
    return out


def median_ms(fn, repeat: int = REPEAT) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


# --- speed -------------------------------------------------------------------------------------

def torch_times(fp32: Path, ids: np.ndarray) -> dict:
    import torch

    from splitlm.export.bundle import ExportOptions, client_graphs, load_model
    from splitlm.manifest import Bundle

    torch.set_num_threads(1)
    bundle = Bundle.open(fp32, verify=False)
    m = bundle.manifest
    model, _ = load_model("default")
    graphs = client_graphs(model, ExportOptions(cut=m.cut, lora_rank=m.lora.rank, lora_alpha=m.lora.alpha,
                                                lora_targets=tuple(m.lora.targets)))
    x, mask = torch.from_numpy(ids), torch.ones(ids.shape, dtype=torch.int64)
    loras = [torch.from_numpy(a).requires_grad_(True) for a in bundle.lora_init().values()]
    optim = torch.optim.AdamW(loras, lr=1e-3, weight_decay=0.0)
    g = torch.full((*ids.shape, m.model.hidden_size), 1e-3)

    def forward():
        with torch.no_grad():
            graphs.head(x, mask, *loras)

    def train():
        graphs.head(x, mask, *loras).backward(g)  # (B, T, H)
        optim.step()
        optim.zero_grad()
    return {"forward_ms": median_ms(forward), "train_ms": median_ms(train, REPEAT // 2)}


def device_times(bundle_dir: Path, ids: np.ndarray, **runtime_options) -> dict:
    from splitlm.edge_client.optim import AdamW
    from splitlm.edge_client.runtime import HeadRuntime
    from splitlm.manifest import Bundle

    rt = HeadRuntime(Bundle.open(bundle_dir, verify=False), threads=1, **runtime_options)
    mask = np.ones_like(ids)
    loras, optim = rt.bundle.lora_init(), AdamW(lr=1e-3)
    g = np.full((*ids.shape, rt.manifest.model.hidden_size), 1e-3, np.float32)

    def train():
        rt.forward(ids, mask, loras)  # what the device sends up
        optim.step(loras, rt.lora_grads(ids, mask, g, loras))
    return {"forward_ms": median_ms(lambda: rt.forward(ids, mask, loras)), "train_ms": median_ms(train, REPEAT // 2)}


def kept(bundle_dir: Path) -> bool:
    """Exported with --keep-activations (the step can keep the forward's activations)."""
    from splitlm.edge_client.runtime import missing_kept_graphs
    from splitlm.manifest import Bundle

    return not missing_kept_graphs(Bundle.open(bundle_dir, verify=False).manifest)


# --- memory, each in a fresh process -----------------------------------------------------------

def memory_child(bundle_dir: str, mode: str, seq: int, **runtime_options) -> dict:
    """mode: 'train' (forward + head_grad; labels at the server, so no tail session) or
    'labels-device[-whole]' (forward, tail chunked or in one run, head_grad); '-reuse': head_grad
    with onnxruntime's buffer reuse on (the runtime's default before it was turned off there);
    '-keep': the forward's activations kept for the backward (--keep-activations)."""
    import dataclasses

    from splitlm.edge_client.meter import rss_peak_mb
    from splitlm.edge_client.runtime import HeadRuntime
    from splitlm.manifest import Bundle

    bundle = Bundle.open(bundle_dir, verify=False)
    train = mode.startswith("train")
    if train:
        bundle = Bundle(bundle.path, dataclasses.replace(bundle.manifest, labels="server"))
    rt = HeadRuntime(bundle, threads=1, grad_mem_reuse=mode.endswith("-reuse"), keep_activations=mode.endswith("-keep"),
                     **({"tail_chunk": None} if mode.endswith("whole") else {}), **runtime_options)
    ids = np.random.default_rng(0).integers(0, rt.manifest.model.vocab_size, (1, seq), dtype=np.int64)
    mask, loras = np.ones_like(ids), rt.bundle.lora_init()
    peaks = []
    for _ in range(3):
        hidden = rt.forward(ids, mask, loras)  # (1, T, H)
        grad = rt.tail(hidden, ids, mask)[1] if not train else np.full_like(hidden, 1e-3)
        rt.lora_grads(ids, mask, grad, loras)
        peaks.append(rss_peak_mb())
    return {"peak_mb": peaks[-1], "first_step_mb": peaks[0]}


def memory(bundle_dir: Path, mode: str, seq: int = 512) -> dict:
    cmd = [sys.executable, __file__, str(bundle_dir), "--child", mode, "--seq", str(seq)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return json.loads(out.stdout.strip().splitlines()[-1])


# --- report ------------------------------------------------------------------------------------

def ppl_change(bundle_dir: Path, model) -> float:
    from splitlm.export.fidelity import fidelity_report

    return fidelity_report(bundle_dir, model, eval_text=LICENSE.read_text()).ppl_increase


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("fp32", type=Path, help="an fp32 bundle exported with --labels device")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--ppl", action="store_true", help="also the perplexity change of each variant (slow)")
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--arena", action="store_true",
                    help="speed with onnxruntime's memory arena and pattern on (the runtime's mem_arena=True): "
                         "no fresh pages per run, more memory held")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--seq", type=int, default=512, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(memory_child(str(args.fp32), args.child, args.seq)))
        return
    from splitlm.export.cost import step_cost

    bundles = {v: derive(args.fp32, v) for v in args.variants}
    ids = np.random.default_rng(0).integers(0, 49152, (1, SEQ), dtype=np.int64)
    result = {"torch": torch_times(args.fp32, ids), "device": {}, "mem_arena": args.arena}
    base = result["torch"]
    arena = ", onnxruntime arena on" if args.arena else ""
    print(f"one thread, batch 1 x {SEQ}{arena}; PyTorch fp32 eager: head forward {base['forward_ms']:.1f} ms, "
          f"forward + backward + AdamW {base['train_ms']:.1f} ms")
    print(f"  {'variant':9s} {'forward':>9s} {'vs torch':>8s} {'train step':>11s} {'vs torch':>8s} "
          f"{'GFLOP/step':>10s} {'MB moved/step':>13s}")
    for v, path in bundles.items():
        r = device_times(path, ids, mem_arena=args.arena)
        if kept(path):
            r["train_keep_ms"] = device_times(path, ids, mem_arena=args.arena, keep_activations=True)["train_ms"]
            r["train_keep_x"] = base["train_ms"] / r["train_keep_ms"]
            kept_cost = step_cost(path, batch=1, seq=SEQ, files=("head_saved.onnx", "head_grad_kept.onnx"))
            r["step_keep_gflop"], r["step_keep_mb_moved"] = kept_cost.flops / 1e9, kept_cost.bytes_moved / 1e6
        cost = step_cost(path, batch=1, seq=SEQ)
        r |= {"forward_x": base["forward_ms"] / r["forward_ms"], "train_x": base["train_ms"] / r["train_ms"],
              "step_gflop": cost.flops / 1e9, "step_mb_moved": cost.bytes_moved / 1e6,
              "step_weight_mb": cost.weight_bytes / 1e6}
        result["device"][v] = r
        keep = (f"   activations kept: train step {r['train_keep_ms']:.1f} ms {r['train_keep_x']:.2f}x, "
                f"{r['step_keep_gflop']:.2f} GFLOP, {r['step_keep_mb_moved']:.0f} MB moved") if kept(path) else ""
        print(f"  {v:9s} {r['forward_ms']:6.1f} ms {r['forward_x']:7.2f}x {r['train_ms']:8.1f} ms "
              f"{r['train_x']:7.2f}x {r['step_gflop']:10.2f} {r['step_mb_moved']:13.0f}{keep}")
    if "q4" in bundles:  # the same q4 step with head_grad's buffer reuse on, as before
        r = device_times(bundles["q4"], ids, grad_mem_reuse=True, mem_arena=args.arena)
        r |= {"forward_x": base["forward_ms"] / r["forward_ms"], "train_x": base["train_ms"] / r["train_ms"]}
        result["q4_grad_mem_reuse"] = r
        print(f"  q4 with head_grad's buffer reuse on: train step {r['train_ms']:.1f} ms {r['train_x']:.2f}x")
    if args.ppl:
        from splitlm.export.bundle import load_model
        model, _ = load_model("default")
        result["ppl"] = {v: ppl_change(p, model) for v, p in bundles.items()}
        print("  perplexity change on Python's LICENSE: " +
              ", ".join(f"{v} {100 * x:+.2f}%" for v, x in result["ppl"].items()))
    if not args.skip_memory and "q4" in bundles:
        q4 = bundles["q4"]
        modes = ("train", "train-reuse", "labels-device-whole", "labels-device", "labels-device-reuse")
        modes += ("train-keep", "labels-device-keep") if kept(q4) else ()
        result["memory"] = {mode: memory(q4, mode) for mode in modes}
        mem = result["memory"]
        print(f"peak RSS, q4, batch 1 x 512, fresh process, after 3 steps: training step {mem['train']['peak_mb']:.0f} MB "
              f"({mem['train-reuse']['peak_mb']:.0f} MB with head_grad's buffer reuse); "
              f"labels on device {mem['labels-device-whole']['peak_mb']:.0f} MB with the tail in one run -> "
              f"{mem['labels-device']['peak_mb']:.0f} MB chunked ({mem['labels-device-reuse']['peak_mb']:.0f} MB with "
              f"head_grad's buffer reuse)")
        if kept(q4):
            print(f"  with the forward's activations kept (--keep-activations): training step "
                  f"{mem['train-keep']['peak_mb']:.0f} MB, labels on device {mem['labels-device-keep']['peak_mb']:.0f} MB")
        from splitlm.edge_client.fit import probe
        from splitlm.edge_client.runtime import TAIL_CHUNK
        predicted = probe(q4, seq=512, chunk=TAIL_CHUNK, threads=1).predict(1, 512, TAIL_CHUNK)
        mem["max_memory_predicted_mb"] = predicted
        print(f"--max-memory's model for that labels-on-device step: {predicted:.0f} MB predicted, "
              f"{mem['labels-device']['peak_mb']:.0f} MB measured")
        if kept(q4):
            predicted = probe(q4, seq=512, chunk=TAIL_CHUNK, threads=1, keep_activations=True).predict(1, 512, TAIL_CHUNK)
            mem["max_memory_predicted_keep_mb"] = predicted
            print(f"  and with activations kept: {predicted:.0f} MB predicted, "
                  f"{mem['labels-device-keep']['peak_mb']:.0f} MB measured")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
