"""`splitlm demo`: the whole system on one machine, as real processes on 127.0.0.1.

    default model -> q4 bundle at K=2 (cached) -> `splitlm serve` -> two `splitlm edge` clients,
    each with its own slice of a small private-looking dataset -> a printed summary.

The dataset is made here: prompt/completion pairs that turn an ISO date into a made-up ledger
code ("Ledger code for 2023-07-14:" -> " D14-JUL-23"). The base model cannot know the format,
so the fine-tune's effect is plain to see.
"""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

MONTHS = ("JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC")


def ledger_example(rng: random.Random) -> dict[str, str]:
    year, month, day = rng.randint(1990, 2029), rng.randint(1, 12), rng.randint(1, 28)
    return {"prompt": f"Ledger code for {year}-{month:02d}-{day:02d}:",
            "completion": f" D{day:02d}-{MONTHS[month - 1]}-{year % 100:02d}"}


def write_ledger_data(folder: Path, *, clients: int, per_client: int, held_out: int, seed: int = 0) -> list[Path]:
    """client-<i>.jsonl for each client (disjoint examples) and eval.jsonl; returns the client files."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for i in range(clients):
        files.append(folder / f"client-{i}.jsonl")
        _write_jsonl(files[-1], [ledger_example(rng) for _ in range(per_client)])
    _write_jsonl(folder / "eval.jsonl", [ledger_example(rng) for _ in range(held_out)])
    return files


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@dataclass(frozen=True)
class DemoConfig:
    workdir: Path
    clients: int = 2
    steps: int = 20
    steps_per_round: int = 5
    batch_size: int = 4
    cut: int = 2
    quant: str = "q4"
    wire: str = "f16"


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "splitlm.cli", *args]


def ensure_bundle(cfg: DemoConfig) -> tuple[Path, Path]:
    """The default model folder and a cached bundle of it (exported on first use)."""
    from splitlm.export.default_model import cache_dir, default_model_dir

    model = default_model_dir()
    bundle = cache_dir() / "bundles" / f"{model.name}-k{cfg.cut}-{cfg.quant}"
    if not (bundle / "manifest.json").is_file():
        print(f"exporting a {cfg.quant} bundle at K={cfg.cut} (once; cached in {bundle}) ...", flush=True)
        subprocess.run(_cli("export", str(model), "--cut", str(cfg.cut), "--quant", cfg.quant,
                            "--out", str(bundle), "--max-length", "512"), check=True)
    return model, bundle


def start_server(cfg: DemoConfig, model: Path) -> tuple[subprocess.Popen, str]:
    log = open(cfg.workdir / "server.log", "w")
    proc = subprocess.Popen(_cli("serve", str(model), "--cut", str(cfg.cut), "--port", "0",
                                 "--steps-per-round", str(cfg.steps_per_round), "--wire", cfg.wire,
                                 "--out", str(cfg.workdir / "server"), "--threads", "1"),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 300
    for line in proc.stdout:
        log.write(line)
        match = re.search(r"listening on (ws://\S+)", line)
        if match:
            _drain_in_background(proc.stdout, log)
            return proc, match.group(1)
        if time.monotonic() > deadline:
            break
    proc.kill()
    raise RuntimeError(f"the server did not start; see {cfg.workdir / 'server.log'}")


def _drain_in_background(stream, log) -> None:
    import threading

    def copy():
        for line in stream:
            log.write(line)
            log.flush()
    threading.Thread(target=copy, daemon=True).start()


def run_clients(cfg: DemoConfig, url: str, bundle: Path, data: list[Path]) -> list[Path]:
    procs, metrics = [], []
    for i, path in enumerate(data):
        metrics.append(cfg.workdir / f"client-{i}.metrics.jsonl")
        procs.append(subprocess.Popen(_cli("edge", url, "--bundle", str(bundle), "--data", str(path),
                                           "--steps", str(cfg.steps), "--batch-size", str(cfg.batch_size),
                                           "--seq-len", "64", "--client-id", f"client-{i}", "--seed", str(i),
                                           "--metrics-out", str(metrics[-1]), "--threads", "1"),
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    for i, proc in enumerate(procs):
        out, _ = proc.communicate()
        (cfg.workdir / f"client-{i}.log").write_text(out)
        if proc.returncode != 0:
            raise RuntimeError(f"client-{i} failed (exit {proc.returncode}):\n{out[-2000:]}")
    return metrics


def summarize(cfg: DemoConfig, metrics: list[Path]) -> list[str]:
    lines = []
    for i, path in enumerate(metrics):
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        losses = " ".join(f"{r['loss']:.2f}" for r in rows)
        n = len(rows)
        lines += [f"client-{i}: loss per step  {losses}",
                  f"          bytes/step up {sum(r['bytes_up'] for r in rows) / n / 1e3:.1f} kB, "
                  f"down {sum(r['bytes_down'] for r in rows) / n / 1e3:.1f} kB; "
                  f"compute {1e3 * sum(r['compute_s'] for r in rows) / n:.0f} ms/step, "
                  f"waiting {1e3 * sum(r['wait_s'] for r in rows) / n:.0f} ms/step, "
                  f"peak RSS {max(r['rss_peak_mb'] for r in rows):.0f} MB"]
    lines.append(f"results: {cfg.workdir / 'server'} (one PEFT adapter per round), metrics and logs in {cfg.workdir}")
    return lines


def run_demo(cfg: DemoConfig) -> None:
    cfg.workdir.mkdir(parents=True, exist_ok=True)
    model, bundle = ensure_bundle(cfg)
    data = write_ledger_data(cfg.workdir / "data", clients=cfg.clients,
                             per_client=cfg.steps * cfg.batch_size, held_out=50)
    server, url = start_server(cfg, model)
    print(f"server at {url}; {cfg.clients} edge clients, {cfg.steps} steps each ...", flush=True)
    try:
        metrics = run_clients(cfg, url, bundle, data)
    finally:
        server.terminate()
        server.wait(timeout=60)
    print("\n".join(summarize(cfg, metrics)))


def default_workdir() -> Path:
    return Path(os.environ.get("SPLITLM_DEMO_DIR", Path.cwd() / "splitlm-demo"))
