"""edge_client.optim: the numpy AdamW against torch.optim.AdamW, and its saved state."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from splitlm.edge_client.optim import AdamW

SHAPES = {"a.lora_A": (4, 64), "a.lora_B": (64, 4), "b.lora_A": (4, 32)}


def params_and_grads(steps: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    params = {n: rng.standard_normal(s).astype(np.float32) for n, s in SHAPES.items()}
    # Gradients of very different scales per step, as LoRA gradients have.
    grads = [{n: (rng.standard_normal(s) * 10.0 ** rng.integers(-4, 1)).astype(np.float32)
              for n, s in SHAPES.items()} for _ in range(steps)]
    return params, grads


def run_numpy(params, grads, **hyper):
    params = {n: p.copy() for n, p in params.items()}
    opt = AdamW(**hyper)
    for g in grads:
        opt.step(params, g)
    return params


def run_torch(params, grads, **hyper):
    tensors = {n: torch.tensor(p, requires_grad=True) for n, p in params.items()}
    opt = torch.optim.AdamW(list(tensors.values()), **hyper)
    for g in grads:
        for n, t in tensors.items():
            t.grad = torch.tensor(g[n])
        opt.step()
    return {n: t.detach().numpy() for n, t in tensors.items()}


@pytest.mark.parametrize("hyper", [
    {"lr": 1e-3, "weight_decay": 0.0},
    {"lr": 1e-2, "weight_decay": 0.01},
    {"lr": 3e-3, "betas": (0.8, 0.99), "eps": 1e-6, "weight_decay": 0.1},
])
def test_adamw_matches_torch_over_ten_steps(hyper):
    params, grads = params_and_grads(10)
    ours, theirs = run_numpy(params, grads, **hyper), run_torch(params, grads, **hyper)
    for n in SHAPES:
        np.testing.assert_allclose(ours[n], theirs[n], rtol=1e-6, atol=1e-7)
        assert not np.allclose(ours[n], params[n])  # it did move


def test_the_default_has_no_weight_decay_like_the_server():
    params, grads = params_and_grads(3)
    ours = run_numpy(params, grads, lr=1e-2)
    theirs = run_torch(params, grads, lr=1e-2, weight_decay=0.0)
    for n in SHAPES:
        np.testing.assert_allclose(ours[n], theirs[n], rtol=1e-6, atol=1e-7)


def test_step_updates_the_arrays_in_place():
    params, grads = params_and_grads(1)
    before = params["a.lora_A"]
    AdamW(lr=1e-2).step(params, grads[0])
    assert params["a.lora_A"] is before and params["a.lora_A"].dtype == np.float32


def test_state_saved_with_savez_resumes_exactly(tmp_path):
    params, grads = params_and_grads(10)
    straight = run_numpy(params, grads, lr=1e-2, weight_decay=0.01)

    resumed = {n: p.copy() for n, p in params.items()}
    opt = AdamW(lr=1e-2, weight_decay=0.01)
    for g in grads[:4]:
        opt.step(resumed, g)
    np.savez(tmp_path / "optim.npz", **opt.state_dict())
    opt = AdamW(lr=1e-2, weight_decay=0.01)
    with np.load(tmp_path / "optim.npz", allow_pickle=False) as z:
        opt.load_state_dict(z)
    assert opt.t == 4
    for g in grads[4:]:
        opt.step(resumed, g)
    for n in SHAPES:
        np.testing.assert_array_equal(resumed[n], straight[n])


def test_state_dict_is_plain_arrays_by_name():
    params, grads = params_and_grads(1)
    opt = AdamW()
    opt.step(params, grads[0])
    state = opt.state_dict()
    assert set(state) == {"step", *(f"exp_avg.{n}" for n in SHAPES), *(f"exp_avg_sq.{n}" for n in SHAPES)}
    assert all(isinstance(v, np.ndarray) for v in state.values())


def test_a_missing_or_misshapen_gradient_is_refused():
    params, grads = params_and_grads(1)
    with pytest.raises(KeyError, match="no gradient for"):
        AdamW().step(params, {n: g for n, g in grads[0].items() if n != "b.lora_A"})
    with pytest.raises(ValueError, match="gradient of a.lora_A has shape"):
        AdamW().step(params, {**grads[0], "a.lora_A": np.zeros((64, 4), np.float32)})
