"""A 4-bit body (serve --body-quant nf4): it trains, and the adapter a round writes is the body's
own model when PEFT loads it onto the same 4-bit base."""

from __future__ import annotations

import subprocess

import numpy as np
import torch

from splitlm.cloud_server.body import Body, BodyConfig, quantization_config
from splitlm.edge_client.data import Dataset

from .conftest import ServerProcess, edge_cmd
from .test_split_training import BATCH, SEQ, data_dir, read_metrics, serve_args  # noqa: F401

STEPS, LR = 12, 3e-2


def four_bit_base(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="eager", dtype=torch.float32,
                                                quantization_config=quantization_config("nf4"), device_map={"": "cpu"})


def test_the_written_adapter_on_a_4bit_base_is_the_servers_model(tiny_llama, tmp_path):
    from peft import PeftModel

    torch.set_num_threads(1)
    body = Body(BodyConfig(model=str(tiny_llama), cut=2, lora_rank=4, lr=1e-2, device="cpu", quant="nf4"))
    assert any(type(m).__name__ == "Linear4bit" for m in body.arch.blocks[2].modules())
    rng = np.random.default_rng(0)
    for _ in range(3):  # move the body's LoRA (B starts at zero)
        body.step(rng.standard_normal((2, 16, body.hidden_size)).astype(np.float32), np.ones((2, 16), np.int64),
                  rng.integers(0, 300, (2, 16)))
    head = {n: rng.standard_normal(v.shape).astype(np.float32) * 0.1 for n, v in body.lora_tensors(head=True).items()}
    body.set_head_adapter(head)  # as a round end does with the devices' average
    body.save_snapshot(tmp_path, body.snapshot())

    ids = torch.from_numpy(rng.integers(0, 300, (2, 24)))
    with torch.no_grad():
        want = body.peft(input_ids=ids, labels=ids).loss.item()
        loaded = PeftModel.from_pretrained(four_bit_base(tiny_llama), tmp_path / "adapter").eval()
        got = loaded(input_ids=ids, labels=ids).loss.item()
        plain = four_bit_base(tiny_llama)(input_ids=ids, labels=ids).loss.item()
    assert abs(got - want) < 1e-5 * abs(want)
    assert abs(plain - want) > 1e-3, "the adapter should change the model"


def test_a_split_run_with_a_4bit_body_trains(tiny_llama, tiny_bundle, data_dir, tmp_path):
    from peft import PeftModel

    bundle = tiny_bundle("server")
    out = tmp_path / "out"
    server = ServerProcess(*serve_args(tiny_llama, bundle, "--steps-per-round", "6", "--lr", str(LR), "--body-quant",
                                       "nf4", "--out", str(out)))
    try:
        metrics = tmp_path / "m.jsonl"
        r = subprocess.run(edge_cmd(server.url, bundle.path, data_dir / "client-0.jsonl", "--steps", str(STEPS),
                                    "--batch-size", str(BATCH), "--seq-len", str(SEQ), "--lr", str(LR),
                                    "--threads", "1", "--metrics-out", str(metrics)),
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stdout + r.stderr
    finally:
        server.stop()
    losses = [row["loss"] for row in read_metrics(metrics)]
    assert len(losses) == STEPS and np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.2, losses
    first = Dataset.from_file(data_dir / "client-0.jsonl", bundle, seq_len=SEQ, batch_size=BATCH, seed=0).batch(0)
    with torch.no_grad():  # the last round's adapter, on the 4-bit base, has learned the first batch too
        model = PeftModel.from_pretrained(four_bit_base(tiny_llama), out / "round-0001" / "adapter").eval()
        after = model(input_ids=torch.from_numpy(first.input_ids), attention_mask=torch.from_numpy(first.attention_mask),
                      labels=torch.from_numpy(first.labels)).loss.item()
    assert after < losses[0] - 0.2, (after, losses[0])
