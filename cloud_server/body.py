"""The body the server hosts: blocks K..N (+ final norm and LM head), LoRA through PEFT.

The PEFT model covers the WHOLE model (LoRA on the targets of every block), but the server only
trains the body's adapters; the head's adapters are the clients' average, copied in at each
round end. So `save_adapter` writes one standard PEFT adapter for the whole model.

A step, labels at the server:        h_K -> body -> loss -> backward -> AdamW -> dL/dh_K
A step, labels on the device (U):    h_K -> body -> h_N ... dL/dh_N -> backward -> AdamW -> dL/dh_K
Several devices' steps at once:      `step_batch` (see `batching` for the two optimizer semantics)
Replicas:                            `step_batch(..., reduce=)` sums gradients over replicas first (`replicas`)

Where the body lives (`BodyConfig.device`): the model, its adapters and AdamW's state are on that
device; each step moves h_K (and mask, labels) there once and dL/dh_K back once. With
`BodyConfig.quant` "nf4" or "int8" the frozen linears are bitsandbytes `Linear4bit` / `Linear8bitLt`
(transformers' `BitsAndBytesConfig`; compute in float32) and LoRA trains on top (QLoRA); the
embedding and LM head stay float32. The adapter a round writes loads with PEFT onto the base loaded
with the same `quantization_config` (`quantization_config(quant)`), or onto the float model.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from splitlm.errors import BundleMismatch
from splitlm.export.arch import DEFAULT_TARGETS, Arch
from splitlm.export.bundle import load_model
from splitlm.export.graphs import causal_lm_loss
from splitlm.manifest import model_folder_hash
from splitlm.protocol import Hello

from . import batching
from .state import StateError

# replicas: (this replica's summed gradients, its device count) -> every replica's, summed
Reduce = Callable[[list[torch.Tensor], float], tuple[list[torch.Tensor], float]]
_PEFT_NAME = re.compile(r"^base_model\.model\.(.+)\.(lora_[AB])\.default\.weight$")


@dataclass(frozen=True)
class BodyConfig:
    model: str                      # HF folder or "default"
    cut: int
    labels: str = "server"          # "server" or "device"
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_targets: tuple[str, ...] | None = None
    lr: float = 1e-3                # AdamW, betas (0.9, 0.999), eps 1e-8, no weight decay
    full: bool = False              # train every body parameter instead of LoRA
    seed: int = 0                   # body LoRA init
    device: str = "auto"            # "auto": CUDA when torch sees a GPU, else the CPU
    quant: str = "none"             # the frozen body: "none" (float32), "nf4" or "int8" (bitsandbytes)


BODY_QUANTS = ("none", "nf4", "int8")


def resolve_device(device: str) -> torch.device:
    """"auto": the first CUDA GPU when torch sees one, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def quantization_config(quant: str):
    """The transformers `BitsAndBytesConfig` of a --body-quant preset (None for "none")."""
    from transformers import BitsAndBytesConfig

    if quant == "nf4":  # QLoRA's NF4, double quantization of the scales, float32 compute
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=torch.float32)
    if quant == "int8":  # LLM.int8(): 8-bit weights, outlier features (> 6) in 16-bit
        return BitsAndBytesConfig(load_in_8bit=True)
    return None


def load_body_model(model: str, *, quant: str, device: torch.device) -> tuple[torch.nn.Module, Path]:
    """The whole causal LM, frozen, in eval mode; its linears quantized per `quant`, and then (bitsandbytes
    quantizes while it places the weights) already on `device`."""
    from transformers import AutoModelForCausalLM

    from splitlm.export.bundle import load_config, resolve_model_path

    if quant not in BODY_QUANTS:
        raise ValueError(f"body quant: expected one of {BODY_QUANTS}, got {quant!r}")
    if quant == "none":  # loaded on the CPU, moved with its LoRA (drawn from the CPU generator on any device)
        return load_model(model)
    path = resolve_model_path(model)
    load_config(path)
    loaded = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager", dtype=torch.float32,
                                                  quantization_config=quantization_config(quant),
                                                  device_map={"": "cpu" if device.type == "cpu" else device.index or 0})
    return loaded.eval().requires_grad_(False), path


@dataclass(frozen=True)
class Snapshot:
    """Copies of what a round writes, taken on the body's thread (see `Body.snapshot`)."""
    head: dict[str, np.ndarray]          # the head LoRA under bundle names
    lora: dict[str, torch.Tensor]        # every LoRA tensor under PEFT names
    model: dict[str, torch.Tensor] | None  # full: the whole model's weights under plain HF names


@dataclass
class PendingStep:
    """A U-shape step between `forward_u` and `backward_u`."""
    h_k: torch.Tensor   # (B, T, H), requires grad
    h_n: torch.Tensor   # (B, T, H)


class Body:
    def __init__(self, cfg: BodyConfig):
        from peft import LoraConfig, get_peft_model

        if cfg.quant != "none" and cfg.full:  # checked by the CLI before the model is loaded, too
            raise ValueError("--full trains every body weight; a quantized body (--body-quant) cannot be trained")
        self.device = resolve_device(cfg.device)
        model, path = load_body_model(cfg.model, quant=cfg.quant, device=self.device)
        self.cfg, self.path = cfg, path
        self.model_hash = model_folder_hash(path)
        family = Arch.of(model).family
        self.targets = tuple(cfg.lora_targets or DEFAULT_TARGETS[family])
        self.num_layers = model.config.num_hidden_layers
        self.hidden_size = model.config.hidden_size
        torch.manual_seed(cfg.seed)
        peft_config = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=0.0,
                                 target_modules=list(self.targets),
                                 fan_in_fan_out=family == "gpt2" and cfg.quant == "none")  # bnb turns Conv1D into Linear
        self.peft = get_peft_model(model, peft_config).to(self.device)  # the new LoRA tensors too
        self.arch = Arch.of(self.peft.base_model.model)
        self.optimizer = torch.optim.AdamW(self._trainable(), lr=cfg.lr, weight_decay=0.0)

    def _trainable(self) -> list[torch.nn.Parameter]:
        if self.cfg.full:
            self.peft.requires_grad_(False)
            params = [*self.arch.blocks[self.cfg.cut:].parameters(), *self.arch.final_norm.parameters()]
        else:
            params = [p for name, p in self.peft.named_parameters()
                      if "lora_" in name and self._layer_of(name) >= self.cfg.cut]
        for p in params:
            p.requires_grad_(True)
        return params

    def _layer_of(self, name: str) -> int:
        match = re.search(rf"{re.escape(self.arch.block_prefix)}\.(\d+)\.", name)
        return int(match.group(1)) if match else -1

    def check_hello(self, hello: Hello) -> None:
        """Refuse a client whose bundle is not the model, cut, labels and LoRA spec served here."""
        want = {"model_hash": self.model_hash, "cut": self.cfg.cut, "labels": self.cfg.labels,
                "lora_rank": self.cfg.lora_rank, "lora_alpha": float(self.cfg.lora_alpha),
                "lora_targets": self.targets}
        got = {"model_hash": hello.model_hash, "cut": hello.cut, "labels": hello.labels,
               "lora_rank": hello.lora_rank, "lora_alpha": float(hello.lora_alpha),
               "lora_targets": tuple(hello.lora_targets)}
        wrong = [f"{k}: server serves {want[k]!r}, bundle has {got[k]!r}" for k in want if want[k] != got[k]]
        if wrong:
            raise BundleMismatch("bundle does not match this server: " + "; ".join(wrong))

    # ------------------------------------------------------------------ one training step

    def step(self, hidden: np.ndarray, mask: np.ndarray, labels: np.ndarray) -> tuple[float, np.ndarray]:
        """Labels at the server: one whole step. Returns (loss, dL/dh_K)."""
        h_k = self._tensor(hidden).requires_grad_(True)                        # (B, T, H), a copy
        mask_t = self._tensor(mask, np.int64)                                  # (B, T)
        h_n = self.arch.run_blocks(h_k, mask_t, self.cfg.cut, self.num_layers)
        loss = causal_lm_loss(self.arch.logits(h_n), self._tensor(labels, np.int64), mask_t)
        self._update(lambda: loss.backward())
        return float(loss.detach()), h_k.grad.cpu().numpy()

    def step_batch(self, steps: Sequence[batching.StepInput], *, per_device: bool,
                   reduce: Reduce | None = None) -> list[tuple[float, np.ndarray]]:
        """Labels at the server, several devices' steps as one body batch: (loss, dL/dh_K) per step,
        each as that step alone would get at these weights. `per_device`: one AdamW step per device
        (arrival order) on its own gradient; else one AdamW step on the mean of the devices' gradients,
        and with `reduce` (replicas) on the mean over every replica's devices; then `steps` may be empty
        (this replica adds a zero gradient with zero weight)."""
        if not steps:
            return self._idle_step(reduce)
        packed = batching.pack(steps)
        h_k = self._tensor(packed.hidden).requires_grad_(True)                 # (sum B, T_max, H)
        mask_t = self._tensor(packed.mask, np.int64)                           # (sum B, T_max), 0 on padding
        labels_t = self._tensor(packed.labels, np.int64)
        capture = batching.PerDeviceGrads(self.peft, packed.rows) if per_device else None
        with capture or contextlib.nullcontext():
            h_n = self.arch.run_blocks(h_k, mask_t, self.cfg.cut, self.num_layers)
            logits = self.arch.logits(h_n)                                     # (sum B, T_max, V)
            losses = [causal_lm_loss(logits[a:b], labels_t[a:b], mask_t[a:b]) for a, b in packed.rows]
            self.optimizer.zero_grad(set_to_none=True)
            torch.stack(losses).sum().backward()  # device i's rows of h_k.grad are dL_i/dh_K: losses are apart
        self._optimize_batch(capture, n_devices=len(steps), reduce=reduce)
        grads = batching.unpack(h_k.grad.cpu().numpy(), packed)
        return [(float(loss.detach()), g) for loss, g in zip(losses, grads)]

    def _idle_step(self, reduce: Reduce | None) -> list:
        """A replica with no step at a synced step: zero gradient, zero weight, the same AdamW step."""
        if reduce is None:
            raise ValueError("a batch of no steps is only a replica's share of a synced step")
        self.optimizer.zero_grad(set_to_none=True)
        self._optimize_batch(None, n_devices=0, reduce=reduce)
        return []

    def _optimize_batch(self, capture: batching.PerDeviceGrads | None, *, n_devices: int,
                        reduce: Reduce | None = None) -> None:
        """No capture (per-batch): one AdamW step on the mean of the devices' summed gradients (with
        `reduce`, summed over every replica's devices). With one: one AdamW step per device's own
        gradient, in arrival order."""
        params = self.optimizer.param_groups[0]["params"]
        if capture is None:
            if reduce is not None:
                local = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
                grads, n_devices = reduce(local, float(n_devices))
                for p, g in zip(params, grads):
                    p.grad = g
            for p in params:
                if p.grad is not None:
                    p.grad /= n_devices
            self.optimizer.step()
            return
        for grads in capture.grads(params):
            for p, g in zip(params, grads):
                p.grad = g
            self.optimizer.step()

    def _tensor(self, array: np.ndarray, dtype=np.float32) -> torch.Tensor:
        """A copy of `array` on the body's device (activations move once per step each way)."""
        return torch.tensor(np.asarray(array, dtype), device=self.device)

    def forward_u(self, hidden: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, PendingStep]:
        """Labels on the device, first half: h_K -> h_N, keeping the graph for `backward_u`."""
        h_k = self._tensor(hidden).requires_grad_(True)
        h_n = self.arch.run_blocks(h_k, self._tensor(mask, np.int64), self.cfg.cut, self.num_layers)
        return h_n.detach().cpu().numpy(), PendingStep(h_k, h_n)

    def backward_u(self, pending: PendingStep, grad_n: np.ndarray) -> np.ndarray:
        """Labels on the device, second half: dL/dh_N -> update -> dL/dh_K."""
        self._update(lambda: pending.h_n.backward(self._tensor(grad_n)))
        return pending.h_k.grad.cpu().numpy()

    def _update(self, backward) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        backward()
        self.optimizer.step()

    # ------------------------------------------------------------------ adapters

    def lora_tensors(self, *, head: bool) -> dict[str, np.ndarray]:
        """The head's (or the body's) LoRA tensors under bundle names ("<module>.lora_A")."""
        out = {}
        for name, p in self.peft.named_parameters():
            match = _PEFT_NAME.match(name)
            if match and (self._layer_of(name) < self.cfg.cut) == head:
                out[f"{match.group(1)}.{match.group(2)}"] = p.detach().cpu().numpy().copy()
        return out

    def set_head_adapter(self, tensors: dict[str, np.ndarray]) -> None:
        """Copy the clients' averaged head LoRA into the whole-model PEFT adapter."""
        params = dict(self.peft.named_parameters())
        with torch.no_grad():
            for name, value in tensors.items():
                module, _, which = name.rpartition(".")
                params[f"base_model.model.{module}.{which}.default.weight"].copy_(torch.from_numpy(np.asarray(value, np.float32)))

    # ------------------------------------------------------------------ resumable state

    def training_state(self) -> dict[str, torch.Tensor]:
        """What training changes: `body.<param>` for each trained parameter and
        `adam.<param>.{step,exp_avg,exp_avg_sq}` for AdamW's state (absent before the first step)."""
        names = self._trained_names()
        out = {f"body.{n}": p.detach().cpu().clone() for n, p in zip(names, self.optimizer.param_groups[0]["params"])}
        for i, per_param in self.optimizer.state_dict()["state"].items():
            out |= {f"adam.{names[i]}.{k}": torch.as_tensor(v).detach().cpu().clone() for k, v in per_param.items()}
        return out

    def load_training_state(self, tensors: dict[str, torch.Tensor]) -> None:
        """Undo everything since `training_state()` was taken (the learning rate is this run's)."""
        names = self._trained_names()
        want = {f"body.{n}" for n in names}
        if not want <= tensors.keys():
            raise StateError(f"server state: no saved value for trained parameters {sorted(want - tensors.keys())[:3]}")
        with torch.no_grad():
            for n, p in zip(names, self.optimizer.param_groups[0]["params"]):
                p.copy_(tensors[f"body.{n}"])
        # copies: AdamW updates its state in place, and `tensors` may be restored from again
        state = {i: {k: tensors[f"adam.{n}.{k}"].clone() for k in ("step", "exp_avg", "exp_avg_sq")}
                 for i, n in enumerate(names) if f"adam.{n}.step" in tensors}
        self.optimizer.load_state_dict({"state": state, "param_groups": self.optimizer.state_dict()["param_groups"]})

    def _trained_names(self) -> list[str]:
        """The names of the optimizer's parameters, in its order."""
        by_id = {id(p): n for n, p in self.peft.named_parameters()}
        return [by_id[id(p)] for p in self.optimizer.param_groups[0]["params"]]

    def save_adapter(self, folder: Path) -> None:
        """One PEFT adapter for the whole model: PeftModel.from_pretrained(base, folder) loads it."""
        self.peft.save_pretrained(folder)

    def snapshot(self) -> Snapshot:
        """Copies of what a round writes, so the writer can write while the body trains on."""
        state = self.peft.state_dict()
        lora = {k: v.detach().clone() for k, v in state.items() if "lora_" in k}
        model = None
        if self.cfg.full:  # the trained base weights, under the names a plain HF model has
            prefix = "base_model.model."
            model = {k[len(prefix):].replace(".base_layer.", "."): v.detach().clone()
                     for k, v in state.items() if "lora_" not in k}
        return Snapshot(head=self.lora_tensors(head=True), lora=lora, model=model)

    def save_snapshot(self, folder: Path, snap: Snapshot) -> None:
        """folder/adapter: the whole-model PEFT adapter. With --full also folder/model: the base
        weights the body trained (save_pretrained), which that adapter goes on top of."""
        self.peft.save_pretrained(folder / "adapter", state_dict=snap.lora)
        if snap.model is not None:
            self.peft.get_base_model().save_pretrained(folder / "model", state_dict=snap.model)
