"""Server throughput of 2 body replicas against 1, measured in the same run.

One server (`--batch-optimizer per-batch`) and then two replicas of it (`--replicas 2`, gloo on
127.0.0.1, gradients all-reduced each step), each `splitlm serve` a process of its own with 1
torch thread and the tests' tiny random Llama (or --model). The devices are the synthetic ones of
`bench_batching` (asyncio clients in this process speaking the wire, random h_K), N in all, spread
round-robin over the replicas. For each N it counts every device's answered steps during --seconds
after a warm-up and prints steps/s and the ratio of 2 replicas to 1 at that N.

On one machine the replicas share its cores: this measures what the lockstep costs (the tick's
all-reduces, waiting for the slower replica), not the gain of a second machine. Two replicas on two
machines each get half the devices' compute; the ratio here is a floor for that.

    python bench/bench_replicas.py [--batch-size 4] [--seq-len 64] [--seconds 6] [--wait-ms 50] [--devices 2 4 8]
"""

from __future__ import annotations

import asyncio
import re
import socket
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.conftest: the tiny model; bench_batching

from bench.bench_batching import CLI, model_and_hello, parse_args, rate  # noqa: E402


def start_servers(model: Path, world: int, args) -> tuple[list[subprocess.Popen], list[str]]:
    """`world` replicas (1: a plain server), all started before any is waited for (they meet first)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    common = [*CLI, "serve", str(model), "--cut", "2", "--port", "0", "--threads", "1", "--wire", "f32",
              "--steps-per-round", "1000000", "--max-clients", "16", "--no-status", "--batch-wait-ms",
              str(args.wait_ms), "--batch-optimizer", "per-batch"]
    replica = lambda r: ["--replicas", str(world), "--replica-rank", str(r), "--dist-url", f"tcp://127.0.0.1:{port}"]  # noqa: E731
    procs = [subprocess.Popen(common + (replica(r) if world > 1 else []), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for r in range(world)]
    urls = []
    for proc in procs:
        urls.append(next(m.group(1) for line in proc.stdout if (m := re.search(r"listening on (ws://\S+)", line))))
        threading.Thread(target=proc.stdout.read, daemon=True).start()  # a line per step: a full pipe would stall it
    return procs, urls


def main() -> None:
    args = parse_args(__doc__, wait_help="--batch-wait-ms of every server", devices=[2, 4, 8])
    with tempfile.TemporaryDirectory() as tmp:
        model, hidden, hello = model_and_hello(args, tmp)
        print(f"server steps/s, {model.name}, device batch {args.batch_size} x {args.seq_len} tokens, "
              f"{args.seconds:g} s per point, 1 torch thread per server, per-batch steps within {args.wait_ms:g} ms")
        rates = {}
        for world in (1, 2):
            procs, urls = start_servers(model, world, args)
            try:
                rates[world] = [asyncio.run(rate(urls, n, hello, args, hidden)) for n in args.devices]
            finally:
                for proc in procs:
                    proc.terminate()
                for proc in procs:
                    proc.wait()
        print(f"{'servers':12s}" + "".join(f"{f'{n} dev':>16s}" for n in args.devices))
        print(f"{'1 server':12s}" + "".join(f"{r:16.1f}" for r in rates[1]))
        print(f"{'2 replicas':12s}" + "".join(f"{f'{r2:.1f} ({r2 / r1:.2f}x)':>16s}" for r1, r2 in zip(*rates.values())))
        print("(x: 2 replicas' steps/s over 1 server's at the same number of devices, same run)")


if __name__ == "__main__":
    main()
