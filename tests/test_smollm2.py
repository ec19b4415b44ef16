"""The real default model, SmolLM2-135M-Instruct cut at K=2: fidelity, size, gradients, training.

Slow (minutes in all), but part of the suite. Text the project has never seen: Python's own
LICENSE.txt for perplexity; the GNU FDL from the system's common licenses for training.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from splitlm.edge_client.data import Dataset
from splitlm.export.bundle import ExportOptions, export_bundle, load_model
from splitlm.export.fidelity import fidelity_report
from splitlm.manifest import Bundle

from .conftest import ServerProcess, edge_cmd
from .test_export import head_grad_errors
from .test_split_training import centralized_losses, read_metrics

pytestmark = pytest.mark.slow
CUT = 2
EVAL_TEXT = Path(sys.base_prefix) / "lib" / f"python{sys.version_info[0]}.{sys.version_info[1]}" / "LICENSE.txt"


@pytest.fixture(scope="module")
def train_text(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("text") / "gfdl.txt"
    path.write_text(Path("/usr/share/common-licenses/GFDL-1.3").read_text())
    return path


@pytest.fixture(scope="session")
def smol_bundle(smollm2, tmp_path_factory):
    made: dict[tuple[str, str], Bundle] = {}

    def get(quant: str, labels: str = "server") -> Bundle:
        if (quant, labels) not in made:
            out = tmp_path_factory.mktemp("smol") / f"{quant}-{labels}"
            export_bundle(str(smollm2), out, ExportOptions(cut=CUT, quant=quant, labels=labels, max_length=512),
                          log=lambda *_: None)
            made[quant, labels] = Bundle.open(out)
        return made[quant, labels]
    return get


@pytest.fixture(scope="module")
def smol_model(smollm2):
    return load_model(str(smollm2))[0]


@pytest.mark.parametrize("quant,max_mb,min_cos,mean_cos,max_ppl_increase", [
    ("fp32", 150, 0.99999, 0.99999, 0.0001),
    ("q8", 45, 0.999, 0.999, 0.002),
    ("q4", 25, 0.98, 0.995, 0.025),
])
def test_head_fidelity_size_and_perplexity(smol_bundle, smol_model, quant, max_mb, min_cos, mean_cos,
                                           max_ppl_increase):
    bundle = smol_bundle(quant)
    report = fidelity_report(bundle.path, smol_model, eval_text=EVAL_TEXT.read_text())
    print(f"\n{quant}: " + " | ".join(line.strip() for line in report.lines()))
    assert report.sizes_mb["head.onnx"] <= max_mb
    assert report.cosine_min >= min_cos and report.cosine_mean >= mean_cos
    assert report.ppl_increase <= max_ppl_increase


@pytest.mark.parametrize("batch,seq", [(2, 24), (3, 41)])
def test_fp32_head_grad_equals_peft_autograd(smol_bundle, smollm2, batch, seq):
    errors = head_grad_errors(smollm2, smol_bundle("fp32"), batch, seq)
    assert max(errors.values()) < 1e-4, errors


def train(server_args: list[str], bundle: Bundle, data: Path, out: Path, *edge_args: str) -> list[dict]:
    server = ServerProcess(*server_args)
    try:
        metrics = out / "metrics.jsonl"
        r = subprocess.run(edge_cmd(server.url, bundle.path, data, "--metrics-out", str(metrics), *edge_args),
                           capture_output=True, text=True, timeout=900)
        assert r.returncode == 0, r.stdout + r.stderr
    finally:
        server.stop()
    return read_metrics(metrics)


def test_q4_bundle_learns_real_english_over_f16_wire(smol_bundle, smollm2, train_text, tmp_path):
    bundle = smol_bundle("q4")
    batch, seq, hidden = 2, 64, bundle.manifest.model.hidden_size
    rows = train([str(smollm2), "--cut", str(CUT), "--wire", "f16", "--lr", "2e-3"], bundle, train_text, tmp_path,
                 "--steps", "40", "--batch-size", str(batch), "--seq-len", str(seq), "--lr", "2e-3")
    losses = [r["loss"] for r in rows]
    print("\nq4/f16 losses:", " ".join(f"{x:.2f}" for x in losses))
    assert np.mean(losses[-10:]) < np.mean(losses[:10]) - 0.2
    payload = batch * seq * hidden * 2  # the f16 activations
    # step 0 also sends the hello, and round-end steps the adapter
    header = [r["bytes_up"] - payload for r in rows if r["step"] % 10 != 9 and r["step"] > 0]
    print("bytes_up per step:", rows[1]["bytes_up"], "= payload", payload, "+", header[0])
    assert all(0 < h < batch * seq * 5 + 400 for h in header)  # + uint8 mask, int32 labels, msgpack headers


@pytest.mark.parametrize("labels", ["server", "device"])
def test_fp32_split_matches_centralized_on_smollm2(smol_bundle, smollm2, train_text, labels, tmp_path):
    bundle = smol_bundle("fp32", labels)
    lr = "1e-3"
    rows = train([str(smollm2), "--cut", str(CUT), "--labels", labels, "--wire", "f32", "--lr", lr], bundle,
                 train_text, tmp_path, "--steps", "20", "--batch-size", "2", "--seq-len", "32", "--lr", lr)
    split = [r["loss"] for r in rows]
    data = Dataset.from_file(train_text, bundle, seq_len=32, batch_size=2, seed=0)
    central = centralized_losses(smollm2, bundle, data, steps=20, lr=float(lr))
    print(f"\n{labels}: split", " ".join(f"{x:.4f}" for x in split))
    print(f"{labels}: central", " ".join(f"{x:.4f}" for x in central))
    np.testing.assert_allclose(split, central, rtol=1e-3)


def test_tail_grad_gives_back_the_labels_of_held_out_english(smol_bundle, smollm2):
    """U-shape's leak on the real model: a curious server reads every label (the text shifted by one)
    back from tail_grad in closed form. 512 tokens of Python's LICENSE.txt, no defense."""
    from splitlm.audit.run import AuditConfig, run_audit

    result = run_audit(AuditConfig(model=str(smollm2), bundle=smol_bundle("fp32", "device").path, data=EVAL_TEXT,
                                   attacks=("labels",), max_tokens=512, seed=0))
    assert result.n_tokens >= 512
    assert result.recovery["labels"] > 0.99
