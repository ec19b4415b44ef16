"""Devices' body steps as one batch: each device gets what it would get alone, and the optimizer
does exactly what its semantics say (one AdamW step per device, or one on the mean)."""

from __future__ import annotations

import subprocess

import numpy as np
import pytest
import torch

from splitlm.cloud_server.batching import StepInput
from splitlm.cloud_server.body import Body, BodyConfig
from splitlm.edge_client.data import Dataset

from .conftest import ServerProcess, edge_cmd
from .test_split_training import BATCH, LR, SEQ, centralized_losses, data_dir, read_metrics, serve_args  # noqa: F401

STEPS = 10  # per device, two rounds


def device_steps(hidden_size: int) -> list[StepInput]:
    """Three devices: different batch sizes and lengths, one with its own right padding."""
    rng = np.random.default_rng(1)
    steps = []
    for b, t, pad in ((2, 12, 0), (1, 20, 0), (3, 7, 3)):
        mask = np.ones((b, t), np.int64)
        mask[:, t - pad:] = 0
        steps.append(StepInput(hidden=rng.standard_normal((b, t, hidden_size)).astype(np.float32), mask=mask,
                               labels=rng.integers(0, 300, (b, t))))
    return steps


def alone(body: Body, steps: list[StepInput]) -> tuple[list[float], list[np.ndarray], list[list[torch.Tensor]]]:
    """Each step on its own at the body's current weights: loss, dL/dh_K and the parameter gradients
    (the body is put back after each)."""
    start = body.training_state()
    losses, grads, param_grads = [], [], []
    for s in steps:
        loss, grad = body.step(s.hidden, s.mask, s.labels)
        losses.append(loss)
        grads.append(grad)
        param_grads.append([p.grad.clone() for p in body.optimizer.param_groups[0]["params"]])
        body.load_training_state(start)
    return losses, grads, param_grads


def trained(body: Body) -> list[torch.Tensor]:
    return [p.detach().clone() for p in body.optimizer.param_groups[0]["params"]]


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def body(request, tiny_llama, tiny_gpt2):
    torch.set_num_threads(1)
    model = {"llama": tiny_llama, "gpt2": tiny_gpt2}[request.param]
    b = Body(BodyConfig(model=str(model), cut=2, lora_rank=4, lr=1e-2, device="cpu"))
    first = device_steps(b.hidden_size)[0]
    b.step(first.hidden, first.mask, first.labels)  # AdamW has state: the next steps are not its first
    return b


@pytest.mark.parametrize("per_device", [True, False], ids=["per-device", "per-batch"])
def test_a_batch_equals_its_steps_one_by_one(body, per_device):
    steps = device_steps(body.hidden_size)
    start = body.training_state()
    want_losses, want_grads, param_grads = alone(body, steps)
    params = body.optimizer.param_groups[0]["params"]
    for grads in (param_grads if per_device else [[sum(g) / len(steps) for g in zip(*param_grads)]]):
        for p, g in zip(params, grads):
            p.grad = g
        body.optimizer.step()  # per-device: one AdamW step per device; per-batch: one on the mean
    want_params = trained(body)
    body.load_training_state(start)

    got = body.step_batch(steps, per_device=per_device)
    np.testing.assert_allclose([loss for loss, _ in got], want_losses, rtol=1e-5)
    for (_, grad), want, s in zip(got, want_grads, steps):
        assert grad.shape == s.hidden.shape
        np.testing.assert_allclose(grad, want, rtol=1e-4, atol=1e-7)
    for p, want in zip(trained(body), want_params):
        torch.testing.assert_close(p, want, rtol=1e-4, atol=1e-7)
    assert any(not torch.equal(p, q) for p, q in zip(want_params, (start[f"body.{n}"] for n in body._trained_names())))
    body.load_training_state(start)


def test_two_identical_devices_batched_per_batch_train_as_one_alone(tiny_llama, tiny_bundle, data_dir, tmp_path):
    """Two devices with the same data in lockstep, one batch per step, one AdamW step on the mean of two equal
    gradients: each device's losses are those of a single device alone (= a centralized fine-tune)."""
    bundle = tiny_bundle("server")
    server = ServerProcess(*serve_args(tiny_llama, bundle, "--steps-per-round", "5", "--batch-wait-ms", "60000",
                                       "--batch-max-devices", "2", "--batch-optimizer", "per-batch", "--min-clients", "2"))
    metrics = [tmp_path / f"m{i}.jsonl" for i in range(2)]
    try:
        edges = [subprocess.Popen(edge_cmd(server.url, bundle.path, data_dir / "client-0.jsonl", "--steps", str(STEPS),
                                           "--batch-size", str(BATCH), "--seq-len", str(SEQ), "--lr", str(LR),
                                           "--threads", "1", "--client-id", f"twin-{i}", "--metrics-out", str(m)),
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i, m in enumerate(metrics)]
        for e in edges:
            out, _ = e.communicate(timeout=300)
            assert e.returncode == 0, out
    finally:
        server.stop()
    data = Dataset.from_file(data_dir / "client-0.jsonl", bundle, seq_len=SEQ, batch_size=BATCH, seed=0)
    central = centralized_losses(tiny_llama, bundle, data, steps=STEPS)
    for m in metrics:
        np.testing.assert_allclose([row["loss"] for row in read_metrics(m)], central, rtol=1e-3)
