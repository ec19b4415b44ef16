"""Peak RSS of a device doing training steps (head forward + head_grad), per runtime configuration.

    splitlm export default --cut 2 --quant fp32 --out /tmp/smol-fp32
    python bench/bench_edge_memory.py /tmp/smol-fp32 [/tmp/smol-q4 ...] [--seq 512 --batch 1 --steps 1]

Each configuration runs in a fresh subprocess, so its peak (VmHWM) is its own. `plain` is
two onnxruntime sessions opened from the files with onnxruntime's defaults (CPU memory arena
and memory pattern on): the baseline every ratio is against, measured in the same run. `shared`
is HeadRuntime's weight pool (one copy of each frozen weight for both sessions); `no
arena/pattern` turns both allocation caches off. Ratios: peak after the first step, and after
the last (the pattern's block appears from the second run on). The import of numpy +
onnxruntime alone is printed for reference.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

CONFIGS = {  # name -> HeadRuntime keywords
    "plain (baseline)": {"share_weights": False, "mem_arena": True},
    "plain, no arena/pattern": {"share_weights": False, "mem_arena": False},
    "shared, arena/pattern": {"share_weights": True, "mem_arena": True},
    "shared, no arena/pattern (default)": {"share_weights": True, "mem_arena": False},
}


def peak_mb() -> float:
    """This process's own peak (VmHWM; ru_maxrss would carry a large parent's peak over exec)."""
    from splitlm.edge_client.meter import rss_peak_mb
    return rss_peak_mb()


def child(bundle: str, config: str, *, seq: int, batch: int, steps: int) -> dict:
    """One configuration, in this (fresh) process: peak RSS after import, sessions, each step."""
    import numpy as np

    from splitlm.edge_client.runtime import HeadRuntime

    out = {"import_mb": peak_mb()}
    t0 = time.perf_counter()
    rt = HeadRuntime(bundle, **CONFIGS[config]) if config != "import only" else None
    if rt is None:
        return out
    out |= {"open_s": time.perf_counter() - t0, "sessions_mb": peak_mb()}
    m = rt.manifest
    ids = np.random.default_rng(0).integers(0, m.model.vocab_size, (batch, seq), dtype=np.int64)  # (B, T)
    mask = np.ones_like(ids)
    loras = rt.bundle.lora_init()
    step_s, step_mb = [], []
    for _ in range(steps):
        t0 = time.perf_counter()
        hidden = rt.forward(ids, mask, loras)  # (B, T, H)
        rt.lora_grads(ids, mask, np.full_like(hidden, 1e-3), loras)
        step_s.append(time.perf_counter() - t0)
        step_mb.append(peak_mb())
    return out | {"step_s": step_s, "step_mb": step_mb}


def run_child(bundle: str, config: str, args) -> dict:
    cmd = [sys.executable, __file__, bundle, "--child", config, "--seq", str(args.seq),
           "--batch", str(args.batch), "--steps", str(args.steps)]
    r = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(r.stdout.strip().splitlines()[-1])


def report(bundle: str, args) -> None:
    from splitlm.manifest import Bundle

    m = Bundle.open(bundle, verify=False).manifest
    print(f"\n{bundle}: {m.model.name} cut {m.cut} {m.quant}, batch {args.batch} seq {args.seq}, "
          f"{args.steps} step(s), fresh process each")
    print(f"  numpy + onnxruntime imported: {run_child(bundle, 'import only', args)['import_mb']:.0f} MB")
    print(f"  {'peak RSS':35s} {'sessions':>9s} {'1 step':>15s} {f'{args.steps} steps':>15s} "
          f"{'open':>6s} {'step':>7s}")
    base = None
    for config in CONFIGS:
        r = run_child(bundle, config, args)
        first, last = r["step_mb"][0], r["step_mb"][-1]
        base = base or (first, last)
        print(f"  {config:35s} {r['sessions_mb']:6.0f} MB {first:6.0f} MB {first / base[0]:5.2f}x "
              f"{last:6.0f} MB {last / base[1]:5.2f}x {r['open_s']:5.2f}s {min(r['step_s']) * 1e3:5.0f}ms")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundles", nargs="+", help="bundle folders (splitlm export ...)")
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=3, help="training steps per process (peak after the last)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.bundles[0], args.child, seq=args.seq, batch=args.batch, steps=args.steps)))
        return
    for bundle in args.bundles:
        report(bundle, args)


if __name__ == "__main__":
    main()
