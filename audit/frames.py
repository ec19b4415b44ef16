"""What a curious server receives from one device, and the truth to score an attack against.

`device_frames` runs the device's side exactly as `splitlm edge` does (its data reader, its
onnxruntime head, its privatizer) over a data file, with the bundle's initial LoRA (what the
head is at step 0, and what the server knows it to be):

    FILE --edge_client.data--> batches --HeadRuntime.forward--> h_K --Privatizer.hidden--> sent h_K
    U-shape:  sent h_K --the server's own body (torch)--> h_N --HeadRuntime.tail--> tail_grad
              --Privatizer.tail_grad--> sent tail_grad

`log_frames` reads a recorded frame log instead: a file of msgpack `bin` objects, each one whole
websocket frame as it crossed the wire (either direction), decoded with splitlm.protocol.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import msgpack
import numpy as np

from splitlm.edge_client.data import IGNORE_INDEX, Dataset
from splitlm.edge_client.privacy import PrivacySettings, Privatizer
from splitlm.edge_client.runtime import HeadRuntime
from splitlm.errors import DataError
from splitlm.manifest import Bundle
from splitlm.protocol import Forward, Hidden, Limits, TailGrad, decode


@dataclass(frozen=True)
class Frames:
    """Everything per batch, concatenated over batches of one (padded) length T."""

    input_ids: np.ndarray        # (N, T) the truth: what the device read
    attention_mask: np.ndarray   # (N, T)
    labels: np.ndarray           # (N, T) the truth of U-shape; IGNORE_INDEX where nothing is learned
    hidden: np.ndarray           # (N, T, H) h_K as sent
    hidden_n: np.ndarray | None  # (N, T, H) h_N the server computed (U-shape)
    tail_grad: np.ndarray | None  # (N, T, H) dL/dh_N as sent (U-shape)

    @property
    def n_tokens(self) -> int:
        return int(self.attention_mask.sum())


def device_frames(bundle: Bundle, data: str | Path, *, settings: PrivacySettings, runtime: HeadRuntime,
                  body=None, seq_len: int = 64, batch_size: int = 4, max_tokens: int = 2048,
                  rng: np.random.Generator | None = None, progress=None) -> Frames:
    """The frames a device with `settings` would send for the first `max_tokens` of `data`.

    `body(h_k, mask) -> h_N` (the server's blocks K..N) is needed for tail_grad frames (U-shape).
    """
    dataset = Dataset.from_file(data, bundle, seq_len=seq_len, batch_size=batch_size, seed=0)
    privatizer = Privatizer(settings, rng if rng is not None else np.random.default_rng())
    lora = bundle.lora_init()
    parts: list[dict] = []
    seen = 0
    for step in range(dataset.steps_per_epoch):
        if seen >= max_tokens:
            break
        batch = dataset.batch(step)
        h_k = privatizer.hidden(runtime.forward(batch.input_ids, batch.attention_mask, lora))  # (B, T, H)
        part = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask, "labels": batch.labels,
                "hidden": h_k}
        if body is not None and runtime.has_tail:
            h_n = body(h_k, batch.attention_mask)
            _, grad = runtime.tail(h_n, batch.labels, batch.attention_mask)
            part |= {"hidden_n": h_n, "tail_grad": privatizer.tail_grad(grad)}
        parts.append(part)
        seen += batch.n_tokens
        if progress is not None:
            progress(batch.n_tokens)
    return _concat(parts)


def _concat(parts: list[dict]) -> Frames:
    """Batches padded to one length T and stacked."""
    if not parts:
        raise DataError("no frames: the data gave no batch")
    T = max(p["input_ids"].shape[1] for p in parts)

    def stack(key: str, fill) -> np.ndarray | None:
        if key not in parts[0]:
            return None
        padded = []
        for p in parts:
            x = p[key]
            pad = [(0, 0), (0, T - x.shape[1])] + [(0, 0)] * (x.ndim - 2)
            padded.append(np.pad(x, pad, constant_values=fill))
        return np.concatenate(padded)

    return Frames(stack("input_ids", 0), stack("attention_mask", 0), stack("labels", IGNORE_INDEX),
                  stack("hidden", 0.0), stack("hidden_n", 0.0), stack("tail_grad", 0.0))


def log_frames(path: str | Path, bundle: Bundle, data: str | Path, *, seq_len: int, batch_size: int,
               seed: int = 0) -> Frames:
    """A recorded frame log, scored against the device's `data` read as the edge read it.

    The edge's batch of step s is a pure function of (data, seq_len, batch_size, seed), so the
    truth of each recorded `forward` is `Dataset.batch(s)`: pass the edge's own settings.
    """
    dataset = Dataset.from_file(data, bundle, seq_len=seq_len, batch_size=batch_size, seed=seed)
    limits = Limits(hidden_size=bundle.manifest.model.hidden_size, max_frame_bytes=1 << 31)
    by_step: dict[int, dict] = {}
    with open(path, "rb") as f:
        for frame in msgpack.Unpacker(f, raw=False, max_buffer_size=1 << 31):
            _, msg = decode(frame, limits=limits)
            if isinstance(msg, Forward):
                by_step.setdefault(msg.step, {})["hidden"] = np.array(msg.hidden, np.float32)
            elif isinstance(msg, Hidden):
                by_step.setdefault(msg.step, {})["hidden_n"] = np.array(msg.hidden, np.float32)
            elif isinstance(msg, TailGrad):
                by_step.setdefault(msg.step, {})["tail_grad"] = np.array(msg.grad, np.float32)
    if not by_step:
        raise DataError(f"{path}: no forward frames in the log")
    parts = []
    for step in sorted(by_step):
        batch = dataset.batch(step)
        got = by_step[step]
        if got["hidden"].shape[:2] != batch.input_ids.shape:
            raise DataError(f"{path}: forward of step {step} has shape {got['hidden'].shape[:2]}, the data's batch "
                            f"{batch.input_ids.shape}: pass the edge's --seq-len, --batch-size and --seed")
        parts.append({"input_ids": batch.input_ids, "attention_mask": batch.attention_mask, "labels": batch.labels,
                      **got})
    if any(set(p) != set(parts[0]) for p in parts):
        parts = [{k: p[k] for k in ("input_ids", "attention_mask", "labels", "hidden")} for p in parts]
    return _concat(parts)
