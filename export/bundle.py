"""`splitlm export`: load a model, cut it, write a client bundle atomically.

    load_model(path)  ->  ClientGraphs (head with LoRA inputs)  ->  fp32 ONNX in a staging dir
      ->  quantize each graph  ->  tokenizer + lora_init.npz + manifest.json  ->  rename into place
"""

from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from splitlm import __version__
from splitlm.errors import ExportError
from splitlm.manifest import (LABEL_PLACEMENTS, LORA_INIT, MANIFEST, QUANT_PRESETS, LoRAInfo,
                              Manifest, ModelInfo, model_folder_hash, sha256_file)

from .arch import DEFAULT_TARGETS, Arch, family_of
from .graphs import ClientGraphs, export_client_graphs
from .lora import LoRAInputs, LoRASpec


@dataclass(frozen=True)
class ExportOptions:
    cut: int = 0                    # split only: the device runs blocks [0, cut)
    quant: str = "q4"
    labels: str = "server"
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_targets: tuple[str, ...] | None = None  # None: the family's default
    lora_seed: int = 0
    max_length: int = 2048
    mode: str = "split"             # "split", or the device holds the whole model: "fedavg", "distill"
    train: str = "lora"             # fedavg / distill: "lora" or "full" (every block weight + final norm)
    topk: int = 32                  # distill: k of topk.onnx
    public: Path | None = None      # distill: the public set (.txt); None: splitlm/data/public.txt
    public_seq_len: int = 128       # distill: the public set is packed into sequences this long
    privacy: dict = field(default_factory=dict)  # split: the devices' defense floor (edge_client.privacy keys)
    graphs_from: Path | None = None  # fedavg / distill: copy train.onnx from this bundle (whole_bundle.reusable_train_graph)
    keep_activations: bool = False  # split: also head_saved.onnx + head_grad_kept.onnx (a step without a second forward)


def resolve_model_path(model: str) -> Path:
    if model == "default":
        from .default_model import default_model_dir
        return default_model_dir()
    path = Path(model)
    if not path.is_dir():
        raise ExportError(f"no such model folder: {model}")
    if not (path / "config.json").is_file():
        raise ExportError(f"{model} is not a Hugging Face model folder: no config.json")
    return path


def load_config(path: Path):
    """The model's config, checked to be a supported causal LM before any weight is read."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise ExportError(f"{path}: cannot read config.json ({e})") from e
    family_of(config.model_type)  # unsupported or non-causal architectures stop here
    return config


def load_model(model: str) -> tuple[torch.nn.Module, Path]:
    """A supported causal LM in fp32 eval mode, frozen. Raises ExportError otherwise."""
    from transformers import AutoModelForCausalLM

    path = resolve_model_path(model)
    load_config(path)
    loaded = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager", dtype=torch.float32)
    return loaded.eval().requires_grad_(False), path


def check_options(opts: ExportOptions, num_layers: int) -> None:
    if opts.mode != "split":
        from .whole_bundle import check_whole_options
        return check_whole_options(opts)
    if opts.quant not in QUANT_PRESETS:
        raise ExportError(f"unknown quant preset {opts.quant!r}: choose from {', '.join(QUANT_PRESETS)}")
    if opts.graphs_from is not None:
        raise ExportError("--graphs-from only applies to --mode fedavg and distill, whose devices share train.onnx")
    if opts.labels not in LABEL_PLACEMENTS:
        raise ExportError(f"--labels must be one of {', '.join(LABEL_PLACEMENTS)}, got {opts.labels!r}")
    if not 1 <= opts.cut <= num_layers - 1:
        raise ExportError(f"--cut must be in 1..{num_layers - 1} for this {num_layers}-layer model, got {opts.cut}")
    if opts.lora_rank < 1 or opts.max_length < 3:
        raise ExportError(f"--lora-rank must be >= 1 and --max-length >= 3, got {opts.lora_rank} and {opts.max_length}")


def client_graphs(model: torch.nn.Module, opts: ExportOptions) -> ClientGraphs:
    arch = Arch.of(model)
    targets = opts.lora_targets or DEFAULT_TARGETS[arch.family]
    spec = LoRASpec(opts.lora_rank, opts.lora_alpha, tuple(targets))
    lora = LoRAInputs(model, arch.target_modules(range(opts.cut), spec.targets), spec)
    return ClientGraphs(arch, opts.cut, lora)


def write_tokenizer(model_path: Path, out: Path) -> tuple[int, int]:
    """Copy the fast tokenizer; return the (pad, eos) token ids the device uses."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(model_path)
    except Exception as e:  # noqa: BLE001 - any failure here means the same thing to the user
        raise ExportError(f"{model_path}: no usable tokenizer ({e})") from e
    if not tokenizer.is_fast:
        raise ExportError(f"{model_path}: the edge needs a fast tokenizer (tokenizer.json)")
    tokenizer.save_pretrained(out)
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    return int(pad), int(eos)


def export_bundle(model: str, out: str | Path, opts: ExportOptions, *, log=print) -> Manifest:
    """Write a complete bundle to `out`, or nothing at all."""
    out = Path(out)
    if out.exists() and not (out / MANIFEST).is_file() and any(out.iterdir()):
        raise ExportError(f"{out} exists and is not a bundle: refusing to overwrite it")
    t0 = time.perf_counter()
    check_options(opts, load_config(resolve_model_path(model)).num_hidden_layers)
    log(f"loading {model} ...")
    loaded, path = load_model(model)
    graphs = client_graphs(loaded, opts) if opts.mode == "split" else None
    blocks = f"blocks 0..{opts.cut - 1}" if opts.mode == "split" else "the whole model"
    log(f"tracing the device's graphs ({blocks}) with torch.onnx: the slow part, a minute or more ...")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.staging-", dir=out.parent))
    try:
        if graphs is None:
            from .whole_bundle import write_whole
            manifest = write_whole(staging, loaded, path, opts, log=log)
        else:
            manifest = _write(staging, graphs, loaded, path, opts, log=log)
        _replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log(f"bundle written to {out} in {time.perf_counter() - t0:.1f} s")
    return manifest


def tail_preset(quant: str) -> str:
    """The tail computes the loss that drives training: a 4-bit LM head moved it +5.6% on SmolLM2,
    8 bits by 0.01%, so q4 bundles keep their tail at 8 bits."""
    return "q8" if quant == "q4" else quant


TAIL_ACCURACY_LEVEL = 4
"""The tail's MatMulNBits compute in int8 (MLAS's packed kernels). Its default float path
dequantizes the whole 8-bit LM head to float32 on every run (113 MB for SmolLM2, which put the
labels-on-device step over 400 MB); int8 compute moved the tail's loss by 2e-5 relative to float
compute on SmolLM2, and ran it 2.3x faster."""


def graph_opset(path: Path) -> int:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def _write(staging: Path, graphs: ClientGraphs, loaded, path: Path, opts: ExportOptions, *, log) -> Manifest:
    fp32 = staging / "fp32"
    fp32.mkdir()
    files = export_client_graphs(graphs, fp32, with_tail=opts.labels == "device", max_seq=opts.max_length,
                                 keep_activations=opts.keep_activations)
    for name in files:
        preset = tail_preset(opts.quant) if name == "tail.onnx" else opts.quant
        if preset == "fp32":
            (fp32 / name).rename(staging / name)
        else:
            from .quantize import quantize_graph
            log(f"  quantizing {name} to {preset} ...")
            level = TAIL_ACCURACY_LEVEL if name == "tail.onnx" else None
            quantize_graph(fp32 / name, staging / name, preset=preset, accuracy_level=level)
        log(f"  {name:15s} {opts.quant:5s} {(staging / name).stat().st_size / 1e6:8.1f} MB")
    shutil.rmtree(fp32)
    pad_eos = write_tokenizer(path, staging)
    np.savez(staging / LORA_INIT, **graphs.lora.init(opts.lora_seed))
    manifest = _manifest(staging, graphs, loaded, path, opts, pad_eos)
    (staging / MANIFEST).write_text(manifest.to_json())
    return manifest


def _manifest(staging: Path, graphs: ClientGraphs, loaded, path: Path, opts: ExportOptions,
              pad_eos: tuple[int, int]) -> Manifest:
    cfg = loaded.config
    info = ModelInfo(name=path.name, architecture=cfg.model_type, family=graphs.arch.family,
                     hash=model_folder_hash(path), num_layers=cfg.num_hidden_layers,
                     hidden_size=cfg.hidden_size, vocab_size=cfg.vocab_size)
    spec = graphs.lora.spec
    lora = LoRAInfo(rank=spec.rank, alpha=spec.alpha, targets=spec.targets, seed=opts.lora_seed,
                    tensors=dict(graphs.lora.shapes))
    files = {p.name: sha256_file(p) for p in sorted(staging.iterdir()) if p.is_file()}
    return Manifest(model=info, cut=opts.cut, quant=opts.quant, labels=opts.labels,
                    max_length=opts.max_length, opset=graph_opset(staging / "head.onnx"), lora=lora, files=files,
                    pad_token_id=pad_eos[0], eos_token_id=pad_eos[1], splitlm_version=__version__,
                    privacy=dict(opts.privacy))


def _replace(staging: Path, out: Path) -> None:
    """Move the finished bundle into place; an older bundle at `out` goes only after that."""
    if not out.exists():
        staging.rename(out)
        return
    old = out.with_name(f".{out.name}.old-{time.time_ns()}")
    out.rename(old)
    staging.rename(out)
    shutil.rmtree(old, ignore_errors=True)
