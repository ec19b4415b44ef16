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
    parameters: ClassVar[bool] = False  # carries model parameters: encoded with the session's update codec


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

MODES = ("split", "fedavg", "distill")
TRAIN = ("lora", "full")


@_message("hello", client_id=v.text, model_hash=v.text, cut=v.count,
          labels=v.one_of("server", "device"), lora_rank=v.count, lora_alpha=v.real,
          lora_targets=v.texts, codecs=v.texts, n_samples=v.count,
          resume_step=v.optional(v.count), mode=v.one_of(*MODES), train=v.one_of(*TRAIN),
          public_hash=v.optional(v.text), public_seq_len=v.optional(v.count))
class Hello(_Message):
    """client -> server, first frame: who it is and what bundle it runs.

    For fedavg and distill the bundle is the whole model: `cut` is its number of layers, and for
    `train="full"` the LoRA fields are 0, 0.0 and ()."""
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
    mode: str = "split"             # one of MODES, from the bundle's manifest
    train: str = "lora"             # what the device trains: LoRA tensors or every decoder weight
    public_hash: str | None = None  # distill: sha256 of the public set the bundle names
    public_seq_len: int | None = None  # distill: the length the bundle packs that set into (rows follow it)


@_message("welcome", session_id=v.text, codec=v.one_of(*FLOAT_CODECS),
          steps_per_round=v.count, round=v.count, step=v.count, max_frame_bytes=v.count,
          head_adapter=v.float_tensors, mode=v.one_of(*MODES),
          update_codec=v.one_of(*FLOAT_CODECS), rounds=v.count, topk=v.count,
          global_chunks=v.count)
class Welcome(_Message):
    """server -> client: the session's settings and where training stands."""
    session_id: str
    codec: str                          # codec for activations and their gradients, both directions
    steps_per_round: int                # R: split steps between adapter averages; local steps otherwise
    round: int
    step: int
    max_frame_bytes: int                # the largest frame the server accepts
    head_adapter: dict[str, np.ndarray]  # split: current global client LoRA; may be empty
    mode: str = "split"                 # the server's mode; must equal the bundle's
    update_codec: str = "f32"           # codec for parameters: adapter, adapter_global, update, global
    rounds: int = 0                     # rounds the server runs; 0: until it says bye
    topk: int = 0                       # distill: k of the top-k logits
    global_chunks: int = 0              # `global` frames that follow (0: start from the bundle's init)


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
    parameters = True
    round: int
    tensors: dict[str, np.ndarray]
    n_samples: int       # averaging weight


@_message("adapter_global", round=v.count, tensors=v.float_tensors)
class AdapterGlobal(_Message):
    """server -> client: the sample-weighted average of the clients' LoRA tensors."""
    parameters = True
    round: int
    tensors: dict[str, np.ndarray]


# ---------------------------------------------------------------- fedavg and distill rounds
# A round's parameters or logits can exceed one frame: they travel as `chunks` frames, numbered
# `chunk` = 0..chunks-1, each holding whole tensors (update, global) or a run of rows (logits).

@_message("update", round=v.count, chunk=v.count, chunks=v.count, tensors=v.float_tensors,
          n_samples=v.count)
class Update(_Message):
    """client -> server, fedavg: one chunk of the delta (local - global at round start) of each
    trainable tensor after R local steps."""
    parameters = True
    round: int
    chunk: int
    chunks: int
    tensors: dict[str, np.ndarray]
    n_samples: int       # averaging weight

    def __post_init__(self) -> None:
        v.chunk_index(self.chunk, self.chunks, where="update")


@_message("global", round=v.count, chunk=v.count, chunks=v.count, tensors=v.float_tensors,
          delta=v.flag)
class Global(_Message):
    """server -> client, fedavg (and the starting point in distill): one chunk of the global
    trainables of `round`; `delta`: add these to what you hold, else they are the values."""
    parameters = True
    round: int
    chunk: int
    chunks: int
    tensors: dict[str, np.ndarray]
    delta: bool

    def __post_init__(self) -> None:
        v.chunk_index(self.chunk, self.chunks, where="global")


@_message("logits", round=v.count, chunk=v.count, chunks=v.count, start=v.count,
          indices=v.index_matrix, values=v.float_matrix, n_samples=v.count)
class Logits(_Message):
    """distill, one chunk of rows [start, start + N) of the public set's top-k.
    client -> server: raw logits of the device's local model; server -> client: the aggregate's
    top-k as log-probabilities (n_samples: the samples it aggregates)."""
    round: int
    chunk: int
    chunks: int
    start: int           # first public row in this chunk
    indices: np.ndarray  # (N, k) int token ids
    values: np.ndarray   # (N, k) float32
    n_samples: int

    def __post_init__(self) -> None:
        v.chunk_index(self.chunk, self.chunks, where="logits")
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
    tensors always go raw. A session picks `codec` per message with `codec_for`."""
    if KINDS.get(getattr(msg, "kind", None)) is not type(msg):
        raise bad(f"encode: expected a message dataclass, got {type(msg).__name__}")
    if codec not in FLOAT_CODECS:
        raise bad(f"encode: expected a float codec in {FLOAT_CODECS}, got {codec!r}")
    frame = {"v": v.PROTOCOL_VERSION, "kind": msg.kind, "seq": v.count(seq, "encode.seq", None)}
    for name in msg.wire:
        frame[name] = _to_wire(getattr(msg, name), codec=codec, where=f"{msg.kind}.{name}")
    return msgpack.packb(frame, use_bin_type=True)


def codec_for(msg: Message, *, activations: str, parameters: str) -> str:
    """The session's codec for `msg`: parameter kinds (adapter, update, global, ...) use the
    update codec, everything else the activations' codec; a `global` that carries values rather
    than a delta (a device joining) goes f32, so both sides start from the same exact numbers."""
    if isinstance(msg, Global) and not msg.delta:
        return "f32"
    return parameters if type(msg).parameters else activations


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
