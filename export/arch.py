"""What splitlm knows about each supported architecture, and nothing more.

An `Arch` names the pieces of a Hugging Face causal LM that a cut needs: the embedding, the
decoder blocks, the final norm and the LM head, plus how to call one block with an explicit
attention mask. Export (the head) and the server (the body) both cut models through it, so a
block sees exactly the same inputs on the device and in the cloud.

Supported: the Llama family (llama, mistral, qwen2 — rotary positions, `model.layers`) and
GPT-2 (`transformer.h`, learned positions).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from splitlm.errors import ExportError

LLAMA_FAMILY = ("llama", "mistral", "qwen2")
SUPPORTED = LLAMA_FAMILY + ("gpt2",)
# Linear layers a LoRA may target, per family (module names inside one block).
LORA_TARGETS = {
    "llama": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
              "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"),
    "gpt2": ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"),
}
DEFAULT_TARGETS = {"llama": ("self_attn.q_proj", "self_attn.v_proj"), "gpt2": ("attn.c_attn",)}


def family_of(model_type: str) -> str:
    if model_type in LLAMA_FAMILY:
        return "llama"
    if model_type == "gpt2":
        return "gpt2"
    raise ExportError(
        f"unsupported architecture {model_type!r}: splitlm supports {', '.join(SUPPORTED)}"
    )


def causal_mask(attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, T) 1/0 key mask -> (B, 1, T, T) additive mask: causal and key padding.

    Right padding only: a padded query row still sees position 0, so softmax stays finite.
    """
    t = attention_mask.shape[1]
    pos = torch.arange(t, device=attention_mask.device)
    causal = pos[None, :] <= pos[:, None]  # (T, T): key <= query
    allowed = causal[None, None, :, :] & attention_mask[:, None, None, :].bool()  # (B,1,T,T)
    zero = torch.zeros((), dtype=dtype)
    return torch.where(allowed, zero, torch.full((), torch.finfo(dtype).min, dtype=dtype))


@dataclass(frozen=True)
class Arch:
    """The named pieces of one loaded model. Build with `Arch.of(model)`."""

    family: str
    model: nn.Module
    blocks: nn.ModuleList
    block_prefix: str  # module path of block i is f"{block_prefix}.{i}"
    final_norm: nn.Module
    lm_head: nn.Module
    _embed: Callable[[torch.Tensor], torch.Tensor]
    _rotary: nn.Module | None

    @staticmethod
    def of(model: nn.Module) -> "Arch":
        family = family_of(model.config.model_type)
        model.config._attn_implementation = "eager"  # plain matmul attention: exports, and matches HF eager
        if family == "llama":
            base = model.model
            return Arch(family, model, base.layers, "model.layers", base.norm, model.lm_head,
                        base.embed_tokens, base.rotary_emb)
        base = model.transformer

        def embed(ids: torch.Tensor) -> torch.Tensor:
            pos = torch.arange(ids.shape[1], device=ids.device)[None, :]
            return base.wte(ids) + base.wpe(pos)

        return Arch(family, model, base.h, "transformer.h", base.ln_f, model.lm_head, embed, None)

    @property
    def num_layers(self) -> int:
        return len(self.blocks)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self._embed(input_ids)  # (B, T, H)

    def run_blocks(self, h: torch.Tensor, attention_mask: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """Blocks [start, stop) over h (B, T, H) with a (B, T) key mask."""
        mask = causal_mask(attention_mask, h.dtype)  # (B, 1, T, T)
        kwargs: dict = {"attention_mask": mask}
        if self._rotary is not None:
            pos = torch.arange(h.shape[1], device=h.device)[None, :]
            kwargs["position_embeddings"] = self._rotary(h, pos)
            kwargs["position_ids"] = pos
        for block in self.blocks[start:stop]:
            out = block(h, **kwargs)
            h = out[0] if isinstance(out, tuple) else out
        return h

    def logits(self, h_n: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.final_norm(h_n))  # (B, T, V)

    def target_modules(self, layers: range, targets: tuple[str, ...]) -> dict[str, nn.Module]:
        """Full HF module name -> module, for every LoRA target in the given blocks."""
        known = LORA_TARGETS[self.family]
        unknown = [t for t in targets if t not in known]
        if unknown:
            raise ExportError(f"unknown LoRA targets {unknown} for {self.family}: choose from {list(known)}")
        return {f"{self.block_prefix}.{i}.{t}": self.blocks[i].get_submodule(t)
                for i in layers for t in targets}
