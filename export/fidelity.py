"""How faithful a bundle's head is to the PyTorch model it came from.

    head cosine / max-abs   head.onnx (LoRA at zero) vs Hugging Face hidden_states[K], per token
    perplexity              the unsplit model vs this bundle's head in onnxruntime + the rest in PyTorch
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from splitlm.data import encode, load_tokenizer
from splitlm.manifest import Bundle

from .arch import Arch
from .graphs import causal_lm_loss

SAMPLE_TEXT = (
    "The lighthouse keeper climbed the spiral stairs every evening at dusk, carrying a lantern "
    "and a small notebook in which he recorded the weather, the ships that passed, and the "
    "birds that rested on the railing. Over forty years the notebooks filled a whole shelf."
)
PPL_WINDOW = 512


@dataclass(frozen=True)
class Fidelity:
    sizes_mb: dict[str, float]
    cosine_min: float
    cosine_mean: float
    max_abs: float
    ppl_model: float | None = None
    ppl_bundle: float | None = None

    @property
    def ppl_increase(self) -> float | None:
        if self.ppl_model is None:
            return None
        return self.ppl_bundle / self.ppl_model - 1.0

    def lines(self) -> list[str]:
        out = [f"  {name:15s} {mb:8.1f} MB" for name, mb in self.sizes_mb.items()]
        out.append(f"  head vs PyTorch: cosine min {self.cosine_min:.6f} mean {self.cosine_mean:.6f}, "
                   f"max |diff| {self.max_abs:.3g}")
        if self.ppl_model is not None:
            out.append(f"  perplexity: model {self.ppl_model:.3f}, with this head {self.ppl_bundle:.3f} "
                       f"({100 * self.ppl_increase:+.2f} %)")
        return out


class OnnxHead:
    """head.onnx in onnxruntime, with every LoRA tensor fed as zeros unless given."""

    def __init__(self, bundle: Bundle):
        self.session = ort.InferenceSession(str(bundle.file("head.onnx")), providers=["CPUExecutionProvider"])
        self.zeros = {n: np.zeros(s, np.float32) for n, s in bundle.manifest.lora.tensors.items()}

    def __call__(self, input_ids: np.ndarray, attention_mask: np.ndarray, loras=None) -> np.ndarray:
        feeds = {"input_ids": input_ids.astype(np.int64), "attention_mask": attention_mask.astype(np.int64)}
        feeds.update(loras or self.zeros)
        return self.session.run(["hidden"], feeds)[0]  # (B, T, H)


def per_token_cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.reshape(-1, a.shape[-1]).astype(np.float64), b.reshape(-1, b.shape[-1]).astype(np.float64)
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1) + 1e-30)


def tokenize(bundle: Bundle, texts: list[str]) -> list[np.ndarray]:
    """Token ids as the device makes them (no special tokens added)."""
    tokenizer = load_tokenizer(bundle.file("tokenizer.json"))
    return [np.asarray(ids, dtype=np.int64) for ids in encode(tokenizer, texts)]


@torch.no_grad()
def head_agreement(bundle: Bundle, head: OnnxHead, model: torch.nn.Module, ids: np.ndarray) -> tuple[float, float, float]:
    """(min cosine, mean cosine, max abs diff) of head.onnx vs hidden_states[K], per token."""
    ids = ids[None, : bundle.manifest.max_length]  # (1, T)
    mask = np.ones_like(ids)
    ref = model(torch.from_numpy(ids), output_hidden_states=True).hidden_states[bundle.manifest.cut].numpy()
    got = head(ids, mask)
    cos = per_token_cosine(got, ref)
    return float(cos.min()), float(cos.mean()), float(np.abs(got - ref).max())


@torch.no_grad()
def perplexities(bundle: Bundle, head: OnnxHead, model: torch.nn.Module, ids: np.ndarray) -> tuple[float, float]:
    """Perplexity of the unsplit model, and of this bundle's head + the PyTorch rest, over `ids`."""
    arch, cut = Arch.of(model), bundle.manifest.cut
    window = min(PPL_WINDOW, bundle.manifest.max_length)
    nll_model = nll_bundle = 0.0
    count = 0
    for start in range(0, len(ids) - 1, window):
        chunk = ids[None, start:start + window]  # (1, T)
        if chunk.shape[1] < 3:
            break
        mask = torch.ones(chunk.shape, dtype=torch.int64)
        labels = torch.from_numpy(chunk)
        n = chunk.shape[1] - 1
        nll_model += n * float(causal_lm_loss(model(labels).logits, labels, mask))
        h = torch.from_numpy(head(chunk, mask.numpy()))
        h_n = arch.run_blocks(h, mask, cut, arch.num_layers)
        nll_bundle += n * float(causal_lm_loss(arch.logits(h_n), labels, mask))
        count += n
    return math.exp(nll_model / count), math.exp(nll_bundle / count)


def fidelity_report(bundle_dir: Path, model: torch.nn.Module, *, eval_text: str | None = None) -> Fidelity:
    bundle = Bundle.open(bundle_dir)
    sizes = {name: bundle.file(name).stat().st_size / 1e6 for name in bundle.manifest.files if name.endswith(".onnx")}
    head = OnnxHead(bundle)  # one session: the head's weights are loaded once
    sample, *evaluated = tokenize(bundle, [SAMPLE_TEXT, *([eval_text] if eval_text else [])])
    cmin, cmean, max_abs = head_agreement(bundle, head, model, sample)
    ppl = perplexities(bundle, head, model, evaluated[0]) if evaluated else (None, None)
    return Fidelity(sizes, cmin, cmean, max_abs, *ppl)
