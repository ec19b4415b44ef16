"""Rerun the numbers the README claims and print each beside the README's own words.

    flock /tmp/splitlm-heavy.lock python bench/readme_numbers.py [--only demo edge-memory] [--workdir DIR]

demo         `splitlm demo` (default model, two clients x 20 steps, a round every 5), then the
             `splitlm eval` line the demo prints (base vs the last round's adapter, 50 held-out
             examples): the loss per client and the held-out loss and exact match.
edge-memory  bench/bench_edge_memory.py on the demo's q4 bundle, batch 1 x 512 tokens, 3 steps:
             peak RSS of the default client against two plain onnxruntime sessions.

Each claim is found in README.md by a pattern; its numbers are compared with the measured ones
within a stated tolerance, and the line says `matches` or `DIFFERS`. The exit status is 1 when any
claim differs or is missing from the README. Not rerun here: the quant presets table and the
latencies under it (`python bench/bench_export.py`). Minutes of CPU: run it under the flock.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from splitlm.launch import cli_command

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Claim:
    group: str
    pattern: str                                   # finds the claim in README.md; its groups are the numbers
    check: Callable[[tuple[float, ...], dict], tuple[bool, str]]  # (README numbers, measured) -> (ok, measured text)


def _numbers(match: re.Match) -> tuple[float, ...]:
    return tuple(float(g) for g in match.groups() if g is not None)


def _demo_loss(readme, m) -> tuple[bool, str]:
    first, last = readme[0], readme[1]
    ok = all(abs(f - first) <= 0.5 and abs(l - last) <= 0.15 for f, l in m["client_loss"])
    return ok, ", ".join(f"client-{i} {f:.2f} -> {l:.2f}" for i, (f, l) in enumerate(m["client_loss"])) + \
        " (first -> last step; within 0.5 and 0.15)"


def _demo_exact_match(readme, m) -> tuple[bool, str]:
    base, low, high = readme[0], readme[1], readme[-1]
    got_base, got = 100 * m["base"]["exact_match"], 100 * m["adapter"]["exact_match"]
    ok = got_base == base and low - 5 <= got <= high + 5
    return ok, f"{got_base:.0f}% -> {got:.0f}% (the README's range, 5 points either side)"


def _demo_eval_loss(readme, m) -> tuple[bool, str]:
    base, adapted = readme[0], readme[1]
    ok = abs(m["base"]["loss"] - base) <= 0.01 and abs(m["adapter"]["loss"] - adapted) <= 0.1
    return ok, f"{m['base']['loss']:.2f} -> {m['adapter']['loss']:.2f} (base within 0.01, adapter within 0.1)"


def _edge_memory(readme, m) -> tuple[bool, str]:
    ours, plain = readme
    ok = abs(m["default_mb"] - ours) <= 0.15 * ours and abs(m["plain_mb"] - plain) <= 0.15 * plain
    return ok, f"{m['default_mb']:.0f} MB against {m['plain_mb']:.0f} MB (within 15%)"


CLAIMS = (
    Claim("demo", r"loss ([\d.]+) -> ([\d.]+) in (\d+)\s+steps per client", _demo_loss),
    Claim("demo", r"exact match from (\d+)% to (\d+)%?(?:\s*(?:-|–|to)\s*(\d+)%)?", _demo_exact_match),
    Claim("demo", r"and loss from ([\d.]+) to ([\d.]+)", _demo_eval_loss),
    Claim("edge-memory", r"is (\d+) MB after three steps, against (\d+) MB for two plain sessions", _edge_memory),
)


def measure_demo(workdir: Path) -> dict:
    """Run the demo, then the eval line it printed; losses per client and the eval's JSON."""
    out = _run(cli_command("demo", "--workdir", str(workdir)), cwd=workdir.parent)
    client_loss = []
    for path in sorted(workdir.glob("client-*.metrics.jsonl")):
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        client_loss.append((rows[0]["loss"], rows[-1]["loss"]))
    printed = shlex.split(out.strip().splitlines()[-1])
    assert printed[:2] == ["splitlm", "eval"], f"the demo's last line is not its eval command: {printed}"
    result = json.loads(_run(cli_command(*printed[1:], "--json"), cwd=workdir.parent).strip().splitlines()[-1])
    return {"client_loss": client_loss, "adapter": result, "base": result["base"],
            "bundle": _bundle_of(workdir), "commands": [f"splitlm demo --workdir {workdir}", shlex.join(printed)]}


def _bundle_of(workdir: Path) -> Path:
    from splitlm.export.default_model import FOLDER_NAME, cache_dir

    return cache_dir() / "bundles" / f"{FOLDER_NAME}-k2-q4"  # the demo's defaults: K=2, q4


def measure_edge_memory(bundle: Path) -> dict:
    out = _run([sys.executable, str(ROOT / "bench" / "bench_edge_memory.py"), str(bundle),
                "--seq", "512", "--batch", "1", "--steps", "3"], cwd=ROOT)
    rows = {}
    for line in out.splitlines():  # "  <config>  <sessions> MB  <1 step> MB <x>  <3 steps> MB <x> ..."
        match = re.match(r"\s+(.+?)\s+\d+ MB\s+\d+ MB\s+[\d.]+x\s+(\d+) MB", line)
        if match:
            rows[match.group(1)] = float(match.group(2))
    return {"plain_mb": rows["plain (baseline)"], "default_mb": rows["shared, no arena/pattern (default)"],
            "commands": [f"python bench/bench_edge_memory.py {bundle} --seq 512 --batch 1 --steps 3"]}


def _run(cmd: list[str], *, cwd: Path) -> str:
    """Run `cmd`, echo its output as it comes, return it; stop on failure."""
    print("$ " + ("splitlm " + shlex.join(cmd[3:]) if cmd[1] == "-c" else shlex.join(cmd)), flush=True)
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in proc.stdout:
        print("  | " + line, end="", flush=True)
        lines.append(line)
    if proc.wait() != 0:
        sys.exit(f"failed (exit {proc.returncode}): {shlex.join(cmd)}")
    return "".join(lines)


def compare(readme: str, group: str, measured: dict) -> list[tuple[bool, str]]:
    """One (ok, text) per claim of `group`: the README's words, then what was measured."""
    results = []
    for claim in (c for c in CLAIMS if c.group == group):
        match = re.search(claim.pattern.replace(" ", r"\s+"), readme)  # a claim may wrap across lines
        if match is None:
            results.append((False, f"[{group}] README: no text matches /{claim.pattern}/"))
            continue
        ok, got = claim.check(_numbers(match), measured)
        results.append((ok, f"[{group}] README: \"{' '.join(match.group(0).split())}\"\n"
                            f"{'':{len(group) + 3}}measured: {got}  -> {'matches' if ok else 'DIFFERS'}"))
    return results


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="+", choices=("demo", "edge-memory"), default=["demo", "edge-memory"])
    ap.add_argument("--workdir", help="the demo's folder (default: a new temporary one)")
    args = ap.parse_args()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="readme-numbers-")).absolute() / "splitlm-demo"
    workdir.parent.mkdir(parents=True, exist_ok=True)
    readme = (ROOT / "README.md").read_text()
    results, commands = [], []
    if "demo" in args.only:
        measured = measure_demo(workdir)
        results += compare(readme, "demo", measured)
        commands += measured["commands"]
    if "edge-memory" in args.only:
        measured = measure_edge_memory(_bundle_of(workdir))
        results += compare(readme, "edge-memory", measured)
        commands += measured["commands"]
    print("\nthe README's numbers, rerun:")
    print("\n".join(text for _, text in results))
    print("commands:\n" + "\n".join("  " + c for c in commands))
    return 0 if all(ok for ok, _ in results) else 1


if __name__ == "__main__":
    sys.exit(main())
