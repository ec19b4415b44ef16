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
