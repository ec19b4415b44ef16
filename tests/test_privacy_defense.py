"""The device's defenses (edge_client.privacy): applied on the device before bytes leave, by the
device's own floor, which neither the manifest nor the server can lower.

Real processes: `splitlm serve` and `splitlm edge` on 127.0.0.1 with a recording relay between
them; the recorded step-0 frames are compared with the device's own undefended activations and
tail gradients, recomputed here with the same onnxruntime head and tail.
"""

from __future__ import annotations

import math
import subprocess

import msgpack
import numpy as np
import pytest

from splitlm.demo import write_ledger_data
from splitlm.edge_client.data import Dataset
from splitlm.edge_client.privacy import (Noise, PrivacyError, PrivacySettings, clip_rows, effective, privatize,
                                         strongest)
from splitlm.edge_client.runtime import HeadRuntime
from splitlm.manifest import Bundle
from splitlm.protocol import Forward, Hidden, Limits, TailGrad, Welcome, decode

from .conftest import ServerProcess, edge_cmd, run_cli
from .test_privacy import RecordingRelay

CLIP, SIGMA = 0.1, 0.5          # h_K: the tiny model's median token norm is ~0.19, so clipping shows too
GRAD_CLIP, GRAD_SIGMA = 0.01, 0.5
SEQ, BATCH = 32, 2


# --- the mechanism, as pure functions ----------------------------------------------------------

def test_clip_bounds_every_token_and_keeps_short_ones():
    x = (np.random.default_rng(0).standard_normal((3, 5, 64)) * np.array([0.01, 1, 100])[:, None, None]).astype(np.float32)
    out = clip_rows(x, 2.0)
    norms = np.linalg.norm(out, axis=-1)
    assert norms.max() <= 2.0 + 1e-5
    np.testing.assert_array_equal(out[0], x[0])                      # norms ~0.08: untouched
    np.testing.assert_allclose(norms[2], 2.0, rtol=1e-5)              # norms ~800: scaled to the clip


def test_noise_has_the_configured_std():
    x = np.zeros((64, 32, 576), np.float32)
    out = privatize(x, Noise(clip=3.0, sigma=2.0), np.random.default_rng(0))
    assert out.std() == pytest.approx(2.0 * 3.0 / math.sqrt(576), rel=0.01)
    assert np.linalg.norm(out, axis=-1).mean() == pytest.approx(6.0, rel=0.01)  # noise norm = sigma * clip


@pytest.mark.parametrize("a, b, want", [
    (Noise(), Noise(), Noise()),
    (Noise(2.0, 0.5), Noise(), Noise(2.0, 0.5)),
    (Noise(), Noise(2.0, 0.5), Noise(2.0, 0.5)),
    (Noise(2.0, 0.5), Noise(4.0, 0.0), Noise(2.0, 0.5)),   # a weaker manifest changes nothing
    (Noise(4.0, 1.0), Noise(2.0, 0.0), Noise(2.0, 2.0)),   # smaller clip, the same absolute noise (4.0)
    (Noise(2.0, 0.5), Noise(2.0, 3.0), Noise(2.0, 3.0)),   # a stronger manifest raises it
])
def test_the_stronger_setting_wins(a, b, want):
    got = strongest(a, b)
    assert got.clip == want.clip and got.sigma == pytest.approx(want.sigma)


def test_noise_without_a_clip_is_refused():
    with pytest.raises(PrivacyError, match="noise sigma 1.0 needs a clip"):
        Noise(None, 1.0)
    with pytest.raises(PrivacyError, match="manifest privacy: expected keys .* got \\['sigma'\\]"):
        PrivacySettings.from_dict({"sigma": 1.0})


def test_cli_refuses_noise_without_clip(tmp_path):
    from .conftest import run_cli

    r = run_cli("edge", "ws://127.0.0.1:9", "--bundle", str(tmp_path), "--data", "x.txt", "--noise", "1")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1].endswith("noise sigma 1.0 needs a clip: the noise is calibrated to "
                                                      "the clip norm")


@pytest.mark.parametrize("args, needle", [
    (["--cut", "2", "--noise", "1"], "noise sigma 1.0 needs a clip: the noise is calibrated to the clip norm"),
    (["--mode", "fedavg", "--clip", "5"], "--clip: a privacy floor is for split bundles, whose devices send activations"),
    (["--cut", "2", "--grad-clip", "1"], "--grad-clip/--grad-noise: tail_grad exists only with --labels device"),
])
def test_export_refuses_a_floor_it_cannot_mean_before_any_work(tiny_llama, tmp_path, args, needle):
    r = run_cli("export", str(tiny_llama), "--out", str(tmp_path / "b"), *args)
    assert r.returncode == 2 and needle in r.stderr.strip().splitlines()[-1], r.stderr
    assert not (tmp_path / "b").exists()


# --- on the device, before bytes leave ---------------------------------------------------------

def _with_manifest_privacy(model, dest, privacy: dict) -> Bundle:
    """The tiny U-shape bundle, exported with `privacy` as its manifest's floor (the server writes the bundle)."""
    from splitlm.export.bundle import ExportOptions, export_bundle

    export_bundle(str(model), dest, ExportOptions(cut=2, quant="fp32", labels="device", lora_rank=4, max_length=128,
                                                  privacy=privacy), log=lambda *_: None)
    return Bundle.open(dest)


@pytest.fixture(scope="module")
def runs(tiny_llama, tiny_bundle, tmp_path_factory):
    """Three edge runs of one step through a recording relay:
    none    no defense anywhere: the reference
    weak    the manifest says clip only, no noise; the device says --clip/--noise/--grad-*: the device's applies
    strong  the manifest says 3x the device's noise; the device says nothing more: the manifest's applies
    """
    tmp = tmp_path_factory.mktemp("defense")
    write_ledger_data(tmp, clients=1, per_client=8, held_out=1)
    base = tiny_bundle("device")
    weak = _with_manifest_privacy(tiny_llama, tmp / "weak", {"clip": CLIP, "noise": 0.0})
    strong = _with_manifest_privacy(tiny_llama, tmp / "strong", {"clip": CLIP, "noise": 3 * SIGMA,
                                                                 "grad_clip": GRAD_CLIP, "grad_noise": 3 * GRAD_SIGMA})
    assert strong.manifest.privacy["noise"] == 3 * SIGMA  # the export wrote the floor into the manifest
    server = ServerProcess(str(tiny_llama), "--cut", "2", "--labels", "device", "--lora-rank", "4", "--wire", "f32",
                           "--steps-per-round", "100")
    out = {}
    try:
        for name, bundle, flags in (
                ("none", base, []),
                ("weak", weak, ["--clip", str(CLIP), "--noise", str(SIGMA), "--grad-clip", str(GRAD_CLIP),
                                "--grad-noise", str(GRAD_SIGMA)]),
                ("strong", strong, ["--clip", str(CLIP)])):
            relay = RecordingRelay(server.url)
            try:
                r = subprocess.run(edge_cmd(relay.url, bundle.path, tmp / "client-0.jsonl", "--steps", "1",
                                            "--batch-size", str(BATCH), "--seq-len", str(SEQ), "--client-id", name,
                                            "--threads", "1", *flags), capture_output=True, text=True, timeout=300)
                assert r.returncode == 0, r.stdout + r.stderr
            finally:
                relay.close()
            out[name] = (bundle, relay.frames)
    finally:
        server.stop()
    return tmp, out


def _step0(bundle: Bundle, frames, data):
    """The recorded step-0 messages and what the device computes for that step without any defense."""
    msgs = {type(m): m for m in (decode(f, limits=Limits())[1] for _, f in frames)}
    batch = Dataset.from_file(data, bundle, seq_len=SEQ, batch_size=BATCH, seed=0).batch(0)
    lora = msgs[Welcome].head_adapter or bundle.lora_init()
    runtime = HeadRuntime(bundle, threads=1)
    h_clean = runtime.forward(batch.input_ids, batch.attention_mask, lora)
    _, g_clean = runtime.tail(np.array(msgs[Hidden].hidden), batch.labels, batch.attention_mask)
    return msgs, h_clean, g_clean


def _residual_std(sent: np.ndarray, clean: np.ndarray, clip: float) -> tuple[float, float]:
    residual = np.asarray(sent) - clip_rows(clean, clip)
    return float(residual.std()), float(residual.mean())


@pytest.mark.parametrize("name, sigma, grad_sigma", [("weak", SIGMA, GRAD_SIGMA), ("strong", 3 * SIGMA, 3 * GRAD_SIGMA)])
def test_what_left_the_device_is_clipped_and_noised_by_the_stronger_floor(runs, name, sigma, grad_sigma):
    tmp, out = runs
    bundle, frames = out[name]
    msgs, h_clean, g_clean = _step0(bundle, frames, tmp / "client-0.jsonl")
    H = h_clean.shape[-1]
    assert np.linalg.norm(h_clean, axis=-1).max() > 2 * CLIP   # so clipping had work to do
    std, mean = _residual_std(msgs[Forward].hidden, h_clean, CLIP)
    assert std == pytest.approx(sigma * CLIP / math.sqrt(H), rel=0.1)  # BATCH*SEQ*H = 4096 draws
    assert abs(mean) < 4 * std / math.sqrt(h_clean.size)
    std, mean = _residual_std(msgs[TailGrad].grad, g_clean, GRAD_CLIP)
    assert std == pytest.approx(grad_sigma * GRAD_CLIP / math.sqrt(H), rel=0.1)


def test_a_run_without_a_defense_sends_the_activations_as_computed(runs):
    """The undefended reference: the same comparison finds no residual beyond f32 rounding."""
    tmp, out = runs
    bundle, frames = out["none"]
    msgs, h_clean, g_clean = _step0(bundle, frames, tmp / "client-0.jsonl")
    np.testing.assert_allclose(msgs[Forward].hidden, h_clean, atol=1e-5)
    np.testing.assert_allclose(msgs[TailGrad].grad, g_clean, atol=1e-7)


def test_effective_settings_take_the_manifest_floor_when_the_device_says_nothing():
    manifest = PrivacySettings.from_dict({"clip": 2.0, "noise": 1.0})
    assert effective(PrivacySettings(), manifest) == manifest
    assert effective(PrivacySettings(Noise(2.0, 4.0)), manifest).hidden == Noise(2.0, 4.0)


def test_a_recorded_log_is_what_the_audit_reads(runs, tiny_llama):
    """The relay's frames written as a msgpack log: `log_frames` returns the h_K that left the device."""
    from splitlm.audit.frames import log_frames

    tmp, out = runs
    bundle, frames = out["weak"]
    log = tmp / "weak.log"
    log.write_bytes(b"".join(msgpack.packb(f, use_bin_type=True) for _, f in frames))
    got = log_frames(log, bundle, tmp / "client-0.jsonl", seq_len=SEQ, batch_size=BATCH)
    forward = next(m for m in (decode(f, limits=Limits())[1] for _, f in frames) if isinstance(m, Forward))
    np.testing.assert_array_equal(got.hidden, forward.hidden)
    assert got.tail_grad is not None and got.hidden_n is not None
