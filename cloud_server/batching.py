"""Several devices' body steps as one batch: packing, unpacking, and per-device LoRA gradients.

Steps from different devices differ in batch size B_i and length T_i. `pack` stacks them along the
batch axis, padded on the right to the longest T (mask 0, so the padding is attended by nobody and
scored by nothing); row range `rows[i]` is device i's. `Body.step_batch` then computes each
device's loss over its own rows only and backpropagates their SUM: the rows of dL/dh_K that device
i gets back are dL_i/dh_K, exactly what it would get alone at the same weights (the losses share no
term). What the optimizer does with the batch is a choice (`serve --batch-optimizer`):

- `per-batch`: one AdamW step on the mean of the devices' gradients (each device's loss is its own
  token mean, so every device weighs the same). N devices in a batch make one optimizer step, not N.
- `per-device`: one AdamW step per device, in arrival order, each on that device's own gradient,
  as sequential steps would be; but every gradient in a batch is taken at the weights the batch
  started from (the k-th device of a batch is up to k-1 updates stale, as in asynchronous SGD).
  With one device per batch it is exactly the sequential server. LoRA bodies only: the per-device
  gradient of each LoRA matrix is recovered from its inputs and output gradients in the one
  backward pass (`PerDeviceGrads`, the trick Opacus uses for per-sample gradients).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn


@dataclass(frozen=True)
class StepInput:
    """One device's labels-at-server step."""
    hidden: np.ndarray   # (B_i, T_i, H) float32
    mask: np.ndarray     # (B_i, T_i) 0/1
    labels: np.ndarray   # (B_i, T_i) token ids


@dataclass(frozen=True)
class Packed:
    hidden: np.ndarray               # (sum B_i, T_max, H), zero on padding
    mask: np.ndarray                 # (sum B_i, T_max), 0 on padding
    labels: np.ndarray               # (sum B_i, T_max)
    rows: tuple[tuple[int, int], ...]  # device i owns rows[i][0]:rows[i][1]
    lengths: tuple[int, ...]         # T_i


def pack(steps: Sequence[StepInput]) -> Packed:
    t_max = max(s.hidden.shape[1] for s in steps)
    n = sum(s.hidden.shape[0] for s in steps)
    hidden = np.zeros((n, t_max, steps[0].hidden.shape[2]), np.float32)
    mask = np.zeros((n, t_max), np.int64)
    labels = np.zeros((n, t_max), np.int64)
    rows, start = [], 0
    for s in steps:
        b, t = s.hidden.shape[:2]
        hidden[start:start + b, :t] = s.hidden
        mask[start:start + b, :t] = s.mask
        labels[start:start + b, :t] = s.labels
        rows.append((start, start + b))
        start += b
    return Packed(hidden, mask, labels, tuple(rows), tuple(s.hidden.shape[1] for s in steps))


def unpack(grad: np.ndarray, packed: Packed) -> list[np.ndarray]:
    """dL/dh_K (sum B, T_max, H) -> each device's (B_i, T_i, H), a copy of its own rows."""
    return [grad[a:b, :t].copy() for (a, b), t in zip(packed.rows, packed.lengths)]


class PerDeviceGrads:
    """While active, records every LoRA matrix's input x and output gradient dy; then the gradient
    of device i for weight W (out, in) is sum over its rows and positions of dy^T x.

    Use: `with PerDeviceGrads(model, rows) as c: forward; backward`, then `c.grads(params)`.
    """

    def __init__(self, model: nn.Module, rows: Sequence[tuple[int, int]]):
        self.rows = rows
        self._modules = {name: m for name, m in model.named_modules()
                         if isinstance(m, nn.Linear) and (".lora_A." in name or ".lora_B." in name)}
        self._seen: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id(weight) -> (x, dy)
        self._handles: list = []

    def __enter__(self) -> PerDeviceGrads:
        for m in self._modules.values():
            self._handles.append(m.register_forward_hook(self._forward))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _forward(self, module: nn.Linear, inputs: tuple, out: torch.Tensor) -> None:
        if out.requires_grad and module.weight.requires_grad:
            x = inputs[0].detach()                                    # (N, T, in)

            def keep(dy: torch.Tensor) -> None:                       # (N, T, out)
                self._seen[id(module.weight)] = (x, dy.detach())
            out.register_hook(keep)

    def grads(self, params: Sequence[torch.Tensor]) -> Iterator[list[torch.Tensor]]:
        """For each device in order, its gradient of every parameter in `params`."""
        missing = [i for i, p in enumerate(params) if id(p) not in self._seen]
        if missing:
            raise RuntimeError(f"per-device gradients: {len(missing)} trained tensors are not LoRA matrices "
                               "this batch ran through (per-device batching needs a LoRA body)")
        for a, b in self.rows:
            yield [torch.einsum("nto,nti->oi", self._seen[id(p)][1][a:b], self._seen[id(p)][0][a:b])
                   for p in params]
