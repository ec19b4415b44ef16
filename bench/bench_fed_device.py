"""The device side of fedavg on SmolLM2: bundle export time and size, local step time and peak RSS.

    flock /tmp/splitlm-heavy.lock python bench/bench_fed_device.py [--out DIR] [--steps 6]

Exports (once; reused when DIR already holds them) two fedavg bundles of the default model:
  lora  LoRA r=8, alpha 16 on q_proj and v_proj of all 30 blocks, q8 frozen weights
  full  every block weight and the final norm trainable (fp32), the embedding frozen (fp32)
then, for each, a fresh process (so peak RSS is the device's alone) loads the bundle with
`LocalTrainer` and runs --steps local steps at batch 4 x 64 tokens (AdamW in numpy), one
onnxruntime thread. Prints one JSON object per bundle: export seconds, bundle MB, trainable
values, step seconds (median of the steps after the first), peak RSS after the first step and at
the end.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

BATCH, SEQ = 4, 64
VARIANTS = {"lora": {"train": "lora", "quant": "q8"}, "full": {"train": "full", "quant": "fp32"}}


def export(out: Path, variant: str) -> float | None:
    """Export the variant into out (None when it is already there)."""
    if (out / "manifest.json").is_file():
        return None
    from splitlm.export.bundle import ExportOptions, export_bundle

    opts = ExportOptions(mode="fedavg", max_length=512, lora_rank=8, lora_alpha=16.0, **VARIANTS[variant])
    t0 = time.perf_counter()
    export_bundle("default", out, opts, log=lambda line: print(line, file=sys.stderr, flush=True))
    return time.perf_counter() - t0


def device_run(bundle: str, steps: int) -> dict:
    """In this (fresh) process: load the bundle and train `steps` local steps; no torch imported."""
    import statistics

    from splitlm.edge_client.data import Dataset
    from splitlm.edge_client.local import LocalTrainer
    from splitlm.edge_client.meter import rss_peak_mb
    from splitlm.manifest import Bundle

    b = Bundle.open(bundle)
    data = Dataset.from_file(Path(__file__).resolve().parents[1] / "splitlm" / "data" / "public.txt", b,
                             batch_size=BATCH, seq_len=SEQ, seed=0)
    t0 = time.perf_counter()
    trainer = LocalTrainer(b, lr=1e-4, threads=1)
    load_s = time.perf_counter() - t0
    times, losses, rss_first = [], [], None
    for step in range(steps):
        t0 = time.perf_counter()
        losses.append(trainer.train_step(data.batch(step)))
        times.append(time.perf_counter() - t0)
        rss_first = rss_first or rss_peak_mb()
    return {"load_s": round(load_s, 2), "step_s_first": round(times[0], 3),
            "step_s_median": round(statistics.median(times[1:]), 3), "losses": [round(x, 4) for x in losses],
            "rss_peak_mb_first_step": round(rss_first, 1), "rss_peak_mb": round(rss_peak_mb(), 1),
            "torch_loaded": "torch" in sys.modules}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=os.path.expanduser("~/.cache/splitlm/bench-fed"))
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--device", help=argparse.SUPPRESS)  # internal: the fresh device process
    args = parser.parse_args()
    if args.device:
        print(json.dumps(device_run(args.device, args.steps)))
        return
    out = Path(args.out)
    for variant in VARIANTS:
        bundle = out / f"fedavg-{variant}"
        seconds = export(bundle, variant)
        manifest = json.loads((bundle / "manifest.json").read_text())
        sizes = {p.name: round(p.stat().st_size / 1e6, 1) for p in bundle.iterdir() if p.is_file()}
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        run = subprocess.run([sys.executable, __file__, "--device", str(bundle), "--steps", str(args.steps)],
                             capture_output=True, text=True, env=env, check=True)
        result = {"variant": variant, **VARIANTS[variant], "export_s": None if seconds is None else round(seconds, 1),
                  "bundle_mb": round(sum(sizes.values()), 1), "files_mb": sizes,
                  "trainable_values": sum(math.prod(s) for s in manifest["trainables"].values()),
                  "batch": f"{BATCH}x{SEQ}", **json.loads(run.stdout.strip().splitlines()[-1])}
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
