"""The privacy frontier: what each device-side defense buys against `splitlm audit`, and what it costs.

For SmolLM2 cut at each K and each noise level sigma (0 = none), one config:
  1. the device's frames for the victim text (GFDL-1.3), defended with clip C (the median per-token
     norm of clean h_K on public text) and noise sigma; in U-shape the tail_grad too (its own clip:
     the median per-token norm of clean tail_grads; the same sigma);
  2. every shipped attack on them: dictionary (L2, cosine), inverter (fitted on GPL-3 + Apache-2.0,
     text the victim never wrote), exact search (first --exact-tokens tokens), labels from tail_grad;
  3. a fixed fine-tune on the victim text (same data, steps, seed for every config) through the
     same split as `splitlm serve --labels device` + `splitlm edge`, in one process: the bundle's
     ONNX head, the privatizer, the server's Body (PEFT LoRA, AdamW), the device tail;
  4. held-out loss after it, on Python's LICENSE.txt, through the clean head and trained body.

Prints one line per config and writes OUT/privacy_frontier.json (rewritten after every config) and
OUT/privacy_frontier.png (recovery of the strongest attack vs held-out loss cost).

    flock /tmp/splitlm-heavy.lock python bench/privacy_frontier.py --out bench/results
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from splitlm.audit import attacks
from splitlm.audit.frames import device_frames
from splitlm.audit.run import body_fn, dictionary_prefix
from splitlm.edge_client.data import Dataset
from splitlm.edge_client.optim import AdamW
from splitlm.edge_client.privacy import Noise, PrivacySettings, Privatizer
from splitlm.edge_client.runtime import HeadRuntime
from splitlm.manifest import Bundle

LICENSES = Path("/usr/share/common-licenses")
HELD_OUT = Path(sys.base_prefix) / "lib" / f"python{sys.version_info[0]}.{sys.version_info[1]}" / "LICENSE.txt"


def texts(work: Path) -> dict[str, Path]:
    """victim (the device's data), public (the server's), held_out (the judge's): three different texts."""
    work.mkdir(parents=True, exist_ok=True)
    out = {"victim": work / "victim.txt", "public": work / "public.txt", "held_out": work / "held_out.txt"}
    out["victim"].write_text((LICENSES / "GFDL-1.3").read_text())
    out["public"].write_text((LICENSES / "GPL-3").read_text() + "\n" + (LICENSES / "Apache-2.0").read_text())
    out["held_out"].write_text(HELD_OUT.read_text())
    return out


def bundle_for(model: str, cut: int, bundles: Path) -> Bundle:
    path = bundles / f"k{cut}"
    if not (path / "manifest.json").is_file():
        from splitlm.export.bundle import ExportOptions, export_bundle

        export_bundle(model, path, ExportOptions(cut=cut, quant="fp32", labels="device"), log=print)
    return Bundle.open(path)


def fine_tune(model: str, bundle: Bundle, runtime: HeadRuntime, data: Path, held_out: Path, settings: PrivacySettings, *,
              steps: int, batch: int, seq: int, seed: int, held_out_tokens: int, before: float | None = None) -> dict:
    """U-shape split fine-tune in one process; held-out loss before (step 0; pass it when known) and after,
    on the first `held_out_tokens` tokens of the held-out batches (seed 0: the same tokens every time)."""
    from splitlm.cloud_server.body import Body, BodyConfig
    from splitlm.export.graphs import causal_lm_loss

    m = bundle.manifest
    body = Body(BodyConfig(model=model, cut=m.cut, labels="device", lora_rank=m.lora.rank,
                           lora_alpha=m.lora.alpha, lora_targets=m.lora.targets, seed=seed))
    lora, optim = bundle.lora_init(), AdamW(lr=1e-3)
    privatizer = Privatizer(settings, np.random.default_rng(seed))
    train = Dataset.from_file(data, bundle, seq_len=seq, batch_size=batch, seed=seed)
    evals = Dataset.from_file(held_out, bundle, seq_len=seq, batch_size=8, seed=0)

    def held_out_loss() -> float:
        total = count = 0.0
        for s in range(evals.steps_per_epoch):
            if count >= held_out_tokens:
                break
            b = evals.batch(s)
            h = runtime.forward(b.input_ids, b.attention_mask, lora)  # the clean head: inference is not the wire
            with torch.no_grad():
                mask = torch.from_numpy(b.attention_mask)
                h_n = body.arch.run_blocks(torch.from_numpy(h), mask, m.cut, body.num_layers)
                loss = causal_lm_loss(body.arch.logits(h_n), torch.from_numpy(b.labels), mask)
            n = float((b.labels[:, 1:] != -100).sum())
            total, count = total + float(loss) * n, count + n
        return total / count

    before = held_out_loss() if before is None else before
    for step in range(steps):
        b = train.batch(step)
        h_k = privatizer.hidden(runtime.forward(b.input_ids, b.attention_mask, lora))      # (B, T, H) sent
        h_n, pending = body.forward_u(h_k, b.attention_mask)                               # server
        _, g_n = runtime.tail(h_n, b.labels, b.attention_mask)                             # device
        g_k = body.backward_u(pending, privatizer.tail_grad(g_n))                          # server
        optim.step(lora, runtime.lora_grads(b.input_ids, b.attention_mask, g_k, lora))     # device
    return {"held_out_before": before, "held_out_after": held_out_loss()}


def run_attacks(bundle, runtime, tables, public, frames, settings, arch, *, exact_tokens: int) -> dict:
    noise, lora = settings.hidden, bundle.lora_init()
    keep = frames.attention_mask.astype(bool)
    rec = lambda pred, k=keep, rows=None: float((pred[k] == frames.input_ids[:rows][k]).mean())  # noqa: E731
    out = {"dictionary": rec(attacks.dictionary_attack(frames.hidden, tables, noise=noise)),
           "dictionary-cosine": rec(attacks.dictionary_attack(frames.hidden, tables, noise=noise, metric="cosine")),
           "inverter": rec(attacks.inverter_attack(frames.hidden, frames.attention_mask, tables, public=public,
                                                   noise=noise))}
    rows = max(1, exact_tokens // frames.input_ids.shape[1])
    pred = attacks.exact_attack(frames.hidden[:rows], frames.attention_mask[:rows], tables, runtime, lora, noise=noise)
    out["exact"] = rec(pred, keep[:rows], rows)
    labels = attacks.label_attack(frames.tail_grad, frames.hidden_n, frames.attention_mask, norm=arch.final_norm,
                                  lm_head=arch.lm_head)
    truth = np.where(keep, frames.labels, -100)[:, 1:]
    lk = truth != -100
    out["labels"] = float((labels[:, :-1][lk] == truth[lk]).mean())
    return out


def plot(results: list[dict], path: Path) -> None:
    try:
        import matplotlib
    except ImportError:
        print("no plot: pip install matplotlib", file=sys.stderr)
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, title in ((axes[0], "tokens", "text from h_K (strongest of dictionary/inverter/exact)"),
                           (axes[1], "labels", "labels from tail_grad (U-shape)")):
        for cut in sorted({r["cut"] for r in results}):
            rs = sorted((r for r in results if r["cut"] == cut), key=lambda r: r["sigma"])
            x = [100 * r["loss_cost"] for r in rs]
            y = [100 * (r["strongest_tokens"] if key == "tokens" else r["recovery"]["labels"]) for r in rs]
            ax.plot(x, y, "o-", label=f"K={cut}")
            for r, xi, yi in zip(rs, x, y):
                ax.annotate(f"σ={r['sigma']:g}", (xi, yi), fontsize=7)
        ax.axhline(10, color="grey", ls=":")
        ax.axvline(5, color="grey", ls=":")
        ax.set_ylim(0, 105)
        ax.set_xlabel("held-out loss cost vs undefended (%)")
        ax.set_ylabel("recovered (%)")
        ax.set_title(title, fontsize=9)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default", help="the model folder (default: SmolLM2-135M-Instruct)")
    p.add_argument("--cuts", type=int, nargs="+", default=[2, 4, 8])
    p.add_argument("--sigmas", type=float, nargs="+", default=[0.0, 0.5, 1.0, 2.0])
    p.add_argument("--tokens", type=int, default=1024, help="victim tokens attacked")
    p.add_argument("--exact-tokens", type=int, default=256)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--held-out-tokens", type=int, default=10 ** 9, help="default: the whole held-out text")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bundles", default=str(Path(tempfile.gettempdir()) / "splitlm-privacy-bundles"))
    p.add_argument("--out", default="bench/results")
    p.add_argument("--append", action="store_true", help="keep the results already in OUT/privacy_frontier.json")
    args = p.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    files = texts(Path(args.bundles) / "text")
    results: list[dict] = []
    if args.append and (out / "privacy_frontier.json").is_file():
        results = json.loads((out / "privacy_frontier.json").read_text())["results"]
    from splitlm.export.arch import Arch
    from splitlm.export.bundle import load_model

    model, _ = load_model(args.model)
    arch = Arch.of(model)
    for cut in args.cuts:
        bundle = bundle_for(args.model, cut, Path(args.bundles))
        runtime = HeadRuntime(bundle, threads=1)
        t0 = time.perf_counter()
        tables = attacks.dictionary_tables(runtime, bundle.lora_init(), prefix=dictionary_prefix(bundle))
        clean_public = device_frames(bundle, files["public"], settings=PrivacySettings(), runtime=runtime,
                                     max_tokens=4 * args.tokens)
        body = body_fn(arch, cut)
        clean = device_frames(bundle, files["victim"], settings=PrivacySettings(), runtime=runtime, body=body,
                              max_tokens=args.tokens, rng=np.random.default_rng(args.seed))
        clip = _median_norm(clean_public.hidden, clean_public.attention_mask)
        grad_clip = _median_norm(clean.tail_grad, clean.attention_mask)
        print(f"K={cut}: dictionary + public frames in {time.perf_counter() - t0:.0f} s; clip {clip:.3g}, "
              f"grad clip {grad_clip:.3g}", flush=True)
        done = {r["sigma"]: r for r in results if r["cut"] == cut}  # from --append
        baseline = done[0.0]["held_out_after"] if 0.0 in done else None
        before = done[0.0]["held_out_before"] if 0.0 in done else None
        for sigma in args.sigmas:
            if sigma in done:
                continue
            t0 = time.perf_counter()
            settings = (PrivacySettings() if sigma == 0 else
                        PrivacySettings(Noise(clip, sigma), Noise(grad_clip, sigma)))
            frames = device_frames(bundle, files["victim"], settings=settings, runtime=runtime, body=body,
                                   max_tokens=args.tokens, rng=np.random.default_rng(args.seed + 1))
            recovery = run_attacks(bundle, runtime, tables, clean_public, frames, settings, arch,
                                   exact_tokens=args.exact_tokens)
            tune = fine_tune(args.model, bundle, runtime, files["victim"], files["held_out"], settings, steps=args.steps,
                             batch=args.batch, seq=args.seq, seed=args.seed, held_out_tokens=args.held_out_tokens,
                             before=before)
            before = tune["held_out_before"]
            baseline = tune["held_out_after"] if sigma == 0 else baseline
            row = {"cut": cut, "sigma": sigma, "clip": None if sigma == 0 else clip,
                   "grad_clip": None if sigma == 0 else grad_clip, "recovery": recovery,
                   "strongest_tokens": max(v for k, v in recovery.items() if k != "labels"), **tune,
                   "loss_cost": (tune["held_out_after"] / baseline - 1) if baseline else float("nan"),
                   "seconds": round(time.perf_counter() - t0, 1)}
            results.append(row)
            print(json.dumps(row), flush=True)
            (out / "privacy_frontier.json").write_text(json.dumps(
                {"config": vars(args), "victim": "GFDL-1.3", "public": "GPL-3 + Apache-2.0",
                 "held_out": "Python LICENSE.txt", "results": results}, indent=1))
            plot(results, out / "privacy_frontier.png")


def _median_norm(x: np.ndarray, mask: np.ndarray) -> float:
    keep = mask.astype(bool)
    norms = np.linalg.norm(x[keep], axis=-1)
    return float(np.median(norms[norms > 0]))


if __name__ == "__main__":
    main()
