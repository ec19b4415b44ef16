"""A FedLLM round against its parallel compute floor, and its bytes and device memory.

The job (issue 8, the same as measured for Flower 1.41): SmolLM2-135M, LoRA r=8 on q and v,
2 devices x 10 local steps of batch 4 x 64 tokens a round. One run measures, on this machine:

    floor   one device alone: its 10 local steps (compute only, no server, nothing else running)
    round   2 devices + `splitlm serve --mode fedavg` as real processes on 127.0.0.1: wall time
            from the round's first local step to the new global on the slower device
    ratio   round / floor; bytes up and down per device-round (frame bytes, headers included);
            each device's peak RSS (its own VmHWM)

    python bench/bench_fedavg.py [--quant q4 | --bundle B] [--rounds 2] [--local-steps 10] [--json]

(--bundle: an existing fedavg LoRA bundle of SmolLM2, r 8 on q and v, instead of exporting one:
the whole-model export is the slow part, tens of minutes on 2 cores.)

Flower 1.41 on the same job, measured here when the issue was written: 1.75x the floor, 2.39 MB up
and 2.00 MB down per device-round, 1.67 GB device RSS.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

CLI = [sys.executable, "-m", "splitlm.cli"]
TEXT = Path("/usr/share/common-licenses/GFDL-1.3")


def export(model: Path, out: Path, quant: str) -> Path:
    bundle = out / f"fedavg-lora-{quant}"
    subprocess.run([*CLI, "export", str(model), "--mode", "fedavg", "--train", "lora", "--quant", quant,
                    "--lora-rank", "8", "--max-length", "128", "--out", str(bundle)], check=True, capture_output=True)
    return bundle


def write_shards(out: Path, n: int) -> list[Path]:
    words = TEXT.read_text().split()
    shards = []
    for i in range(n):
        part = words[i::n]
        path = out / f"shard-{i}.jsonl"
        path.write_text("".join(json.dumps({"text": " ".join(part[j:j + 60])}) + "\n" for j in range(0, len(part), 60)))
        shards.append(path)
    return shards


def edge(url: str, bundle: Path, data: Path, metrics: Path, args, client_id: str) -> subprocess.Popen:
    return subprocess.Popen([*CLI, "edge", url, "--bundle", str(bundle), "--data", str(data), "--batch-size", "4",
                             "--seq-len", "64", "--threads", "1", "--metrics-out", str(metrics), "--client-id", client_id],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def rounds_of(metrics: Path) -> list[dict]:
    return [r for r in map(json.loads, metrics.read_text().splitlines()) if r.get("phase") == "round"]


def run(model: Path, bundle: Path, shards: list[Path], out: Path, args, *, devices: int) -> list[list[dict]]:
    server = subprocess.Popen([*CLI, "serve", str(model), "--mode", "fedavg", "--lora-rank", "8", "--port", "0",
                               "--threads", "1", "--rounds", str(args.rounds), "--local-steps", str(args.local_steps),
                               "--update-wire", args.update_wire, "--min-clients", str(devices)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = next(m.group(1) for line in server.stdout if (m := re.search(r"listening on (ws://\S+)", line)))
        procs = [edge(url, bundle, shards[i], out / f"m-{devices}-{i}.jsonl", args, f"dev{i}") for i in range(devices)]
        for p in procs:
            _, err = p.communicate(timeout=3600)
            if p.returncode:
                raise SystemExit(f"edge failed: {err[-2000:]}")
    finally:
        server.wait(timeout=120)
    return [rounds_of(out / f"m-{devices}-{i}.jsonl") for i in range(devices)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quant", default="q4")
    ap.add_argument("--bundle", type=Path, help="use this fedavg LoRA bundle instead of exporting one")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--local-steps", type=int, default=10)
    ap.add_argument("--update-wire", default="f16", choices=("f32", "f16", "q8"))
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    from splitlm.export.default_model import default_model_dir

    model = default_model_dir()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        bundle = args.bundle or export(model, out, args.quant)
        shards = write_shards(out, 2)
        alone = run(model, bundle, shards, out, args, devices=1)[0]
        both = run(model, bundle, shards, out, args, devices=2)
    floor = min(r["compute_s"] for r in alone[1:] or alone)        # one device's local training, alone
    # a round's wall time on a device: its compute plus its waiting (for the others and the server)
    round_s = [max(d[r]["compute_s"] + d[r]["wait_s"] for d in both) for r in range(1, len(both[0]))] or \
              [max(d[0]["compute_s"] + d[0]["wait_s"] for d in both)]
    result = {"floor_s": floor, "round_s": min(round_s), "ratio": min(round_s) / floor,
              "bytes_up_per_device_round": max(d[-1]["bytes_up"] for d in both),
              "bytes_down_per_device_round": max(d[-1]["bytes_down"] for d in both),
              "device_rss_peak_mb": max(d[-1]["rss_peak_mb"] for d in both),
              "flower_1_41": {"ratio": 1.75, "bytes_up": 2.39e6, "bytes_down": 2.00e6, "rss_mb": 1670}}
    if args.json:
        print(json.dumps(result))
        return
    print(f"floor (one device's {args.local_steps} local steps alone): {floor:.2f} s")
    print(f"fedavg round, 2 devices + server on loopback:      {result['round_s']:.2f} s  = {result['ratio']:.2f}x the floor"
          f"  (Flower 1.41: 1.75x)")
    print(f"bytes per device-round: up {result['bytes_up_per_device_round'] / 1e6:.2f} MB, down "
          f"{result['bytes_down_per_device_round'] / 1e6:.2f} MB  (Flower: 2.39 / 2.00 MB)")
    print(f"device peak RSS: {result['device_rss_peak_mb']:.0f} MB  (Flower: 1670 MB)")


if __name__ == "__main__":
    main()
