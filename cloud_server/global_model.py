"""The server's copy of the whole model for fedavg and distill: its trainables by bundle name,
a round's output folder, held-out loss, and (distill) knowledge distillation on the public set.

Trainables use the names and shapes the device's bundle uses, so updates apply name by name:
    lora  "<module>.lora_A" (r, in), "<module>.lora_B" (out, r) on the targets of every block,
          PEFT's tensors (init from `seed`, as `splitlm export --lora-seed`)
    full  every decoder block's weights and the final norm, under their HF state_dict names; the
          embedding (tied to the LM head in SmolLM2) stays frozen on both sides
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from splitlm.export.arch import DEFAULT_TARGETS, Arch
from splitlm.export.bundle import load_model
from splitlm.export.whole import kd_loss
from splitlm.manifest import model_folder_hash

_PEFT_NAME = re.compile(r"^base_model\.model\.(.+)\.(lora_[AB])\.default\.weight$")


@dataclass(frozen=True)
class GlobalConfig:
    model: str                      # HF folder or "default"
    train: str = "lora"             # "lora" or "full"
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_targets: tuple[str, ...] | None = None
    lr: float = 1e-3                # distill: the server's own AdamW on the public set
    seed: int = 0                   # LoRA init
    device: str = "auto"


class GlobalModel:
    def __init__(self, cfg: GlobalConfig):
        model, path = load_model(cfg.model)
        self.cfg, self.path = cfg, path
        self.model_hash = model_folder_hash(path)
        self.num_layers = model.config.num_hidden_layers
        self.vocab_size = model.config.vocab_size
        family = Arch.of(model).family
        self.targets = tuple(cfg.lora_targets or DEFAULT_TARGETS[family]) if cfg.train == "lora" else ()
        self.device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available()
                                   else "cpu" if cfg.device == "auto" else cfg.device)
        if cfg.train == "lora":
            from peft import LoraConfig, get_peft_model

            torch.manual_seed(cfg.seed)
            self.model = get_peft_model(model, LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=0.0,
                                                          target_modules=list(self.targets),
                                                          fan_in_fan_out=family == "gpt2"))
            self._params = {f"{m.group(1)}.{m.group(2)}": p for name, p in self.model.named_parameters()
                            if (m := _PEFT_NAME.match(name))}
        else:
            model.requires_grad_(False)
            self.model = model
            arch = Arch.of(model)
            trained = {id(p) for p in [*arch.blocks.parameters(), *arch.final_norm.parameters()]}
            self._params = {name: p for name, p in model.named_parameters() if id(p) in trained}
        for p in self._params.values():
            p.requires_grad_(True)
        self.model.to(self.device)
        self.optimizer = torch.optim.AdamW(list(self._params.values()), lr=cfg.lr, weight_decay=0.0)

    # ------------------------------------------------------------------ trainables

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {n: tuple(p.shape) for n, p in self._params.items()}

    def trainables(self) -> dict[str, np.ndarray]:
        return {n: p.detach().cpu().numpy().copy() for n, p in self._params.items()}

    def set_trainables(self, values: dict[str, np.ndarray]) -> None:
        with torch.no_grad():
            for name, value in values.items():
                self._params[name].copy_(torch.from_numpy(np.asarray(value, np.float32)))

    def hello_fields(self) -> dict:
        """What a device's hello must say to train this model (compared field by field)."""
        lora = self.cfg.train == "lora"
        return {"model_hash": self.model_hash, "cut": self.num_layers, "train": self.cfg.train,
                "lora_rank": self.cfg.lora_rank if lora else 0,
                "lora_alpha": float(self.cfg.lora_alpha) if lora else 0.0, "lora_targets": self.targets}

    # ------------------------------------------------------------------ output

    def snapshot(self) -> dict[str, torch.Tensor]:
        """What `save` writes, copied, so the writer can write while training goes on."""
        state = self.model.state_dict()
        if self.cfg.train == "lora":
            return {k: v.detach().cpu().clone() for k, v in state.items() if "lora_" in k}
        return {k: v.detach().cpu().clone() for k, v in state.items()}

    def save(self, folder: Path, snapshot: dict[str, torch.Tensor]) -> None:
        """lora: folder/adapter (PeftModel.from_pretrained(base, it)); full: folder/model (save_pretrained)."""
        if self.cfg.train == "lora":
            self.model.save_pretrained(folder / "adapter", state_dict=snapshot)
        else:
            self.model.save_pretrained(folder / "model", state_dict=snapshot)

    # ------------------------------------------------------------------ losses

    @torch.no_grad()
    def mean_loss(self, batches) -> float:
        """Token-weighted next-token loss over `batches` (splitlm.data.Batch)."""
        total, count = 0.0, 0
        self.model.eval()
        for b in batches:
            labels = torch.from_numpy(b.labels).to(self.device)
            n = int((labels[:, 1:] != -100).sum())
            out = self.model(input_ids=torch.from_numpy(b.input_ids).to(self.device),
                             attention_mask=torch.from_numpy(b.attention_mask).to(self.device), labels=labels)
            total += float(out.loss) * n
            count += n
        return total / max(count, 1)

    def distill_step(self, batch, teacher_idx: np.ndarray, teacher_logp: np.ndarray) -> float:
        """One AdamW step on the KD loss toward the teacher's top-k log-probabilities at every
        masked position of `batch` (the device's loss, `export.whole.kd_loss`, from one source).
        `teacher_*` are (N, k) rows in the order of the batch's mask==1 positions."""
        self.model.train()
        mask = torch.from_numpy(batch.attention_mask).to(self.device).bool()            # (B, T)
        logits = self.model(input_ids=torch.from_numpy(batch.input_ids).to(self.device),
                            attention_mask=mask.long()).logits                            # (B, T, V)
        idx = torch.from_numpy(np.asarray(teacher_idx, np.int64)).to(self.device)        # (N, k)
        lp = torch.from_numpy(np.asarray(teacher_logp, np.float32)).to(self.device)     # (N, k)
        rows = logits[mask][None]                                                        # (1, N, V)
        loss = kd_loss(rows, idx[None], lp[None], torch.ones(rows.shape[:2], device=self.device))
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return loss.item()

    def eval_batches(self, path: Path, *, seq_len: int = 128, batch_size: int = 8) -> list:
        """Held-out data as batches, read and tokenized exactly as a device reads its data."""
        from transformers import AutoTokenizer

        from splitlm.data import collate, read_examples, tokenize

        tok = AutoTokenizer.from_pretrained(self.path)
        eos = tok.eos_token_id if tok.eos_token_id is not None else 0
        pad = tok.pad_token_id if tok.pad_token_id is not None else eos
        seqs = tokenize(read_examples(path), tok.backend_tokenizer, seq_len=seq_len, eos_id=eos)
        return [collate(seqs[i:i + batch_size], pad_token_id=pad) for i in range(0, len(seqs), batch_size)]
