"""The `splitlm` command. Each subcommand imports its component only when it runs, so
`splitlm edge` and every `--help` work on a device install without torch."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from splitlm import __version__
from splitlm.errors import SplitLMError
from splitlm.manifest import LABEL_PLACEMENTS, QUANT_PRESETS



class _Parser(argparse.ArgumentParser):
    """Usage errors as one line on stderr, exit status 2."""

    def error(self, message: str):  # noqa: D401 - argparse's name
        self.exit(2, f"{self.prog}: error: {message}\n")


def _cmd_default_model(args: argparse.Namespace) -> None:
    from splitlm.export.default_model import default_model_dir

    print(default_model_dir())


def _cmd_export(args: argparse.Namespace) -> None:
    from splitlm.export.bundle import ExportOptions, export_bundle, load_model
    from splitlm.export.fidelity import fidelity_report

    opts = ExportOptions(cut=args.cut, quant=args.quant, labels=args.labels, lora_rank=args.lora_rank,
                         lora_alpha=args.lora_alpha, lora_targets=tuple(args.lora_targets or ()) or None,
                         lora_seed=args.lora_seed, max_length=args.max_length)
    eval_text = _read_text(args.eval_text) if args.eval_text else None
    export_bundle(args.model, args.out, opts, log=lambda line: print(line, flush=True))
    model, _ = load_model(args.model)
    print("fidelity:")
    for line in fidelity_report(Path(args.out), model, eval_text=eval_text).lines():
        print(line)


def _cmd_serve(args: argparse.Namespace) -> None:
    import asyncio

    from splitlm.cloud_server.body import Body, BodyConfig
    from splitlm.cloud_server.server import ServeConfig, SplitServer, serve_until_stopped
    from splitlm.cloud_server.state import STATE_FILE, load_state

    out = Path(args.out) if args.out else None
    if args.resume and (out is None or not (out / STATE_FILE).is_file()):  # say so before loading the model
        where = "no --out given" if out is None else f"no {STATE_FILE} in {out}"
        raise SplitLMError(f"--resume: {where}; the state is written under --out at each round end and on shutdown")
    if args.threads > 0:
        import torch

        torch.set_num_threads(args.threads)
    body = Body(BodyConfig(model=args.model, cut=args.cut, labels=args.labels, lora_rank=args.lora_rank,
                           lora_alpha=args.lora_alpha, lora_targets=tuple(args.lora_targets or ()) or None,
                           lr=args.lr, full=args.full, seed=args.seed))
    cfg = ServeConfig(host=args.host, port=args.port, steps_per_round=args.steps_per_round, codec=args.wire,
                      max_clients=args.max_clients, max_batch=args.max_batch, max_seq_len=args.max_seq_len,
                      round_deadline_s=args.round_deadline, out=out, save_state=out is not None)
    server = SplitServer(body, cfg, log=lambda line: print(line, flush=True))
    if args.resume:
        server.restore(load_state(server.state_path, config=server.state_config()))
    asyncio.run(serve_until_stopped(server))


def _cmd_edge(args: argparse.Namespace) -> None:
    import asyncio

    from splitlm.edge_client.client import EdgeClient, EdgeConfig

    if args.resume and not args.state:
        raise SplitLMError("--resume needs --state FILE: the state to continue from")
    cfg = EdgeConfig(url=args.url, bundle=Path(args.bundle), data=Path(args.data), steps=args.steps,
                     epochs=args.epochs, batch_size=args.batch_size, seq_len=args.seq_len, lr=args.lr,
                     seed=args.seed, client_id=args.client_id, threads=args.threads,
                     metrics_out=Path(args.metrics_out) if args.metrics_out else None,
                     state=Path(args.state) if args.state else None, resume=args.resume,
                     reconnect_tries=args.reconnect_tries)
    if args.max_memory is not None:  # before any connection: refuse what cannot fit
        from splitlm.edge_client.fit import fit_config
        cfg = fit_config(cfg, args.max_memory, log=lambda line: print(line, flush=True))
    summary = asyncio.run(EdgeClient(cfg).run())
    print(f"{args.client_id}: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                            for k, v in summary.items()))


def _cmd_eval(args: argparse.Namespace) -> None:
    import json

    from splitlm.cloud_server.evaluate import evaluate

    result = evaluate(args.model, args.data, adapter=args.adapter, seq_len=args.seq_len,
                      batch_size=args.batch_size, max_examples=args.max_examples)
    print(json.dumps(result.as_dict()) if args.json else result.line())


def _cmd_demo(args: argparse.Namespace) -> None:
    from splitlm.demo import DemoConfig, default_workdir, run_demo

    run_demo(DemoConfig(workdir=Path(args.workdir) if args.workdir else default_workdir(),
                        steps=args.steps, clients=args.clients))


def _read_text(path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise SplitLMError(f"cannot read {path}: {e.strerror}") from e


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="splitlm", description="Split-learning fine-tuning of causal LMs across edge devices.")
    parser.add_argument("--version", action="version", version=f"splitlm {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("default-model", help="print the folder of the embedded default model (SmolLM2-135M-Instruct)")
    p.set_defaults(run=_cmd_default_model)

    p = sub.add_parser("export", help="cut a model at layer K and write a client bundle")
    p.add_argument("model", help="a Hugging Face causal-LM folder, or 'default'")
    p.add_argument("--cut", type=int, required=True, help="the device runs embeddings + blocks 0..K-1")
    p.add_argument("--quant", default="q4", help=f"weight preset: {', '.join(QUANT_PRESETS)} (default q4)")
    p.add_argument("--out", required=True, help="bundle folder to write (replaced atomically)")
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--lora-alpha", type=float, default=16.0)
    p.add_argument("--lora-targets", nargs="+", help="module names inside a block (default: q and v projections)")
    p.add_argument("--lora-seed", type=int, default=0, help="seed of the initial LoRA tensors")
    p.add_argument("--labels", default="server", help=f"where labels live: {' or '.join(LABEL_PLACEMENTS)} (device adds tail.onnx)")
    p.add_argument("--max-length", type=int, default=2048, help="longest sequence the graphs accept")
    p.add_argument("--eval-text", help="a text file: report perplexity of the model vs this bundle's head")
    p.set_defaults(run=_cmd_export)

    p = sub.add_parser("serve", help="host the body (blocks K..N) for edge clients")
    p.add_argument("model", help="a Hugging Face causal-LM folder, or 'default'")
    p.add_argument("--cut", type=int, required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8765, help="0 picks a free port (printed at start)")
    p.add_argument("--labels", default="server", choices=LABEL_PLACEMENTS)
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--lora-alpha", type=float, default=16.0)
    p.add_argument("--lora-targets", nargs="+")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--full", action="store_true", help="train every body parameter instead of LoRA")
    p.add_argument("--seed", type=int, default=0, help="seed of the body's LoRA init")
    p.add_argument("--steps-per-round", type=int, default=10)
    p.add_argument("--round-deadline", type=float, default=300.0, help="seconds a round waits for late clients")
    p.add_argument("--wire", default="f16", choices=("f32", "f16", "q8"), help="float codec on the wire")
    p.add_argument("--max-clients", type=int, default=8)
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--max-seq-len", type=int, default=1024)
    p.add_argument("--out", help="folder for per-round adapters and metrics, and the server state "
                                 "(server-state.safetensors, written at every round end and on SIGINT/SIGTERM)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/server-state.safetensors")
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads (0: torch's default). Use 1 when clients share this host's cores: "
                        "torch's thread pool slows ~100x when its cores are contended")
    p.set_defaults(run=_cmd_serve)

    p = sub.add_parser("edge", help="train on this device against a splitlm server (no torch needed)")
    p.add_argument("url", help="ws://HOST:PORT")
    p.add_argument("--bundle", required=True)
    p.add_argument("--data", required=True, help=".txt, or .jsonl of {text} or {prompt, completion}")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--steps", type=int)
    group.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0, help="seed of the data order")
    p.add_argument("--client-id", default="edge")
    p.add_argument("--threads", type=int, default=0, help="onnxruntime threads (0: its default)")
    p.add_argument("--metrics-out", help="one JSON object per step")
    p.add_argument("--state", help="training state file (LoRA, optimizer, step), rewritten after every step")
    p.add_argument("--resume", action="store_true", help="continue from --state after this process died")
    p.add_argument("--reconnect-tries", type=int, default=8,
                   help="reconnects in a row before giving up when the link drops (0.5 s doubling to 8 s apart)")
    p.add_argument("--max-memory", type=float, metavar="MB",
                   help="peak memory this device may use: picks the batch size (<= --batch-size) and tail chunk "
                        "that fit, measured on this device, or refuses before connecting")
    p.set_defaults(run=_cmd_edge)

    p = sub.add_parser("eval", help="loss, perplexity and exact match of a model (+ PEFT adapter) on data")
    p.add_argument("model", help="a Hugging Face causal-LM folder, or 'default'")
    p.add_argument("--adapter", help="a PEFT adapter folder, e.g. OUT/round-0003/adapter")
    p.add_argument("--data", required=True, help=".txt, or .jsonl of {text} or {prompt, completion}")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-examples", type=int)
    p.add_argument("--json", action="store_true", help="one JSON object instead of a line")
    p.set_defaults(run=_cmd_eval)

    p = sub.add_parser("demo", help="default model, a q4 bundle, a server and two edge clients on 127.0.0.1")
    p.add_argument("--steps", type=int, default=20, help="steps per client")
    p.add_argument("--clients", type=int, default=2)
    p.add_argument("--workdir", help="where data, logs and results go (default ./splitlm-demo)")
    p.set_defaults(run=_cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.run(args)
    except SplitLMError as e:
        print(f"splitlm {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
