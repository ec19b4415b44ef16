"""Load and abuse on loopback: many enrolled devices train while a stream of bad connection
attempts hits the same server; the server's memory and file descriptors stay flat, and every
honest device's step log is exactly 0..N-1.

    flock /tmp/splitlm-heavy.lock python bench/bench_load.py [--minutes 10] [--devices 32]

One `splitlm serve` process (split, a tiny random llama, --auth, TLS, 1 torch thread) on 127.0.0.1.
This process runs the devices: `--devices` real `EdgeClient`s (onnxruntime, 1 thread each, wss://,
their own credentials) in one event loop, and a thread making bad attempts from 127.0.0.2 (also
loopback, so the per-address limit can tell it apart): no credential, another server's credential,
a revoked one, a replayed handshake, a stale one, a valid credential claiming another device's id,
an enrolled device sending garbage and NaN frames, raw bytes, plain ws:// to the TLS port, and a
connection that never speaks. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
CLI = [sys.executable, "-m", "splitlm.cli"]
BAD_SOURCE = ("127.0.0.2", 0)


def prepare(work: Path, devices: int) -> dict:
    import torch

    from splitlm.demo import write_ledger_data
    from splitlm.export.bundle import ExportOptions, export_bundle
    from tests.conftest import build_tiny_model

    torch.set_num_threads(1)
    model = build_tiny_model("llama", work / "model")
    export_bundle(str(model), work / "bundle", ExportOptions(cut=2, quant="fp32", lora_rank=4, max_length=128),
                  log=lambda *_: None)
    write_ledger_data(work / "data", clients=devices, per_client=40, held_out=1)
    names = [f"dev-{i}" for i in range(devices)] + ["mallory", "revoked"]
    for name in names:
        subprocess.run([*CLI, "enroll", name, "--auth", str(work / "auth"), "--out", str(work / f"creds/{name}.json")],
                       check=True, capture_output=True)
    subprocess.run([*CLI, "enroll", "revoked", "--auth", str(work / "auth"), "--revoke"], check=True, capture_output=True)
    subprocess.run([*CLI, "enroll", "dev-0", "--auth", str(work / "elsewhere"), "--out", str(work / "creds/foreign.json")],
                   check=True, capture_output=True)
    subprocess.run([*CLI, "certs", "--out", str(work / "tls")], check=True, capture_output=True)
    return {"model": model, "bundle": work / "bundle"}


def start_server(work: Path, model: Path, devices: int, steps_per_round: int) -> tuple[subprocess.Popen, str, Path]:
    log = work / "server.log"
    proc = subprocess.Popen([*CLI, "serve", str(model), "--cut", "2", "--lora-rank", "4", "--wire", "f32", "--port", "0",
                             "--threads", "1", "--max-seq-len", "64", "--steps-per-round", str(steps_per_round),
                             "--max-clients", str(devices + 2), "--max-connections", str(devices + 16),
                             "--auth", str(work / "auth"), "--tls-cert", str(work / "tls/server.pem"),
                             "--tls-key", str(work / "tls/server.key"), "--round-deadline", "60"],
                            stdout=open(log, "w"), stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    for _ in range(1200):
        match = re.search(r"listening on (wss://\S+)", log.read_text())
        if match:
            return proc, match.group(1), log
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError("server did not start:\n" + log.read_text())


def server_usage(pid: int) -> dict:
    rss = next(int(line.split()[1]) for line in open(f"/proc/{pid}/status") if line.startswith("VmRSS"))
    return {"rss_mb": round(rss / 1024, 1), "fds": len(os.listdir(f"/proc/{pid}/fd"))}


# ---------------------------------------------------------------- the bad stream

class BadStream(threading.Thread):
    """Round-robin through the attacks until stopped; counts each attack's outcomes."""

    def __init__(self, url: str, work: Path, bundle, period_s: float):
        super().__init__(daemon=True)
        from splitlm.edge_client.credential import Credential

        self.url, self.bundle, self.period_s = url, bundle, period_s
        self.host, self.port = url.split("//")[1].split(":")[0], int(url.rsplit(":", 1)[1])
        self.tls = ssl.create_default_context(cafile=str(work / "tls/ca.pem"))
        self.cred = {n: Credential.load(work / f"creds/{n}.json") for n in ("mallory", "revoked", "foreign")}
        self.captured = self.cred["mallory"].header()  # mallory uses it once; an eavesdropper keeps a copy
        self._connect(self.captured).close()
        self.outcomes: dict[str, Counter] = defaultdict(Counter)
        self.stop = threading.Event()
        self.attacks = [self.no_credential, self.foreign, self.revoked, self.replayed, self.stale, self.other_id,
                        self.bad_frames, self.raw_bytes, self.plain_ws, self.silent]

    def run(self) -> None:
        i = 0
        while not self.stop.is_set():
            attack = self.attacks[i % len(self.attacks)]
            try:
                outcome = attack()
            except Exception as e:  # noqa: BLE001 - every outcome is counted, none stops the stream
                outcome = self._classify(e)
            self.outcomes[attack.__name__][outcome] += 1
            i += 1
            self.stop.wait(self.period_s)

    @staticmethod
    def _classify(e: Exception) -> str:
        from websockets.exceptions import InvalidStatus

        if isinstance(e, InvalidStatus):
            return f"http_{e.response.status_code}"
        return type(e).__name__

    def _connect(self, header: str | None, *, url: str | None = None, tls=True):
        from websockets.sync.client import connect

        return connect(url or self.url, ssl=self.tls if tls else None, max_size=None, open_timeout=10,
                       additional_headers={"Authorization": header} if header else None, source_address=BAD_SOURCE)

    def _session(self, header: str, client_id: str, frames: list[bytes]) -> str:
        from splitlm.protocol import Limits, decode, encode

        from tests.test_server_robustness import hello_for

        with self._connect(header) as ws:
            ws.send(encode(hello_for(self.bundle, client_id=client_id), seq=0))
            first = decode(ws.recv(timeout=30), limits=Limits())[1]
            if first.kind == "error":
                return f"error_{first.code}"
            codes = []
            for frame in frames:
                ws.send(frame)
                reply = decode(ws.recv(timeout=30), limits=Limits())[1]
                codes.append(reply.code if reply.kind == "error" else reply.kind)
            return "admitted_then_" + "+".join(codes)

    def no_credential(self):
        self._connect(None).close()
        return "ADMITTED"

    def foreign(self):
        self._connect(self.cred["foreign"].header()).close()
        return "ADMITTED"

    def revoked(self):
        self._connect(self.cred["revoked"].header()).close()
        return "ADMITTED"

    def replayed(self):
        self._connect(self.captured).close()
        return "ADMITTED"

    def stale(self):
        self._connect(self.cred["mallory"].header(now=time.time() - 3600)).close()
        return "ADMITTED"

    def other_id(self):
        return self._session(self.cred["mallory"].header(), "dev-1", [])

    def bad_frames(self):
        from tests.test_server_robustness import forward_frame, nan_frame

        frames = [b"\x00\xffgarbage", nan_frame(self.bundle), forward_frame(self.bundle, step=10 ** 6)]
        return self._session(self.cred["mallory"].header(), "mallory", frames)

    def raw_bytes(self):
        with socket.create_connection((self.host, self.port), timeout=10, source_address=BAD_SOURCE) as s:
            s.sendall(os.urandom(512))
            return "closed" if s.recv(4096) == b"" else "answered"

    def plain_ws(self):
        self._connect(None, url=self.url.replace("wss://", "ws://"), tls=False).close()
        return "ADMITTED"

    def silent(self):
        """Open TCP + TLS and say nothing: the server's handshake timeout must close it."""
        with socket.create_connection((self.host, self.port), timeout=30, source_address=BAD_SOURCE) as raw:
            with self.tls.wrap_socket(raw, server_hostname=self.host) as s:
                t0 = time.monotonic()
                try:
                    closed = s.recv(1) == b""
                except (ssl.SSLError, OSError):
                    closed = True
                return f"closed_after_{round(time.monotonic() - t0)}s" if closed else "answered"


# ---------------------------------------------------------------- the honest devices

async def run_devices(url: str, work: Path, bundle: Path, devices: int, seconds: float, samples: list) -> dict:
    from splitlm.edge_client.client import EdgeClient, EdgeConfig

    clients = []
    (work / "steps").mkdir(exist_ok=True)
    for i in range(devices):
        cfg = EdgeConfig(url=url, bundle=bundle, data=work / f"data/client-{i}.jsonl", steps=10 ** 9, batch_size=2,
                         seq_len=32, client_id=f"dev-{i}", threads=1, progress=False, reconnect_tries=3,
                         metrics_out=work / f"steps/dev-{i}.jsonl", credential=work / f"creds/dev-{i}.json",
                         ca=work / "tls/ca.pem")
        clients.append(EdgeClient(cfg))
    tasks = [asyncio.create_task(c.run()) for c in clients]
    t0 = time.monotonic()
    while time.monotonic() - t0 < seconds and not all(t.done() for t in tasks):
        await asyncio.sleep(1.0)
        samples.append((time.monotonic() - t0, sum(c.step for c in clients)))
    for c in clients:  # stop cleanly: each finishes the step it is in, then says bye
        c.total_steps = c.step + 1
    results = await asyncio.gather(*tasks, return_exceptions=True)
    errors = [f"dev-{i}: {type(r).__name__}: {r}" for i, r in enumerate(results) if isinstance(r, BaseException)]
    walls = np.array([r["wall_s"] for c in clients for r in c.meter.records])
    return {"clients": clients, "errors": errors, "walls": walls, "seconds": time.monotonic() - t0}


def exact_step_logs(work: Path, log: Path, devices: int) -> tuple[bool, list[int], list[str]]:
    """Every device's own step log and the server's log of its steps are exactly 0..N-1."""
    server_steps = defaultdict(list)
    for line in log.read_text().splitlines():
        m = re.search(r"client (dev-\d+)\s+step\s+(\d+)", line)
        if m:
            server_steps[m.group(1)].append(int(m.group(2)))
    counts, bad = [], []
    for i in range(devices):
        path = work / f"steps/dev-{i}.jsonl"
        steps = [json.loads(line)["step"] for line in path.read_text().splitlines()] if path.exists() else []
        counts.append(len(steps))
        if steps != list(range(len(steps))) or server_steps[f"dev-{i}"] != steps or not steps:
            bad.append(f"dev-{i}")
    return not bad, counts, bad


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=10.0, help="how long the devices train")
    p.add_argument("--devices", type=int, default=32, help="concurrent honest devices")
    p.add_argument("--steps-per-round", type=int, default=20, help="split steps between adapter averages")
    p.add_argument("--bad-per-s", type=float, default=4.0, help="bad connection attempts per second")
    p.add_argument("--warmup", type=float, default=15.0, help="seconds before the 'start' RSS/fd sample")
    args = p.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    work = Path(tempfile.mkdtemp(prefix="splitlm-load-"))
    made = prepare(work, args.devices)
    server, url, log = start_server(work, made["model"], args.devices, args.steps_per_round)
    try:
        from splitlm.manifest import Bundle

        usage = {"listening": server_usage(server.pid)}
        bad = BadStream(url, work, Bundle.open(made["bundle"]), 1.0 / args.bad_per_s)
        samples: list = []
        watch: list = []

        def sample_server() -> None:
            t0 = time.monotonic()
            while server.poll() is None and not bad.stop.is_set():
                watch.append((round(time.monotonic() - t0), server_usage(server.pid)))
                bad.stop.wait(5.0)

        bad.start()
        threading.Thread(target=sample_server, daemon=True).start()
        result = asyncio.run(run_devices(url, work, made["bundle"], args.devices, args.minutes * 60, samples))
        usage["end"] = server_usage(server.pid)
        bad.stop.set()
        bad.join(timeout=60)
    finally:
        server.terminate()
        server.wait(timeout=60)
    after = [u for t, u in watch if t >= args.warmup]
    usage["start"] = after[0] if after else usage["listening"]
    exact, counts, wrong = exact_step_logs(work, log, args.devices)
    walls = result["walls"]
    steps = int(sum(counts))
    admitted = {k: dict(v) for k, v in bad.outcomes.items() if "ADMITTED" in v or "answered" in v}
    print(json.dumps({
        "command": " ".join(["python bench/bench_load.py", f"--minutes {args.minutes:g}", f"--devices {args.devices}"]),
        "devices": args.devices, "seconds": round(result["seconds"], 1), "steps": steps,
        "steps_per_s": round(steps / result["seconds"], 2),
        "step_latency_ms": {"p50": round(float(np.percentile(walls, 50)) * 1e3, 1),
                            "p99": round(float(np.percentile(walls, 99)) * 1e3, 1),
                            "max": round(float(walls.max()) * 1e3, 1)} if len(walls) else None,
        "steps_per_device": {"min": min(counts), "max": max(counts)},
        "step_logs_exact": exact, "devices_not_exact": wrong, "honest_errors": result["errors"],
        "rounds_closed": log.read_text().count(" closed: "),
        "bad_attempts": sum(sum(c.values()) for c in bad.outcomes.values()),
        "bad_outcomes": {k: dict(v) for k, v in sorted(bad.outcomes.items())}, "bad_admitted": admitted,
        "server": {"rss_mb_start": usage["start"]["rss_mb"], "rss_mb_end": usage["end"]["rss_mb"],
                   "rss_mb_max": max(u["rss_mb"] for _, u in watch) if watch else None,
                   "fds_start": usage["start"]["fds"], "fds_end": usage["end"]["fds"],
                   "fds_max": max(u["fds"] for _, u in watch) if watch else None},
        "server_refusals_logged": log.read_text().count("refused a"),
        "workdir": str(work),
    }, indent=1))


if __name__ == "__main__":
    main()
