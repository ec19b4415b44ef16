"""The result goes home: each round's adapter is a standard PEFT adapter for the whole model."""

from __future__ import annotations

import json
import subprocess

import pytest

from splitlm.demo import write_ledger_data
from splitlm.edge_client.data import Dataset, read_examples

from .conftest import ServerProcess, edge_cmd, run_cli
from .test_split_training import read_metrics

ROUND, BATCH, SEQ = 3, 2, 32


@pytest.fixture(scope="module", params=["server", "device"])
def trained(request, tiny_llama, tiny_bundle, tmp_path_factory):
    """ROUND steps, a round end (adapter written), then one more step with the averaged adapter."""
    bundle = tiny_bundle(request.param)
    work = tmp_path_factory.mktemp(f"trained-{request.param}")
    write_ledger_data(work, clients=1, per_client=20, held_out=4)
    server = ServerProcess(str(tiny_llama), "--cut", "2", "--labels", request.param, "--lora-rank", "4",
                           "--lr", "1e-2", "--wire", "f32", "--steps-per-round", str(ROUND), "--out", str(work / "out"))
    try:
        r = subprocess.run(edge_cmd(server.url, bundle.path, work / "client-0.jsonl", "--steps", str(ROUND + 1),
                                    "--batch-size", str(BATCH), "--seq-len", str(SEQ), "--lr", "1e-2",
                                    "--metrics-out", str(work / "m.jsonl")), capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stdout + r.stderr
    finally:
        server.stop()
    return tiny_llama, bundle, work


def test_eval_with_the_written_adapter_equals_the_split_loss(trained):
    model, bundle, work = trained
    examples = read_examples(work / "client-0.jsonl")
    data = Dataset.from_file(work / "client-0.jsonl", bundle, seq_len=SEQ, batch_size=BATCH)
    batch_file = work / "batch.jsonl"  # exactly the examples of the step after the round, in order
    batch_file.write_text("".join(json.dumps(vars(examples[i])) + "\n" for i in data.indices(ROUND)))
    r = run_cli("eval", str(model), "--adapter", str(work / "out" / "round-0000" / "adapter"),
                "--data", str(batch_file), "--seq-len", str(SEQ), "--batch-size", str(BATCH), "--json")
    assert r.returncode == 0, r.stderr
    evaluated = json.loads(r.stdout.strip().splitlines()[-1])["loss"]
    split = read_metrics(work / "m.jsonl")[ROUND]["loss"]
    assert abs(evaluated - split) / split < 1e-3, (evaluated, split)


def test_the_adapter_merges_into_a_plain_model_that_saves(trained, tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model, _, work = trained
    adapter = work / "out" / "round-0000" / "adapter"
    assert {p.name for p in adapter.iterdir()} >= {"adapter_config.json", "adapter_model.safetensors"}
    base = AutoModelForCausalLM.from_pretrained(model)
    ids = torch.tensor([[5, 17, 42, 7, 99]])
    with torch.no_grad():
        before = base(ids).logits
        peft = PeftModel.from_pretrained(base, adapter)
        adapted = peft(ids).logits
        merged = peft.merge_and_unload()
        merged.save_pretrained(tmp_path / "merged")
        reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")(ids).logits
    assert (adapted - before).abs().max() > 1e-3, "the adapter changes the model"
    torch.testing.assert_close(reloaded, adapted, rtol=1e-4, atol=1e-4)


def test_eval_reports_exact_match_on_prompt_completion_data(trained):
    model, _, work = trained
    r = run_cli("eval", str(model), "--data", str(work / "eval.jsonl"), "--json")
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert result["examples"] == 4 and 0.0 <= result["exact_match"] <= 1.0
    assert result["perplexity"] == pytest.approx(2.718281828 ** result["loss"], rel=1e-9)
