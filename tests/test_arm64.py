"""bench/arm64/run.sh: a real `splitlm edge` in an emulated arm64 Debian userland, under a 512 MB
cgroup cap, against a server on this host; its losses must equal an x86 client's.

Opt-in: `python -m pytest -m arm64` as root on a Debian host with debootstrap, qemu-user-static
and binfmt-support (15-20 minutes the first time, a few minutes once the userland is cached).
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

RUN = Path(__file__).resolve().parents[1] / "bench" / "arm64" / "run.sh"
CAP_MB = 512

pytestmark = pytest.mark.arm64


def test_the_arm64_client_trains_like_the_x86_one_within_512_mb(request):
    if "arm64" not in (request.config.getoption("-m") or ""):
        pytest.skip("opt-in: python -m pytest -m arm64 (root; debootstrap, qemu-user-static, binfmt-support)")
    out = subprocess.run(["bash", str(RUN)], capture_output=True, text=True, timeout=3600,
                         env={**os.environ, "MEM_MB": str(CAP_MB)})
    last = json.loads(out.stdout.strip().splitlines()[-1])
    assert out.returncode == 0 and last["ok"], out.stderr[-3000:]
    assert last["steps"] >= 2 and last["max_loss_diff"] <= last["tol"]
    assert last["oom_kills"] == 0 and last["arm64_rss_peak_mb"] < CAP_MB
