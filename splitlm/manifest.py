"""The client bundle's manifest: the one contract between `export` (writes) and the edge (reads).

Torch-free on purpose: the device, the server and export all read bundles through this module.

    BUNDLE/manifest.json   this file's `Manifest`, as JSON
    BUNDLE/head.onnx       input_ids, attention_mask, *lora -> hidden           (B, T, H)
    BUNDLE/head_grad.onnx  input_ids, attention_mask, grad_hidden, *lora -> grad.<lora>
    BUNDLE/tail.onnx       hidden, labels, attention_mask -> loss, grad_hidden (labels on device)
    BUNDLE/lora_init.npz   the initial LoRA tensors (PEFT init from `lora.seed`)

fedavg / distill bundles (the device holds the whole model, `cut` = num_layers):
    BUNDLE/train.onnx      input_ids, attention_mask, labels, *trainables -> loss, grad.<trainable>
    BUNDLE/topk.onnx       distill: input_ids, attention_mask, *trainables -> topk_values, topk_indices
    BUNDLE/kd_grad.onnx    distill: + teacher_indices, teacher_logprobs -> kd_loss, grad.<trainable>
    BUNDLE/lora_init.npz   --train lora: the initial trainables; --train full: full_init.npz
    BUNDLE/public.txt      distill: the public set, named by sha256 in `public`
    BUNDLE/tokenizer.json  (+ tokenizer_config.json, chat template)
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from splitlm.errors import BundleMismatch

FORMAT_VERSION = 1
TOPK_VALUES = "logprobs"  # distill: topk.onnx gives log-probabilities over the whole vocabulary
MANIFEST = "manifest.json"
LORA_INIT = "lora_init.npz"
FULL_INIT = "full_init.npz"
MODES = ("split", "fedavg", "distill")
TRAIN_KINDS = ("lora", "full")
QUANT_PRESETS = ("fp32", "q8", "q4", "int8")
LABEL_PLACEMENTS = ("server", "device")


@dataclass(frozen=True)
class ModelInfo:
    name: str           # folder name of the source model
    architecture: str   # config.model_type, e.g. "llama"
    family: str         # "llama" or "gpt2"
    hash: str           # model_folder_hash of the source folder
    num_layers: int
    hidden_size: int
    vocab_size: int


@dataclass(frozen=True)
class LoRAInfo:
    rank: int
    alpha: float
    targets: tuple[str, ...]               # module names inside one block
    seed: int                              # PEFT-style init drawn from this seed -> lora_init.npz
    tensors: dict[str, tuple[int, ...]]    # graph input name -> shape, in graph input order

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank if self.rank else 0.0  # full training: no LoRA


@dataclass(frozen=True)
class Manifest:
    model: ModelInfo
    cut: int
    quant: str
    labels: str                  # where labels live: "server" or "device" (then tail.onnx exists)
    max_length: int              # longest sequence the graphs were exported for
    opset: int
    lora: LoRAInfo
    files: dict[str, str]        # file name -> sha256
    pad_token_id: int
    eos_token_id: int            # appended after each example when the edge packs text
    format: int = FORMAT_VERSION
    splitlm_version: str = ""
    wire: dict[str, str] = field(default_factory=lambda: {"codec": "f16"})
    # fedavg / distill (defaults keep split bundles valid):
    mode: str = "split"                                   # "split", "fedavg" or "distill"
    train: str = "lora"                                   # what the device trains: "lora" or "full"
    trainables: dict[str, tuple[int, ...]] = field(default_factory=dict)  # graph input name -> shape (JSON sorts the names; sessions are fed by name)
    topk: int = 0                                         # distill: k of topk.onnx (a session takes <= k)
    public: dict | None = None                            # distill: {"name", "sha256", "tokens", "seq_len"}
    topk_values: str = ""                                 # distill: what topk.onnx's values are: "logprobs"
    # A floor of device-side defenses (edge_client.privacy): {"clip", "noise", "grad_clip", "grad_noise"}.
    # The device applies the stronger of this and its own settings; empty: the device's own.
    privacy: dict = field(default_factory=dict)

    @property
    def init_file(self) -> str:
        """The file of the initial trainables (fedavg / distill) or LoRA tensors (split)."""
        return FULL_INIT if self.train == "full" else LORA_INIT

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @staticmethod
    def from_json(text: str) -> "Manifest":
        d = json.loads(text)
        if d.get("format") != FORMAT_VERSION:
            raise BundleMismatch(f"manifest format: expected {FORMAT_VERSION}, got {d.get('format')!r}")
        if d.get("mode") == "distill" and d.get("topk_values") != TOPK_VALUES:
            raise BundleMismatch("this distill bundle's topk.onnx returns raw logits (it predates the KD loss's "
                                 "rest bucket, which needs log-probabilities); export it again with "
                                 "`splitlm export MODEL --mode distill`")
        lora = d["lora"]
        lora = LoRAInfo(rank=lora["rank"], alpha=lora["alpha"], targets=tuple(lora["targets"]),
                        seed=lora["seed"], tensors={k: tuple(v) for k, v in lora["tensors"].items()})
        trainables = {k: tuple(v) for k, v in d.get("trainables", {}).items()}
        return Manifest(**{**d, "model": ModelInfo(**d["model"]), "lora": lora, "trainables": trainables})


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt")


def model_folder_hash(path: str | Path) -> str:
    """sha256 over a model folder's config.json and weight files, as stored on disk.

    Computed from files, not from loaded tensors, so a server that loads the body in 4-bit
    still recognises the bundles exported from the same folder.
    """
    path = Path(path)
    h = hashlib.sha256()
    for p in [path / "config.json", *sorted(q for q in path.iterdir() if q.suffix in WEIGHT_SUFFIXES)]:
        h.update(f"{p.name}:{sha256_file(p)}\n".encode())
    return h.hexdigest()


@dataclass(frozen=True)
class Bundle:
    """A bundle folder on disk, its manifest read and its files checked."""

    path: Path
    manifest: Manifest

    @staticmethod
    def open(path: str | Path, *, verify: bool = True) -> "Bundle":
        path = Path(path)
        if not (path / MANIFEST).is_file():
            raise BundleMismatch(f"{path} is not a splitlm bundle: no {MANIFEST}")
        manifest = Manifest.from_json((path / MANIFEST).read_text())
        if verify:
            for name, digest in manifest.files.items():
                if not (path / name).is_file():
                    raise BundleMismatch(f"bundle {path}: {name} is listed in the manifest but missing")
                if sha256_file(path / name) != digest:
                    raise BundleMismatch(f"bundle {path}: {name} does not match its sha256 in the manifest")
        return Bundle(path, manifest)

    def file(self, name: str) -> Path:
        return self.path / name

    def lora_init(self) -> dict[str, np.ndarray]:
        with np.load(self.path / LORA_INIT, allow_pickle=False) as z:
            return {name: z[name] for name in self.manifest.lora.tensors}

    def trainables_init(self) -> dict[str, np.ndarray]:
        """The initial trainables of a fedavg / distill bundle, float32, in manifest order."""
        with np.load(self.path / self.manifest.init_file, allow_pickle=False) as z:
            return {name: np.asarray(z[name], np.float32) for name in self.manifest.trainables}

    def public_text(self) -> str:
        """The distill public set, checked against its sha256 in the manifest."""
        public = self.manifest.public
        if not public:
            raise BundleMismatch(f"bundle {self.path} has no public set: it was exported with --mode "
                                 f"{self.manifest.mode}, not distill")
        path = self.path / public["name"]
        if not path.is_file() or sha256_file(path) != public["sha256"]:
            got = sha256_file(path) if path.is_file() else "no file"
            raise BundleMismatch(f"public set {path}: expected sha256 {public['sha256']}, got {got}")
        return path.read_text(encoding="utf-8")


def ordered_tensors(tensors: dict[str, np.ndarray], spec: dict[str, tuple[int, ...]], *, what: str) -> dict:
    """`tensors` in the order of `spec` (graph input order), or BundleMismatch naming the missing or
    unexpected names, or the first tensor whose shape differs; `what` names them ("LoRA tensor")."""
    if set(tensors) != set(spec):
        missing, unexpected = sorted(set(spec) - set(tensors)), sorted(set(tensors) - set(spec))
        raise BundleMismatch(f"{what}s do not match the bundle: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for name, shape in spec.items():
        if tuple(tensors[name].shape) != tuple(shape):
            raise BundleMismatch(f"{what} {name}: expected shape {tuple(shape)}, got {tensors[name].shape}")
    return {name: tensors[name] for name in spec}
