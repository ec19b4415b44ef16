"""Shared fixtures: tiny randomly initialised Hugging Face model folders built in code.

Each folder is what a user would hand to `splitlm export`: config.json, safetensors weights and a
fast tokenizer (a byte-level BPE trained here on a few sentences).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

TEXT = [
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "A lighthouse keeper wrote the weather into his notebook every evening.",
    "Split learning keeps private text on the device and sends only activations.",
    "Gradients come back from the server and update the adapters on the device.",
    "Numbers such as 12, 345 and 6789 appear in the text too.",
]
VOCAB = 320


def build_tokenizer(out: Path):
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(TEXT * 4, vocab_size=VOCAB, special_tokens=["<|endoftext|>"], show_progress=False)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>",
                                  pad_token="<|endoftext|>", bos_token="<|endoftext|>")
    tok.save_pretrained(out)
    return tok


def build_tiny_model(family: str, out: Path, *, layers: int = 4, seed: int = 0) -> Path:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    if family == "llama":
        cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                          tie_word_embeddings=True, pad_token_id=0)
        model = LlamaForCausalLM(cfg)
    else:
        cfg = GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=layers, n_head=4, n_positions=512,
                         bos_token_id=0, eos_token_id=0)
        model = GPT2LMHeadModel(cfg)
    model.save_pretrained(out)
    build_tokenizer(out)
    return out


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    return build_tiny_model("llama", tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory) -> Path:
    return build_tiny_model("gpt2", tmp_path_factory.mktemp("tiny-gpt2"))


@pytest.fixture(scope="session", params=["llama", "gpt2"])
def tiny_model(request, tiny_llama, tiny_gpt2) -> Path:
    return {"llama": tiny_llama, "gpt2": tiny_gpt2}[request.param]


def run_cli(*args: str, env: dict | None = None, timeout: float = 600, **kw) -> subprocess.CompletedProcess:
    """`splitlm ARGS` as a real subprocess."""
    return subprocess.run([sys.executable, "-m", "splitlm.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})}, **kw)


@pytest.fixture(scope="session")
def tiny_bundle(tiny_llama, tiny_gpt2, tmp_path_factory):
    """`tiny_bundle(labels, family="llama")`: an fp32 bundle cut at 2, LoRA rank 4, made once a session."""
    from splitlm.export.bundle import ExportOptions, export_bundle
    from splitlm.manifest import Bundle

    made: dict[tuple[str, str], Bundle] = {}

    def get(labels: str, family: str = "llama") -> Bundle:
        if (labels, family) not in made:
            out = tmp_path_factory.mktemp("bundle") / f"{family}-{labels}"
            model = {"llama": tiny_llama, "gpt2": tiny_gpt2}[family]
            export_bundle(str(model), out, ExportOptions(cut=2, quant="fp32", labels=labels, lora_rank=4,
                                                         max_length=128), log=lambda *_: None)
            made[labels, family] = Bundle.open(out)
        return made[labels, family]
    return get


@pytest.fixture(scope="session")
def tiny_whole_bundle(tiny_llama, tmp_path_factory):
    """`tiny_whole_bundle(mode, train)`: a whole-model (fedavg / distill) fp32 bundle of tiny_llama,
    LoRA rank 4, top-k 8, exported once a session through the CLI (the slow export, shared); the
    distill bundle's train.onnx comes from the fedavg one (`--graphs-from`)."""
    from splitlm.manifest import Bundle

    made: dict[tuple[str, str], Bundle] = {}

    def get(mode: str, train: str = "lora") -> Bundle:
        if (mode, train) not in made:
            out = tmp_path_factory.mktemp("whole") / f"{mode}-{train}"
            # distill takes train.onnx from the fedavg bundle, as `splitlm compare` exports it
            reuse = ["--graphs-from", str(get("fedavg", train).path)] if mode == "distill" else []
            r = run_cli("export", str(tiny_llama), "--mode", mode, "--train", train, "--quant", "fp32", "--out",
                        str(out), "--lora-rank", "4", "--max-length", "128", "--topk", "8", *reuse)
            assert r.returncode == 0, r.stderr
            made[mode, train] = Bundle.open(out)
        return made[mode, train]
    return get


@pytest.fixture(scope="session")
def smollm2() -> Path:
    """The real default model folder (materialized from the GGUF on first use)."""
    from splitlm.export.default_model import default_model_dir

    return default_model_dir()


class ServerProcess:
    """`splitlm serve ... --port 0` as a real subprocess; `.url` once it listens; `.lines` its log."""

    def __init__(self, *args: str, timeout: float = 120, wait: bool = True):
        self.lines: list[str] = []
        self.proc = subprocess.Popen([sys.executable, "-m", "splitlm.cli", "serve", *args, "--port", "0", "--threads", "1"],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.url = None
        if wait:
            self.wait_listening(timeout)

    @classmethod
    def many(cls, *arg_lists: list[str], timeout: float = 120) -> list["ServerProcess"]:
        """Several servers started at once (replicas wait for each other before they listen)."""
        servers = [cls(*args, wait=False) for args in arg_lists]
        for s in servers:
            s.wait_listening(timeout)
        return servers

    def wait_listening(self, timeout: float) -> None:
        import re
        import threading
        import time

        deadline = time.monotonic() + timeout
        for line in self.proc.stdout:
            self.lines.append(line)
            match = re.search(r"listening on (wss?://\S+)", line)
            if match:
                self.url = match.group(1)
                break
            if time.monotonic() > deadline:
                break
        if self.url is None:
            self.proc.kill()
            raise RuntimeError("server did not start:\n" + "".join(self.lines))
        threading.Thread(target=lambda: self.lines.extend(self.proc.stdout), daemon=True).start()

    def stop(self) -> int:
        self.proc.terminate()
        return self.proc.wait(timeout=60)

    def log(self) -> str:
        return "".join(self.lines)


def edge_cmd(url: str, bundle, data, *extra: str) -> list[str]:
    return [sys.executable, "-m", "splitlm.cli", "edge", url, "--bundle", str(bundle), "--data", str(data), *extra]
