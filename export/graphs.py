"""The three client graphs as PyTorch functions, and their path to ONNX.

    head(input_ids, attention_mask, *loras)            -> hidden_K               (B, T, H)
    head_grad(input_ids, attention_mask, grad_hidden, *loras) -> dL/d(each lora)
    tail(hidden_N, labels, attention_mask)             -> loss, dL/dhidden_N

and, exported with --keep-activations, the same step without running the forward twice:

    head_saved(input_ids, attention_mask, *loras)      -> hidden_K, *saved      (what backward reads)
    head_grad_kept(input_ids, attention_mask, grad_hidden, *loras, *saved) -> dL/d(each lora)

`torch.autograd.grad` inside a module's forward does not export (torch.export errors, or bakes
the LoRA inputs in as constants). What works: trace the joint forward+backward function with
`make_fx` into plain aten ops, `torch.export` that graph with dynamic batch and sequence, then
`torch.onnx.export` it. The same path serves all three graphs.
"""

from __future__ import annotations

import operator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable

import sympy
import torch
import torch.fx.experimental._config as fx_shapes_config
import torch.nn.functional as F
from torch.fx import config as fx_config
from torch.fx.experimental.proxy_tensor import make_fx

from splitlm.errors import ExportError

from .arch import Arch
from .attention import recomputing_attention
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
    saved_layout: list | None = None  # head_saved's outputs, set when it is traced

    def head(self, input_ids, attention_mask, *loras):
        with self.lora.bind(dict(zip(self.lora.names, loras))):
            h = self.arch.embed(input_ids)  # (B, T, H)
            return self.arch.run_blocks(h, attention_mask, 0, self.cut)  # (B, T, H)

    def head_grad(self, input_ids, attention_mask, grad_hidden, *loras):
        loras = [t.detach().requires_grad_(True) for t in loras]
        with torch.enable_grad():
            h = self.head(input_ids, attention_mask, *loras)
            return tuple(torch.autograd.grad(h, loras, grad_hidden))

    def head_saved(self, input_ids, attention_mask, *loras):
        """The head, and every activation its backward reads (autograd's saved tensors), each
        reshaped to dims that are the batch, the sequence or constants. Traced only (see
        `SavedActivations`); `self.saved_layout` is set from the trace. Attention keeps q, k, v
        and the mask, not its probabilities (export/attention.py)."""
        loras = [t.detach().requires_grad_(True) for t in loras]
        saved = SavedActivations(input_ids, loras)
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(saved.pack, saved.unpack), \
                recomputing_attention(self.arch.model):
            h = self.head(input_ids, attention_mask, *loras)
        outputs, self.saved_layout = saved.outputs()
        return (h.detach(), *outputs)

    def head_grad_kept(self, input_ids, attention_mask, grad_hidden, *loras_and_saved):
        """head_grad with head_saved's tensors given: the forward is traced again, but backward reads
        the inputs instead of its values, and `reroute_sizes` leaves the forward nothing to feed."""
        n = len(self.lora.names)
        loras = [t.detach().requires_grad_(True) for t in loras_and_saved[:n]]
        saved = SavedActivations(input_ids, loras, given=loras_and_saved[n:])
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(saved.pack, saved.unpack), \
                recomputing_attention(self.arch.model):
            h = self.head(input_ids, attention_mask, *loras)
            return tuple(torch.autograd.grad(h, loras, grad_hidden))

    def tail(self, hidden, labels, attention_mask):
        hidden = hidden.detach().requires_grad_(True)
        with torch.enable_grad():
            loss = causal_lm_loss(self.arch.logits(hidden), labels, attention_mask)
            (grad,) = torch.autograd.grad(loss, [hidden])
        return loss, grad


class SavedActivations:
    """autograd's saved tensors as graph outputs (head_saved) or graph inputs (head_grad_kept).

    `torch.autograd.graph.saved_tensors_hooks` sees every tensor a backward formula keeps. Those
    whose shape depends on the tokens' batch or sequence (a symbol of the trace that is not a LoRA
    tensor's) are activations: head_saved returns them (each once), head_grad_kept takes them in
    the same order, as the same trace of the same forward packs them. The rest (frozen weights and
    their views, the LoRA tensors) stay in the backward graph as they are. A dim such as
    batch * seq (a matmul's flattened rows) or batch * heads cannot be a graph input's dynamic
    dim, so each saved tensor is reshaped to one dim per factor: ["B", "T", 64] is (batch, seq, 64).
    """

    def __init__(self, input_ids: torch.Tensor, loras: list[torch.Tensor], given: tuple = ()):
        b, t = input_ids.shape[:2]
        self.tokens = [(d.node.expr, d.node.hint) if isinstance(d, torch.SymInt) else None for d in (b, t)]
        self.sizes = {"B": b, "T": t}
        self.lora_symbols = {d.node.expr: d.node.hint for x in loras for d in x.shape
                             if isinstance(d, torch.SymInt) and d.node.expr.is_Symbol}
        self.given, self.kept, self.shapes = given, [], []

    def _activation(self, x: torch.Tensor) -> bool:
        symbols = {s for d in x.shape if isinstance(d, torch.SymInt) for s in d.node.expr.free_symbols}
        return bool(symbols - self.lora_symbols.keys())

    def pack(self, x: torch.Tensor):
        if not self._activation(x):
            return x
        for i, k in enumerate(self.kept):
            if k is x:
                return i
        self.kept.append(x)
        self.shapes.append(x.shape)
        return len(self.kept) - 1

    def unpack(self, packed):
        if not isinstance(packed, int):
            return packed
        return self.given[packed].view(self.shapes[packed]) if self.given else self.kept[packed]

    def outputs(self) -> tuple[list[torch.Tensor], list[dict]]:
        """The kept tensors in their output shapes, and each one's layout {"dims": [...], "dtype": ...}."""
        if None in self.tokens:
            raise ExportError("head_saved is traced with symbolic shapes only (make_fx tracing_mode='symbolic')")
        outs, layout = [], []
        for x in self.kept:
            dims = [f for d in x.shape for f in self._factors(d)]
            sizes = [self.sizes.get(f, f) if isinstance(f, str) else f for f in dims]
            outs.append(x.detach().contiguous().view(sizes))
            layout.append({"dims": dims, "dtype": x.dtype})
        return outs, layout

    def _factors(self, d) -> list:
        if not isinstance(d, torch.SymInt):
            return [int(d)]
        expr, rest, out, product = d.node.expr, int(d.node.hint), [], sympy.Integer(1)
        for (symbol, hint), name in zip(self.tokens, "BT"):
            if symbol in expr.free_symbols:
                out.append(name)
                rest //= hint
                product *= symbol
        # batch, seq, both or neither, times a constant (a LoRA rank counts as one); not seq - 1 or seq^2
        if sympy.expand(expr.subs(self.lora_symbols) - rest * product) != 0:
            raise ExportError(f"a saved activation has a dim {expr}: not the tokens' batch and/or sequence times "
                              f"a constant, which head_grad_kept could not take as an input")
        return out + ([rest] if rest != 1 else [])


def saved_examples(layout: list[dict], *, batch: int, seq: int) -> list[torch.Tensor]:
    """Zero tensors shaped as head_saved's outputs for these batch and seq (head_grad_kept's tracing inputs)."""
    sizes = {"B": batch, "T": seq}
    return [torch.zeros([sizes.get(d, d) for d in item["dims"]], dtype=item["dtype"]) for item in layout]


def saved_dynamic(layout: list[dict], batch, seq) -> list:
    """torch.export dynamic_shapes for head_saved's outputs given back as inputs."""
    return [{i: batch if d == "B" else seq for i, d in enumerate(item["dims"]) if d in ("B", "T")} or None
            for item in layout]


def reroute_sizes(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Read every size from the graph's inputs, then drop what nothing uses.

    In head_grad_kept the traced forward's values feed nothing but sizes: backward formulas and
    `SavedActivations.unpack` ask the forward's tensors for their shape (`aten.sym_size`), which
    would keep the whole forward alive in the graph. Each such size is an expression in the input
    dims' symbols; it is rebuilt from the inputs' own sizes, and dead-code elimination removes the
    forward (tiny Llama: 57 -> 32 MatMuls, the backward's alone)."""
    graph = gm.graph
    inputs = {}
    for node in graph.nodes:
        val = node.meta.get("val") if node.op == "placeholder" else None
        for i, d in enumerate(getattr(val, "shape", ())):
            if isinstance(d, torch.SymInt) and d.node.expr.is_Symbol:
                inputs.setdefault(d.node.expr, (node, i))
    built: dict = {}

    def build(expr):
        if expr not in built:
            if expr.is_Integer:
                built[expr] = int(expr)
            elif expr.is_Symbol:
                node, i = inputs[expr]
                built[expr] = graph.call_function(torch.ops.aten.sym_size.int, (node, i))
            elif expr.is_Mul or expr.is_Add:
                op = operator.mul if expr.is_Mul else operator.add
                terms = [build(a) for a in expr.args]
                built[expr] = terms[0]
                for term in terms[1:]:
                    built[expr] = graph.call_function(op, (built[expr], term))
            else:
                raise ExportError(f"head_grad_kept: cannot rebuild the size {expr} from the graph's inputs")
        return built[expr]

    first = next(n for n in graph.nodes if n.op != "placeholder")
    for node in list(graph.nodes):
        if (node.op == "call_function" and node.target is torch.ops.aten.sym_size.int
                and node.args[0].op != "placeholder"):
            with graph.inserting_before(first):
                node.replace_all_uses_with(build(node.meta["val"].node.expr))
    graph.eliminate_dead_code()
    gm.recompile()
    return gm


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
    batch, seq = token_dims(max_seq, min_seq)
    dynamic = tuple({0: batch, 1: seq} if i < n_dynamic else None for i in range(len(args)))
    trace_with_shapes(fn, args, dynamic, input_names=input_names, output_names=output_names, path=path)


def token_dims(max_seq: int, min_seq: int = 2) -> tuple:
    """torch.export's dynamic batch and sequence dims."""
    return torch.export.Dim("batch", min=1, max=MAX_BATCH), torch.export.Dim("seq", min=min_seq, max=max_seq)


def trace_with_shapes(fn: Callable, args: tuple, dynamic: tuple, *, input_names: list[str],
                      output_names: list[str] | Callable[[], list[str]], path: Path,
                      fx_pass: Callable | None = None, own_symbols: bool = False,
                      runtime_asserts: bool = False) -> None:
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
      private modules.

    For head_saved / head_grad_kept: `output_names` may be a function called after make_fx (how
    many tensors are saved is known from the trace); `fx_pass` rewrites the traced graph before
    torch.export; own_symbols gives every input dim a symbol of its own, where make_fx gives one
    symbol to all dims of the same example size (a saved tensor's head_dim of 16 and a sequence of
    16 would become one, and the sequence a constant); runtime_asserts makes a guard sympy cannot
    decide (a saved view's stride: seq * min(64, 64 * seq) == 64 * seq) a runtime check, not an
    export error."""
    duck = fx_shapes_config.patch(use_duck_shape=False) if own_symbols else nullcontext()
    with _no_stack_traces():
        with duck:
            gm = make_fx(lambda *a: fn(*a), tracing_mode="symbolic", decomposition_table=onnx_decompositions(),
                         _allow_non_fake_inputs=True)(*args)
        gm = integer_powers(gm)
        if fx_pass is not None:
            gm = fx_pass(gm)
        program = torch.export.export(gm, args, dynamic_shapes=dynamic,
                                      prefer_deferred_runtime_asserts_over_guards=runtime_asserts)
        if callable(output_names):
            output_names = output_names()
        with _decomposed_already():
            onnx_program = torch.onnx.export(program, args, input_names=input_names, output_names=output_names,
                                             opset_version=OPSET, dynamo=True, optimize=False, verbose=False)
    optimize_graph(onnx_program.model)
    onnx_program.save(str(path), external_data=False)


def integer_powers(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """x ** 1 -> x, x ** 2 -> x * x, x ** 3 -> x * x * x on float tensors.

    The backward of the norms' x ** 2 is 2 * x ** 1 (and RMSNorm's rsqrt brings x ** 3):
    onnxruntime runs a Pow with any exponent but 2 through std::pow per element, 0.37 ms each on
    SmolLM2's (1, 128, 576) gradients, 2.2 of head_grad's ~50 ms at batch 1 x 128. A Mul is one
    vector instruction per 8 floats."""
    graph, changed = gm.graph, False
    for node in list(graph.nodes):
        if not (node.op == "call_function" and node.target is torch.ops.aten.pow.Tensor_Scalar):
            continue
        x, exponent = node.args
        val = getattr(x, "meta", {}).get("val")
        if exponent not in (1, 2, 3) or val is None or not val.dtype.is_floating_point \
                or val.dtype != node.meta["val"].dtype:
            continue
        with graph.inserting_before(node):
            power = x
            for _ in range(int(exponent) - 1):
                power = graph.call_function(torch.ops.aten.mul.Tensor, (power, x))
        node.replace_all_uses_with(power)
        graph.erase_node(node)
        changed = True
    if changed:
        gm.recompile()
    return gm


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


def export_client_graphs(graphs: ClientGraphs, out: Path, *, with_tail: bool, max_seq: int,
                         keep_activations: bool = False) -> list[str]:
    """Write head.onnx, head_grad.onnx (and tail.onnx; keep_activations: head_saved.onnx and
    head_grad_kept.onnx) into `out`; return the file names."""
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
    if keep_activations:
        files += export_kept_graphs(graphs, out, ids=ids, mask=mask, hidden=hidden, loras=loras, max_seq=max_seq)
    if with_tail:
        trace_to_onnx(graphs.tail, (hidden, ex["labels"], mask), input_names=list(TAIL_INPUTS),
                      output_names=["loss", "grad_hidden"], n_dynamic=3, max_seq=max_seq,
                      path=out / "tail.onnx", min_seq=MIN_TAIL_SEQ)
        files.append("tail.onnx")
    return files


def export_kept_graphs(graphs: ClientGraphs, out: Path, *, ids, mask, hidden, loras, max_seq: int) -> list[str]:
    """head_saved.onnx and head_grad_kept.onnx: the training step's forward keeps what its backward
    reads, so the backward does not run the forward again (more memory held between the two)."""
    names = graphs.lora.names
    batch, seq = token_dims(max_seq)
    tokens = ({0: batch, 1: seq}, {0: batch, 1: seq})
    graphs.saved_layout = None

    def saved_names() -> list[str]:
        return [f"saved.{i}" for i in range(len(graphs.saved_layout))]
    trace_with_shapes(graphs.head_saved, (ids, mask, *loras), (*tokens, *[None] * len(loras)),
                      input_names=[*HEAD_INPUTS, *names], output_names=lambda: ["hidden", *saved_names()],
                      path=out / "head_saved.onnx", runtime_asserts=True)
    layout, saved = graphs.saved_layout, saved_names()
    examples = saved_examples(layout, batch=ids.shape[0], seq=ids.shape[1])
    trace_with_shapes(graphs.head_grad_kept, (ids, mask, hidden, *loras, *examples),
                      (*tokens, {0: batch, 1: seq}, *[None] * len(loras), *saved_dynamic(layout, batch, seq)),
                      input_names=[*HEAD_INPUTS, "grad_hidden", *names, *saved],
                      output_names=[f"grad.{n}" for n in names], path=out / "head_grad_kept.onnx",
                      fx_pass=reroute_sizes, own_symbols=True, runtime_asserts=True)
    merge_duplicate_saved(out / "head_saved.onnx", out / "head_grad_kept.onnx", layout)
    return ["head_saved.onnx", "head_grad_kept.onnx"]


def merge_duplicate_saved(saved_path: Path, grad_path: Path, layout: list[dict]) -> list[str]:
    """Keep each saved activation once: drop head_saved outputs that are another output through
    Identity and Reshape nodes only, in the same layout (so the same shape and the same data in
    the same order), and feed head_grad_kept the one kept instead. autograd saves one tensor
    under several views (the attention probabilities for softmax's backward and for the matmul
    with V; a norm's output for the q and the v LoRA): SmolLM2 cut at 2 at 1 x 512 kept 71.4 MB,
    38 of them four (1, 9, 512, 512) tensors, two of which were copies. Returns the dropped names."""
    import onnx

    from .quantize import replace_repeated

    saved, grad = onnx.load(str(saved_path)), onnx.load(str(grad_path))
    producer = {o: n for n in saved.graph.node for o in n.output}

    def root(value: str) -> str:
        while value in producer and producer[value].op_type in ("Identity", "Reshape"):
            value = producer[value].input[0]
        return value

    first: dict = {}
    same: dict[str, str] = {}
    for i, out in enumerate(saved.graph.output[1:]):  # [0] is hidden
        item = layout[i]
        key = (root(out.name), tuple(item["dims"]), item["dtype"])
        if key in first:
            same[out.name] = first[key]
        else:
            first[key] = out.name
    if not same:
        return []
    replace_repeated(saved.graph.output, [o for o in saved.graph.output if o.name not in same])
    _drop_dead_nodes(saved.graph)
    for node in grad.graph.node:
        for j, name in enumerate(node.input):
            if name in same:
                node.input[j] = same[name]
    replace_repeated(grad.graph.input, [i for i in grad.graph.input if i.name not in same])
    onnx.save(saved, str(saved_path))
    onnx.save(grad, str(grad_path))
    return sorted(same)


def _drop_dead_nodes(graph) -> None:
    from .quantize import replace_repeated

    needed = {o.name for o in graph.output}
    alive = []
    for node in reversed(graph.node):
        if any(o in needed for o in node.output):
            alive.append(node)
            needed.update(node.input)
    replace_repeated(graph.node, alive[::-1])
