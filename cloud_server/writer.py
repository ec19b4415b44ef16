"""The round writer: each round's results go to OUT/round-NNNN/, whole or not at all, on a thread
of their own, so writing a model folder never stalls other clients' steps.

The strategy snapshots what it writes (copies of tensors) where the model is consistent, then
hands `write` a function that fills a staging folder; the folder is renamed into place when the
function returns.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path


class RoundWriter:
    def __init__(self, out: Path | None):
        self.out = out
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="round-writer")

    def folder(self, round_: int) -> Path | None:
        return None if self.out is None else self.out / f"round-{round_:04d}"

    def write(self, round_: int, fill: Callable[[Path], None], metrics: dict) -> Future:
        """Fill a staging folder with `fill(folder)` plus metrics.json, then move it to round-NNNN."""
        return self._pool.submit(self._write, round_, fill, metrics)

    def _write(self, round_: int, fill: Callable[[Path], None], metrics: dict) -> None:
        final = self.folder(round_)
        if final is None:
            return
        final.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))
        fill(staging)
        (staging / "metrics.json").write_text(json.dumps(metrics, indent=2))
        shutil.rmtree(final, ignore_errors=True)
        staging.rename(final)

    def drain(self) -> None:
        """Wait for every queued write (shutdown, tests)."""
        self._pool.submit(lambda: None).result()
