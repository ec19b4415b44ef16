"""The device's own memory: the meter's peak is the process's own, not a parent's."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from splitlm.edge_client.meter import rss_peak_mb, vm_hwm_kib

PARENT_MB = 800

# One training step of the device code in a fresh process; prints its meter record and ru_maxrss.
DEVICE_STEP = """
import json, resource, sys
import numpy as np
from splitlm.edge_client.meter import Meter
from splitlm.edge_client.runtime import HeadRuntime
rt = HeadRuntime(sys.argv[1], threads=1)
ids = np.ones((1, 16), np.int64); mask = np.ones_like(ids); loras = rt.bundle.lora_init()
meter = Meter()
with meter.compute():
    hidden = rt.forward(ids, mask, loras)
    rt.lora_grads(ids, mask, np.full_like(hidden, 1e-3), loras)
record = meter.end_step(step=0, loss=None)
print(json.dumps({"rss_peak_mb": record["rss_peak_mb"],
                  "ru_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e6}))
"""


def test_a_device_started_by_a_large_parent_reports_its_own_peak(tiny_bundle):
    bundle = tiny_bundle("server")
    ballast = np.ones(PARENT_MB * 1_000_000 // 8)  # 800 MB touched in this (the parent) process
    assert rss_peak_mb() > PARENT_MB
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", DEVICE_STEP, str(bundle.path)], capture_output=True, text=True,
                         env=env, check=True, timeout=120)
    del ballast
    child = json.loads(out.stdout.strip().splitlines()[-1])
    assert child["ru_maxrss_mb"] > PARENT_MB  # what the meter used to report: the parent's peak
    assert 10 < child["rss_peak_mb"] < 250, child  # numpy + onnxruntime + a tiny bundle


def test_vm_hwm_is_read_from_a_status_file_and_absent_files_give_none(tmp_path):
    status = tmp_path / "status"
    status.write_text("Name:\tpython\nVmPeak:\t  900 kB\nVmHWM:\t   12345 kB\nVmRSS:\t 100 kB\n")
    assert vm_hwm_kib(status) == 12345
    assert vm_hwm_kib(tmp_path / "missing") is None
    own = vm_hwm_kib(Path("/proc/self/status")) * 1024 / 1e6
    assert abs(rss_peak_mb() - own) < 5  # on Linux the meter reads exactly this
