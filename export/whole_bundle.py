"""`splitlm export --mode {fedavg,distill}`: a bundle in which the device holds the whole model.

    model  ->  WholeGraphs (LoRA inputs on every block, or every block weight as an input)
      ->  train.onnx (+ topk.onnx, kd_grad.onnx)  ->  quantize the frozen weights
      ->  tokenizer + lora_init.npz | full_init.npz (+ public.txt)  ->  manifest.json

The quantizers only touch initializers, so under `--train full` they shrink the frozen embedding
(and tied LM head) and leave every trainable in fp32: trainables are graph inputs.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from splitlm import __version__
from splitlm.errors import ExportError
from splitlm.manifest import (FULL_INIT, LORA_INIT, MANIFEST, MODES, QUANT_PRESETS, TOPK_VALUES, TRAIN_KINDS, LoRAInfo,
                              Manifest, ModelInfo, model_folder_hash, sha256_file)

from .arch import DEFAULT_TARGETS, Arch
from .lora import LoRAInputs, LoRASpec
from .whole import WholeGraphs, export_whole_graphs

from splitlm.public import PUBLIC_FILE as PUBLIC, default_public  # noqa: E402,F401 - export writes it under this name


def check_whole_options(opts) -> None:
    if opts.mode not in MODES:
        raise ExportError(f"--mode must be one of {', '.join(MODES)}, got {opts.mode!r}")
    if opts.quant not in QUANT_PRESETS:
        raise ExportError(f"unknown quant preset {opts.quant!r}: choose from {', '.join(QUANT_PRESETS)}")
    if opts.train not in TRAIN_KINDS:
        raise ExportError(f"--train must be one of {', '.join(TRAIN_KINDS)}, got {opts.train!r}")
    if opts.cut:
        raise ExportError(f"--cut only applies to --mode split; a {opts.mode} device holds the whole model")
    if opts.labels != "server":
        raise ExportError(f"--labels only applies to --mode split; a {opts.mode} device computes its own loss")
    if opts.keep_activations:
        raise ExportError(f"--keep-activations only applies to --mode split; a {opts.mode} device's train.onnx "
                          f"runs its forward and backward in one graph already")
    if opts.lora_rank < 1 or opts.max_length < 3:
        raise ExportError(f"--lora-rank must be >= 1 and --max-length >= 3, got {opts.lora_rank} and {opts.max_length}")
    if opts.mode == "distill" and not (opts.topk >= 1 and 3 <= opts.public_seq_len <= opts.max_length):
        raise ExportError(f"--topk must be >= 1 and the public sequence length in 3..{opts.max_length}, "
                          f"got {opts.topk} and {opts.public_seq_len}")


def whole_graphs(model, opts) -> WholeGraphs:
    arch = Arch.of(model)
    k_max = min(opts.topk, model.config.vocab_size)
    if opts.train == "full":
        return WholeGraphs.for_full(arch, k_max)
    spec = LoRASpec(opts.lora_rank, opts.lora_alpha, tuple(opts.lora_targets or DEFAULT_TARGETS[arch.family]))
    lora = LoRAInputs(model, arch.target_modules(range(arch.num_layers), spec.targets), spec)
    return WholeGraphs.for_lora(arch, lora, k_max)


def write_whole(staging: Path, loaded, path: Path, opts, *, log) -> Manifest:
    from .bundle import write_tokenizer

    graphs = whole_graphs(loaded, opts)
    reused = None
    if opts.graphs_from is not None:
        reused = reusable_train_graph(Path(opts.graphs_from), graphs, path, opts)
        shutil.copyfile(reused, staging / "train.onnx")
        log(f"  train.onnx      {opts.quant:5s} {(staging / 'train.onnx').stat().st_size / 1e6:8.1f} MB  "
            f"(from {opts.graphs_from})")
    fp32 = staging / "fp32"
    fp32.mkdir()
    files = export_whole_graphs(graphs, fp32, distill=opts.mode == "distill", max_seq=opts.max_length,
                                train=reused is None)
    for name in files:
        _quantize(fp32 / name, staging / name, opts.quant)
        log(f"  {name:15s} {opts.quant:5s} {(staging / name).stat().st_size / 1e6:8.1f} MB")
    shutil.rmtree(fp32)
    pad_eos = write_tokenizer(path, staging)
    np.savez(staging / (FULL_INIT if opts.train == "full" else LORA_INIT), **initial_values(graphs, opts))
    public = _write_public(staging, path, opts) if opts.mode == "distill" else None
    manifest = _manifest(staging, graphs, loaded, path, opts, pad_eos, public)
    (staging / MANIFEST).write_text(manifest.to_json())
    log(f"  {len(graphs.shapes)} trainables, {sum(int(np.prod(s)) for s in graphs.shapes.values()):,} values")
    return manifest


def reusable_train_graph(source: Path, graphs: WholeGraphs, model_path: Path, opts) -> Path:
    """`--graphs-from BUNDLE`: BUNDLE's train.onnx, to copy instead of tracing it again (the export's
    slow part: a third of a distill bundle's time). The train graph depends only on the model, what
    is trained (the LoRA rank, alpha and targets, or every block weight), the quant preset, the
    maximum length and the code that wrote it; not on the mode, k, the public set or the LoRA seed.
    So a fedavg bundle's train.onnx is a distill bundle's. BUNDLE's manifest must show all of these
    equal (the same splitlm version standing for the same code), and every file its sha256."""
    from splitlm.errors import BundleMismatch
    from splitlm.manifest import Bundle

    try:
        bundle = Bundle.open(source)
    except BundleMismatch as e:
        raise ExportError(f"--graphs-from {source}: {e}") from e
    m = bundle.manifest
    ours = graphs.lora.spec if graphs.lora is not None else None
    want = {"mode": ("fedavg or distill", m.mode in ("fedavg", "distill")),
            "model": (model_folder_hash(model_path)[:12], m.model.hash == model_folder_hash(model_path)),
            "train": (opts.train, m.train == opts.train), "quant": (opts.quant, m.quant == opts.quant),
            "max length": (opts.max_length, m.max_length == opts.max_length),
            "splitlm version": (__version__, m.splitlm_version == __version__),
            "trainables": ("the same names and shapes", {k: tuple(v) for k, v in m.trainables.items()}
                           == {k: tuple(v) for k, v in graphs.shapes.items()})}
    if ours is not None:
        want["LoRA"] = (f"rank {ours.rank}, alpha {ours.alpha:g}, targets {list(ours.targets)}",
                        (m.lora.rank, m.lora.alpha, tuple(m.lora.targets)) == (ours.rank, ours.alpha, ours.targets))
    differ = [f"{k} (this export: {v})" for k, (v, same) in want.items() if not same]
    if differ:
        raise ExportError(f"--graphs-from {source}: its train.onnx is not this export's; it differs in "
                          + ", ".join(differ))
    return bundle.file("train.onnx")


def _quantize(src: Path, dst: Path, preset: str) -> None:
    if preset == "fp32":
        src.rename(dst)
        return
    from .quantize import quantize_graph
    quantize_graph(src, dst, preset=preset)


def initial_values(graphs: WholeGraphs, opts) -> dict[str, np.ndarray]:
    """LoRA: PEFT's init from the seed. Full: the model's own fp32 weights, by state_dict name."""
    if graphs.lora is not None:
        return graphs.lora.init(opts.lora_seed)
    model = graphs.arch.model
    return {n: model.get_parameter(n).detach().float().numpy().copy() for n in graphs.names}


def _write_public(staging: Path, model_path: Path, opts) -> dict:
    """Copy the public set into the bundle; its name, sha256, token count and packing length."""
    from splitlm.data import encode, load_tokenizer

    src = Path(opts.public) if opts.public else default_public()
    try:
        text = src.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ExportError(f"--public {src}: cannot read it as UTF-8 text ({e})") from e
    if not text.strip():
        raise ExportError(f"--public {src}: the file is empty")
    (staging / PUBLIC).write_text(text, encoding="utf-8")
    (ids,) = encode(load_tokenizer(staging / "tokenizer.json"), [text])
    return {"name": PUBLIC, "sha256": sha256_file(staging / PUBLIC), "tokens": len(ids) + 1,  # + the eos
            "seq_len": opts.public_seq_len}


def _manifest(staging: Path, graphs: WholeGraphs, loaded, path: Path, opts, pad_eos: tuple[int, int],
              public: dict | None) -> Manifest:
    from .bundle import graph_opset

    cfg = loaded.config
    info = ModelInfo(name=path.name, architecture=cfg.model_type, family=graphs.arch.family,
                     hash=model_folder_hash(path), num_layers=cfg.num_hidden_layers,
                     hidden_size=cfg.hidden_size, vocab_size=cfg.vocab_size)
    if graphs.lora is not None:
        spec = graphs.lora.spec
        lora = LoRAInfo(rank=spec.rank, alpha=spec.alpha, targets=spec.targets, seed=opts.lora_seed,
                        tensors=dict(graphs.lora.shapes))
    else:
        lora = LoRAInfo(rank=0, alpha=0.0, targets=(), seed=opts.lora_seed, tensors={})
    files = {p.name: sha256_file(p) for p in sorted(staging.iterdir()) if p.is_file()}
    return Manifest(model=info, cut=cfg.num_hidden_layers, quant=opts.quant, labels="device",
                    max_length=opts.max_length, opset=graph_opset(staging / "train.onnx"), lora=lora, files=files,
                    pad_token_id=pad_eos[0], eos_token_id=pad_eos[1], splitlm_version=__version__,
                    mode=opts.mode, train=opts.train, trainables=dict(graphs.shapes),
                    topk=graphs.k_max if opts.mode == "distill" else 0, public=public,
                    topk_values=TOPK_VALUES if opts.mode == "distill" else "")
