"""`splitlm audit`: play the honest-but-curious server against one device's frames and score it.

The server holds what a real one holds: the model folder (so the body, final norm and LM head),
the bundle it built (so the head and its initial LoRA), public text of its own, and every frame the
device sent. `audit` reports, per attack, the share of the device's tokens it recovers exactly,
and a few recovered passages beside the originals.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from splitlm.edge_client.data import IGNORE_INDEX, load_tokenizer
from splitlm.edge_client.privacy import PrivacySettings, effective
from splitlm.edge_client.runtime import HeadRuntime
from splitlm.errors import SplitLMError
from splitlm.manifest import Bundle

from . import ACTIVATION_ATTACKS, ATTACKS, CHEAP, attacks
from .frames import Frames, device_frames, log_frames



@dataclass(frozen=True)
class AuditConfig:
    model: str                       # the server's model folder (or "default")
    bundle: Path
    data: Path                       # the device's data
    public: Path | None = None       # the server's own text (needed by the inverter)
    attacks: tuple[str, ...] = CHEAP
    privacy: PrivacySettings = PrivacySettings()  # the device's settings (the manifest's floor is added)
    max_tokens: int = 2048
    seq_len: int = 64
    batch_size: int = 4
    frame_log: Path | None = None    # score a recorded frame log instead of running the device
    seed: int | None = None          # the device's noise; None: OS entropy, as on a device
    exact_k: int = 16
    exact_max_tokens: int = 512      # the exact search runs on the first this-many tokens
    samples: int = 3
    progress: bool = False


@dataclass
class AuditResult:
    cut: int
    labels_mode: str
    privacy: dict
    n_tokens: int
    recovery: dict[str, float] = field(default_factory=dict)   # attack -> share of tokens recovered
    seconds: dict[str, float] = field(default_factory=dict)
    norms: dict[str, float] = field(default_factory=dict)      # median per-token L2 norms (to choose clips)
    samples: list[dict] = field(default_factory=list)

    def as_dict(self) -> dict:
        return dict(self.__dict__)

    def lines(self) -> list[str]:
        out = [f"cut K={self.cut}, labels at the {self.labels_mode}, privacy {self.privacy}, {self.n_tokens} tokens"]
        out += [f"  {name:18s} {100 * r:6.1f}% recovered ({self.seconds[name]:.1f} s)" for name, r in self.recovery.items()]
        for s in self.samples:
            out += [f"  [{s['attack']}] original:  {s['original']!r}", f"  [{s['attack']}] recovered: {s['recovered']!r}"]
        return out


class _Progress:
    def __init__(self, enabled: bool):
        self.enabled = enabled

    def __call__(self, total: int, desc: str):
        if not self.enabled:
            return None
        from tqdm import tqdm

        bar = tqdm(total=total, desc=desc, unit="", leave=False)
        return bar.update


def run_audit(cfg: AuditConfig, *, log=lambda line: None) -> AuditResult:
    """Run the device's side (or read the log), every requested attack, and score them."""
    unknown = [a for a in cfg.attacks if a not in ATTACKS]
    if unknown:
        raise SplitLMError(f"unknown attacks {unknown}: choose from {', '.join(ATTACKS)}")
    from splitlm.export.arch import Arch
    from splitlm.export.bundle import load_model

    bundle = Bundle.open(cfg.bundle)
    m = bundle.manifest
    settings = effective(cfg.privacy, PrivacySettings.from_dict(m.privacy))
    runtime = HeadRuntime(bundle, threads=1)
    lora = bundle.lora_init()
    model, _ = load_model(cfg.model)
    arch = Arch.of(model)
    body = body_fn(arch, m.cut)
    bar = _Progress(cfg.progress)
    rng = np.random.default_rng(cfg.seed)

    if cfg.frame_log is not None:
        frames = log_frames(cfg.frame_log, bundle, cfg.data, seq_len=cfg.seq_len, batch_size=cfg.batch_size)
    else:
        frames = device_frames(bundle, cfg.data, settings=settings, runtime=runtime,
                               body=body if "labels" in cfg.attacks else None, seq_len=cfg.seq_len,
                               batch_size=cfg.batch_size, max_tokens=cfg.max_tokens, rng=rng,
                               progress=bar(cfg.max_tokens, "device frames"))
    result = AuditResult(cut=m.cut, labels_mode=m.labels, privacy=settings.as_dict(), n_tokens=frames.n_tokens)
    result.norms = _norms(frames)
    predictions = {}
    table = None
    if any(a in ACTIVATION_ATTACKS for a in cfg.attacks):
        t0 = time.perf_counter()
        table = attacks.dictionary_tables(runtime, lora, prefix=dictionary_prefix(bundle),
                                          progress=bar(2 * m.model.vocab_size, "token table"))
        log(f"dictionary: 2 x {m.model.vocab_size} tokens in {time.perf_counter() - t0:.1f} s")
    for name in cfg.attacks:
        t0 = time.perf_counter()
        pred, truth, keep = _attack(name, cfg, frames, table, runtime, lora, arch, settings, bundle, bar)
        result.seconds[name] = round(time.perf_counter() - t0, 2)
        result.recovery[name] = float((pred[keep] == truth[keep]).mean()) if keep.any() else float("nan")
        predictions[name] = (pred, truth, keep)
        log(f"{name}: {100 * result.recovery[name]:.1f}% of {int(keep.sum())} tokens in {result.seconds[name]:.1f} s")
    result.samples = _samples(predictions, bundle, cfg.samples)
    return result


def _attack(name, cfg, frames: Frames, table, runtime, lora, arch, settings, bundle, bar):
    """(predicted ids, true ids, which positions count), each (N, T)."""
    noise = settings.hidden
    truth, keep = frames.input_ids, frames.attention_mask.astype(bool)
    if name in ("dictionary", "dictionary-cosine"):
        metric = "cosine" if name.endswith("cosine") else "l2"
        return attacks.dictionary_attack(frames.hidden, table, noise=noise, metric=metric), truth, keep
    if name == "inverter":
        if cfg.public is None:
            raise SplitLMError("the inverter attack needs --public FILE: the server's own text to fit on")
        public = device_frames(bundle, cfg.public, settings=PrivacySettings(), runtime=runtime, seq_len=cfg.seq_len,
                               batch_size=cfg.batch_size, max_tokens=4 * cfg.max_tokens,
                               progress=bar(4 * cfg.max_tokens, "public frames"))
        pred = attacks.inverter_attack(frames.hidden, frames.attention_mask, table, public=public, noise=noise)
        return pred, truth, keep
    if name == "exact":
        n = _rows_for(frames, cfg.exact_max_tokens)
        pred = np.zeros_like(truth)
        pred[:n] = attacks.exact_attack(frames.hidden[:n], frames.attention_mask[:n], table, runtime, lora,
                                        noise=noise, k=cfg.exact_k, progress=bar(truth.shape[1], "exact search"))
        keep = keep.copy()
        keep[n:] = False
        return pred, truth, keep
    # labels: position t's gradient comes from label t+1
    if frames.tail_grad is None:
        raise SplitLMError("the labels attack needs tail_grad frames: a bundle exported with --labels device")
    pred = attacks.label_attack(frames.tail_grad, frames.hidden_n, frames.attention_mask, norm=arch.final_norm,
                                lm_head=arch.lm_head, progress=bar(frames.input_ids.size, "labels"))
    target = np.where(frames.attention_mask.astype(bool), frames.labels, IGNORE_INDEX)
    truth = np.full_like(target, IGNORE_INDEX)
    truth[:, :-1] = target[:, 1:]
    return pred, truth, truth != IGNORE_INDEX


def dictionary_prefix(bundle: Bundle) -> tuple[int, ...]:
    """eos + " the" (when " the" is one token), the context the dictionary reads each token in."""
    the = load_tokenizer(bundle.file("tokenizer.json")).encode(" the", add_special_tokens=False).ids
    return (bundle.manifest.eos_token_id, *the[:1])


def _rows_for(frames: Frames, max_tokens: int) -> int:
    counts = np.cumsum(frames.attention_mask.sum(1))
    return int(min(len(counts), np.searchsorted(counts, max_tokens) + 1))


def body_fn(arch, cut: int):
    """The server's blocks K..N as a numpy function (h_K, mask) -> h_N."""
    import torch

    def run(h_k: np.ndarray, mask: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            h = arch.run_blocks(torch.from_numpy(np.asarray(h_k, np.float32)), torch.from_numpy(mask.astype(np.int64)),
                                cut, arch.num_layers)
        return h.numpy()
    return run


def _norms(frames: Frames) -> dict[str, float]:
    keep = frames.attention_mask.astype(bool)
    out = {"hidden": float(np.median(np.linalg.norm(frames.hidden[keep], axis=-1)))}
    if frames.tail_grad is not None:
        out["tail_grad"] = float(np.median(np.linalg.norm(frames.tail_grad[keep], axis=-1)))
    return out


def _samples(predictions: dict, bundle: Bundle, n: int) -> list[dict]:
    """The first `n` 16-token passages of the first row, original beside recovered, per attack."""
    tokenizer = load_tokenizer(bundle.file("tokenizer.json"))
    out = []
    for name, (pred, truth, keep) in predictions.items():
        row = np.nonzero(keep[0])[0]
        for i in range(min(n, len(row) // 16)):
            span = row[16 * i:16 * (i + 1)]
            out.append({"attack": name, "original": tokenizer.decode(truth[0, span].tolist()),
                        "recovered": tokenizer.decode(pred[0, span].tolist())})
    return out
