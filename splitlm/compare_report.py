"""What `splitlm compare` reads back from a run and what it writes: numbers, table, CSV, plots.

Sources, all written by the run's own processes (nothing is estimated):

    held-out loss, perplexity,   each round's output (OUT/runs/ID/server/round-NNNN/adapter or model)
    exact match                  judged by `splitlm eval`'s own code (`cloud_server.evaluate.judge`)
    bytes up / down              each edge's metrics file: the frame bytes its meter counted
                                 (msgpack headers included). Split: the steps of a round (the
                                 adapter exchange counts in the round's last step; a split
                                 device's closing `bye`, ~40 bytes, is in no record); fedavg and
                                 distill: the records between two `phase: "round"` lines; the
                                 closing `bye` counts in the last round
    device CPU-s, compute time,  the same records: process CPU time, onnxruntime + optimizer time,
    peak RSS                     VmHWM of the edge process
    device FLOPs                 `compare_cost`: the bundle's graphs, priced at the batches each
                                 device ran
    wall time                    the server's round close times (metrics.json `time`)

The table's row per configuration (also results.csv):
    final loss / ppl / EM     of the last round's output on the held-out data
    up, down /round/client    mean frame bytes per client per round, each direction
    total bytes               every client, every round, both directions
    bytes to target           cumulative bytes (all clients) when the held-out loss first
                              reached the target (default: the worst final loss among the
                              configurations that improved on the base model, so every one of
                              them reaches it)
    CPU s, compute s /round   per client per round (device)
    GFLOP /round              per client per round (device graphs)
    peak RSS MB               the largest edge process
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

from splitlm.demo import read_jsonl

SUMMED = ("bytes_up", "bytes_down", "cpu_s", "compute_s", "wall_s")
STEP_PHASES = (None, "local", "kd")


# ---------------------------------------------------------------- a client's rounds

def client_rounds(rows: list[dict], *, split: bool, steps: int, rounds: int) -> list[dict]:
    """Each round's totals of one edge's metrics records (see the module docstring for the grouping)."""
    buckets: list[list[dict]] = [[] for _ in range(rounds)]
    if split:
        for j, r in enumerate(rows):
            buckets[min(j // steps, rounds - 1)].append(r)
    else:
        open_, k = [], 0
        for r in rows:
            if r.get("phase") == "round":
                buckets[min(k, rounds - 1)] += open_
                open_, k = [], k + 1
            else:
                open_.append(r)
        buckets[-1] += open_  # the closing bye
    return [_totals(b) for b in buckets]


def _totals(records: list[dict]) -> dict:
    steps = [r for r in records if r.get("phase") in STEP_PHASES]
    losses = [r["loss"] for r in steps if r.get("loss") is not None and r.get("phase") != "kd"]
    out = {k: sum(r[k] for r in records) for k in SUMMED}
    out |= {"steps": len(steps), "rss_peak_mb": max((r["rss_peak_mb"] for r in records), default=0.0),
            "train_loss": sum(losses) / len(losses) if losses else None}
    return out


# ---------------------------------------------------------------- judging round outputs

JUDGE_TOKENS = 2048  # tokens per judging batch: SmolLM2's (B, T, vocab) logits ~400 MB


def judge_batch_size(seq_len: int) -> int:
    """As many sequences as fit in JUDGE_TOKENS tokens, but never fewer than 8 (the batch `splitlm
    eval` uses; past 256 tokens that floor, not JUDGE_TOKENS, sets the logits' size). Larger batches
    judge faster on CPU (SmolLM2, 64 held-out examples of 64 tokens, 2 threads: 12.3 s at 8, 9.0 at
    16, 7.7 at 32), and the logits grow with batch x length, so the batch shrinks as sequences grow."""
    return max(8, JUDGE_TOKENS // seq_len)


class Judge:
    """`splitlm eval` on the held-out data, for the base model and each round's output."""

    def __init__(self, model: Path, data: Path, *, seq_len: int, max_examples: int):
        from transformers.utils import logging

        logging.disable_progress_bar()  # a "Loading weights" bar per round would bury the progress lines
        self.model, self.data = model, data
        self.kw = dict(seq_len=seq_len, batch_size=judge_batch_size(seq_len))
        self.max_examples = max_examples

    def _examples(self):
        from splitlm.data import read_examples

        return read_examples(self.data)[:self.max_examples]

    def _judge(self, loaded, tokenizer) -> dict:
        """Every core: judging runs between configurations, when no process is measured."""
        import torch

        from splitlm.cloud_server.evaluate import judge

        threads = torch.get_num_threads()
        torch.set_num_threads(os.cpu_count() or 1)
        try:
            return judge(loaded, tokenizer, self._examples(), label="model", progress=False, **self.kw).as_dict()
        finally:
            torch.set_num_threads(threads)

    def base(self, cache: Path, settings: dict) -> dict:
        """The model before any training (every configuration starts there); cached in `cache`."""
        try:
            saved = json.loads(cache.read_text())
            if saved["settings"] == settings:
                return saved["eval"]
        except (OSError, ValueError, KeyError):
            pass
        from splitlm.cloud_server.evaluate import load_for_eval

        result = self._judge(*load_for_eval(str(self.model)))
        cache.write_text(json.dumps({"settings": settings, "eval": result}))
        return result

    def round(self, folder: Path) -> dict:
        """A round's output: folder/adapter (a PEFT adapter of the whole model) or folder/model."""
        from splitlm.cloud_server.evaluate import load_for_eval

        if (folder / "adapter").is_dir():
            return self._judge(*load_for_eval(str(self.model), str(folder / "adapter")))
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        loaded = AutoModelForCausalLM.from_pretrained(folder / "model", attn_implementation="eager",
                                                      dtype=torch.float32).eval()
        return self._judge(loaded, AutoTokenizer.from_pretrained(self.model))


# ---------------------------------------------------------------- one run's result

def collect_run(spec, cfg, *, files, bundle: Path, shards: list[Path], judge: Judge, times: dict) -> dict:
    """One configuration's per-round numbers, from its processes' files."""
    from splitlm.compare_cost import graph_scalings, round_flops

    scalings = graph_scalings(bundle)
    clients = {}
    for i, shard in enumerate(shards):
        per_round = client_rounds(read_jsonl(files.metrics(i)), split=spec.mode == "split", steps=cfg.local_steps,
                                  rounds=cfg.rounds)
        flops = round_flops(bundle, shard, scalings=scalings, rounds=cfg.rounds, steps=cfg.local_steps,
                            batch_size=cfg.batch_size, seq_len=cfg.seq_len, seed=cfg.seed + i)
        for row, f in zip(per_round, flops):
            row["flops"] = f
        clients[f"client-{i}"] = per_round
    rounds, closed_at = [], times["started"]
    for r in range(cfg.rounds):
        folder = files.server_out / f"round-{r:04d}"
        server = json.loads((folder / "metrics.json").read_text())
        per = {cid: rows[r] for cid, rows in clients.items()}
        n = len(per)
        losses = [c["train_loss"] for c in per.values() if c["train_loss"] is not None]
        rounds.append({
            "round": r, "eval": judge.round(folder), "clients": per,
            "bytes_up": sum(c["bytes_up"] for c in per.values()),
            "bytes_down": sum(c["bytes_down"] for c in per.values()),
            "cpu_s": sum(c["cpu_s"] for c in per.values()) / n,
            "compute_s": sum(c["compute_s"] for c in per.values()) / n,
            "flops": sum(c["flops"] for c in per.values()) / n,
            "rss_peak_mb": max(c["rss_peak_mb"] for c in per.values()),
            "train_loss": sum(losses) / len(losses) if losses else None,
            "wall_s": server["time"] - closed_at, "server_metrics": server})
        closed_at = server["time"]
    graphs = {p.name: p.stat().st_size for p in bundle.glob("*.onnx")}
    return {"id": spec.id, "family": spec.family, "mode": spec.mode, "train": spec.train, "labels": spec.labels,
            "cut": spec.cut, "rank": spec.rank, "bundle": str(bundle), "device_graph_bytes": sum(graphs.values()),
            "wall_s": times["wall_s"], "rounds": rounds}


# ---------------------------------------------------------------- the report

def default_target(base_loss: float, results: list[dict]) -> float | None:
    """The worst final loss among configurations that ended below the base model's loss."""
    finals = [r["rounds"][-1]["eval"]["loss"] for r in results]
    improved = [f for f in finals if f < base_loss]
    return max(improved) if improved else None


def summarize(result: dict, *, clients: int, target: float | None) -> dict:
    rounds = result["rounds"]
    n = len(rounds)
    up, down = sum(r["bytes_up"] for r in rounds), sum(r["bytes_down"] for r in rounds)
    to_target = None
    cumulative = 0
    for r in rounds:
        cumulative += r["bytes_up"] + r["bytes_down"]
        if target is not None and r["eval"]["loss"] <= target:
            to_target = cumulative
            break
    last = rounds[-1]["eval"]
    return {"id": result["id"], "family": result["family"], "final_loss": last["loss"],
            "final_perplexity": last["perplexity"], "final_exact_match": last.get("exact_match"),
            "bytes_up_per_round_per_client": up / (n * clients), "bytes_down_per_round_per_client": down / (n * clients),
            "total_bytes": up + down, "bytes_to_target": to_target,
            "cpu_s_per_round": sum(r["cpu_s"] for r in rounds) / n,
            "compute_s_per_round": sum(r["compute_s"] for r in rounds) / n,
            "gflop_per_round": sum(r["flops"] for r in rounds) / n / 1e9,
            "peak_rss_mb": max(r["rss_peak_mb"] for r in rounds), "wall_s": result["wall_s"],
            "device_graph_mb": result["device_graph_bytes"] / 1e6}


def write_report(cfg, *, base: dict, outcomes: list, partition: dict, log=print) -> dict:
    results = [o.result for o in outcomes if o.result is not None]
    target = cfg.target_loss if cfg.target_loss is not None else default_target(base["loss"], results)
    rows = [summarize(r, clients=cfg.clients, target=target) for r in results]
    report = {"settings": results[0]["settings"] if results else cfg.settings(), "base": base,
              "target_loss": target, "table": rows,
              "partition": {k: v for k, v in partition.items() if k != "clients"}
              | {"sizes": [len(c) for c in partition["clients"]], "file": str(cfg.out / "partition.json")},
              "runs": results, "failed": {o.spec.id: o.error for o in outcomes if o.error}}
    (cfg.out / "results.json").write_text(json.dumps(report, indent=1))
    _write_csv(cfg.out / "results.csv", rows)
    _write_csv(cfg.out / "rounds.csv", [_round_row(r, x) for r in results for x in r["rounds"]])
    table = format_table(rows, base=base, target=target)
    (cfg.out / "table.md").write_text(table + "\n")
    log(table)
    if results:
        plot(results, base=base, path=cfg.out / "compare.png", clients=cfg.clients)
        log(f"results: {cfg.out / 'results.json'}, results.csv, rounds.csv, table.md, compare.png")
    return report


def _round_row(result: dict, r: dict) -> dict:
    return {"id": result["id"], "round": r["round"], "eval_loss": r["eval"]["loss"],
            "perplexity": r["eval"]["perplexity"], "exact_match": r["eval"].get("exact_match"),
            "train_loss": r["train_loss"], "bytes_up": r["bytes_up"], "bytes_down": r["bytes_down"],
            "cpu_s_per_client": r["cpu_s"], "compute_s_per_client": r["compute_s"],
            "flops_per_client": r["flops"], "rss_peak_mb": r["rss_peak_mb"], "wall_s": r["wall_s"]}


def _write_csv(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        if rows:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)


def human_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n:.0f} B"


def format_table(rows: list[dict], *, base: dict, target: float | None) -> str:
    head = ["configuration", "final loss", "ppl", "exact match", "up/round/client", "down/round/client",
            "total bytes", "bytes to target", "device CPU s/round", "compute s/round", "GFLOP/round",
            "peak RSS MB"]
    body = [["base model (round 0)", f"{base['loss']:.4f}", f"{base['perplexity']:.2f}", _em(base.get("exact_match")),
             *["-"] * 8]]
    for r in rows:
        body.append([r["id"], f"{r['final_loss']:.4f}", f"{r['final_perplexity']:.2f}", _em(r["final_exact_match"]),
                     human_bytes(r["bytes_up_per_round_per_client"]), human_bytes(r["bytes_down_per_round_per_client"]),
                     human_bytes(r["total_bytes"]), human_bytes(r["bytes_to_target"]), f"{r['cpu_s_per_round']:.2f}",
                     f"{r['compute_s_per_round']:.2f}", f"{r['gflop_per_round']:.3g}", f"{r['peak_rss_mb']:.0f}"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    lines.append(f"\ntarget loss for 'bytes to target': {'-' if target is None else f'{target:.4f}'}")
    return "\n".join(lines)


def _em(value) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


# ---------------------------------------------------------------- plots

def plot(results: list[dict], *, base: dict, path: Path, clients: int) -> None:
    """One PNG, four panels: loss vs round, loss vs cumulative bytes, device CPU-s and GFLOP per
    round, device peak RSS."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(2, 2, figsize=(13, 9))
    for r in results:
        losses = [base["loss"]] + [x["eval"]["loss"] for x in r["rounds"]]
        ax[0, 0].plot(range(len(losses)), losses, marker="o", label=r["id"])
        cumulative, total = [], 0
        for x in r["rounds"]:
            total += x["bytes_up"] + x["bytes_down"]
            cumulative.append(total)
        ax[0, 1].plot(cumulative, losses[1:], marker="o", label=r["id"])
    ax[0, 0].set(xlabel="round (0: the base model)", ylabel="held-out loss", title="loss vs round")
    ax[0, 0].xaxis.get_major_locator().set_params(integer=True)
    ax[0, 1].axhline(base["loss"], color="grey", ls="--", lw=1, label="base model")
    ax[0, 1].set(xscale="log", xlabel=f"cumulative bytes on the wire ({clients} clients, up + down)",
                 ylabel="held-out loss", title="loss vs cumulative bytes")
    ids = [r["id"] for r in results]
    x = range(len(ids))
    cpu = [sum(y["cpu_s"] for y in r["rounds"]) / len(r["rounds"]) for r in results]
    gflop = [sum(y["flops"] for y in r["rounds"]) / len(r["rounds"]) / 1e9 for r in results]
    ax[1, 0].bar([i - 0.2 for i in x], cpu, 0.4, label="CPU s / round / client")
    twin = ax[1, 0].twinx()
    twin.bar([i + 0.2 for i in x], gflop, 0.4, color="tab:orange", label="GFLOP / round / client")
    ax[1, 0].set(ylabel="device CPU s per round", title="device compute per round (log scales)", yscale="log")
    twin.set(ylabel="device GFLOP per round (from the graphs)", yscale="log")
    ax[1, 1].bar(x, [max(y["rss_peak_mb"] for y in r["rounds"]) for r in results], color="tab:green")
    ax[1, 1].set(ylabel="MB", title="device peak RSS (largest client)")
    for a in (ax[1, 0], ax[1, 1]):
        a.set_xticks(list(x), ids, rotation=20, ha="right", fontsize=8)
    handles = ax[1, 0].get_legend_handles_labels()
    more = twin.get_legend_handles_labels()
    ax[1, 0].legend(handles[0] + more[0], handles[1] + more[1], fontsize=8)
    ax[0, 0].legend(fontsize=8)
    ax[0, 1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
