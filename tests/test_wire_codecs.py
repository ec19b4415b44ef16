"""Parameters travel with the session's update codec, not the activations' lossy one."""

from __future__ import annotations

import subprocess

import numpy as np

from splitlm.demo import write_ledger_data

from .conftest import ServerProcess, edge_cmd

ROUND = 3


def test_adapters_cross_an_f16_activation_wire_exactly(tiny_llama, tiny_bundle, tmp_path):
    """With f16 activations the head adapter still arrives bit-exact: the server writes values f16
    cannot hold, and the device, after adopting the average, holds exactly what the server wrote."""
    bundle = tiny_bundle("server")
    write_ledger_data(tmp_path, clients=1, per_client=12, held_out=2)
    server = ServerProcess(str(tiny_llama), "--cut", "2", "--lora-rank", "4", "--lr", "1e-2", "--wire", "f16",
                           "--steps-per-round", str(ROUND), "--out", str(tmp_path / "out"))
    try:
        r = subprocess.run(edge_cmd(server.url, bundle.path, tmp_path / "client-0.jsonl", "--steps", str(ROUND),
                                    "--batch-size", "2", "--seq-len", "32", "--lr", "1e-2",
                                    "--state", str(tmp_path / "edge.npz")),
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stdout + r.stderr
    finally:
        server.stop()
    with np.load(tmp_path / "out" / "round-0000" / "head_adapter.npz") as z:
        written = {n: z[n] for n in z.files}
    with np.load(tmp_path / "edge.npz") as z:
        held = {n[len("now.lora."):]: z[n] for n in z.files if n.startswith("now.lora.")}
    assert written.keys() == held.keys() and written
    trained_b = np.concatenate([written[n].ravel() for n in written if n.endswith("lora_B")])
    assert np.any(trained_b != trained_b.astype(np.float16).astype(np.float32)), "not f16-rounded"
    for name in written:
        np.testing.assert_array_equal(held[name], written[name])
