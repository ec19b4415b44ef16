"""The server body's memory: float32 vs nf4 vs int8 (serve --body-quant), on SmolLM2 by default.

Each preset in a fresh process (1 torch thread): the `Body` the split server builds, cut at 2.
Prints the bytes of the body blocks' weights (what the server runs: blocks K..N, the final norm;
the tied embedding / LM head is the same float32 table in every preset and is shown apart), the
whole model's parameter and buffer bytes, the process RSS after loading, and the peak RSS after
one training step at batch 1 x 128 tokens.

    python bench/bench_body_memory.py [--model default] [--quants none nf4 int8]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

CHILD = r"""
import json, resource, sys, numpy as np, psutil, torch
torch.set_num_threads(1)
from splitlm.cloud_server.body import Body, BodyConfig
model, quant = sys.argv[1], sys.argv[2]
rss0 = psutil.Process().memory_info().rss
body = Body(BodyConfig(model=model, cut=2, quant=quant, device="cpu"))
def extra(p):  # bitsandbytes keeps scales beside the packed weight: Params4bit.quant_state, Int8Params.SCB
    qs, out = getattr(p, "quant_state", None), [getattr(p, "SCB", None)]
    for st in (qs, getattr(qs, "state2", None)):
        out += [v for v in vars(st).values()] if st is not None else []
    return [t for t in out if isinstance(t, torch.Tensor)]
def nbytes(mod):
    ts = [*mod.parameters(), *mod.buffers()]
    return sum(t.numel() * t.element_size() for t in ts + [e for t in ts for e in extra(t)])
blocks = sum(nbytes(b) for b in body.arch.blocks[2:]) + nbytes(body.arch.final_norm)
loaded = psutil.Process().memory_info().rss
rng = np.random.default_rng(0)
loss0 = body.step(rng.standard_normal((1, 128, body.hidden_size)).astype(np.float32), np.ones((1, 128), np.int64),
                  rng.integers(0, body.arch.model.config.vocab_size, (1, 128)))[0]
print(json.dumps({"quant": quant, "body_blocks_mb": blocks / 1e6, "model_mb": nbytes(body.peft) / 1e6,
                  "embedding_mb": nbytes(body.arch.model.get_input_embeddings()) / 1e6,
                  "rss_loaded_mb": loaded / 1e6, "rss_start_mb": rss0 / 1e6,
                  "peak_rss_step_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--quants", nargs="+", default=["none", "nf4", "int8"])
    args = ap.parse_args()
    rows = []
    for quant in args.quants:
        out = subprocess.run([sys.executable, "-c", CHILD, args.model, quant], capture_output=True, text=True,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
        if out.returncode != 0:
            sys.exit(out.stderr)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"{'body':6s} {'blocks K..N MB':>15s} {'whole model MB':>15s} {'(embedding MB)':>15s} "
          f"{'RSS loaded MB':>14s} {'peak RSS step MB':>17s}")
    for r in rows:
        print(f"{r['quant']:6s} {r['body_blocks_mb']:15.1f} {r['model_mb']:15.1f} {r['embedding_mb']:15.1f} "
              f"{r['rss_loaded_mb']:14.0f} {r['peak_rss_step_mb']:17.0f}")
    base = rows[0]
    for r in rows[1:]:
        print(f"{r['quant']}: body blocks {r['body_blocks_mb'] / base['body_blocks_mb']:.2f}x of {base['quant']}, "
              f"RSS after load {r['rss_loaded_mb'] / base['rss_loaded_mb']:.2f}x")


if __name__ == "__main__":
    main()
