"""`splitlm audit`: the curious server's attacks reproduce both leaks on a tiny model, and the
device's defense lowers them. The attacks are model-agnostic; SmolLM2's numbers are in the README
(bench/privacy_frontier.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from splitlm.audit import attacks
from splitlm.audit.run import AuditConfig, run_audit
from splitlm.edge_client.privacy import Noise, PrivacySettings

from .conftest import TEXT, run_cli


@pytest.fixture(scope="module")
def texts(tmp_path_factory):
    """The device's text and the server's own (the same sentences in another order: not the device's)."""
    d = tmp_path_factory.mktemp("audit-text")
    (d / "device.txt").write_text(" ".join(TEXT * 4))
    (d / "public.txt").write_text(" ".join(reversed(TEXT * 4)))
    return d


@pytest.fixture(scope="module")
def clean(tiny_llama, tiny_bundle, texts):
    """The audit with no defense, through the CLI (JSON on stdout)."""
    r = run_cli("audit", str(tiny_llama), "--bundle", str(tiny_bundle("device").path), "--data",
                str(texts / "device.txt"), "--public", str(texts / "public.txt"), "--json", "--attacks",
                "dictionary", "dictionary-cosine", "inverter", "exact", "labels", env={"OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_the_dictionary_reads_back_the_text_without_a_defense(clean):
    # A random tiny model's cut-layer rows are nearly one per token: the lookup is near-perfect
    # (SmolLM2 K=2: 93-95%). Chance is 1/320.
    assert clean["n_tokens"] > 400
    assert clean["recovery"]["dictionary"] > 0.9
    assert clean["recovery"]["dictionary-cosine"] > 0.9
    assert clean["recovery"]["exact"] > 0.95


def test_tail_grad_gives_back_every_label(clean):
    assert clean["recovery"]["labels"] > 0.99


def test_the_report_shows_passages_and_norms(clean):
    assert {s["attack"] for s in clean["samples"]} >= {"dictionary", "labels"}
    assert clean["norms"]["hidden"] > 0 and clean["norms"]["tail_grad"] > 0
    assert clean["privacy"] == {"clip": None, "noise": 0.0, "grad_clip": None, "grad_noise": 0.0}


def test_noise_lowers_every_attack(tiny_llama, tiny_bundle, texts, clean):
    clip, grad_clip = clean["norms"]["hidden"], clean["norms"]["tail_grad"]
    cfg = AuditConfig(model=str(tiny_llama), bundle=tiny_bundle("device").path, data=texts / "device.txt",
                      public=texts / "public.txt", attacks=("dictionary", "dictionary-cosine", "inverter", "labels"),
                      privacy=PrivacySettings(Noise(clip, 4.0), Noise(grad_clip, 8.0)), seed=0)
    defended = run_audit(cfg).recovery
    for name in ("dictionary", "dictionary-cosine", "inverter"):
        assert defended[name] < 0.2 < clean["recovery"][name], name
    assert defended["labels"] < 0.5


@pytest.mark.parametrize("kind", ["rms", "layer"])
def test_norm_jacobian_terms_match_autograd(kind):
    """J^T v in closed form (what the label attack scores every candidate with) equals autograd's VJP."""
    H = 16
    g = torch.Generator().manual_seed(0)
    if kind == "layer":
        norm = torch.nn.LayerNorm(H)
    else:
        from transformers.models.llama.modeling_llama import LlamaRMSNorm

        norm = LlamaRMSNorm(H, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(H, generator=g) + 0.5)
    x = torch.randn(5, H, generator=g) * 3 + 1
    v = torch.randn(5, H, generator=g)
    xr = x.clone().requires_grad_(True)
    want, = torch.autograd.grad((norm(xr) * v).sum(), xr)
    scale, gamma, terms = attacks.norm_jacobian_terms(norm, x)
    w = gamma * v
    got = scale[:, None] * (w - sum(a * (b * w).sum(-1, keepdim=True) * b for b, a in terms))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_label_scores_match_a_brute_force_over_candidates():
    """The batched cosine equals scoring each candidate label by its own expected gradient."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    H, V, n = 8, 12, 6
    torch.manual_seed(0)
    norm, head = LlamaRMSNorm(H, eps=1e-6), torch.nn.Linear(H, V, bias=False)
    x = torch.randn(n, H)
    y = torch.randint(0, V, (n,))

    def grad_for(labels):
        xr = x.clone().requires_grad_(True)
        loss = torch.nn.functional.cross_entropy(head(norm(xr)), labels, reduction="sum") / 7  # s = 1/7
        return torch.autograd.grad(loss, xr)[0]

    g = grad_for(y) + 1e-4 * torch.randn(n, H)  # a little noise: the argmax must still be the truth
    got = attacks._best_labels(x, g, norm, head, head.weight.detach())
    assert (got == y.numpy()).all()
    brute = np.stack([torch.nn.functional.cosine_similarity(g, grad_for(torch.full((n,), c)), dim=1).numpy()
                      for c in range(V)], axis=1).argmax(1)
    np.testing.assert_array_equal(got, brute)


def test_unknown_attack_is_refused(tiny_llama, tiny_bundle, texts):
    cfg = AuditConfig(model=str(tiny_llama), bundle=tiny_bundle("device").path, data=texts / "device.txt",
                      attacks=("dictionary", "telepathy"))
    with pytest.raises(Exception, match=r"unknown attacks \['telepathy'\]: choose from dictionary"):
        run_audit(cfg)


def test_the_inverter_needs_public_text(tiny_llama, tiny_bundle, texts):
    cfg = AuditConfig(model=str(tiny_llama), bundle=tiny_bundle("device").path, data=texts / "device.txt",
                      attacks=("inverter",))
    with pytest.raises(Exception, match="needs --public FILE"):
        run_audit(cfg)
