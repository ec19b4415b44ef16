"""Message kinds as frozen dataclasses, and `encode` / `decode` between them and frames.

A frame is one msgpack map `{"v": 1, "kind": str, "seq": int, ...fields}`; tensors are maps
described in `tensors`. Each class below names its kind and the check of each field
(`validate`), in field order; `KINDS` is the one table from kind to class.

Arrays in decoded messages may be read-only views of the frame (see `tensors`); the
dataclasses are frozen but the arrays in them are not copied.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import ClassVar

import msgpack
import numpy as np

from . import validate as v
from .codes import bad
from .reader import read_frame
from .tensors import FLOAT_CODECS, encode_tensor

KINDS: dict[str, type] = {}


class _Message:
    kind: ClassVar[str]                # the wire "kind"
    wire: ClassVar[dict[str, v.Check]]  # field name -> check, in field order


def _message(kind: str, **wire: v.Check):
    """Make `cls` a frozen, keyword-only dataclass of `kind` and register it in KINDS."""
    def register(cls: type) -> type:
        cls = dataclass(frozen=True, eq=False, kw_only=True)(cls)
        names = [f.name for f in fields(cls)]
        assert names == list(wire), f"{kind}: fields {names} != wire checks {list(wire)}"
        cls.kind, cls.wire = kind, wire
        KINDS[kind] = cls
        return cls
    return register


# ---------------------------------------------------------------- handshake

@_message("hello", client_id=v.text, model_hash=v.text, cut=v.count,
          labels=v.one_of("server", "device"), lora_rank=v.count, lora_alpha=v.real,
          lora_targets=v.texts, codecs=v.texts, n_samples=v.count,
          resume_step=v.optional(v.count))
class Hello(_Message):
    """client -> server, first frame: who it is and what bundle it runs."""
    client_id: str
    model_hash: str                 # the bundle manifest's source-model hash
    cut: int                        # K: the client runs layers [0, K)
    labels: str                     # "server" or "device" (U-shape)
    lora_rank: int
    lora_alpha: float
    lora_targets: tuple[str, ...]   # module names, e.g. ("q_proj", "v_proj")
    codecs: tuple[str, ...]         # codecs the client can decode
    n_samples: int                  # training examples it holds (FedAvg weight)
    resume_step: int | None         # the next step it will run, to resume; None: fresh


@_message("welcome", session_id=v.text, codec=v.one_of(*FLOAT_CODECS),
          steps_per_round=v.count, round=v.count, step=v.count, max_frame_bytes=v.count,
          head_adapter=v.float_tensors)
class Welcome(_Message):
    """server -> client: the session's settings and where training stands."""
    session_id: str
    codec: str                          # codec for float tensors, both directions
    steps_per_round: int                # R: steps between adapter averages
    round: int
    step: int
    max_frame_bytes: int                # the largest frame the server accepts
    head_adapter: dict[str, np.ndarray]  # current global client LoRA; may be empty


# ---------------------------------------------------------------- split training step

@_message("forward", step=v.count, hidden=v.activation, attention_mask=v.mask,
          labels=v.optional(v.labels))
class Forward(_Message):
    """client -> server: the head's output h_K."""
    step: int
    hidden: np.ndarray           # (B, T, H) float32
    attention_mask: np.ndarray   # (B, T) int or bool
    labels: np.ndarray | None    # (B, T) int; None when labels stay on the device

    def __post_init__(self) -> None:
        batch = getattr(self.hidden, "shape", ())[:2]
        for name in ("attention_mask", "labels"):
            v.same_shape(getattr(self, name), expected=batch, where=f"forward.{name}",
                         what="hidden's (B, T)")


@_message("hidden", step=v.count, hidden=v.activation)
class Hidden(_Message):
    """server -> client, U-shape mode: the body's output h_N."""
    step: int
    hidden: np.ndarray   # (B, T, H) float32


@_message("tail_grad", step=v.count, grad=v.activation, loss=v.real)
class TailGrad(_Message):
    """client -> server, U-shape mode: dL/dh_N from the client's tail, and the loss."""
    step: int
    grad: np.ndarray     # (B, T, H) float32
    loss: float


@_message("backward", step=v.count, grad=v.activation, loss=v.real)
class Backward(_Message):
    """server -> client: dL/dh_K for the head, and the step's loss."""
    step: int
    grad: np.ndarray     # (B, T, H) float32
    loss: float


# ---------------------------------------------------------------- round end

@_message("adapter", round=v.count, tensors=v.float_tensors, n_samples=v.count)
class Adapter(_Message):
    """client -> server, SplitFed round end: the client's LoRA tensors."""
    round: int
    tensors: dict[str, np.ndarray]
    n_samples: int       # averaging weight


@_message("adapter_global", round=v.count, tensors=v.float_tensors)
class AdapterGlobal(_Message):
    """server -> client: the sample-weighted average of the clients' LoRA tensors."""
    round: int
    tensors: dict[str, np.ndarray]


@_message("update", round=v.count, tensors=v.float_tensors, n_samples=v.count)
class Update(_Message):
    """client -> server, fedavg mode: parameter deltas after R local steps."""
    round: int
    tensors: dict[str, np.ndarray]
    n_samples: int


@_message("global", round=v.count, tensors=v.float_tensors)
class Global(_Message):
    """server -> client, fedavg mode: the averaged deltas."""
    round: int
    tensors: dict[str, np.ndarray]


@_message("logits", round=v.count, indices=v.index_matrix, values=v.float_matrix,
          n_samples=v.count)
class Logits(_Message):
    """client -> server (and back, aggregated), distill mode: top-k logits on the public set."""
    round: int
    indices: np.ndarray  # (N, k) int token ids
    values: np.ndarray   # (N, k) float32 logits
    n_samples: int

    def __post_init__(self) -> None:
        v.same_shape(self.values, expected=getattr(self.indices, "shape", ()),
                     where="logits.values", what="indices' (N, k)")


# ---------------------------------------------------------------- control

@_message("metrics", step=v.count, values=v.real_dict)
class Metrics(_Message):
    """either way: named numbers for a step (loss, tokens/s, peak RSS, ...)."""
    step: int
    values: dict[str, float]


@_message("error", code=v.text, message=v.text)
class Error(_Message):
    """either way: what went wrong; `code` is one of codes.ERROR_CODES."""
    code: str
    message: str


@_message("bye", reason=v.text)
class Bye(_Message):
    """either way: the sender is closing the session."""
    reason: str


Message = (Hello | Welcome | Forward | Hidden | TailGrad | Backward | Adapter | AdapterGlobal
           | Update | Global | Logits | Metrics | Error | Bye)


# ---------------------------------------------------------------- encode / decode

def encode(msg: Message, *, seq: int, codec: str = "f32") -> bytes:
    """One frame for `msg`. Float tensors go with `codec` (f32, f16 or q8); integer and bool
    tensors always go raw."""
    if KINDS.get(getattr(msg, "kind", None)) is not type(msg):
        raise bad(f"encode: expected a message dataclass, got {type(msg).__name__}")
    if codec not in FLOAT_CODECS:
        raise bad(f"encode: expected a float codec in {FLOAT_CODECS}, got {codec!r}")
    frame = {"v": v.PROTOCOL_VERSION, "kind": msg.kind, "seq": v.count(seq, "encode.seq", None)}
    for name in msg.wire:
        frame[name] = _to_wire(getattr(msg, name), codec=codec, where=f"{msg.kind}.{name}")
    return msgpack.packb(frame, use_bin_type=True)


def _to_wire(value: object, *, codec: str, where: str) -> object:
    if isinstance(value, np.ndarray):
        return encode_tensor(value, codec=codec if value.dtype.kind == "f" else "raw",
                             where=where)
    if isinstance(value, dict):
        return {k: _to_wire(x, codec=codec, where=f"{where}[{k!r}]") for k, x in value.items()}
    if isinstance(value, tuple):
        return list(value)
    if isinstance(value, np.generic):
        return value.item()
    return value


def decode(frame: bytes | bytearray | memoryview, *, limits: v.Limits) -> tuple[int, Message]:
    """(seq, message) of one frame, through every check in `validate`.
    Raises FrameTooLarge, or BadMessage with `.code` "version" or "bad_message"."""
    buf = _byte_view(frame)
    v.check_frame_size(buf.nbytes, limits=limits)
    raw = read_frame(buf)
    kind, seq = v.check_envelope(raw, kinds=KINDS.keys())
    cls = KINDS[kind]
    return seq, cls(**v.read_fields(raw, kind=kind, schema=cls.wire, limits=limits))


def _byte_view(frame: object) -> memoryview:
    try:
        buf = memoryview(frame)
        return buf if buf.format == "B" and buf.ndim == 1 else buf.cast("B")
    except TypeError as exc:
        raise bad(f"frame: expected contiguous bytes, got {type(frame).__name__} ({exc})")
