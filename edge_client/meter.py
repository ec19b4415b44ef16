"""The on-device meter: where each training step's time, bytes and memory went.

    with meter.compute(): ...          onnxruntime and the optimizer       -> compute_s
    with meter.wait(): ...             waiting on the network and server   -> wait_s
    meter.count_up(len(frame))         payload bytes sent                  -> bytes_up
    meter.count_down(len(frame))       payload bytes received              -> bytes_down
    record = meter.end_step(step=s, loss=l)   one dict (+ one JSON line in `metrics_out`)

A step starts at the first timed section or count after the previous `end_step`; its `cpu_s`
(process CPU time, every thread) and `wall_s` run from there to `end_step`. `rss_peak_mb` is the
process's peak resident set so far (`rss_peak_mb()`).
"""

from __future__ import annotations

import json
import resource
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from splitlm.errors import SplitLMError

TIMES = ("compute_s", "wait_s", "cpu_s", "wall_s")
COUNTS = ("bytes_up", "bytes_down")


STATUS = Path("/proc/self/status")


def rss_peak_mb() -> float:
    """Peak resident set size of this process so far, in MB: its own, not a parent's.

    Linux: VmHWM from /proc/self/status, the high-water mark of this process image. Not
    ru_maxrss: Linux carries that across fork and exec, so a device started by a 1.2 GB Python
    parent reported 1,171 MB against 13 MB of its own. Where /proc is absent (macOS, BSD) this
    falls back to ru_maxrss (bytes on macOS, KiB elsewhere), which there starts at the exec.
    """
    hwm_kib = vm_hwm_kib()
    if hwm_kib is not None:
        return hwm_kib * 1024 / 1e6
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1e6 if sys.platform == "darwin" else peak * 1024 / 1e6


def vm_hwm_kib(status: Path = STATUS) -> int | None:
    """VmHWM in KiB from a /proc/<pid>/status file, or None where there is none."""
    try:
        text = status.read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])  # "VmHWM:     12345 kB"
    return None


class Meter:
    def __init__(self, *, metrics_out: str | Path | None = None):
        self.metrics_out = Path(metrics_out) if metrics_out else None
        if self.metrics_out:  # its folder is made, and a file it cannot write fails here, before any
            try:              # connection, instead of mid-run where the client took it for a lost link
                self.metrics_out.parent.mkdir(parents=True, exist_ok=True)
                self.metrics_out.open("a").close()
            except OSError as e:
                why = "its folder is a file" if self.metrics_out.parent.is_file() else e.strerror
                raise SplitLMError(f"--metrics-out {self.metrics_out}: cannot write there ({why})") from e
        self.records: list[dict] = []
        self._current = self._zero()
        self._started: tuple[float, float] | None = None  # (wall, cpu) at the step's start

    @staticmethod
    def _zero() -> dict[str, float]:
        return {"compute_s": 0.0, "wait_s": 0.0, "bytes_up": 0, "bytes_down": 0}

    def _start(self) -> None:
        if self._started is None:
            self._started = (time.perf_counter(), time.process_time())

    @contextmanager
    def _timed(self, field: str):
        self._start()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self._current[field] += time.perf_counter() - t0

    def compute(self):
        """Time spent computing on the device (onnxruntime sessions, optimizer)."""
        return self._timed("compute_s")

    def wait(self):
        """Time spent waiting on the network and the server."""
        return self._timed("wait_s")

    def count_up(self, n: int) -> None:
        self._start()
        self._current["bytes_up"] += n

    def count_down(self, n: int) -> None:
        self._start()
        self._current["bytes_down"] += n

    def end_step(self, *, step: int, loss: float | None, **extra) -> dict:
        """Close the step: return its record and append it as one JSON line to `metrics_out`.
        `extra` (e.g. round, phase) goes into the record as given."""
        self._start()
        wall0, cpu0 = self._started
        record = {"step": step, "loss": None if loss is None else float(loss), **extra, **self._current,
                  "cpu_s": time.process_time() - cpu0, "wall_s": time.perf_counter() - wall0,
                  "rss_peak_mb": rss_peak_mb()}
        self.records.append(record)
        if self.metrics_out:
            with open(self.metrics_out, "a") as f:
                f.write(json.dumps(record) + "\n")
        self._current, self._started = self._zero(), None
        return record

    def summary(self) -> dict:
        """Totals and per-step means over the recorded steps, for the end-of-run line."""
        n = len(self.records)
        out: dict = {"steps": n}
        if not n:
            return out
        losses = [r["loss"] for r in self.records if r["loss"] is not None]
        if losses:
            out |= {"first_loss": losses[0], "last_loss": losses[-1]}
        for key in (*TIMES, *COUNTS):
            total = sum(r[key] for r in self.records)
            out |= {f"{key}_total": total, f"{key}_per_step": total / n}
        out["rss_peak_mb"] = max(r["rss_peak_mb"] for r in self.records)
        return out
