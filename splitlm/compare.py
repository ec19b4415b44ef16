"""`splitlm compare`: the three frameworks (split learning, FedAvg, distillation) on one footing.

    data -> held-out split + partition (iid | dirichlet:ALPHA; written out) -> one shard per client
    for each configuration of the grid (mode x cut x rank):
        bundle (exported once, cached by model/mode/train/labels/cut/rank/quant/...)
        `splitlm serve` + N `splitlm edge` processes on 127.0.0.1, same shards, seeds and steps
        -> each round's output (adapter or model) judged on the held-out data, the devices'
           metrics files read back, FLOPs counted from the graphs -> runs/ID/result.json
    -> one table, results.json, results.csv, rounds.csv, PNG plots (`compare_report`)

Configurations (`--modes`), each at every cut and rank where the knob exists:
    split-server   split learning, labels at the server            (cut, rank)
    split-device   split learning, U-shape: labels on the device   (cut, rank)
    fedavg-lora    FedLLM, each device trains LoRA on every block  (rank)
    fedavg-full    FedLLM, each device trains every block weight
    distill        KD-FedLLM, top-k logits on the public set; devices train LoRA locally (rank)

Every configuration runs the same R rounds of S local steps per client (split: a head-adapter
average every S steps), the same batches (client i's data order has seed `seed + i`), the same
learning rate, and its round outputs are judged by the same `splitlm eval` code.

Resumable: a configuration whose runs/ID/result.json exists with the same settings is not run
again; one that stopped half-way is run again from its start. Every process runs one thread.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from splitlm.atomic import write_atomic
from splitlm.errors import BundleMismatch, SplitLMError
from splitlm.launch import cli_command
from splitlm.manifest import Manifest

MODES = ("split-server", "split-device", "fedavg-lora", "fedavg-full", "distill")
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
              "TOKENIZERS_PARALLELISM": "false"}


@dataclass(frozen=True)
class CompareConfig:
    out: Path
    model: str = "default"
    data: Path | None = None          # None: the demo's ledger data, made here
    eval: Path | None = None          # None: held out from `data`
    clients: int = 2
    rounds: int = 3
    local_steps: int = 5
    batch_size: int = 4
    seq_len: int = 64
    lr: float = 1e-3
    partition: str = "iid"            # or "dirichlet:ALPHA"
    partition_field: str = "label"
    modes: tuple[str, ...] = MODES
    cuts: tuple[int, ...] = (2,)
    ranks: tuple[int, ...] = (8,)
    quant: str = "q8"
    max_length: int = 512
    topk: int = 16
    wire: str = "f16"                 # activations and logits
    update_wire: str = "f32"          # adapters, updates, globals
    eval_examples: int = 64
    target_loss: float | None = None  # None: the worst final loss among configurations that improved
    seed: int = 0
    bundles: Path | None = None       # bundle cache; None: $SPLITLM_CACHE/compare-bundles
    export_jobs: int = 0              # bundle exports at a time; 0: one per core

    def settings(self) -> dict:
        """What a finished run must have been run with to count as done (not where things live)."""
        keep = ("model", "clients", "rounds", "local_steps", "batch_size", "seq_len", "lr", "partition",
                "partition_field", "quant", "max_length", "topk", "wire", "update_wire", "eval_examples", "seed")
        d = {k: getattr(self, k) for k in keep}
        d["data"] = _file_hash(self.data) if self.data else "ledger"
        d["eval"] = _file_hash(self.eval) if self.eval else None
        return d


@dataclass(frozen=True)
class RunSpec:
    """One configuration of the grid."""
    mode: str                 # split, fedavg or distill
    train: str = "lora"       # lora or full
    labels: str = "server"    # split: where the labels live
    cut: int = 0              # split only
    rank: int = 0             # LoRA only

    @property
    def id(self) -> str:
        if self.mode == "split":
            return f"split-{self.labels}-k{self.cut}-r{self.rank}"
        if self.train == "full":
            return f"{self.mode}-full"
        return f"{self.mode}-{self.train}-r{self.rank}"

    @property
    def family(self) -> str:
        """The --modes name it came from (the row's framework in plots)."""
        if self.mode == "split":
            return f"split-{self.labels}"
        return "distill" if self.mode == "distill" else f"fedavg-{self.train}"


def grid(cfg: CompareConfig) -> list[RunSpec]:
    runs: list[RunSpec] = []
    for mode in cfg.modes:
        if mode.startswith("split-"):
            runs += [RunSpec("split", labels=mode.split("-")[1], cut=k, rank=r) for k in cfg.cuts for r in cfg.ranks]
        elif mode == "fedavg-lora":
            runs += [RunSpec("fedavg", rank=r) for r in cfg.ranks]
        elif mode == "fedavg-full":
            runs.append(RunSpec("fedavg", train="full"))
        elif mode == "distill":
            runs += [RunSpec("distill", rank=r) for r in cfg.ranks]
        else:
            raise SplitLMError(f"--modes: expected some of {', '.join(MODES)}, got {mode!r}")
    return runs


# ---------------------------------------------------------------- data and partition

def prepare_data(cfg: CompareConfig) -> tuple[list[Path], Path]:
    """Client shards under OUT/data and the held-out file; the partition goes to OUT/partition.json."""
    from splitlm.partition import partition

    folder = cfg.out / "data"
    folder.mkdir(parents=True, exist_ok=True)
    if cfg.data is None:
        records, held_out = _ledger_records(cfg)
        suffix = ".jsonl"
    else:
        records, suffix = _read_records(cfg.data), cfg.data.suffix
        held_out = None if cfg.eval else _hold_out(records, cfg)
    eval_path = cfg.eval if cfg.eval else folder / f"eval{suffix}"
    if held_out is not None:
        records = [r for i, r in enumerate(records) if i not in held_out[0]]
        _write_records(eval_path, held_out[1], suffix)
    made = partition(records, scheme=cfg.partition, clients=cfg.clients, seed=cfg.seed, field=cfg.partition_field)
    made["source"] = str(cfg.data) if cfg.data else "ledger (splitlm.demo.ledger_example)"
    (cfg.out / "partition.json").write_text(json.dumps(made))
    shards = []
    for i, indices in enumerate(made["clients"]):
        shards.append(folder / f"client-{i}{suffix}")
        _write_records(shards[-1], [records[j] for j in indices], suffix)
    return shards, eval_path


def _ledger_records(cfg: CompareConfig) -> tuple[list[dict], tuple[set, list[dict]]]:
    """The demo's prompt/completion task, with the month as a label field for Dirichlet splits:
    enough examples for every client's R x S batches, and a held-out set."""
    import random

    from splitlm.demo import MONTHS, ledger_example

    rng = random.Random(cfg.seed)
    n = cfg.clients * cfg.rounds * cfg.local_steps * cfg.batch_size
    rows = [ledger_example(rng) for _ in range(n + cfg.eval_examples)]
    for r in rows:
        r["label"] = next(m for m in MONTHS if m in r["completion"])
    return rows[:n], (set(), rows[n:])


def _read_records(path: Path) -> list[dict]:
    """JSONL lines as dicts; a .txt file as its paragraphs (blank-line separated), each {"text": ...}."""
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    return [{"text": p.strip()} for p in re.split(r"\n\s*\n", text) if p.strip()]


def _hold_out(records: list[dict], cfg: CompareConfig) -> tuple[set, list[dict]]:
    import numpy as np

    n = min(cfg.eval_examples, max(1, len(records) // 10))
    picked = set(np.random.default_rng(cfg.seed + 1).choice(len(records), n, replace=False).tolist())
    return picked, [records[i] for i in sorted(picked)]


def _write_records(path: Path, records: list[dict], suffix: str) -> None:
    if suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    else:
        path.write_text("\n\n".join(r["text"] for r in records) + "\n")


# ---------------------------------------------------------------- bundles

def bundle_cache(cfg: CompareConfig) -> Path:
    if cfg.bundles is not None:
        return cfg.bundles
    from splitlm.export.default_model import cache_dir

    return cache_dir() / "compare-bundles"


def mode_args(spec: RunSpec, cfg: CompareConfig) -> list[str]:
    """What export and serve must agree on: the cut and label placement, or what is trained; k; the rank."""
    args = ["--cut", str(spec.cut), "--labels", spec.labels] if spec.mode == "split" else ["--train", spec.train]
    if spec.mode == "distill":
        args += ["--topk", str(cfg.topk)]
    if spec.train == "lora":
        args += ["--lora-rank", str(spec.rank)]
    return args


def export_args(spec: RunSpec, cfg: CompareConfig) -> list[str]:
    return ["--mode", spec.mode, "--quant", cfg.quant, "--max-length", str(cfg.max_length), *mode_args(spec, cfg)]


def bundle_key(spec: RunSpec, cfg: CompareConfig, model_hash: str) -> str:
    """The cache's folder name: what the bundle is, and a hash of everything that shapes it."""
    digest = hashlib.sha256(json.dumps([model_hash, export_args(spec, cfg)]).encode()).hexdigest()[:12]
    what = spec.id if spec.mode != "split" else f"split-{spec.labels}-k{spec.cut}-r{spec.rank}"
    return f"{what}-{cfg.quant}-{digest}"


def ensure_bundle(spec: RunSpec, cfg: CompareConfig, model: Path, model_hash: str, *, log,
                  graphs_from: Path | None = None) -> Path:
    """The cached bundle of `spec`, exported (as a subprocess, logged) when it is not there yet or
    when this splitlm refuses its manifest (a bundle from an older splitlm: exported again).
    `graphs_from`: a whole-model bundle whose train.onnx this one shares (`export --graphs-from`)."""
    where = bundle_cache(cfg) / bundle_key(spec, cfg, model_hash)
    if cached_bundle(spec, cfg, model_hash, log=log):
        return where
    log(f"exporting the {spec.id} bundle to {where}" + (f", its train.onnx from {graphs_from.name}" if graphs_from else "")
        + " (once; whole-model bundles of a 135M model take minutes on 2 cores) ...")
    where.parent.mkdir(parents=True, exist_ok=True)
    logfile = cfg.out / "logs" / f"export-{where.name}.log"
    logfile.parent.mkdir(parents=True, exist_ok=True)
    extra = ["--graphs-from", str(graphs_from)] if graphs_from else []
    t0 = time.monotonic()
    with open(logfile, "w") as f:
        done = subprocess.run(cli_command("export", str(model), *export_args(spec, cfg), *extra, "--out", str(where)),
                              stdout=f, stderr=subprocess.STDOUT, env={**os.environ, **ONE_THREAD})
    if done.returncode != 0:
        raise SplitLMError(f"exporting the {spec.id} bundle failed (exit {done.returncode}); see {logfile}:\n"
                           + _tail(logfile))
    log(f"  {spec.id} exported in {time.monotonic() - t0:.0f} s")
    return where


def cached_bundle(spec: RunSpec, cfg: CompareConfig, model_hash: str, *, log) -> Path | None:
    """`spec`'s bundle in the cache, or None; a bundle there that this splitlm refuses is removed."""
    where = bundle_cache(cfg) / bundle_key(spec, cfg, model_hash)
    if not (where / "manifest.json").is_file():
        return None
    try:
        Manifest.from_json((where / "manifest.json").read_text())
        return where
    except BundleMismatch as e:
        log(f"the cached {spec.id} bundle is stale ({e}); exporting it again")
        shutil.rmtree(where)
        return None


EXPORT_COST = {"split": 1, "fedavg": 4, "distill": 5}  # relative export times on SmolLM2 (distill: topk + kd_grad)


def ensure_bundles(specs: list[RunSpec], cfg: CompareConfig, model: Path, model_hash: str, *, jobs: int,
                   log) -> dict[RunSpec, Path | SplitLMError]:
    """Every spec's bundle, the missing ones exported before any run starts, `jobs` exports at a time
    (each is one single-threaded process, so on 2 cores two take the time of one; no run is
    measured while they go), in the chains of `export_chains`. Returns each spec's bundle folder,
    or the error its export ended with."""
    out: dict[RunSpec, Path | SplitLMError] = {}
    for spec in specs:
        where = cached_bundle(spec, cfg, model_hash, log=log)
        if where is not None:
            out[spec] = where
    chains = export_chains([s for s in specs if s not in out], set(out))

    def export_chain(chain: list[tuple[RunSpec, RunSpec | None]]) -> None:
        for spec, lender in chain:
            source = out.get(lender) if lender else None
            try:
                out[spec] = ensure_bundle(spec, cfg, model, model_hash, log=log,
                                          graphs_from=source if isinstance(source, Path) else None)
            except SplitLMError as e:
                out[spec] = e

    if chains:
        log(f"exporting {sum(map(len, chains))} bundle(s), {jobs} at a time: "
            + "; ".join(" then ".join(spec.id for spec, _ in chain) for chain in chains))
        with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
            list(pool.map(export_chain, chains))
    return out


EXPORT_COST = {"split": 1, "fedavg": 4, "distill": 5}  # relative export times on SmolLM2 (distill: topk + kd_grad)


def export_chains(missing: list[RunSpec], cached: set[RunSpec]) -> list[list[tuple[RunSpec, RunSpec | None]]]:
    """The exports to run, as chains of (spec, the spec whose bundle lends it train.onnx, or None),
    the costliest chain first (a greedy longest-first schedule over the export workers).

    A distill bundle takes its train.onnx from the fedavg LoRA bundle of the same rank when the
    grid has one (`export --graphs-from`; a third of a distill export): after it, in its chain,
    when that bundle is being exported too, or from the cache."""
    chains = {spec: [(spec, None)] for spec in missing if spec.mode != "distill"}
    for spec in missing:
        if spec.mode != "distill":
            continue
        lender = RunSpec("fedavg", rank=spec.rank)
        if lender in chains:
            chains[lender].append((spec, lender))
        else:
            chains[spec] = [(spec, lender if lender in cached else None)]
    return sorted(chains.values(), key=lambda chain: -sum(EXPORT_COST[spec.mode] for spec, _ in chain))


# ---------------------------------------------------------------- one run

def serve_args(spec: RunSpec, cfg: CompareConfig, out: Path) -> list[str]:
    args = ["--mode", spec.mode, "--rounds", str(cfg.rounds), "--steps-per-round", str(cfg.local_steps),
            "--min-clients", str(cfg.clients), "--wire", cfg.wire, "--update-wire", cfg.update_wire,
            "--lr", str(cfg.lr), "--out", str(out), "--port", "0", "--threads", "1", "--max-batch",
            str(max(16, cfg.batch_size)), "--seed", "0"]
    return args + mode_args(spec, cfg)


def edge_args(spec: RunSpec, cfg: CompareConfig, bundle: Path, shard: Path, i: int, metrics: Path) -> list[str]:
    args = ["--bundle", str(bundle), "--data", str(shard), "--batch-size", str(cfg.batch_size), "--seq-len",
            str(cfg.seq_len), "--lr", str(cfg.lr), "--seed", str(cfg.seed + i), "--client-id", f"client-{i}",
            "--threads", "1", "--metrics-out", str(metrics)]
    if spec.mode == "split":  # the server decides the rounds of fedavg and distill; a split device counts steps
        args += ["--steps", str(cfg.rounds * cfg.local_steps)]
    return args


@dataclass
class RunFiles:
    """Where one configuration's run keeps its parts: OUT/runs/ID/."""
    root: Path

    @property
    def server_out(self) -> Path:
        return self.root / "server"

    def metrics(self, i: int) -> Path:
        return self.root / f"client-{i}.metrics.jsonl"

    def log(self, name: str) -> Path:
        return self.root / f"{name}.log"

    @property
    def result(self) -> Path:
        return self.root / "result.json"


def run_processes(spec: RunSpec, cfg: CompareConfig, *, model: Path, bundle: Path, shards: list[Path],
                  files: RunFiles, label: str, log) -> dict:
    """One server and N edge processes until the server has run its rounds; their wall times."""
    env = {**os.environ, **ONE_THREAD}
    server, url = start_server(cli_command("serve", str(model), *serve_args(spec, cfg, files.server_out)),
                               files.log("server"), env=env)
    t0 = time.time()
    edges = []
    try:
        for i, shard in enumerate(shards):
            with open(files.log(f"client-{i}"), "w") as f:
                edges.append(subprocess.Popen(cli_command("edge", url, *edge_args(spec, cfg, bundle, shard, i,
                                                                                    files.metrics(i))),
                                              stdout=f, stderr=subprocess.STDOUT, env=env))
        watch(edges, [files.metrics(i) for i in range(len(shards))], spec=spec, cfg=cfg, label=label, log=log)
        for i, p in enumerate(edges):
            if p.wait() != 0:
                raise SplitLMError(f"{spec.id}: client-{i} failed (exit {p.returncode}):\n"
                                   + _tail(files.log(f"client-{i}")))
        wall = time.time() - t0
        try:
            server.wait(timeout=120)  # it stops by itself after its rounds
        except subprocess.TimeoutExpired:
            pass
    finally:
        for p in [*edges, server]:
            if p.poll() is None:
                p.terminate()
                p.wait(timeout=60)
    return {"started": t0, "wall_s": wall}


def start_server(argv: list[str], logfile: Path, *, env: dict, timeout_s: float = 600) -> tuple[subprocess.Popen, str]:
    """`splitlm serve ... --port 0` started; its address once it listens. Its output goes to `logfile`."""
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    log = open(logfile, "w")
    deadline = time.monotonic() + timeout_s
    for line in proc.stdout:
        log.write(line)
        log.flush()
        match = re.search(r"listening on (ws://\S+)", line)
        if match:
            threading.Thread(target=_copy, args=(proc.stdout, log), daemon=True).start()
            return proc, match.group(1)
        if time.monotonic() > deadline:
            break
    proc.kill()
    log.close()
    raise SplitLMError(f"the server did not start; see {logfile}:\n" + _tail(logfile))


def _copy(stream, log) -> None:
    for line in stream:
        log.write(line)
        log.flush()
    log.close()


def watch(procs: list[subprocess.Popen], metrics: list[Path], *, spec: RunSpec, cfg: CompareConfig, label: str,
          log, every_s: float = 10.0) -> None:
    """The progress view: until every edge has exited, a line every `every_s` s saying where each is."""
    said = time.monotonic()
    while any(p.poll() is None for p in procs):
        time.sleep(0.5)
        if time.monotonic() - said >= every_s:
            said = time.monotonic()
            log(f"{label} " + "; ".join(f"client-{i} {where(path, spec, cfg)}" for i, path in enumerate(metrics)))


def where(path: Path, spec: RunSpec, cfg: CompareConfig) -> str:
    """'round r/R, step s, loss L' of one client, from its metrics file so far."""
    from splitlm.demo import read_jsonl

    rows = read_jsonl(path)
    steps = [r for r in rows if r.get("phase") in (None, "local", "kd")]
    if spec.mode == "split":
        done = len(steps) // cfg.local_steps
    else:
        done = sum(r.get("phase") == "round" for r in rows)
    loss = next((r["loss"] for r in reversed(steps) if r.get("loss") is not None), None)
    return (f"round {min(done + 1, cfg.rounds)}/{cfg.rounds}, {len(steps)} steps"
            + (f", loss {loss:.3f}" if loss is not None else ""))


# ---------------------------------------------------------------- the whole comparison

@dataclass
class Outcome:
    spec: RunSpec
    result: dict | None = None
    error: str | None = None
    skipped: bool = False
    extra: dict = field(default_factory=dict)


def run_compare(cfg: CompareConfig, *, log=print) -> dict:
    """Every configuration of the grid (finished ones skipped), then the report; returns results.json's content."""
    from splitlm.compare_report import Judge, collect_run, write_report
    from splitlm.export.bundle import resolve_model_path
    from splitlm.manifest import model_folder_hash

    cfg.out.mkdir(parents=True, exist_ok=True)
    specs = grid(cfg)
    model = resolve_model_path(cfg.model)
    settings = cfg.settings()
    shards, eval_path = prepare_data(cfg)
    log(f"comparing {len(specs)} configurations on {model.name}: {', '.join(s.id for s in specs)}; "
        f"{cfg.clients} clients x {cfg.rounds} rounds x {cfg.local_steps} local steps, partition {cfg.partition} "
        f"(written to {cfg.out / 'partition.json'})")
    partition = json.loads((cfg.out / "partition.json").read_text())
    judge = Judge(model, eval_path, seq_len=cfg.seq_len, max_examples=cfg.eval_examples)
    base = judge.base(cfg.out / "base.json", settings)
    pending = [spec for spec in specs if _finished(RunFiles(cfg.out / "runs" / spec.id), settings) is None]
    bundles = ensure_bundles(pending, cfg, model, model_folder_hash(model), jobs=cfg.export_jobs or os.cpu_count() or 1,
                             log=log) if pending else {}
    outcomes = []
    for n, spec in enumerate(specs, 1):
        label = f"[{n}/{len(specs)} {spec.id}]"
        files = RunFiles(cfg.out / "runs" / spec.id)
        done = _finished(files, settings)
        if done is not None:
            log(f"{label} finished before with these settings: not run again ({files.result})")
            outcomes.append(Outcome(spec, done, skipped=True))
            continue
        try:
            bundle = bundles[spec]
            if isinstance(bundle, SplitLMError):
                raise bundle
            _fresh(files.root)
            log(f"{label} starting: a server and {cfg.clients} edge processes")
            times = run_processes(spec, cfg, model=model, bundle=bundle, shards=shards, files=files, label=label,
                                  log=log)
            log(f"{label} trained in {times['wall_s']:.0f} s; judging each round's output on {eval_path.name} ...")
            result = collect_run(spec, cfg, files=files, bundle=bundle, shards=shards, judge=judge, times=times)
            result["settings"] = settings
            write_atomic(files.result, lambda f: f.write(json.dumps(result, indent=1).encode()))
            log(f"{label} done: final held-out loss {result['rounds'][-1]['eval']['loss']:.4f}")
            outcomes.append(Outcome(spec, result))
        except SplitLMError as e:
            log(f"{label} FAILED: {e}")
            outcomes.append(Outcome(spec, error=str(e).splitlines()[0]))
        if n < len(specs):  # the report so far, so a long grid shows its finished rows while it runs
            write_report(cfg, base=base, outcomes=outcomes, partition=partition, log=lambda line: None)
    report = write_report(cfg, base=base, outcomes=outcomes, partition=partition, log=log)
    failed = [o for o in outcomes if o.error]
    if failed:
        raise SplitLMError(f"{len(failed)} of {len(outcomes)} configurations failed: "
                           + "; ".join(f"{o.spec.id}: {o.error}" for o in failed) + ". Rerun to retry them; "
                           "finished ones are kept")
    return report


def _finished(files: RunFiles, settings: dict) -> dict | None:
    try:
        result = json.loads(files.result.read_text())
    except (OSError, ValueError):
        return None
    return result if result.get("settings") == settings else None


def _fresh(root: Path) -> None:
    """An empty run folder: what a run that stopped half-way left is removed."""
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)


def _file_hash(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def _tail(path: Path, n: int = 2000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""


def config_from_args(args) -> CompareConfig:
    def ints(text: str) -> tuple[int, ...]:
        return tuple(int(x) for x in text.split(",") if x.strip())

    return CompareConfig(out=Path(args.out), model=args.model, data=Path(args.data) if args.data else None,
                         eval=Path(args.eval) if args.eval else None, clients=args.clients, rounds=args.rounds,
                         local_steps=args.local_steps, batch_size=args.batch_size, seq_len=args.seq_len, lr=args.lr,
                         partition=args.partition, partition_field=args.partition_field,
                         modes=tuple(m.strip() for m in args.modes.split(",") if m.strip()), cuts=ints(args.cuts),
                         ranks=ints(args.ranks), quant=args.quant, max_length=args.max_length, topk=args.topk,
                         wire=args.wire, update_wire=args.update_wire, eval_examples=args.eval_examples,
                         target_loss=args.target_loss, seed=args.seed,
                         bundles=Path(args.bundles) if args.bundles else None, export_jobs=args.export_jobs)
