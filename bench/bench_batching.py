"""Server throughput with 1, 2, 4, 8 devices at once: one step at a time vs devices batched.

A real `splitlm serve` process (1 torch thread) on 127.0.0.1 with the tiny random Llama of the
tests (or --model); the devices are synthetic: asyncio clients in this process that speak the
wire (hello, then forward -> backward in a loop with random h_K), so the bench measures the
server, not ONNX heads competing for the same 2 cores. For each mode and device count it counts
the steps answered during --seconds after a warm-up and prints steps/s and the ratio to the
1-device rate of the same mode (the issue's goal: >= 0.8 N until the server is compute-bound).

    python bench/bench_batching.py [--batch-size 4] [--seq-len 64] [--seconds 6] [--wait-ms 50]
"""

from __future__ import annotations

import argparse
import asyncio
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from websockets.asyncio.client import connect

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.conftest: the tiny model

from splitlm import protocol as p  # noqa: E402
from splitlm.manifest import model_folder_hash  # noqa: E402

CLI = [sys.executable, "-m", "splitlm.cli"]


def start_server(model: Path, args, extra: list[str]) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([*CLI, "serve", str(model), "--cut", "2", "--port", "0", "--threads", "1", "--wire", "f32",
                             "--steps-per-round", "1000000", "--max-clients", "16", "--no-status", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = next(m.group(1) for line in proc.stdout if (m := re.search(r"listening on (ws://\S+)", line)))
    threading.Thread(target=proc.stdout.read, daemon=True).start()  # a line per step: a full pipe would stall it
    return proc, url


async def device(url: str, i: int, hello: dict, args, hidden: int, stop_at: list[float], counts: list[int]) -> None:
    rng = np.random.default_rng(i)
    b, t = args.batch_size, args.seq_len
    limits = p.Limits(max_frame_bytes=64 << 20, hidden_size=hidden, max_batch=64, max_seq_len=4096)
    async with connect(url, max_size=None, compression=None) as ws:
        await ws.send(p.encode(p.Hello(client_id=f"bench-{i}", n_samples=1, resume_step=None, **hello), seq=0))
        p.decode(await ws.recv(), limits=limits)  # welcome
        step = 0
        while time.monotonic() < stop_at[0]:
            msg = p.Forward(step=step, hidden=rng.standard_normal((b, t, hidden), dtype=np.float32),
                            attention_mask=np.ones((b, t), np.int64), labels=rng.integers(0, 300, (b, t)))
            await ws.send(p.encode(msg, seq=step + 1))
            _, reply = p.decode(await ws.recv(), limits=limits)
            assert isinstance(reply, p.Backward), reply
            step += 1
            if time.monotonic() >= stop_at[1]:  # past the warm-up
                counts[i] += 1
        await ws.send(p.encode(p.Bye(reason="done"), seq=step + 1))


async def rate(urls: list[str], n: int, hello: dict, args, hidden: int) -> float:
    """Steps/s of `n` devices, device i on urls[i % len(urls)]."""
    now = time.monotonic()
    stop_at = [now + args.warmup + args.seconds, now + args.warmup]
    counts = [0] * n
    await asyncio.gather(*(device(urls[i % len(urls)], i, hello, args, hidden, stop_at, counts) for i in range(n)))
    return sum(counts) / args.seconds


def parse_args(doc: str, *, wait_help: str, devices: list[int]) -> argparse.Namespace:
    """The options this bench and bench_replicas share."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--model", help="a model folder (default: the tests' tiny random Llama, built here)")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--seconds", type=float, default=6.0, help="measured window per point")
    ap.add_argument("--warmup", type=float, default=2.0)
    ap.add_argument("--wait-ms", type=float, default=50.0, help=wait_help)
    ap.add_argument("--devices", type=int, nargs="+", default=devices)
    return ap.parse_args()


def model_and_hello(args, tmp: str) -> tuple[Path, int, dict]:
    """The model folder (--model, or the tests' tiny Llama built in `tmp`), its hidden size, and the
    hello fields every synthetic device sends (cut 2, LoRA r 8 on q and v)."""
    from transformers import AutoConfig

    if args.model:
        model = Path(args.model)
    else:
        from tests.conftest import build_tiny_model
        model = build_tiny_model("llama", Path(tmp) / "tiny-llama")
    hello = dict(model_hash=model_folder_hash(model), cut=2, labels="server", lora_rank=8, lora_alpha=16.0,
                 lora_targets=("self_attn.q_proj", "self_attn.v_proj"), codecs=("f32", "f16", "q8"))
    return model, AutoConfig.from_pretrained(model).hidden_size, hello


def main() -> None:
    args = parse_args(__doc__, wait_help="--batch-wait-ms of the batched server", devices=[1, 2, 4, 8])
    with tempfile.TemporaryDirectory() as tmp:
        model, hidden, hello = model_and_hello(args, tmp)
        modes = {"one at a time": [],
                 "batched per-device": ["--batch-wait-ms", str(args.wait_ms), "--batch-optimizer", "per-device"],
                 "batched per-batch": ["--batch-wait-ms", str(args.wait_ms), "--batch-optimizer", "per-batch"]}
        print(f"server steps/s, {model.name}, device batch {args.batch_size} x {args.seq_len} tokens, "
              f"{args.seconds:g} s per point, 1 torch thread")
        print(f"{'mode':22s}" + "".join(f"{f'{n} dev':>18s}" for n in args.devices))
        for name, extra in modes.items():
            proc, url = start_server(model, args, extra)
            try:
                rates = [asyncio.run(rate([url], n, hello, args, hidden)) for n in args.devices]
            finally:
                proc.terminate()
                proc.wait()
            cells = [f"{r:7.1f} ({r / rates[0]:4.2f}x)" for r in rates]
            print(f"{name:22s}" + "".join(f"{c:>18s}" for c in cells), flush=True)
        print("(x: steps/s relative to 1 device in the same mode; the goal is >= 0.8 N)")


if __name__ == "__main__":
    main()
