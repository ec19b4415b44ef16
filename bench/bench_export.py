"""Export benchmark on the default model (SmolLM2-135M) cut at K=2, measured in one run.

For each quant preset: export time, file sizes, head forward latency in onnxruntime at batch 1,
seq 128 and 512, next to PyTorch fp32 eager on the same head, and the peak RSS of a fresh
torch-free process that loads the head and runs it once at seq 512.

    python bench/bench_export.py [--cut 2] [--presets fp32 q8 q4 int8] [--repeat 20]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from splitlm.export.bundle import ExportOptions, client_graphs, export_bundle, load_model
from splitlm.export.fidelity import OnnxHead
from splitlm.manifest import Bundle

RSS_CHILD = """
import resource, sys, numpy as np, onnxruntime as ort
from splitlm.manifest import Bundle
b = Bundle.open(sys.argv[1], verify=False)
s = ort.InferenceSession(str(b.file("head.onnx")), providers=["CPUExecutionProvider"])
feeds = {"input_ids": np.ones((1, 512), np.int64), "attention_mask": np.ones((1, 512), np.int64)}
feeds.update({n: np.zeros(sh, np.float32) for n, sh in b.manifest.lora.tensors.items()})
s.run(None, feeds)
assert "torch" not in sys.modules
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
"""


def median_ms(fn, repeat: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times)


def head_inputs(seq: int, vocab: int) -> tuple[np.ndarray, np.ndarray]:
    ids = np.random.default_rng(seq).integers(0, vocab, (1, seq)).astype(np.int64)
    return ids, np.ones_like(ids)


def torch_head_ms(model_path: str, cut: int, seq: int, repeat: int) -> float:
    model, _ = load_model(model_path)
    graphs = client_graphs(model, ExportOptions(cut=cut))
    ids, mask = (torch.from_numpy(a) for a in head_inputs(seq, model.config.vocab_size))
    with torch.no_grad():
        return median_ms(lambda: graphs.head(ids, mask, *[torch.zeros(s) for s in graphs.lora.shapes.values()]),
                         repeat)


def peak_rss_mb(bundle: Path) -> float:
    out = subprocess.run([sys.executable, "-c", RSS_CHILD, str(bundle)], capture_output=True, text=True, check=True)
    return float(out.stdout.strip())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="default")
    ap.add_argument("--cut", type=int, default=2)
    ap.add_argument("--presets", nargs="+", default=["fp32", "q8", "q4", "int8"])
    ap.add_argument("--repeat", type=int, default=20)
    args = ap.parse_args()
    torch.set_num_threads(2)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for preset in args.presets:
            out = Path(tmp) / preset
            t = time.perf_counter()
            export_bundle(args.model, out, ExportOptions(cut=args.cut, quant=preset, max_length=512),
                          log=lambda *_: None)
            export_s = time.perf_counter() - t
            bundle = Bundle.open(out)
            head = OnnxHead(bundle)
            vocab = bundle.manifest.model.vocab_size
            lat = {seq: median_ms(lambda s=seq: head(*head_inputs(s, vocab)), args.repeat) for seq in (128, 512)}
            rows.append((preset, export_s, bundle.file("head.onnx").stat().st_size / 1e6,
                         bundle.file("head_grad.onnx").stat().st_size / 1e6, lat[128], lat[512], peak_rss_mb(out)))
        eager = {seq: torch_head_ms(args.model, args.cut, seq, args.repeat) for seq in (128, 512)}
    print(f"SmolLM2 head, K={args.cut}; latency = median of {args.repeat} at batch 1; "
          f"ratio = PyTorch fp32 eager / this (higher is faster)")
    print(f"{'preset':7s} {'export s':>9s} {'head MB':>8s} {'grad MB':>8s} {'s128 ms':>8s} {'ratio':>6s} "
          f"{'s512 ms':>8s} {'ratio':>6s} {'RSS MB':>7s}")
    for preset, export_s, mb, grad_mb, l128, l512, rss in rows:
        print(f"{preset:7s} {export_s:9.1f} {mb:8.1f} {grad_mb:8.1f} {l128:8.2f} {eager[128] / l128:6.2f} "
              f"{l512:8.2f} {eager[512] / l512:6.2f} {rss:7.0f}")
    print(f"{'torch':7s} {'':>9s} {'':>8s} {'':>8s} {eager[128]:8.2f} {1:6.2f} {eager[512]:8.2f} {1:6.2f}")


if __name__ == "__main__":
    main()
