"""A split run on real English with a float32 body vs a 4-bit (nf4) body: does QLoRA on the server train?

`splitlm serve default --cut 2 [--body-quant nf4]` and one `splitlm edge` with the cached q4
bundle (exported here if missing) on a GNU license text, 1 torch / 1 onnxruntime thread each, the
same data order. Prints the mean loss of the first and last `--window` steps and the mean step
time for each body, and where the round adapter went.

    python bench/bench_body_quant.py [--steps 40] [--batch-size 2] [--seq-len 128] [--quants none nf4]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

CLI = [sys.executable, "-m", "splitlm.cli"]
TEXT = Path("/usr/share/common-licenses/GPL-3")
BUNDLE = Path.home() / ".cache" / "splitlm" / "bundles" / "SmolLM2-135M-Instruct-k2-q4"


def run(quant: str, args, out: Path, data: Path) -> list[dict]:
    from bench_split import serve_and_train  # bench/ is on sys.path when this runs as a script

    return serve_and_train(["default", "--cut", "2", "--threads", "1", "--wire", "f16", "--steps-per-round",
                            str(args.steps), "--body-quant", quant, "--no-status", "--out", str(out / quant)],
                           ["--bundle", str(args.bundle), "--data", str(data), "--steps", str(args.steps),
                            "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len), "--threads", "1"],
                           out / f"{quant}.jsonl")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--window", type=int, default=8)
    ap.add_argument("--quants", nargs="+", default=["none", "nf4"])
    ap.add_argument("--bundle", type=Path, default=BUNDLE)
    ap.add_argument("--out", type=Path, help="keep the runs here (default: a temporary folder)")
    args = ap.parse_args()
    if not (args.bundle / "manifest.json").is_file():
        subprocess.run([*CLI, "export", "default", "--cut", "2", "--quant", "q4", "--out", str(args.bundle)], check=True)
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp)
        out.mkdir(parents=True, exist_ok=True)
        data = out / "gpl-3.txt"  # the edge reads .txt or .jsonl, by suffix
        data.write_text(TEXT.read_text())
        print(f"SmolLM2-135M-Instruct cut at 2, q4 bundle, {TEXT.name}, {args.steps} steps of "
              f"{args.batch_size} x {args.seq_len} tokens")
        for quant in args.quants:
            rows = run(quant, args, out, data)
            rows = [r for r in rows if r["loss"] is not None]
            losses = [r["loss"] for r in rows]
            first, last = np.mean(losses[:args.window]), np.mean(losses[-args.window:])
            wall, wait = (np.mean([r[k] for r in rows[1:]]) for k in ("wall_s", "wait_s"))
            print(f"body {quant:5s}: loss first {args.window} steps {first:.3f}, last {args.window} {last:.3f} "
                  f"({last - first:+.3f}); step {wall:.2f} s, of it {wait:.2f} s waiting on the server; "
                  f"losses {' '.join(f'{x:.2f}' for x in losses)}", flush=True)


if __name__ == "__main__":
    main()
