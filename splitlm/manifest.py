"""The client bundle's manifest: the one contract between `export` (writes) and the edge (reads).

Torch-free on purpose: the device, the server and export all read bundles through this module.

    BUNDLE/manifest.json   this file's `Manifest`, as JSON
    BUNDLE/head.onnx       input_ids, attention_mask, *lora -> hidden           (B, T, H)
    BUNDLE/head_grad.onnx  input_ids, attention_mask, grad_hidden, *lora -> grad.<lora>
    BUNDLE/tail.onnx       hidden, labels, attention_mask -> loss, grad_hidden (labels on device)
    BUNDLE/lora_init.npz   the initial LoRA tensors (PEFT init from `lora.seed`)
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
MANIFEST = "manifest.json"
LORA_INIT = "lora_init.npz"
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
        return self.alpha / self.rank


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
    # A floor of device-side defenses (edge_client.privacy): {"clip", "noise", "grad_clip", "grad_noise"}.
    # The device applies the stronger of this and its own settings; empty: the device's own.
    privacy: dict = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @staticmethod
    def from_json(text: str) -> "Manifest":
        d = json.loads(text)
        if d.get("format") != FORMAT_VERSION:
            raise BundleMismatch(f"manifest format: expected {FORMAT_VERSION}, got {d.get('format')!r}")
        lora = d["lora"]
        lora = LoRAInfo(rank=lora["rank"], alpha=lora["alpha"], targets=tuple(lora["targets"]),
                        seed=lora["seed"], tensors={k: tuple(v) for k, v in lora["tensors"].items()})
        return Manifest(**{**d, "model": ModelInfo(**d["model"]), "lora": lora})


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
