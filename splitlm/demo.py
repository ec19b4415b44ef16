"""`splitlm demo`: the whole system on one machine, as real processes on 127.0.0.1.

    default model -> q4 bundle at K=2 (cached) -> `splitlm serve` -> two `splitlm edge` clients,
    each with its own slice of a small private-looking dataset -> a printed summary, the round
    whose adapter is the result and the `splitlm eval` command that judges it.

The parts start through `splitlm.launch`, so the demo works from any directory (a `splitlm/`
folder in the current one would hide the package from `python -m splitlm.cli`). While the clients
train, a line every few seconds says where each one is (read from their metrics files).

The dataset is made here: prompt/completion pairs that turn an ISO date into a made-up ledger
code ("Ledger code for 2023-07-14:" -> " D14-JUL-23"). The base model cannot know the format,
so the fine-tune's effect is plain to see.
"""

from __future__ import annotations

import json
import os
import random
import re
import shlex
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from splitlm.errors import SplitLMError
from splitlm.launch import cli_command

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
    model: str = "default"          # "default" (SmolLM2-135M-Instruct) or a Hugging Face folder
    clients: int = 2
    steps: int = 20
    steps_per_round: int = 5
    batch_size: int = 4
    cut: int = 2
    quant: str = "q4"
    wire: str = "f16"


def model_folder(cfg: DemoConfig) -> Path:
    """The model's folder; the default model is built from its GGUF on first use (~20 s, said first)."""
    from splitlm.export.bundle import resolve_model_path

    return resolve_model_path(cfg.model)


def ensure_bundle(cfg: DemoConfig) -> tuple[Path, Path]:
    """The model folder and a bundle of it (exported on first use; the default model's is cached)."""
    from splitlm.export.default_model import cache_dir

    model = model_folder(cfg)
    where = cache_dir() / "bundles" if cfg.model == "default" else cfg.workdir
    bundle = where / f"{model.name}-k{cfg.cut}-{cfg.quant}"
    if not (bundle / "manifest.json").is_file():
        print(f"exporting a {cfg.quant} bundle at K={cfg.cut} to {bundle} (once; a minute or two) ...", flush=True)
        done = subprocess.run(cli_command("export", str(model), "--cut", str(cfg.cut), "--quant", cfg.quant,
                                          "--out", str(bundle), "--max-length", "512"))
        if done.returncode != 0:
            raise SplitLMError(f"exporting the bundle failed (exit {done.returncode}); its messages are above")
    return model, bundle


def start_server(cfg: DemoConfig, model: Path) -> tuple[subprocess.Popen, str]:
    log = open(cfg.workdir / "server.log", "w")
    print(f"starting the server (loads {model.name}) ...", flush=True)
    proc = subprocess.Popen(cli_command("serve", str(model), "--cut", str(cfg.cut), "--port", "0",
                                        "--steps-per-round", str(cfg.steps_per_round), "--wire", cfg.wire,
                                        "--min-clients", str(cfg.clients),  # a late starter misses no round
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
    raise SplitLMError(f"the server did not start; see {cfg.workdir / 'server.log'}")


def _drain_in_background(stream, log) -> None:
    import threading

    def copy():
        for line in stream:
            log.write(line)
            log.flush()
    threading.Thread(target=copy, daemon=True).start()


def run_clients(cfg: DemoConfig, url: str, bundle: Path, data: list[Path]) -> list[Path]:
    procs, metrics, logs = [], [], []
    for i, path in enumerate(data):
        metrics.append(cfg.workdir / f"client-{i}.metrics.jsonl")
        metrics[-1].unlink(missing_ok=True)
        logs.append(cfg.workdir / f"client-{i}.log")
        with open(logs[-1], "w") as log:  # a file, not a pipe: a chatty client can never block on it
            procs.append(subprocess.Popen(cli_command("edge", url, "--bundle", str(bundle), "--data", str(path),
                                                      "--steps", str(cfg.steps), "--batch-size", str(cfg.batch_size),
                                                      "--seq-len", "64", "--client-id", f"client-{i}",
                                                      "--seed", str(i), "--metrics-out", str(metrics[-1]),
                                                      "--threads", "1"),
                                          stdout=log, stderr=subprocess.STDOUT))
    watch_clients(procs, metrics, total=cfg.steps)
    for i, proc in enumerate(procs):
        if proc.wait() != 0:
            raise SplitLMError(f"client-{i} failed (exit {proc.returncode}):\n{logs[i].read_text()[-2000:]}")
    return metrics


def watch_clients(procs: list[subprocess.Popen], metrics: list[Path], *, total: int, every_s: float = 5.0) -> None:
    """Until every client has exited: a line every `every_s` seconds when a client moved on."""
    last, said_at = None, time.monotonic()
    while any(p.poll() is None for p in procs):
        time.sleep(0.2)
        rows = [read_jsonl(path) for path in metrics]
        now = [len(r) for r in rows]
        if now != last and time.monotonic() - said_at >= every_s:
            print("training: " + "; ".join(_where(i, r, total) for i, r in enumerate(rows)), flush=True)
            last, said_at = now, time.monotonic()


def _where(i: int, rows: list[dict], total: int) -> str:
    return f"client-{i} step {len(rows)}/{total}" + (f" loss {rows[-1]['loss']:.2f}" if rows else "")


def read_jsonl(path: Path) -> list[dict]:
    """The complete JSON lines of a file that may be half written (or absent): a metrics file mid-run."""
    try:
        lines = path.read_text().split("\n")[:-1]
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in lines if line]


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


def last_round(server_out: Path) -> Path | None:
    """The folder of the last round the server closed (round-NNNN with an adapter), or None."""
    rounds = sorted(p for p in server_out.glob("round-[0-9]*") if (p / "adapter").is_dir())
    return rounds[-1] if rounds else None


def next_steps(cfg: DemoConfig) -> list[str]:
    """Which adapter is the result, and the command that judges it against the base model."""
    final = last_round(cfg.workdir / "server")
    if final is None:
        return [f"no round closed: give each client at least {cfg.steps_per_round} steps (--steps)"]
    adapter, data = final / "adapter", cfg.workdir / "data" / "eval.jsonl"
    command = ["splitlm", "eval", cfg.model, "--adapter", _shown(adapter), "--data", _shown(data)]
    return [f"the result: the adapter of round {int(final.name.split('-')[1])} (the last one): {_shown(adapter)}",
            "judge it against the base model on the held-out examples:",
            "  " + shlex.join(command)]


def _shown(path: Path) -> str:
    """`path` relative to the current directory when it lies under it, else absolute."""
    path = path.absolute()
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def run_demo(cfg: DemoConfig) -> None:
    cfg.workdir.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(cfg.workdir / "server", ignore_errors=True)  # an older run's rounds would pass for this one's
    model, bundle = ensure_bundle(cfg)
    data = write_ledger_data(cfg.workdir / "data", clients=cfg.clients,
                             per_client=cfg.steps * cfg.batch_size, held_out=50)
    server, url = start_server(cfg, model)
    print(f"server at {url}; {cfg.clients} edge clients, {cfg.steps} steps each, a round every "
          f"{cfg.steps_per_round} steps ...", flush=True)
    try:
        metrics = run_clients(cfg, url, bundle, data)
    finally:
        server.terminate()
        server.wait(timeout=60)
    print("\n".join(summarize(cfg, metrics) + next_steps(cfg)))


def default_workdir() -> Path:
    return Path(os.environ.get("SPLITLM_DEMO_DIR", Path.cwd() / "splitlm-demo"))
