"""Progress for people: a tqdm bar on a terminal, a plain line every few seconds in a log.

A long step that prints nothing looks hung. On a terminal the bar redraws itself; when stderr is a
file or a pipe (a log, a test, the demo), carriage-return redraws would pile up, so `Progress`
writes whole lines instead: at most one per `every_s` seconds, and always the last one.
"""

from __future__ import annotations

import sys
import time


class Progress:
    """`with Progress("base: loss", total=n) as p: ... p.update(k)`; `k` is the absolute count done."""

    def __init__(self, desc: str, *, total: int, unit: str = "it", every_s: float = 5.0, stream=None,
                 bar: bool | None = None):
        self.desc, self.total, self.unit, self.every_s = desc, total, unit, every_s
        self.stream = stream if stream is not None else sys.stderr
        self.done, self._t0 = 0, time.monotonic()
        self._last_line = self._t0
        use_bar = bar if bar is not None else self.stream.isatty()
        self._bar = None
        if use_bar:
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=desc, unit=unit, file=self.stream, leave=True)

    def update(self, done: int) -> None:
        self.done = done
        if self._bar is not None:
            self._bar.update(done - self._bar.n)
        elif time.monotonic() - self._last_line >= self.every_s:
            self._line()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        else:
            self._line()

    def _line(self) -> None:
        self._last_line = time.monotonic()
        print(f"{self.desc}: {self.done}/{self.total} {self.unit} ({self._last_line - self._t0:.0f} s)",
              file=self.stream, flush=True)

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
