"""The three client graphs as PyTorch functions, and their path to ONNX.

    head(input_ids, attention_mask, *loras)            -> hidden_K               (B, T, H)
    head_grad(input_ids, attention_mask, grad_hidden, *loras) -> dL/d(each lora)
    tail(hidden_N, labels, attention_mask)             -> loss, dL/dhidden_N

`torch.autograd.grad` inside a module's forward does not export (torch.export errors, or bakes
the LoRA inputs in as constants). What works: trace the joint forward+backward function with
`make_fx` into plain aten ops, `torch.export` that graph with dynamic batch and sequence, then
`torch.onnx.export` it. The same path serves all three graphs.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch.fx import config as fx_config
from torch.fx.experimental.proxy_tensor import make_fx

from .arch import Arch
from .lora import LoRAInputs

IGNORE_INDEX = -100
OPSET = 18
MIN_TAIL_SEQ = 3  # the shifted loss needs two predicted positions to trace a dynamic length
MAX_BATCH = 256  # upper bounds torch.export needs for the symbolic dims
HEAD_INPUTS = ("input_ids", "attention_mask")
TAIL_INPUTS = ("hidden", "labels", "attention_mask")


@dataclass
class ClientGraphs:
    """The client-side functions of one cut model with LoRA inputs on its head."""

    arch: Arch
    cut: int
    lora: LoRAInputs

    def head(self, input_ids, attention_mask, *loras):
        with self.lora.bind(dict(zip(self.lora.names, loras))):
            h = self.arch.embed(input_ids)  # (B, T, H)
            return self.arch.run_blocks(h, attention_mask, 0, self.cut)  # (B, T, H)

    def head_grad(self, input_ids, attention_mask, grad_hidden, *loras):
        loras = [t.detach().requires_grad_(True) for t in loras]
        with torch.enable_grad():
            h = self.head(input_ids, attention_mask, *loras)
            return tuple(torch.autograd.grad(h, loras, grad_hidden))

    def tail(self, hidden, labels, attention_mask):
        hidden = hidden.detach().requires_grad_(True)
        with torch.enable_grad():
            loss = causal_lm_loss(self.arch.logits(hidden), labels, attention_mask)
            (grad,) = torch.autograd.grad(loss, [hidden])
        return loss, grad


def next_token_labels(labels: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """labels[:, t+1] at position t (-100 past the end and where the mask is 0): what logits[:, t] predicts."""
    labels = torch.where(attention_mask.bool(), labels, torch.full_like(labels, IGNORE_INDEX))
    return torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], IGNORE_INDEX)], dim=1)


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over positions whose label is kept (not -100, mask 1).

    Labels are aligned with input_ids (as in Hugging Face): logits[:, t] predicts labels[:, t+1].
    The labels move left (the last position predicts nothing: -100) rather than the logits being
    cut to T-1: the same sum, but the backward of a logits slice is a zero tensor the size of the
    logits and a pad into it, two more (B, T, V) buffers (50 MB each for SmolLM2 at 4 x 64).
    """
    labels = next_token_labels(labels, attention_mask)  # (B, T)
    per_token = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                ignore_index=IGNORE_INDEX, reduction="sum")
    count = (labels != IGNORE_INDEX).sum().clamp(min=1)
    return per_token / count


def trace_to_onnx(fn: Callable, args: tuple, *, input_names: list[str], output_names: list[str],
                  n_dynamic: int, max_seq: int, path: Path, min_seq: int = 2) -> None:
    """make_fx -> torch.export -> ONNX. The first `n_dynamic` args have dims (batch, seq, ...)."""
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    seq = torch.export.Dim("seq", min=min_seq, max=max_seq)
    dynamic = tuple({0: batch, 1: seq} if i < n_dynamic else None for i in range(len(args)))
    trace_with_shapes(fn, args, dynamic, input_names=input_names, output_names=output_names, path=path)


def trace_with_shapes(fn: Callable, args: tuple, dynamic: tuple, *, input_names: list[str],
                      output_names: list[str], path: Path) -> None:
    """make_fx -> torch.export (with these dynamic_shapes) -> ONNX, cleaned by `optimize_graph`.

    Two things torch would do for nothing, measured on SmolLM2's fedavg train graph (one sampled
    profile, 762 s in all) and undone here:
    - every trace records a Python stack trace for every FX node (108 s); nothing reads them;
    - torch.onnx.export decomposes the program once more (`run_decompositions`, a third full
      trace: 139 of the remaining 377 s) with its own table, aten ops without an ONNX function.
      make_fx applies that same table (`onnx_decompositions`) and that step is skipped
      (`_decomposed_already`). On tiny Llama's distill graphs: 107 -> 51 s, the same nodes and
      the same outputs to the bit. An op the table left would fail the export by name
      ("No ONNX function found"), not change a graph; torch is pinned, as these are its
      private modules."""
    with _no_stack_traces():
        gm = make_fx(lambda *a: fn(*a), tracing_mode="symbolic", decomposition_table=onnx_decompositions(),
                     _allow_non_fake_inputs=True)(*args)
        program = torch.export.export(gm, args, dynamic_shapes=dynamic)
        with _decomposed_already():
            onnx_program = torch.onnx.export(program, args, input_names=input_names, output_names=output_names,
                                             opset_version=OPSET, dynamo=True, optimize=False, verbose=False)
    optimize_graph(onnx_program.model)
    onnx_program.save(str(path), external_data=False)


@lru_cache(maxsize=1)
def onnx_decompositions() -> dict:
    """torch.onnx's decomposition table: every aten op without an ONNX function, decomposed."""
    from torch.onnx._internal.exporter import _decomp, _registration

    registry = _registration.ONNXRegistry.from_torchlib()
    return _decomp.create_onnx_friendly_decomposition_table(set(_decomp.get_onnx_implemented_overloads(registry)))


@contextmanager
def _decomposed_already():
    """torch.onnx.export without its decomposition pass (the program is decomposed already)."""
    from torch.onnx._internal.exporter import _fx_passes

    saved = _fx_passes.decompose_with_registry
    _fx_passes.decompose_with_registry = lambda program, registry: program
    try:
        yield
    finally:
        _fx_passes.decompose_with_registry = saved


def optimize_graph(model) -> None:
    """What `torch.onnx.export(optimize=True)` runs (onnxscript's `optimize_ir`), in a cheaper order:
    fold constants and merge common subexpressions first, then run the pattern rewriter once on
    the folded graph, then fold again.

    Why by hand: `optimize_ir` runs its ~45 rewrite rules on the raw graph, 3-4x larger before
    folding, twice. On the tiny distill bundle's three graphs (4,030 / 1,802 / 3,924 raw nodes)
    it took 18.8 / 3.6 / 23.3 s; this order takes 3.3 / 0.9 / 3.5 s and ends with 1,071 / 416 /
    1,041 nodes instead of 1,058 / 416 / 1,031, outputs bit-identical. The difference is 15
    ScatterND per gradient graph that a second rewrite would remove (for 13 s more): onnxruntime
    runs that train graph 2% slower (median 12.15 vs 11.90 ms, batch 4 x 64, tiny model).
    tests/test_export.py checks the two orders give the same outputs on a head. onnxscript's
    opset-23 fusions (`onnx_fusions.fuse`) are left out: at opset 18 they find nothing to fuse.
    """
    import onnx_ir.passes.common as common
    import onnxscript.optimizer
    import onnxscript.rewriter

    def fold() -> None:
        for _ in range(2):  # optimize_ir's num_iterations=2, with its early stop
            folded = onnxscript.optimizer.fold_constants(model, onnx_shape_inference=True)
            removed = common.RemoveUnusedNodesPass()(model)
            common.RemoveUnusedFunctionsPass()(model)
            common.RemoveUnusedOpsetsPass()(model)
            if not (folded.modified or removed.modified):
                break

    common.InlinePass()(model)
    fold()
    common.CommonSubexpressionEliminationPass()(model)
    onnxscript.rewriter.RewritePass(rewrite_rules())(model)
    fold()
    for step in (common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
                 common.LiftSubgraphInitializersToMainGraphPass(), common.DeduplicateInitializersPass(),
                 common.CommonSubexpressionEliminationPass(), common.OutputFixPass(), common.NameFixPass()):
        step(model)


def rewrite_rules() -> tuple:
    """onnxscript's default rewrite rules less those whose pattern has more than one output node.

    onnxscript matches such a pattern (its only one is `SlicesSplit`: two Slices of one tensor ->
    one Split) by indexing the whole graph again for every candidate node, so its cost grows with
    the square of the graph: on SmolLM2's whole-model train graph the rewrite took 226 of the
    export's 762 s. It never fired on our graphs (tiny Llama's train graph: the same 1,057 nodes
    without it), and a Split of two Slices would save no work in onnxruntime anyway."""
    import onnxscript.rewriter

    return tuple(r for r in onnxscript.rewriter._DEFAULT_REWRITE_RULES
                 if len(r._target_pattern.output_nodes) == 1)


@contextmanager
def _no_stack_traces():
    saved = fx_config.do_not_emit_stack_traces
    fx_config.do_not_emit_stack_traces = True
    try:
        yield
    finally:
        fx_config.do_not_emit_stack_traces = saved


def example_inputs(vocab: int, hidden: int, *, batch: int = 2, seq: int = 16) -> dict[str, torch.Tensor]:
    """Tracing inputs; batch >= 2 and a padded row so no dim gets specialised to a constant."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (batch, seq), generator=gen)
    mask = torch.ones(batch, seq, dtype=torch.int64)
    mask[-1, seq // 2:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.clone(),
            "hidden": torch.randn(batch, seq, hidden, generator=gen)}


def export_client_graphs(graphs: ClientGraphs, out: Path, *, with_tail: bool, max_seq: int) -> list[str]:
    """Write head.onnx, head_grad.onnx (and tail.onnx) into `out`; return the file names."""
    cfg = graphs.arch.model.config
    ex = example_inputs(cfg.vocab_size, cfg.hidden_size)
    names = graphs.lora.names
    # LoRA tensors for tracing: nonzero B so no branch of the gradient folds away.
    loras = [torch.randn(graphs.lora.shapes[n]) * 0.01 for n in names]
    ids, mask, hidden = ex["input_ids"], ex["attention_mask"], ex["hidden"]
    trace_to_onnx(graphs.head, (ids, mask, *loras), input_names=[*HEAD_INPUTS, *names],
                  output_names=["hidden"], n_dynamic=2, max_seq=max_seq, path=out / "head.onnx")
    trace_to_onnx(graphs.head_grad, (ids, mask, hidden, *loras),
                  input_names=[*HEAD_INPUTS, "grad_hidden", *names],
                  output_names=[f"grad.{n}" for n in names], n_dynamic=3, max_seq=max_seq,
                  path=out / "head_grad.onnx")
    files = ["head.onnx", "head_grad.onnx"]
    if with_tail:
        trace_to_onnx(graphs.tail, (hidden, ex["labels"], mask), input_names=list(TAIL_INPUTS),
                      output_names=["loss", "grad_hidden"], n_dynamic=3, max_seq=max_seq,
                      path=out / "tail.onnx", min_seq=MIN_TAIL_SEQ)
        files.append("tail.onnx")
    return files
