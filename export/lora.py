"""LoRA whose tensors are function inputs, not parameters.

The device trains its adapters in numpy, so the exported graphs take every LoRA tensor as an
input: one bundle serves every round. `LoRAInputs` wraps the target modules of a model; while
`bind(tensors)` is active, each target computes the PEFT formula

    base(x) + (x @ A.T @ B.T) * alpha / r           # A: (r, in), B: (out, r)

with A and B taken from the bound dict. Tensor names are the Hugging Face module path plus
`.lora_A` / `.lora_B`, so they map one to one onto a PEFT adapter of the same model.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn


@dataclass(frozen=True)
class LoRASpec:
    rank: int
    alpha: float
    targets: tuple[str, ...]  # module names inside one block, e.g. "self_attn.q_proj"

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


def io_features(module: nn.Module) -> tuple[int, int]:
    """(in, out) of an nn.Linear or a GPT-2 Conv1D (whose weight is stored (in, out))."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    in_f, out_f = module.weight.shape  # transformers' Conv1D
    return in_f, out_f


class _Slot:
    tensors: dict[str, torch.Tensor] | None = None


class _LoRATarget(nn.Module):
    def __init__(self, base: nn.Module, name: str, slot: _Slot, scaling: float):
        super().__init__()
        self.base, self.name, self.slot, self.scaling = base, name, slot, scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        if self.slot.tensors is None:
            return out
        a = self.slot.tensors[f"{self.name}.lora_A"]  # (r, in)
        b = self.slot.tensors[f"{self.name}.lora_B"]  # (out, r)
        return out + (x @ a.t() @ b.t()) * self.scaling


class LoRAInputs:
    """Wraps `modules` (full name -> module) of `root` in place."""

    def __init__(self, root: nn.Module, modules: dict[str, nn.Module], spec: LoRASpec):
        self.spec = spec
        self._slot = _Slot()
        self.shapes: dict[str, tuple[int, int]] = {}
        for name, module in modules.items():
            in_f, out_f = io_features(module)
            self.shapes[f"{name}.lora_A"] = (spec.rank, in_f)
            self.shapes[f"{name}.lora_B"] = (out_f, spec.rank)
            parent_name, _, child = name.rpartition(".")
            root.get_submodule(parent_name).register_module(
                child, _LoRATarget(module, name, self._slot, spec.scaling))

    @property
    def names(self) -> list[str]:
        return list(self.shapes)

    @contextlib.contextmanager
    def bind(self, tensors: dict[str, torch.Tensor]):
        self._slot.tensors = tensors
        try:
            yield
        finally:
            self._slot.tensors = None

    def init(self, seed: int) -> dict[str, np.ndarray]:
        """PEFT's default init: A ~ kaiming-uniform(a=sqrt(5)) = U(-1/sqrt(in), 1/sqrt(in)), B = 0."""
        rng = np.random.default_rng(seed)
        out = {}
        for name, shape in self.shapes.items():
            if name.endswith(".lora_A"):
                bound = 1.0 / math.sqrt(shape[1])
                out[name] = rng.uniform(-bound, bound, size=shape).astype(np.float32)
            else:
                out[name] = np.zeros(shape, np.float32)
        return out

    def zeros(self) -> dict[str, np.ndarray]:
        return {n: np.zeros(s, np.float32) for n, s in self.shapes.items()}
