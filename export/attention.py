"""Attention whose backward computes its probabilities again, for the graphs that keep activations.

With `--keep-activations` the device holds what the head's backward reads from the forward until
the server's gradient comes back. Plain (eager) attention makes autograd keep the probabilities
softmax(q k^T s + mask), (B, heads, T, T) per layer, and the keys and values repeated to every
query head: at SmolLM2 cut 2, batch 1 x 512, 21 of the 50 MB kept. The backward already keeps q,
k and v for their own gradients, so the probabilities are one q k^T and a softmax away.
`RecomputedAttention` keeps q, the un-repeated k and v, and the mask, and computes the
probabilities again in its backward (FlashAttention's trade, in plain tensor ops so it exports).

Why by hand: the backward has to be a torch.autograd.Function for autograd not to save the
probabilities; torch.utils.checkpoint would recompute the region but keeps its own saved tensors
out of the hooks `export/graphs.SavedActivations` reads. tests/test_keep_activations.py checks its
output and gradients against transformers' eager attention.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

NAME = "splitlm_recomputed"


def repeat_heads(x: torch.Tensor, groups: int) -> torch.Tensor:
    """(B, kv_heads, T, D) -> (B, kv_heads * groups, T, D), head h from kv head h // groups (transformers' repeat_kv)."""
    if groups == 1:
        return x
    b, kv, t, d = x.shape
    return x[:, :, None].expand(b, kv, groups, t, d).reshape(b, kv * groups, t, d)


def sum_heads(x: torch.Tensor, groups: int) -> torch.Tensor:
    """The gradient of `repeat_heads`: each kv head's share summed over its query heads."""
    if groups == 1:
        return x
    b, h, t, d = x.shape
    return x.reshape(b, h // groups, groups, t, d).sum(2)


def probabilities(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None, scaling: float) -> torch.Tensor:
    scores = torch.matmul(q, k.transpose(-1, -2)) * scaling  # (B, heads, T, T)
    return torch.softmax(scores if mask is None else scores + mask, dim=-1)


class RecomputedAttention(torch.autograd.Function):
    """softmax(q k^T * scaling + mask) v, keeping q, k, v and the mask instead of the probabilities."""

    @staticmethod
    def forward(ctx, q, k, v, mask, scaling: float, groups: int):
        ctx.scaling, ctx.groups = scaling, groups
        ctx.save_for_backward(q, k, v, *([mask] if mask is not None else []))
        p = probabilities(q, repeat_heads(k, groups), mask, scaling)
        return torch.matmul(p, repeat_heads(v, groups))  # (B, heads, T, D)

    @staticmethod
    def backward(ctx, grad):
        q, k, v, *mask = ctx.saved_tensors
        k_all, v_all = repeat_heads(k, ctx.groups), repeat_heads(v, ctx.groups)
        p = probabilities(q, k_all, mask[0] if mask else None, ctx.scaling)
        grad_v = torch.matmul(p.transpose(-1, -2), grad)
        grad_p = torch.matmul(grad, v_all.transpose(-1, -2))
        grad_scores = p * (grad_p - (grad_p * p).sum(-1, keepdim=True)) * ctx.scaling  # softmax's backward
        grad_q = torch.matmul(grad_scores, k_all)
        grad_k = torch.matmul(grad_scores.transpose(-1, -2), q)
        return grad_q, sum_heads(grad_k, ctx.groups), sum_heads(grad_v, ctx.groups), None, None, None


def recomputed_attention(module: nn.Module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers' attention interface (Llama family and GPT-2 call it alike): (B, T, heads, D), no weights."""
    if dropout:
        raise ValueError("recomputed attention is for exporting a model in eval mode (no attention dropout)")
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    groups = getattr(module, "num_key_value_groups", 1)
    out = RecomputedAttention.apply(query, key, value, attention_mask, scaling, groups)
    return out.transpose(1, 2).contiguous(), None


@contextmanager
def recomputing_attention(model: nn.Module):
    """`model`'s attention layers call `recomputed_attention` while inside."""
    from transformers import AttentionInterface

    if NAME not in AttentionInterface._global_mapping:
        AttentionInterface.register(NAME, recomputed_attention)
    saved = model.config._attn_implementation
    model.config._attn_implementation = NAME
    try:
        yield
    finally:
        model.config._attn_implementation = saved
