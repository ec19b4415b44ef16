"""The one validation path every incoming frame goes through (`messages.decode` drives it).

    frame size   <= Limits.max_frame_bytes, checked before any parsing   (FrameTooLarge)
    msgpack      one map filling the frame                               (BadMessage)
    envelope     v == PROTOCOL_VERSION (code "version"), known kind, seq
    fields       exactly the kind's fields, each through its check below
    tensors      header sane (codec, dtype, shape x itemsize == payload), floats finite,
                 shapes against Limits and against each other

A check is `check(value, where, limits) -> python value`; `where` ("forward.hidden") starts
every error message, which then says what was expected and what arrived.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection
from dataclasses import dataclass

import numpy as np

from .codes import bad, too_large
from .tensors import count_not_finite, decode_tensor

PROTOCOL_VERSION = 1
Check = Callable[[object, str, "Limits"], object]


@dataclass(frozen=True)
class Limits:
    """What a receiver accepts. The defaults need no session knowledge: fine for `hello`,
    `welcome` and control messages; a server narrows them once it knows its model."""

    max_frame_bytes: int = 64 << 20  # 64 MiB; one 4 x 512 x 576 f32 activation is 4.7 MB
    hidden_size: int | None = None   # last dim of hidden / grad; None: unchecked
    max_batch: int | None = None     # B of hidden / grad; None: unchecked
    max_seq_len: int | None = None   # T of hidden / grad; None: unchecked


# ---------------------------------------------------------------- frame and envelope

def check_frame_size(n_bytes: int, *, limits: Limits) -> None:
    if n_bytes > limits.max_frame_bytes:
        raise too_large(
            f"frame: expected at most {limits.max_frame_bytes} bytes "
            f"(Limits.max_frame_bytes), got {n_bytes}"
        )


def check_envelope(raw: object, *, kinds: Collection[str]) -> tuple[str, int]:
    """(kind, seq) of a parsed frame, after the version."""
    if not isinstance(raw, dict):
        raise bad(f"frame: expected a msgpack map, got {type(raw).__name__}")
    if "v" not in raw:
        raise bad("frame: expected field 'v' (protocol version), got none", code="version")
    if type(raw["v"]) is not int or raw["v"] != PROTOCOL_VERSION:
        raise bad(f"frame.v: expected protocol version {PROTOCOL_VERSION}, got {raw['v']!r}",
                  code="version")
    kind = _required(raw, "kind", where="frame")
    if not isinstance(kind, str) or kind not in kinds:
        raise bad(f"frame.kind: expected one of {sorted(kinds)}, got {kind!r}")
    seq = count(_required(raw, "seq", where=kind), f"{kind}.seq", None)
    return kind, seq


def read_fields(raw: dict, *, kind: str, schema: dict[str, Check], limits: Limits) -> dict:
    """The kind's fields from a parsed frame, each through its check; no field more or less."""
    extra = set(raw) - set(schema) - {"v", "kind", "seq"}
    if extra:
        raise bad(f"{kind}: expected fields {list(schema)}, got unexpected {sorted(extra)}")
    return {
        name: check(_required(raw, name, where=kind), f"{kind}.{name}", limits)
        for name, check in schema.items()
    }


def _required(raw: dict, name: str, *, where: str) -> object:
    if name not in raw:
        raise bad(f"{where}: expected field {name!r}, got fields {sorted(raw)}")
    return raw[name]


# ---------------------------------------------------------------- scalar checks

def count(value: object, where: str, limits: Limits | None) -> int:
    """A non-negative int (step, round, seq, sizes)."""
    if type(value) is not int or value < 0:
        raise bad(f"{where}: expected a non-negative int, got {_show(value)}")
    return value


def flag(value: object, where: str, limits: Limits | None) -> bool:
    if type(value) is not bool:
        raise bad(f"{where}: expected true or false, got {_show(value)}")
    return value


def real(value: object, where: str, limits: Limits | None) -> float:
    """A finite float (ints accepted)."""
    if type(value) not in (int, float) or not math.isfinite(value):
        raise bad(f"{where}: expected a finite float, got {_show(value)}")
    return float(value)


def text(value: object, where: str, limits: Limits | None) -> str:
    if not isinstance(value, str):
        raise bad(f"{where}: expected a string, got {_show(value)}")
    return value


def texts(value: object, where: str, limits: Limits | None) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise bad(f"{where}: expected a list of strings, got {_show(value)}")
    return tuple(value)


def one_of(*choices: str) -> Check:
    def check(value: object, where: str, limits: Limits | None) -> str:
        if value not in choices:
            raise bad(f"{where}: expected one of {list(choices)}, got {_show(value)}")
        return value
    return check


def optional(inner: Check) -> Check:
    """`inner`, or None (sent as msgpack nil)."""
    def check(value: object, where: str, limits: Limits | None) -> object:
        return None if value is None else inner(value, where, limits)
    return check


def real_dict(value: object, where: str, limits: Limits | None) -> dict[str, float]:
    if not isinstance(value, dict):
        raise bad(f"{where}: expected a map of name to float, got {_show(value)}")
    return {k: real(v, f"{where}[{k!r}]", limits) for k, v in value.items()}


def _show(value: object) -> str:
    shown = repr(value)
    shown = shown if len(shown) <= 40 else shown[:37] + "..."
    return f"{type(value).__name__} {shown}"


# ---------------------------------------------------------------- tensor checks

def float_tensor(value: object, where: str, limits: Limits) -> np.ndarray:
    """Any float tensor (adapter weights, deltas): float32 and finite."""
    arr = decode_tensor(value, where=where)
    if arr.dtype != np.float32:
        raise bad(f"{where}: expected a float tensor (codec f32, f16 or q8), got {arr.dtype}")
    bad_values = count_not_finite(arr)
    if bad_values:
        raise bad(f"{where}: expected finite values, got {bad_values}")
    return arr


def float_tensors(value: object, where: str, limits: Limits) -> dict[str, np.ndarray]:
    """A map of name to float tensor (LoRA weights by name); may be empty."""
    if not isinstance(value, dict):
        raise bad(f"{where}: expected a map of name to tensor, got {_show(value)}")
    return {k: float_tensor(v, f"{where}[{k!r}]", limits) for k, v in value.items()}


def activation(value: object, where: str, limits: Limits) -> np.ndarray:
    """(B, T, H) float: a hidden state or its gradient."""
    arr = float_tensor(value, where, limits)
    h = limits.hidden_size
    if arr.ndim != 3 or (h is not None and arr.shape[2] != h):
        raise bad(f"{where}: expected shape (B, T, {h or 'H'}), got {_shape(arr)}")
    _check_batch(arr.shape, where=where, limits=limits)
    return arr


def mask(value: object, where: str, limits: Limits) -> np.ndarray:
    """(B, T) int or bool attention mask."""
    return _int_matrix(value, where, limits, kinds="iub", what="an integer or bool")


def labels(value: object, where: str, limits: Limits) -> np.ndarray:
    """(B, T) int token ids to predict (-100 ignored, as in torch)."""
    return _int_matrix(value, where, limits, kinds="i", what="a signed integer")


def index_matrix(value: object, where: str, limits: Limits) -> np.ndarray:
    """(N, k) int: top-k token ids."""
    arr = decode_tensor(value, where=where)
    if arr.dtype.kind not in "iu" or arr.ndim != 2:
        raise bad(f"{where}: expected an (N, k) integer tensor, got {arr.dtype} {_shape(arr)}")
    return arr


def float_matrix(value: object, where: str, limits: Limits) -> np.ndarray:
    """(N, k) float: top-k logit values."""
    arr = float_tensor(value, where, limits)
    if arr.ndim != 2:
        raise bad(f"{where}: expected shape (N, k), got {_shape(arr)}")
    return arr


def _int_matrix(value: object, where: str, limits: Limits, *, kinds: str, what: str
                ) -> np.ndarray:
    arr = decode_tensor(value, where=where)
    if arr.dtype.kind not in kinds:
        raise bad(f"{where}: expected {what} dtype, got {arr.dtype}")
    if arr.ndim != 2:
        raise bad(f"{where}: expected shape (B, T), got {_shape(arr)}")
    _check_batch(arr.shape, where=where, limits=limits)
    return arr


def _check_batch(shape: tuple[int, ...], *, where: str, limits: Limits) -> None:
    b, t = shape[0], shape[1]
    if limits.max_batch is not None and b > limits.max_batch:
        raise bad(f"{where}: expected batch B <= {limits.max_batch} (Limits.max_batch), "
                  f"got {b} in shape {_shape_of(shape)}")
    if limits.max_seq_len is not None and t > limits.max_seq_len:
        raise bad(f"{where}: expected sequence T <= {limits.max_seq_len} "
                  f"(Limits.max_seq_len), got {t} in shape {_shape_of(shape)}")


# ---------------------------------------------------------------- cross-field checks

def same_shape(arr: np.ndarray | None, *, expected: tuple[int, ...], where: str,
               what: str) -> None:
    """Raise unless `arr` (when given) has shape `expected`; `what` says where that's from."""
    if arr is not None and getattr(arr, "shape", None) != tuple(expected):
        raise bad(f"{where}: expected shape {_shape_of(expected)} ({what}), "
                  f"got {_shape_of(getattr(arr, 'shape', ()))}")


def chunk_index(chunk: int, chunks: int, *, where: str) -> None:
    """A chunk number within its count: 0 <= chunk < chunks."""
    if type(chunk) is int and type(chunks) is int and not 0 <= chunk < chunks:
        raise bad(f"{where}.chunk: expected 0 <= chunk < chunks = {chunks}, got {chunk}")


def _shape(arr: np.ndarray) -> str:
    return _shape_of(arr.shape)


def _shape_of(shape: tuple[int, ...]) -> str:
    return str(tuple(shape))
