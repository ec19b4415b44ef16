"""The host side of bench/arm64/run.sh: a tiny model, its bundle and data, and the loss check.

    python bench/arm64/host.py prepare WORK      tiny Llama + q4 bundle (labels on the device) + data
    python bench/arm64/host.py compare X86.jsonl ARM.jsonl --tol 1e-3 [--cgroup-peak-mb MB]

`compare` prints one JSON line (the last line run.sh prints) and exits 1 when the per-step losses
differ by more than `tol` or a step is missing.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def prepare(work: Path) -> None:
    sys.path.insert(0, str(REPO))
    from tests.conftest import TEXT, build_tiny_model  # the tests' tiny model, built in code

    from splitlm.export.bundle import ExportOptions, export_bundle

    model = work / "tiny-llama"
    if not (model / "config.json").is_file():
        build_tiny_model("llama", model)
    if not (work / "bundle" / "manifest.json").is_file():
        export_bundle(str(model), work / "bundle", ExportOptions(cut=2, quant="q4", labels="device", lora_rank=4,
                                                                 max_length=128), log=lambda *_: None)
    with open(work / "data.jsonl", "w") as f:
        for line in TEXT * 8:
            f.write(json.dumps({"text": line}) + "\n")


def losses(path: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, path.read_text().splitlines())}


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def compare(x86: Path, arm: Path, tol: float, cgroup_peak_mb: float | None, oom_kills: int) -> int:
    want, got = losses(x86), losses(arm)
    records = [json.loads(line) for line in arm.read_text().splitlines()]
    diff = max((abs(want[s] - got[s]) for s in want if s in got), default=float("inf"))
    ok = bool(want) and set(want) == set(got) and diff <= tol and oom_kills == 0
    print(json.dumps({"ok": ok, "steps": len(got), "max_loss_diff": diff, "tol": tol,
                      "x86_losses": [want[s] for s in sorted(want)], "arm64_losses": [got[s] for s in sorted(got)],
                      "arm64_rss_peak_mb": max(r["rss_peak_mb"] for r in records) if records else None,
                      "cgroup_peak_mb": cgroup_peak_mb, "oom_kills": oom_kills,
                      "arm64_step_s": median([r["wall_s"] for r in records]),
                      "arm64_compute_s": median([r["compute_s"] for r in records])}))
    return 0 if ok else 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("work", type=Path)
    p = sub.add_parser("compare")
    p.add_argument("x86", type=Path)
    p.add_argument("arm", type=Path)
    p.add_argument("--tol", type=float, default=1e-3)
    p.add_argument("--cgroup-peak-mb", type=float)
    p.add_argument("--oom-kills", type=int, default=0)
    args = ap.parse_args()
    if args.cmd == "prepare":
        prepare(args.work)
        return 0
    return compare(args.x86, args.arm, args.tol, args.cgroup_peak_mb, args.oom_kills)


if __name__ == "__main__":
    sys.exit(main())
