"""`splitlm edge --max-memory MB`: what this device needs, measured on it, and the batch and tail
chunk that fit, or a refusal before any connection.

    probe(bundle, seq)     a fresh subprocess opens the bundle's sessions and runs one training
                           step (head forward + head_grad) at two lengths and the tail at one chunk,
                           each from a reset high-water mark      -> Costs
    choose(costs, ...)     the largest batch (<= --batch-size), then the largest tail chunk, whose
                           predicted peak fits                     -> Fit, or MemoryBudgetError
    choose_way(...)        a bundle exported with --keep-activations is probed both ways; the
                           device keeps activations (a step without a second forward) when that
                           fits a batch as large as the other way does

The model, per batch B x T tokens and tail chunk c, in MB:

    peak = sessions + (1 + MARGIN) * max(B * (a*T + b*T^2), t*c + kept(B, T)) + buffers(B, T)

`sessions` is the resident size with the sessions open (weights, onnxruntime, numpy); a*T + b*T^2
a step's transient memory for one row (activations grow with T, attention scores with T^2),
fitted to the two probed lengths; t the tail's logits and their gradient per token; buffers the
step's float tensors held across it (h_K, h_N, dL/dh_N, dL/dh_K); kept(B, T), with --keep-activations,
the activations held from the forward to the backward, alive while the tail runs (counted from the
arrays, fitted the same way; 0 otherwise). The high-water mark is reset by
writing 5 to /proc/self/clear_refs (Linux); where that is not possible the probes run smallest
first and each is measured against the sessions' baseline, which can only overestimate.
bench/bench_device.py prints the prediction beside the measured peak for SmolLM2 q4 at 1 x 512.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from splitlm.errors import SplitLMError

from .meter import rss_peak_mb

MARGIN = 0.15                 # on the measured transients: allocator reuse makes probes read low
MIN_CHUNK = 16                # smallest tail chunk tried (tokens)
PROBE_MIN_T = 16
CLEAR_REFS = Path("/proc/self/clear_refs")
STATUS = Path("/proc/self/status")


class MemoryBudgetError(SplitLMError):
    """--max-memory is below what this bundle needs on this device at the smallest setting."""


@dataclass(frozen=True)
class Costs:
    sessions_mb: float        # resident with the sessions open
    a: float                  # MB per token of one row (linear part of a step)
    b: float                  # MB per token^2 of one row (attention part)
    tail_per_token: float     # MB per tail token (0 without a tail)
    hidden_size: int
    measured: str             # "clear_refs" or "baseline"
    kept_a: float = 0.0       # --keep-activations: MB per token of one row held from forward to backward
    kept_b: float = 0.0       # and per token^2 (attention probabilities); counted exactly, not sampled

    def step_mb(self, batch: int, seq: int) -> float:
        return batch * (self.a * seq + self.b * seq * seq)

    def kept_mb(self, batch: int, seq: int) -> float:
        return batch * (self.kept_a * seq + self.kept_b * seq * seq)

    def predict(self, batch: int, seq: int, chunk: int) -> float:
        """The step's transient (kept activations included), or the tail's beside the kept activations."""
        buffers = 4 * batch * seq * self.hidden_size * 4 / 1e6
        tail = self.tail_per_token * chunk + (self.kept_mb(batch, seq) if self.tail_per_token else 0.0)
        return self.sessions_mb + (1 + MARGIN) * max(self.step_mb(batch, seq), tail) + buffers


@dataclass(frozen=True)
class Fit:
    batch: int
    chunk: int
    predicted_mb: float


def choose(costs: Costs, *, budget_mb: float, batch: int, seq: int, chunk: int) -> Fit:
    """The largest batch <= `batch`, then the largest chunk <= `chunk`, predicted to fit the budget."""
    chunks = [c for c in (chunk, chunk // 2, chunk // 4, chunk // 8) if c >= MIN_CHUNK] or [chunk]
    for b in range(batch, 0, -1):
        for c in chunks:
            need = costs.predict(b, seq, c)
            if need <= budget_mb:
                return Fit(b, c, need)
    need = costs.predict(1, seq, chunks[-1])
    raise MemoryBudgetError(
        f"--max-memory {budget_mb:g} MB cannot fit this bundle at --seq-len {seq}: batch 1 needs ~{need:.0f} MB "
        f"on this device (sessions {costs.sessions_mb:.0f} MB + a training step {costs.step_mb(1, seq):.0f} MB "
        f"+ the tail {costs.tail_per_token * chunks[-1]:.0f} MB, measured; margin {MARGIN:.0%}); "
        f"raise --max-memory to {need:.0f} or lower --seq-len")


# --- measuring, in a fresh process ------------------------------------------------------------

def _rss_mb() -> float:
    for line in STATUS.read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024 / 1e6
    raise OSError("no VmRSS")


def _reset_peak() -> bool:
    try:
        CLEAR_REFS.write_text("5")  # VmHWM := VmRSS
        return True
    except OSError:
        return False


def _transient(run, baseline: float) -> float:
    """MB `run()` took above the resident size before it (or above `baseline` where the peak cannot be reset)."""
    before = _rss_mb() if _reset_peak() else baseline
    run()
    return max(0.0, rss_peak_mb() - before)


def measure(bundle: str, *, seq: int, chunk: int, threads: int, keep_activations: bool = False) -> Costs:
    """Costs of this bundle on this machine: run in a process of its own (see `probe`)."""
    import numpy as np

    from .runtime import HeadRuntime

    rt = HeadRuntime(bundle, threads=threads, tail_chunk=None, keep_activations=keep_activations)
    m = rt.manifest
    sessions = rss_peak_mb()
    loras = rt.bundle.lora_init()
    rows, kept = {}, {}
    for t in sorted({max(PROBE_MIN_T, seq // 4), max(PROBE_MIN_T, seq // 2)}):
        t = min(t, m.max_length)
        ids = np.ones((1, t), np.int64)
        mask = np.ones_like(ids)

        def step():
            hidden = rt.forward(ids, mask, loras)  # (1, T, H)
            kept[t] = sum(x.nbytes for x in rt.kept.saved.values()) / 1e6 if rt.kept else 0.0
            rt.lora_grads(ids, mask, np.full_like(hidden, 1e-3), loras)
        rows[t] = _transient(step, sessions)
    a, b = _fit(rows)
    kept_a, kept_b = _fit(kept)
    tail = 0.0
    if rt.has_tail:
        c = max(3, min(chunk, m.max_length))
        ids = np.ones((1, c), np.int64)
        hidden = np.zeros((1, c, m.model.hidden_size), np.float32)
        tail = _transient(lambda: rt.tail(hidden, ids, np.ones_like(ids)), sessions) / c
    return Costs(sessions, a, b, tail, m.model.hidden_size, "clear_refs" if _reset_peak() else "baseline",
                 kept_a, kept_b)


def _fit(rows: dict[int, float]) -> tuple[float, float]:
    """(a, b) with a*T + b*T^2 through the probed (T, MB) points; b >= 0."""
    (t1, d1), *rest = sorted(rows.items())
    if not rest:
        return d1 / t1, 0.0
    t2, d2 = rest[-1]
    b = max(0.0, (d2 / t2 - d1 / t1) / (t2 - t1))
    return max(d1 / t1 - b * t1, 0.0) if b else max(d1 / t1, d2 / t2), b


def probe(bundle: str | Path, *, seq: int, chunk: int, threads: int, keep_activations: bool = False) -> Costs:
    """`measure` in a fresh subprocess, so its peak is the probe's alone and its memory goes back."""
    cmd = [sys.executable, "-m", "splitlm.edge_client.fit", str(bundle), "--seq", str(seq), "--chunk", str(chunk),
           "--threads", str(threads), *(["--keep-activations"] if keep_activations else [])]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise SplitLMError(f"--max-memory: measuring this bundle failed: {out.stderr.strip()[-500:]}")
    return Costs(**json.loads(out.stdout.strip().splitlines()[-1]))


def choose_way(plain: Costs, kept: Costs | None, *, budget_mb: float, batch: int, seq: int,
               chunk: int) -> tuple[Fit, bool]:
    """The fit of the step that runs the forward again in its backward, or of the step that keeps
    the forward's activations (faster, more memory) when that fits a batch as large: (fit, kept)."""
    fit = choose(plain, budget_mb=budget_mb, batch=batch, seq=seq, chunk=chunk)
    if kept is None:
        return fit, False
    try:
        faster = choose(kept, budget_mb=budget_mb, batch=batch, seq=seq, chunk=chunk)
    except MemoryBudgetError:
        return fit, False
    return (faster, True) if faster.batch >= fit.batch else (fit, False)


def fit_config(cfg, budget_mb: float, *, log=print):
    """`cfg` (an EdgeConfig) with the batch size and tail chunk that fit `budget_mb`, or
    MemoryBudgetError; for a bundle exported with --keep-activations, also whether the device keeps
    the forward's activations (`choose_way`), unless --keep-activations asked for it outright."""
    from splitlm.manifest import Bundle

    from .runtime import TAIL_CHUNK, missing_kept_graphs

    manifest = Bundle.open(cfg.bundle, verify=False).manifest
    seq = min(cfg.seq_len, manifest.max_length)
    chunk = cfg.tail_chunk or TAIL_CHUNK

    def measured(keep: bool) -> Costs:
        return probe(cfg.bundle, seq=seq, chunk=chunk, threads=cfg.threads, keep_activations=keep)
    if cfg.keep_activations:
        costs = measured(True)
        fit, keep = choose(costs, budget_mb=budget_mb, batch=cfg.batch_size, seq=seq, chunk=chunk), True
    else:
        costs = measured(False)
        kept = None if missing_kept_graphs(manifest) else measured(True)
        fit, keep = choose_way(costs, kept, budget_mb=budget_mb, batch=cfg.batch_size, seq=seq, chunk=chunk)
    way = "activations kept for the backward" if keep else "the forward runs again in the backward"
    log(f"--max-memory {budget_mb:g} MB: batch {fit.batch} x {seq} tokens, tail chunk {fit.chunk}, {way}, "
        f"predicted peak {fit.predicted_mb:.0f} MB (sessions {costs.sessions_mb:.0f} MB, measured here)")
    return dataclasses.replace(cfg, batch_size=fit.batch, tail_chunk=fit.chunk, keep_activations=keep)


def main() -> None:
    ap = argparse.ArgumentParser(description="measure a bundle's memory costs on this device (one JSON line)")
    ap.add_argument("bundle")
    ap.add_argument("--seq", type=int, required=True)
    ap.add_argument("--chunk", type=int, required=True)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--keep-activations", action="store_true")
    args = ap.parse_args()
    costs = measure(args.bundle, seq=args.seq, chunk=args.chunk, threads=args.threads,
                    keep_activations=args.keep_activations)
    print(json.dumps(dataclasses.asdict(costs)))


if __name__ == "__main__":
    main()
