"""The whole model as device graphs, for `--mode fedavg` and `--mode distill`.

    train(input_ids, attention_mask, labels, *trainables)        -> loss, grad.<each trainable>
    topk(input_ids, attention_mask, *trainables)                 -> topk_values, topk_indices  (B, T, k_max)
    kd_grad(input_ids, attention_mask, teacher_indices, teacher_logprobs, *trainables)
                                                                 -> kd_loss, grad.<each trainable>

Trainables are graph inputs, so one bundle serves every round and the optimizer lives in numpy:
  lora  the LoRA tensors of the chosen targets in every block (named and shaped as a PEFT adapter)
  full  every decoder-block parameter and the final norm, by their Hugging Face state_dict names
        and shapes (GPT-2's Conv1D weight stays (in, out)). The token embedding, and the LM head
        tied to it, stay frozen: they are 21% of SmolLM2's parameters (28 M of 135 M) and the
        largest single tensor, a tied table would need its two gradients summed, and a frozen
        table is the one weight a quantized preset can still shrink.

Why one train graph (loss and gradients together) and no separate forward graph: a training step
needs both, and a joint graph runs the forward once and keeps its activations for the backward; a
second, forward-only graph would hold a second copy of every frozen weight on the device.

The top-k graph returns the k_max largest log-probabilities (log_softmax over the whole
vocabulary, sorted); a session with a smaller k takes their first k columns. Log-probabilities and
not raw logits, because only they say how much mass lies outside the k named tokens.

The KD loss is the cross-entropy between teacher and student over k + 1 outcomes: the teacher's k
tokens and "any other token" (see `kd_loss`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .arch import Arch
from .graphs import (HEAD_INPUTS, IGNORE_INDEX, MAX_BATCH, MIN_TAIL_SEQ, example_inputs, next_token_labels,
                     trace_with_shapes)
from .lora import LoRAInputs

TRAIN_INPUTS = ("input_ids", "attention_mask", "labels")
KD_INPUTS = ("input_ids", "attention_mask", "teacher_indices", "teacher_logprobs")
EXAMPLE_K = 5  # teacher k while tracing; the graph takes any k >= 1
HEAD_CHUNK = 8192  # LM head rows per chunk of the train graph's loss (SmolLM2: 6 chunks of 49,152)
KD_REST_FLOOR = 1e-6  # q_rest's floor in kd_loss: a student with all its mass on k tokens stays finite


class _Logits(nn.Module):
    """arch's embedding -> every block -> final norm -> LM head (or, `head=False`, stop before the
    LM head), as one module for functional_call."""

    def __init__(self, arch: Arch, head: bool = True):
        super().__init__()
        self.model, self.head = arch.model, head
        self.__dict__["arch"] = arch  # not a submodule: its parts are already under `model`

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h = self.arch.embed(input_ids)  # (B, T, H)
        h = self.arch.run_blocks(h, attention_mask, 0, self.arch.num_layers)  # (B, T, H)
        return self.arch.logits(h) if self.head else self.arch.final_norm(h)  # (B, T, V) or (B, T, H)


def chunked_lm_loss(h: torch.Tensor, table: torch.Tensor, labels: torch.Tensor, attention_mask: torch.Tensor,
                    *, chunk: int = HEAD_CHUNK) -> tuple[torch.Tensor, torch.Tensor]:
    """`causal_lm_loss` of logits h @ W^T and its gradient with respect to h, never holding the
    (B, T, V) logits: one pass over W (`table`, (V, H)) in row chunks of `chunk` keeps a running
    max, sum of exponentials and softmax-weighted sum of W's rows (an online softmax).

        loss   = sum_n keep_n (logsumexp_v(h_n . W_v) - h_n . W_label_n) / count
        dL/dh_n = keep_n (sum_v softmax_v W_v - W_label_n) / count

    Why by hand: autograd through the full cross-entropy keeps 3-4 logits-sized buffers alive
    (log-softmax, its gradient, the softmax) at the step's peak, 50 MB each for SmolLM2 at 4 x 64;
    per chunk they are V/chunks as large and freed before the next. In the graph each chunk is a
    Slice of W, which the quantizers fold into its own weight (`quantize.fold_constant_views`).
    Tested against autograd through `causal_lm_loss` (tests/test_fed_device.py)."""
    B, T, H = h.shape
    x = h.reshape(-1, H)                                                        # (N, H)
    target = next_token_labels(labels, attention_mask).reshape(-1)             # (N,)
    keep = (target != IGNORE_INDEX).to(x.dtype)
    count = keep.sum().clamp(min=1)
    running_max = torch.full_like(keep, -torch.inf)
    running_sum, weighted = torch.zeros_like(keep), torch.zeros_like(x)
    for start in range(0, table.shape[0], chunk):
        w = table[start:start + chunk]                                          # (Vc, H)
        logits = x @ w.T                                                        # (N, Vc)
        new_max = torch.maximum(running_max, logits.max(dim=-1).values)
        scale = torch.exp(running_max - new_max)                                # 0 at the first chunk
        e = torch.exp(logits - new_max[:, None])                                # (N, Vc)
        running_sum = running_sum * scale + e.sum(-1)
        weighted = weighted * scale[:, None] + e @ w
        running_max = new_max
    label_rows = torch.nn.functional.embedding(target.clamp(min=0), table)    # (N, H): W_label
    logsumexp = running_max + torch.log(running_sum)
    loss = ((logsumexp - (x * label_rows).sum(-1)) * keep).sum() / count
    grad = (weighted / running_sum[:, None] - label_rows) * (keep / count)[:, None]
    return loss, grad.reshape(B, T, H)


def full_trainables(arch: Arch) -> dict[str, tuple[int, ...]]:
    """HF state_dict name -> shape of every block parameter and the final norm, in model order."""
    prefixes = (f"{arch.block_prefix}.",)
    norm = {id(p) for p in arch.final_norm.parameters()}
    return {name: tuple(p.shape) for name, p in arch.model.named_parameters()
            if name.startswith(prefixes) or id(p) in norm}


@dataclass
class WholeGraphs:
    """The device-side functions of a whole model; `lora` set for LoRA training, else full."""

    arch: Arch
    lora: LoRAInputs | None
    shapes: dict[str, tuple[int, ...]]  # trainable name -> shape, graph input order
    k_max: int

    @staticmethod
    def for_lora(arch: Arch, lora: LoRAInputs, k_max: int) -> "WholeGraphs":
        return WholeGraphs(arch, lora, dict(lora.shapes), k_max)

    @staticmethod
    def for_full(arch: Arch, k_max: int) -> "WholeGraphs":
        return WholeGraphs(arch, None, full_trainables(arch), k_max)

    @property
    def names(self) -> list[str]:
        return list(self.shapes)

    def logits(self, input_ids, attention_mask, *trainables, head: bool = True) -> torch.Tensor:
        bound = dict(zip(self.names, trainables))
        if self.lora is not None:
            with self.lora.bind(bound):
                return _Logits(self.arch, head)(input_ids, attention_mask)  # (B, T, V), or (B, T, H)
        params = {f"model.{n}": t for n, t in bound.items()}
        return torch.func.functional_call(_Logits(self.arch, head), params, (input_ids, attention_mask))

    def train(self, input_ids, attention_mask, labels, *trainables):
        trainables = [t.detach().requires_grad_(True) for t in trainables]
        with torch.enable_grad():
            h = self.logits(input_ids, attention_mask, *trainables, head=False)  # (B, T, H)
            loss, grad_h = chunked_lm_loss(h.detach(), self.arch.lm_head.weight.detach(), labels, attention_mask)
            return (loss, *torch.autograd.grad(h, trainables, grad_outputs=grad_h))

    def topk(self, input_ids, attention_mask, *trainables):
        logp = torch.log_softmax(self.logits(input_ids, attention_mask, *trainables).float(), dim=-1)
        values, indices = torch.topk(logp, self.k_max, dim=-1)
        return values, indices.to(torch.int32)  # (B, T, k_max) each

    def kd_grad(self, input_ids, attention_mask, teacher_indices, teacher_logprobs, *trainables):
        trainables = [t.detach().requires_grad_(True) for t in trainables]
        with torch.enable_grad():
            logits = self.logits(input_ids, attention_mask, *trainables)  # (B, T, V)
            loss = kd_loss(logits, teacher_indices, teacher_logprobs, attention_mask)
            return (loss, *torch.autograd.grad(loss, trainables))


def kd_loss(logits: torch.Tensor, teacher_indices: torch.Tensor, teacher_logprobs: torch.Tensor,
            attention_mask: torch.Tensor) -> torch.Tensor:
    """Cross-entropy from the teacher's top-k to the student over k + 1 outcomes, mean over mask==1:

        L = -sum_k p_k log q_k - p_rest log q_rest,    p = exp(teacher_logprobs),
        p_rest = max(0, 1 - sum_k p_k),  q = softmax(student)[teacher_indices],  q_rest = 1 - sum_k q_k

    `teacher_logprobs` are log-probabilities over the whole vocabulary (they sum to at most 1).
    The usual renormalised top-k target (softmax over the k kept) says the other tokens have
    probability 0, so every step pushes the student to put its whole mass on k tokens: on
    SmolLM2 that sharpening made the held-out loss rise round after round. The rest bucket keeps
    the teacher's uncertainty and is still a proper cross-entropy (its minimum is at q = p)."""
    logp = torch.log_softmax(logits.float(), dim=-1)  # (B, T, V)
    picked = torch.gather(logp, -1, teacher_indices.long())  # (B, T, k)
    p = teacher_logprobs.exp()
    p_rest = (1 - p.sum(-1)).clamp(min=0)
    q_rest = (1 - picked.exp().sum(-1)).clamp(min=KD_REST_FLOOR)
    per_position = -(p * picked).sum(-1) - p_rest * q_rest.log()  # (B, T)
    mask = attention_mask.to(per_position.dtype)
    return (per_position * mask).sum() / mask.sum().clamp(min=1)


def export_whole_graphs(graphs: WholeGraphs, out: Path, *, distill: bool, max_seq: int, train: bool = True) -> list[str]:
    """Write train.onnx (unless `train` is False: it is taken from another bundle) and, for distill,
    topk.onnx and kd_grad.onnx into `out`; return the file names."""
    cfg = graphs.arch.model.config
    ex = example_inputs(cfg.vocab_size, cfg.hidden_size)
    ids, mask, labels = ex["input_ids"], ex["attention_mask"], ex["labels"]
    names = graphs.names
    # Trainables for tracing: small nonzero values so no branch of the gradient folds away.
    gen = torch.Generator().manual_seed(1)
    trainables = [_tracing_value(n, s, gen, graphs) for n, s in graphs.shapes.items()]
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    seq = torch.export.Dim("seq", min=MIN_TAIL_SEQ, max=max_seq)
    tokens, fixed = {0: batch, 1: seq}, (None,) * len(names)
    grads = [f"grad.{n}" for n in names]
    files = []
    if train:
        trace_with_shapes(graphs.train, (ids, mask, labels, *trainables), (tokens,) * 3 + fixed,
               input_names=[*TRAIN_INPUTS, *names], output_names=["loss", *grads], path=out / "train.onnx")
        files.append("train.onnx")
    if distill:
        trace_with_shapes(graphs.topk, (ids, mask, *trainables), (tokens,) * 2 + fixed, input_names=[*HEAD_INPUTS, *names],
               output_names=["topk_values", "topk_indices"], path=out / "topk.onnx")
        k = torch.export.Dim("k", min=1, max=cfg.vocab_size)
        t_idx = torch.randint(0, cfg.vocab_size, (*ids.shape, EXAMPLE_K), generator=gen, dtype=torch.int32)
        t_lp = torch.log_softmax(torch.randn(*ids.shape, EXAMPLE_K, generator=gen), -1) - 0.5  # mass left outside
        teacher = {0: batch, 1: seq, 2: k}
        trace_with_shapes(graphs.kd_grad, (ids, mask, t_idx, t_lp, *trainables), (tokens, tokens, teacher, teacher) + fixed,
               input_names=[*KD_INPUTS, *names], output_names=["kd_loss", *grads], path=out / "kd_grad.onnx")
        files += ["topk.onnx", "kd_grad.onnx"]
    return files


def _tracing_value(name: str, shape: tuple[int, ...], gen: torch.Generator, graphs: WholeGraphs) -> torch.Tensor:
    if graphs.lora is not None:
        return torch.randn(shape, generator=gen) * 0.01
    return graphs.arch.model.get_parameter(name).detach().clone()  # full: the model's own values
