"""Device FLOPs per round for `splitlm compare`, counted from the bundle's graphs.

A graph's multiply-add count on a (B, T) input is exactly B * (a*T + c*T^2): every MatMul is
either token-by-weight (linear in B*T) or attention's token-by-token product (B * T^2).
`export.cost.graph_cost` counts both from one onnxruntime run, so two runs at batch 1 (T = 8
and 16) give a and c, and every batch a client actually ran is then priced without running the
graph again. Which graphs run, and on which batches, is the device's own schedule:

    split, labels at the server   head.onnx + head_grad.onnx    on each private batch
    split, labels on the device   + tail.onnx                   on each private batch
    fedavg                        train.onnx                    on each private batch
    distill                       train.onnx                    on each private batch
                                  topk.onnx                     on the public set, in order, once a round
                                  kd_grad.onnx                  on each KD batch of the public set

The batches come from the same `Dataset` (same file, bundle tokenizer, seq_len, batch size and
seed) the edge process used, so the shapes are those it ran, step by step.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from splitlm.manifest import Bundle

PROBE_T = (8, 16)


@dataclass(frozen=True)
class Scaling:
    """FLOPs(B, T) = B * (a*T + c*T^2) of one graph."""
    a: float
    c: float

    def flops(self, batch: int, seq: int) -> float:
        return batch * (self.a * seq + self.c * seq * seq)


def scaling(path: Path) -> Scaling:
    from splitlm.export.cost import graph_cost

    t1, t2 = PROBE_T
    f1, f2 = (graph_cost(path, batch=1, seq=t).flops for t in PROBE_T)
    c = (f2 / t2 - f1 / t1) / (t2 - t1)   # f/T = a + c*T
    return Scaling(a=f1 / t1 - c * t1, c=c)


def graph_scalings(bundle: Path) -> dict[str, Scaling]:
    """Every device graph of the bundle, priced once (the slow part: one onnxruntime run each)."""
    names = ("head.onnx", "head_grad.onnx", "tail.onnx", "train.onnx", "topk.onnx", "kd_grad.onnx")
    return {n: scaling(bundle / n) for n in names if (bundle / n).is_file()}


def round_flops(bundle_path: Path, data: Path, *, scalings: dict[str, Scaling], rounds: int, steps: int,
                batch_size: int, seq_len: int, seed: int) -> list[float]:
    """The device FLOPs of each round for the client that trained on `data` with `seed`."""
    from splitlm.edge_client.data import Dataset

    bundle = Bundle.open(bundle_path, verify=False)
    m = bundle.manifest
    private = Dataset.from_file(data, bundle, seq_len=min(seq_len, m.max_length), batch_size=batch_size, seed=seed)
    per_step = [n for n in ("head.onnx", "head_grad.onnx", "tail.onnx", "train.onnx") if n in scalings]
    public = _public(bundle, batch_size, seed) if m.mode == "distill" else None
    out = []
    for r in range(rounds):
        total = 0.0
        for step in range(r * steps, (r + 1) * steps):
            b, t = private.batch(step).input_ids.shape                                 # (B, T)
            total += sum(scalings[n].flops(b, t) for n in per_step)
        if public is not None:
            in_order, kd_order = public
            total += sum(scalings["topk.onnx"].flops(b, t) for b, t in in_order)
            total += sum(scalings["kd_grad.onnx"].flops(*kd_order.batch(s).input_ids.shape)
                         for s in range(r * steps, (r + 1) * steps))
        out.append(total)
    return out


def _public(bundle: Bundle, batch_size: int, seed: int):
    """The public set's in-order batch shapes (top-k) and its KD batch order, as the device makes them."""
    from splitlm.edge_client.data import Dataset
    from splitlm.public import PublicSet

    public = PublicSet.from_bundle(bundle)
    pad = bundle.manifest.pad_token_id
    in_order = [b.input_ids.shape for _, b in public.in_order(batch_size, pad_token_id=pad)]
    return in_order, Dataset(public.sequences, batch_size=batch_size, pad_token_id=pad, seed=seed)
