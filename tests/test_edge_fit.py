"""`splitlm edge --max-memory MB`: the fit is measured on this machine; what cannot fit is refused
before any connection, and a setting that fits trains."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from splitlm.demo import write_ledger_data
from splitlm.edge_client.fit import MARGIN, Costs, MemoryBudgetError, choose, probe

from .conftest import ServerProcess, edge_cmd

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
COSTS = Costs(sessions_mb=100.0, a=0.1, b=0.0, tail_per_token=1.0, hidden_size=64, measured="clear_refs")


@pytest.mark.parametrize("budget,batch,chunk", [(10_000, 4, 64), (170, 4, 32), (150, 3, 32), (125, 1, 16)])
def test_choose_keeps_the_largest_batch_then_the_largest_chunk_that_fit(budget, batch, chunk):
    fit = choose(COSTS, budget_mb=budget, batch=4, seq=128, chunk=64)
    assert (fit.batch, fit.chunk) == (batch, chunk)
    assert fit.predicted_mb <= budget
    assert fit.predicted_mb == pytest.approx(COSTS.predict(batch, 128, chunk))


def test_choose_refuses_with_what_it_would_need():
    need = COSTS.sessions_mb + (1 + MARGIN) * 16 * 1.0 + 4 * 128 * 64 * 4 / 1e6
    with pytest.raises(MemoryBudgetError, match=f"--max-memory 110 MB cannot fit this bundle at --seq-len 128: "
                                                f"batch 1 needs ~{need:.0f} MB .* raise --max-memory to {need:.0f}"):
        choose(COSTS, budget_mb=110, batch=4, seq=128, chunk=64)


def test_the_probe_measures_sessions_and_a_step_that_grows_with_length(tiny_bundle):
    bundle = tiny_bundle("device")
    costs = probe(bundle.path, seq=128, chunk=64, threads=1)
    assert 20 < costs.sessions_mb < 300  # numpy + onnxruntime + a tiny bundle, in a process of its own
    assert costs.a >= 0 and costs.b >= 0 and costs.tail_per_token > 0
    assert costs.step_mb(1, 128) > 0 and costs.measured == "clear_refs"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fit-data")
    write_ledger_data(folder, clients=1, per_client=20, held_out=2)
    return next(folder.glob("client-*.jsonl"))


def test_a_budget_that_cannot_fit_is_refused_before_connecting(tiny_bundle, data):
    bundle = tiny_bundle("device")
    cmd = edge_cmd("ws://127.0.0.1:9", bundle.path, data, "--max-memory", "20", "--threads", "1", "--steps", "2")
    out = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=300)
    assert out.returncode == 2, out.stderr
    line = out.stderr.strip().splitlines()[-1]
    assert line.startswith("splitlm edge: error: --max-memory 20 MB cannot fit this bundle at --seq-len 128")  # 256, clipped to the bundle's max
    assert "raise --max-memory to" in line and "127.0.0.1:9" not in out.stderr


def test_a_budget_that_fits_trains(tiny_llama, tiny_bundle, data, tmp_path):
    bundle = tiny_bundle("device")
    m = bundle.manifest
    server = ServerProcess(str(tiny_llama), "--cut", str(m.cut), "--labels", "device", "--lora-rank", str(m.lora.rank))
    try:
        metrics = tmp_path / "metrics.jsonl"
        cmd = edge_cmd(server.url, bundle.path, data, "--max-memory", "1000", "--threads", "1", "--steps", "2",
                       "--batch-size", "2", "--seq-len", "32", "--metrics-out", str(metrics))
        out = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=300)
    finally:
        server.stop()
    assert out.returncode == 0, out.stderr
    assert "--max-memory 1000 MB: batch 2 x 32 tokens, tail chunk 64" in out.stdout
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 1]
    assert all(r["rss_peak_mb"] < 1000 for r in records)
