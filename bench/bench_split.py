"""The runtime's overhead: the same steps split over loopback vs centralized in one process.

Split: `splitlm serve` and one `splitlm edge` process on 127.0.0.1 (1 torch thread, 1 onnxruntime
thread: the two processes share this machine's 2 cores). Centralized: the same model with PEFT
LoRA on every block, torch AdamW, the same data order, in this process with 1 thread.
Prints mean step times, their ratio (the overhead), and the client's compute as a share of its
step.

    python bench/bench_split.py [--quant q4] [--wire f16] [--steps 20] [--batch-size 4] [--seq-len 128]
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from splitlm.edge_client.data import Dataset
from splitlm.export.bundle import ExportOptions, export_bundle
from splitlm.export.default_model import default_model_dir
from splitlm.manifest import Bundle

CLI = [sys.executable, "-m", "splitlm.cli"]
TEXT = Path("/usr/share/common-licenses/GFDL-1.3")


def serve_and_train(serve: list[str], edge: list[str], metrics: Path) -> list[dict]:
    """`splitlm serve SERVE... --port 0`, one `splitlm edge URL EDGE... --metrics-out METRICS` against it,
    then the server stopped; the device's per-step records."""
    server = subprocess.Popen([*CLI, "serve", *serve, "--port", "0"], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    try:
        url = next(m.group(1) for line in server.stdout if (m := re.search(r"listening on (ws://\S+)", line)))
        subprocess.run([*CLI, "edge", url, *edge, "--metrics-out", str(metrics)], check=True, capture_output=True)
    finally:
        server.terminate()
        server.wait()
    return [json.loads(line) for line in metrics.read_text().splitlines()]


def split_run(model: Path, bundle: Path, data: Path, args, out: Path) -> list[dict]:
    return serve_and_train([str(model), "--cut", str(args.cut), "--threads", "1", "--wire", args.wire,
                            "--steps-per-round", "1000"],
                           ["--bundle", str(bundle), "--data", str(data), "--steps", str(args.steps), "--batch-size",
                            str(args.batch_size), "--seq-len", str(args.seq_len), "--threads", "1"],
                           out / "split.jsonl")


def centralized_step_s(model: Path, bundle: Bundle, data: Dataset, steps: int) -> list[float]:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(1)  # 2 threads collapse ~100x whenever another process wants a core
    m = bundle.manifest
    peft = get_peft_model(AutoModelForCausalLM.from_pretrained(model, attn_implementation="eager"),
                          LoraConfig(r=m.lora.rank, lora_alpha=m.lora.alpha, target_modules=list(m.lora.targets)))
    optim = torch.optim.AdamW([p for p in peft.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.0)
    times = []
    for step in range(steps):
        b = data.batch(step)
        t = time.perf_counter()
        loss = peft(input_ids=torch.from_numpy(b.input_ids), attention_mask=torch.from_numpy(b.attention_mask),
                    labels=torch.from_numpy(b.labels)).loss
        optim.zero_grad()
        loss.backward()
        optim.step()
        times.append(time.perf_counter() - t)
    return times


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cut", type=int, default=2)
    ap.add_argument("--quant", default="q4")
    ap.add_argument("--wire", default="f16")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=128)
    args = ap.parse_args()
    model = default_model_dir()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = tmp / "train.txt"
        data.write_text(TEXT.read_text())
        export_bundle(str(model), tmp / "bundle", ExportOptions(cut=args.cut, quant=args.quant, max_length=512),
                      log=lambda *_: None)
        bundle = Bundle.open(tmp / "bundle")
        rows = split_run(model, bundle.path, data, args, tmp)
        dataset = Dataset.from_file(data, bundle, seq_len=args.seq_len, batch_size=args.batch_size)
        central = centralized_step_s(model, bundle, dataset, args.steps)
    warm = rows[2:]  # the first steps pay one-off start-up costs on both sides
    split_s = sum(r["wall_s"] for r in warm) / len(warm)
    central_s = sum(central[2:]) / len(central[2:])
    compute_s = sum(r["compute_s"] for r in warm) / len(warm)
    up = sum(r["bytes_up"] for r in warm) / len(warm)
    print(f"SmolLM2 K={args.cut}, {args.quant} bundle, {args.wire} wire, batch {args.batch_size} x {args.seq_len} "
          f"tokens, mean of steps 3..{args.steps}")
    print(f"  centralized (PyTorch, one process)   {1e3 * central_s:8.0f} ms/step")
    print(f"  split over loopback                  {1e3 * split_s:8.0f} ms/step   ratio {split_s / central_s:.2f}x")
    print(f"  client compute (onnxruntime+AdamW)   {1e3 * compute_s:8.0f} ms/step   {100 * compute_s / split_s:.0f}% "
          f"of the split step")
    print(f"  bytes up per step                    {up / 1e3:8.1f} kB")


if __name__ == "__main__":
    main()
