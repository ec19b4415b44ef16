"""KD-FedLLM on the default model: does the server's global model get better on held-out English,
and are the bytes what the formula says?

2 devices (shards of the GPL-3 text), a q4 distill bundle of SmolLM2, `splitlm serve --mode
distill` with --eval on the Apache-2.0 text (never trained on), 3 rounds. Prints the held-out loss
of the global model before training and after each round, and each round's bytes per device
against public tokens x k x (2-byte value + 2-byte index).

    python bench/bench_distill.py [--rounds 3] [--local-steps 5] [--topk 16] [--json]
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
LICENSES = Path("/usr/share/common-licenses")


def jsonl(path: Path, words: list[str], per_line: int = 80) -> Path:
    path.write_text("".join(json.dumps({"text": " ".join(words[i:i + per_line])}) + "\n"
                            for i in range(0, len(words), per_line)))
    return path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--local-steps", type=int, default=5)
    ap.add_argument("--topk", type=int, default=16)
    ap.add_argument("--quant", default="q4")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    from splitlm.export.default_model import default_model_dir

    model = default_model_dir()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        words = (LICENSES / "GPL-3").read_text().split()
        shards = [jsonl(out / f"shard-{i}.jsonl", words[i::2]) for i in range(2)]
        held_out = jsonl(out / "held-out.jsonl", (LICENSES / "Apache-2.0").read_text().split())
        bundle = out / "distill"
        subprocess.run([*CLI, "export", str(model), "--mode", "distill", "--quant", args.quant, "--topk",
                        str(args.topk), "--max-length", "128", "--out", str(bundle)], check=True, capture_output=True)
        base = json.loads(subprocess.run([*CLI, "eval", str(model), "--data", str(held_out), "--seq-len", "128",
                                          "--no-base", "--json", "--threads", "1"],
                                         check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])
        server = subprocess.Popen([*CLI, "serve", str(model), "--mode", "distill", "--port", "0", "--threads", "1",
                                   "--rounds", str(args.rounds), "--local-steps", str(args.local_steps), "--topk",
                                   str(args.topk), "--eval", str(held_out), "--out", str(out / "runs"),
                                   "--min-clients", "2"],
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        url = next(m.group(1) for line in server.stdout if (m := re.search(r"listening on (ws://\S+)", line)))
        edges = [subprocess.Popen([*CLI, "edge", url, "--bundle", str(bundle), "--data", str(s), "--batch-size", "4",
                                   "--seq-len", "64", "--threads", "1", "--client-id", f"dev{i}"],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for i, s in enumerate(shards)]
        for e in edges:
            _, err = e.communicate(timeout=7200)
            if e.returncode:
                raise SystemExit(err[-3000:])
        server.stdout.read()
        server.wait(timeout=300)
        rounds = [json.loads((out / "runs" / f"round-{r:04d}" / "metrics.json").read_text()) for r in range(args.rounds)]
    formula = rounds[0]["public_rows"] * args.topk * 4
    result = {"base_loss": base["loss"], "eval_loss": [r["eval_loss"] for r in rounds],
              "kd_loss": [r["kd_loss"] for r in rounds], "public_rows": rounds[0]["public_rows"],
              "formula_bytes": formula,
              "bytes_up_per_device": [max(c["bytes_up"] for c in r["clients"].values()) for r in rounds],
              "bytes_down_per_device": [max(c["bytes_down"] for c in r["clients"].values()) for r in rounds]}
    if args.json:
        print(json.dumps(result))
        return
    print(f"held-out loss of the global model: base {base['loss']:.4f} -> "
          + " -> ".join(f"{x:.4f}" for x in result["eval_loss"]) + f"  (rounds 0..{args.rounds - 1})")
    print(f"bytes per device-round up {result['bytes_up_per_device']}, down {result['bytes_down_per_device']}; "
          f"public tokens x k x 4 = {result['public_rows']} x {args.topk} x 4 = {formula}")


if __name__ == "__main__":
    main()
