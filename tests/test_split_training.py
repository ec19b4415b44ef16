"""Split training end to end: a real server process, real edge-client processes, real sockets."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest
import torch

from splitlm.demo import write_ledger_data
from splitlm.edge_client.data import Dataset
from splitlm.manifest import Bundle

from .conftest import ServerProcess, edge_cmd

STEPS, LR, BATCH, SEQ = 20, 1e-2, 2, 32


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data")
    write_ledger_data(folder, clients=2, per_client=40, held_out=10)
    return folder


@pytest.fixture(scope="module", params=["server", "device"])
def split_setup(request, tiny_llama, tiny_bundle):
    return tiny_llama, tiny_bundle(request.param)


def serve_args(model, bundle: Bundle, *extra: str) -> list[str]:
    m = bundle.manifest
    return [str(model), "--cut", str(m.cut), "--labels", m.labels, "--lora-rank", str(m.lora.rank),
            "--lr", str(LR), "--wire", "f32", *extra]


def read_metrics(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def centralized_losses(model_dir, bundle: Bundle, data: Dataset, *, steps: int, seed: int = 0,
                       lr: float = LR) -> list[float]:
    """The same fine-tune in one PyTorch process: PEFT LoRA on every block, torch AdamW, same data order."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    m = bundle.manifest
    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="eager").eval()
    torch.manual_seed(seed)  # as the server seeds the body's LoRA init
    peft = get_peft_model(model, LoraConfig(r=m.lora.rank, lora_alpha=m.lora.alpha, lora_dropout=0.0,
                                            target_modules=list(m.lora.targets)))
    params = dict(peft.named_parameters())
    with torch.no_grad():
        for name, value in bundle.lora_init().items():  # the head starts where the device starts
            module, _, which = name.rpartition(".")
            params[f"base_model.model.{module}.{which}.default.weight"].copy_(torch.from_numpy(value))
    optim = torch.optim.AdamW([p for n, p in params.items() if "lora_" in n], lr=lr, weight_decay=0.0)
    losses = []
    for step in range(steps):
        b = data.batch(step)
        loss = peft(input_ids=torch.from_numpy(b.input_ids), attention_mask=torch.from_numpy(b.attention_mask),
                    labels=torch.from_numpy(b.labels)).loss
        optim.zero_grad()
        loss.backward()
        optim.step()
        losses.append(loss.item())
    return losses


def test_one_client_matches_a_centralized_fine_tune(split_setup, data_dir, tmp_path):
    model, bundle = split_setup
    server = ServerProcess(*serve_args(model, bundle, "--steps-per-round", "10", "--out", str(tmp_path / "out")))
    try:
        metrics = tmp_path / "m.jsonl"
        r = subprocess.run(edge_cmd(server.url, bundle.path, data_dir / "client-0.jsonl", "--steps", str(STEPS),
                                    "--batch-size", str(BATCH), "--seq-len", str(SEQ), "--lr", str(LR),
                                    "--metrics-out", str(metrics)), capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stdout + r.stderr
    finally:
        server.stop()
    split = [row["loss"] for row in read_metrics(metrics)]
    data = Dataset.from_file(data_dir / "client-0.jsonl", bundle, seq_len=SEQ, batch_size=BATCH, seed=0)
    central = centralized_losses(model, bundle, data, steps=STEPS)
    assert len(split) == STEPS
    np.testing.assert_allclose(split, central, rtol=1e-3)
    assert central[-1] < central[0] - 0.1, "the fine-tune should visibly learn in 20 steps"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["round-0000", "round-0001",
                                                                    "server-state.safetensors", "steps.jsonl"]
