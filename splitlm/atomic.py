"""Files that are either the old version or the new one, never half of either."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable


def write_atomic(path: Path, write: Callable[[object], None]) -> None:
    """`write(f)` into a temp file beside `path`, fsync it, then os.replace: old file or new, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # the rename itself survives a power cut
    finally:
        os.close(dir_fd)
