"""glibc's mmap threshold on the device: speed against memory, measured in one run.

The runtime fixes glibc's M_MMAP_THRESHOLD at 64 KiB (`edge_client/runtime.py::give_back_large_blocks`):
every activation buffer over it is its own mapping, returned to the OS when freed, so the device
holds little between steps, but each run faults its pages in afresh. A larger threshold keeps more
buffers on the heap (fewer page faults, faster) at some memory. For each threshold, in fresh
processes, one thread, alternating, `--repeats` times: head forward and training step at batch
1 x 128 (`bench_device.device_times`) and peak RSS after 3 steps at 1 x 512 (training step, and
labels on the device), both from `bench_device`.

    python bench/bench_mmap_threshold.py FP32_BUNDLE [--variant q4] [--thresholds 65536 1048576] [--repeats 2] [--json]

FP32_BUNDLE: an fp32 split bundle exported with --labels device (the variant is derived beside it).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import numpy as np  # noqa: E402
from splitlm.edge_client.runtime import MMAP_THRESHOLD  # noqa: E402

import bench_device  # noqa: E402


def child(bundle: str, threshold: int, what: str) -> dict:
    if what == "times":
        ids = np.random.default_rng(0).integers(0, 49152, (1, bench_device.SEQ), dtype=np.int64)
        return bench_device.device_times(Path(bundle), ids, mmap_threshold=threshold)
    return bench_device.memory_child(bundle, what, 512, mmap_threshold=threshold)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("fp32", type=Path)
    ap.add_argument("--variant", default="q4", choices=list(bench_device.VARIANTS))
    ap.add_argument("--thresholds", type=int, nargs="+", default=[MMAP_THRESHOLD, 1 << 20])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        bundle, threshold, what = args.child
        print(json.dumps(child(bundle, int(threshold), what)))
        return
    bundle = bench_device.derive(args.fp32, args.variant)
    runs: dict[int, dict[str, list[dict]]] = {t: {} for t in args.thresholds}
    for _ in range(args.repeats):
        for t in args.thresholds:
            for what in ("times", "train", "labels-device"):
                out = subprocess.run([sys.executable, __file__, str(args.fp32), "--child", str(bundle), str(t), what],
                                     capture_output=True, text=True, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
                runs[t].setdefault(what, []).append(json.loads(out.stdout.strip().splitlines()[-1]))
    median = lambda xs: float(np.median(xs))  # noqa: E731
    table = {t: {"forward_ms": median([r["forward_ms"] for r in r_["times"]]),
                 "train_ms": median([r["train_ms"] for r in r_["times"]]),
                 "train_peak_mb": max(r["peak_mb"] for r in r_["train"]),
                 "labels_device_peak_mb": max(r["peak_mb"] for r in r_["labels-device"])} for t, r_ in runs.items()}
    base = table[args.thresholds[0]]
    for row in table.values():
        row["speedup_forward"] = base["forward_ms"] / row["forward_ms"]
        row["speedup_train"] = base["train_ms"] / row["train_ms"]
    if args.json:
        print(json.dumps({"variant": args.variant, "table": table, "runs": runs}))
        return
    print(f"{args.variant}, one thread; time at 1 x {bench_device.SEQ} (median of {args.repeats} processes), "
          "peak RSS at 1 x 512 (largest); ratios against the first threshold")
    for t, r in table.items():
        print(f"  threshold {t:>8d} B: forward {r['forward_ms']:5.1f} ms ({r['speedup_forward']:.2f}x), step "
              f"{r['train_ms']:6.1f} ms ({r['speedup_train']:.2f}x); peak training step {r['train_peak_mb']:.0f} MB, "
              f"labels on device {r['labels_device_peak_mb']:.0f} MB")


if __name__ == "__main__":
    main()
