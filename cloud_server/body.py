"""The body the server hosts: blocks K..N (+ final norm and LM head), LoRA through PEFT.

The PEFT model covers the WHOLE model (LoRA on the targets of every block), but the server only
trains the body's adapters; the head's adapters are the clients' average, copied in at each
round end. So `save_adapter` writes one standard PEFT adapter for the whole model.

A step, labels at the server:        h_K -> body -> loss -> backward -> AdamW -> dL/dh_K
A step, labels on the device (U):    h_K -> body -> h_N ... dL/dh_N -> backward -> AdamW -> dL/dh_K
"""

from __future__ import annotations

import re
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

from .state import StateError

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

        model, path = load_model(cfg.model)
        self.cfg, self.path = cfg, path
        self.model_hash = model_folder_hash(path)
        family = Arch.of(model).family
        self.targets = tuple(cfg.lora_targets or DEFAULT_TARGETS[family])
        self.num_layers = model.config.num_hidden_layers
        self.hidden_size = model.config.hidden_size
        torch.manual_seed(cfg.seed)
        peft_config = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=0.0,
                                 target_modules=list(self.targets), fan_in_fan_out=family == "gpt2")
        self.peft = get_peft_model(model, peft_config)
        self.device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available()
                                   else "cpu" if cfg.device == "auto" else cfg.device)
        self.peft.to(self.device)
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
        return float(loss), h_k.grad.cpu().numpy()

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
        state = {i: {k: tensors[f"adam.{n}.{k}"] for k in ("step", "exp_avg", "exp_avg_sq")}
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
