"""FedAvg through splitlm's real processes against FedAvg simulated in one torch process.

Issue 8, item 1 on a real model: an fp32 fedavg bundle, the f32 update wire, 2 devices, R local
steps, 3 rounds; the written global adapter (or model) must equal the simulation within 1e-3
relative. `tests/test_federated.py` runs the same check on a tiny model with the same
`simulate_fedavg` and `written_global`; this script runs it on SmolLM2 (or any --model):

    python bench/fedavg_equality.py [--model M] [--bundle B] [--train lora] [--rounds 3]
        [--local-steps 2] [--batch-size 2] [--seq-len 32] [--lr 1e-3] [--json]

Without --bundle it exports one (`splitlm export M --mode fedavg --train T --quant fp32`, tens of
minutes for SmolLM2 on 2 cores) into a temporary folder. Prints, per trainable, the relative error
of the global (|got - want| / |want|) and of the round's movement from the initial global
(|got - want| / |want - init|, the stricter number: LoRA's B and full weights start far from 0).
Exits 1 when the largest global error is 1e-3 or more.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from splitlm.launch import cli_command


def simulate_fedavg(model_dir, bundle, datasets, *, rounds: int, local_steps: int,
                    lr: float) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """FedAvg in one torch process: each device its own copy and its own AdamW (its moments kept
    across rounds, as the device keeps them), R local steps from the global, sample-weighted mean
    delta. LoRA: PEFT with the bundle manifest's rank, alpha and targets, initialised as the server
    initialises it (torch seed 0 before `get_peft_model`); full: every parameter but the embedding.
    Returns (the initial global, the global after `rounds`)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    m = bundle.manifest

    def device_model():
        model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="eager", torch_dtype=torch.float32)
        model.requires_grad_(False)
        if m.train == "full":
            return model, {n: p.requires_grad_(True) for n, p in model.named_parameters() if "embed" not in n}
        torch.manual_seed(0)  # the server's LoRA init, which it sends every device at join
        peft = get_peft_model(model, LoraConfig(r=m.lora.rank, lora_alpha=m.lora.alpha, lora_dropout=0.0,
                                                target_modules=list(m.lora.targets)))
        return peft, {n: p for n, p in peft.named_parameters() if "lora_" in n}

    devices = [device_model() for _ in datasets]
    optims = [torch.optim.AdamW(params.values(), lr=lr, weight_decay=0.0) for _, params in devices]
    glob = initial = {n: p.detach().clone() for n, p in devices[0][1].items()}
    total = sum(d.n_samples for d in datasets)
    for r in range(rounds):
        mean = {n: torch.zeros_like(g) for n, g in glob.items()}
        for (model, params), optim, data in zip(devices, optims, datasets):
            with torch.no_grad():
                for n, p in params.items():
                    p.copy_(glob[n])
            for i in range(local_steps):
                b = data.batch(r * local_steps + i)
                loss = model(input_ids=torch.from_numpy(b.input_ids), attention_mask=torch.from_numpy(b.attention_mask),
                             labels=torch.from_numpy(b.labels)).loss
                optim.zero_grad()
                loss.backward()
                optim.step()
            for n, p in params.items():
                mean[n] += (p.detach() - glob[n]) * (data.n_samples / total)
        glob = {n: glob[n] + mean[n] for n in glob}
    return initial, glob


def written_global(folder: Path, train: str) -> dict[str, torch.Tensor]:
    """A round's global as the server wrote it, named as `simulate_fedavg` names it."""
    from safetensors.torch import load_file

    if train == "full":
        return load_file(folder / "model" / "model.safetensors")
    return {k.replace(".weight", ".default.weight"): v
            for k, v in load_file(folder / "adapter" / "adapter_model.safetensors").items()}


def relative_errors(got: dict, want: dict, init: dict) -> dict[str, tuple[float, float]]:
    """name -> (|got - want| / |want|, |got - want| / |want - init|)."""
    out = {}
    for name, value in want.items():
        diff = float((got[name] - value).norm())
        out[name] = (diff / float(value.norm().clamp_min(1e-12)),
                     diff / max(float((value - init[name]).norm()), 1e-12))
    return out


def run(args, bundle: Path, tmp: Path) -> dict:
    from splitlm.compare import ONE_THREAD, start_server
    from splitlm.demo import write_ledger_data
    from splitlm.edge_client.data import Dataset
    from splitlm.manifest import Bundle

    b = Bundle.open(bundle)
    write_ledger_data(tmp / "data", clients=2, per_client=12, held_out=4)
    out = tmp / "out"
    serve = cli_command("serve", str(args.model), "--mode", "fedavg", "--train", b.manifest.train, "--rounds", str(args.rounds),
             "--local-steps", str(args.local_steps), "--update-wire", "f32", "--min-clients", "2", "--out", str(out),
             "--port", "0", "--threads", "1")
    if b.manifest.train == "lora":
        serve += ["--lora-rank", str(b.manifest.lora.rank)]
    env = {**os.environ, **ONE_THREAD}
    server, url = start_server(serve, tmp / "server.log", env=env)
    try:
        devices = [subprocess.Popen(cli_command("edge", url, "--bundle", str(bundle), "--data", str(tmp / "data" / f"client-{i}.jsonl"),
                                     "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len), "--lr", str(args.lr),
                                     "--threads", "1", "--metrics-out", str(tmp / f"m-{i}.jsonl")),
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for i in range(2)]
        for p in devices:
            _, err = p.communicate(timeout=7200)
            if p.returncode:
                raise SystemExit(f"edge failed:\n{err[-3000:]}")
        if server.wait(timeout=600):
            raise SystemExit("server failed:\n" + (tmp / "server.log").read_text()[-3000:])
    finally:
        if server.poll() is None:
            server.kill()
    datasets = [Dataset.from_file(tmp / "data" / f"client-{i}.jsonl", b, seq_len=args.seq_len, batch_size=args.batch_size)
                for i in range(2)]
    torch.set_num_threads(1)
    init, want = simulate_fedavg(args.model, b, datasets, rounds=args.rounds, local_steps=args.local_steps, lr=args.lr)
    got = written_global(out / f"round-{args.rounds - 1:04d}", b.manifest.train)
    errors = relative_errors(got, want, init)
    steps = [r for i in range(2) for r in map(json.loads, (tmp / f"m-{i}.jsonl").read_text().splitlines())
             if r.get("phase") == "round"]
    worst = max(errors.items(), key=lambda kv: kv[1][0])
    worst_move = max(errors.items(), key=lambda kv: kv[1][1])
    return {"model": str(args.model), "train": b.manifest.train, "quant": b.manifest.quant, "rounds": args.rounds,
            "local_steps": args.local_steps, "batch": [args.batch_size, args.seq_len], "lr": args.lr,
            "tensors": len(errors), "max_rel_error": worst[1][0], "max_rel_error_tensor": worst[0],
            "max_rel_error_of_movement": worst_move[1][1], "max_rel_error_of_movement_tensor": worst_move[0],
            "device_rss_peak_mb": max(r["rss_peak_mb"] for r in steps),
            "device_compute_s_per_step": max(r["compute_s"] for r in steps) / args.local_steps}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", type=Path)
    ap.add_argument("--bundle", type=Path, help="an fp32 fedavg bundle of --model (else one is exported)")
    ap.add_argument("--train", default="lora", choices=("lora", "full"))
    ap.add_argument("--lora-rank", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--local-steps", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.model is None:
        from splitlm.export.default_model import default_model_dir
        args.model = default_model_dir()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        bundle = args.bundle
        if bundle is None:
            bundle = tmp / "bundle"
            subprocess.run(cli_command("export", str(args.model), "--mode", "fedavg", "--train", args.train, "--quant",
                                       "fp32", "--lora-rank", str(args.lora_rank), "--max-length", "128", "--out",
                                       str(bundle)), check=True)
        result = run(args, bundle, tmp)
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{result['tensors']} trainables after {args.rounds} rounds x {args.local_steps} local steps, 2 devices: "
              f"largest relative error {result['max_rel_error']:.2e} ({result['max_rel_error_tensor']}), "
              f"of the movement from the initial global {result['max_rel_error_of_movement']:.2e} "
              f"({result['max_rel_error_of_movement_tensor']}); device peak RSS {result['device_rss_peak_mb']:.0f} MB, "
              f"{result['device_compute_s_per_step']:.2f} s a local step")
    sys.exit(0 if result["max_rel_error"] < 1e-3 else 1)


if __name__ == "__main__":
    main()
