"""The onnxruntime sessions of one client bundle, sharing one copy of the frozen weights.

    forward(ids, mask, loras)               head.onnx       -> hidden            (B, T, H)
    lora_grads(ids, mask, grad_h, loras)    head_grad.onnx  -> {name: dL/dlora}
      keep_activations=True (bundles exported with --keep-activations):
    forward(ids, mask, loras)               head_saved.onnx -> hidden, and keeps what backward reads
    lora_grads(ids, mask, grad_h, loras)    head_grad_kept.onnx, fed those: no second forward
    tail(hidden_N, labels, mask)            tail.onnx       -> loss, dL/dhidden_N  (labels on device)
                                            run `tail_chunk` tokens at a time (edge_client/tail.py)

head.onnx and head_grad.onnx each embed the same frozen weights (the embedding is 80% of a
SmolLM2 head), and two plain sessions keep two copies. Here each distinct large initializer is
read from disk once, into one OrtValue handed to every session that has it
(`SessionOptions.add_initializer`); identical tensors are matched by content, since the graphs
name them differently. Each session is built from the model bytes with those tensors' data
replaced by a reference to their place in the .onnx file, so onnxruntime never parses a second
copy either. The onnx package is not on the device: the few protobuf fields this needs are read
by hand (`read_initializers`).

onnxruntime's memory arena and memory pattern are off by default (`mem_arena=False`): both keep
the largest step's activations (the pattern, one block sized for a whole run) for the session's
life. For fp32 bundles prepacking is off too: a packed copy of a shared weight is a second copy.

Peak RSS of a fresh process training SmolLM2-135M cut at 2, batch 1 x 512 tokens
(bench/bench_edge_memory.py), plain two sessions -> this runtime:
    fp32   one step 525 -> 336 MB (0.64x)    after three steps 681 -> 338 MB (0.50x)
    q4     one step 286 -> 219 MB (0.77x)    after three steps 449 -> 224 MB (0.50x)

The sessions borrow the pool's memory: keep the HeadRuntime alive while they are in use.
"""

from __future__ import annotations

import ctypes
import hashlib
import math
import mmap
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from splitlm.errors import BundleMismatch
from splitlm.manifest import Bundle, ordered_tensors

from .tail import chunked_tail

SHARE_MIN_BYTES = 1 << 16  # smaller initializers stay inside their graph
HASH_CHUNK = 1 << 20
PROVIDERS = ["CPUExecutionProvider"]
TAIL_CHUNK = 64  # tokens per tail.onnx run: SmolLM2's logits and their gradient, ~1.3 MB a token
# The order onnxruntime runs a graph's nodes in (same outputs either way), per kind of graph.
# DEFAULT is a plain topological order; on the whole-model train graph it runs every chunk of the
# LM head before consuming any (the whole logits alive at once), and PRIORITY_BASED, which runs a
# consumer as soon as its inputs are ready, took a SmolLM2 fedavg device 1,023 -> 909 MB
# (bench/bench_fedavg.py). On the split head it went the other way (q4 training step at 1 x 512
# 197 -> 207 MB, labels on the device 277 -> 286 MB; bench/bench_mmap_threshold.py), so split
# sessions keep DEFAULT. SPLITLM_ORT_ORDER=NAME overrides both, for those benchmarks.
SPLIT_ORDER, WHOLE_MODEL_ORDER = "DEFAULT", "PRIORITY_BASED"
ORDER_ENV = "SPLITLM_ORT_ORDER"
MMAP_THRESHOLD = 1 << 16  # glibc: allocations over this get their own mapping (`give_back_large_blocks`)


class HeadRuntime:
    """The device's graphs of one bundle: head, its VJP and (labels on device) the tail."""

    def __init__(self, bundle: Bundle | str | Path, *, threads: int = 0, share_weights: bool = True,
                 mem_arena: bool = False, tail_chunk: int | None = TAIL_CHUNK, grad_mem_reuse: bool = False,
                 mmap_threshold: int = MMAP_THRESHOLD, keep_activations: bool = False):
        self.tail_chunk = tail_chunk  # None: the whole batch in one run
        self.bundle = bundle if isinstance(bundle, Bundle) else Bundle.open(bundle)
        self.manifest = self.bundle.manifest
        self.threads, self.mem_arena = threads, mem_arena
        if not mem_arena:
            give_back_large_blocks(mmap_threshold)
        self.pool = WeightPool() if share_weights else None
        self.grad_mem_reuse = grad_mem_reuse or mem_arena
        self.kept: Kept | None = None  # keep_activations: the last forward's, until its lora_grads
        if keep_activations:
            missing = missing_kept_graphs(self.manifest)
            if missing:
                raise BundleMismatch(f"bundle {self.bundle.path} has no {' or '.join(missing)}: export it with "
                                     f"--keep-activations to keep activations on the device")
            self.head = self._session("head_saved.onnx")
            self.head_grad_kept = self._session("head_grad_kept.onnx", mem_reuse=self.grad_mem_reuse)
            self.saved_names = [o.name for o in self.head.get_outputs()][1:]
            self._head_grad = None  # opened if a backward ever comes without its forward kept
        else:
            self.head = self._session("head.onnx")
            # head_grad's peak is the step's peak: there onnxruntime frees each activation after its
            # last use instead of holding it for a later tensor of the same size (see open_session).
            self._head_grad = self._session("head_grad.onnx", mem_reuse=self.grad_mem_reuse)
        self.keep_activations = keep_activations
        # The tail shares no weight with the head's graphs (its LM head is 8-bit, the embedding is
        # not), and outside the pool onnxruntime frees each weight once its int8 kernel has packed it.
        pool_tail = self.manifest.quant == "fp32"
        self.tail_session = self._session("tail.onnx", pooled=pool_tail) if self.has_tail else None

    @property
    def has_tail(self) -> bool:
        return self.manifest.labels == "device"

    def _session(self, name: str, *, pooled: bool = True, mem_reuse: bool = True) -> ort.InferenceSession:
        return open_session(self.bundle, name, pool=self.pool if pooled else None, threads=self.threads,
                            mem_arena=self.mem_arena, mem_reuse=mem_reuse)

    @property
    def head_grad(self) -> ort.InferenceSession:
        if self._head_grad is None:
            self._head_grad = self._session("head_grad.onnx", mem_reuse=self.grad_mem_reuse)
        return self._head_grad

    def forward(self, input_ids: np.ndarray, attention_mask: np.ndarray,
                loras: dict[str, np.ndarray]) -> np.ndarray:
        """hidden_K (B, T, H) float32 of the head with these LoRA tensors (keep_activations: and
        what its backward reads, held for the next `lora_grads` of the same inputs)."""
        feed = {**self._token_inputs(input_ids, attention_mask), **self._lora_inputs(loras)}
        if not self.keep_activations:
            return self.head.run(["hidden"], feed)[0]
        self.kept = None  # the previous step's go before this one's are made
        hidden, *saved = self.head.run(["hidden", *self.saved_names], feed)
        self.kept = Kept({k: v.copy() for k, v in feed.items()}, dict(zip(self.saved_names, saved)))
        return hidden

    def lora_grads(self, input_ids: np.ndarray, attention_mask: np.ndarray, grad_hidden: np.ndarray,
                   loras: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """dL/d(each LoRA tensor) given dL/dhidden_K (B, T, H), by name. With activations kept from
        a forward of the same ids, mask and LoRA, from those; otherwise the forward runs again."""
        feed = {**self._token_inputs(input_ids, attention_mask),
                "grad_hidden": self._float(grad_hidden, "grad_hidden", input_ids.shape),
                **self._lora_inputs(loras)}
        names = list(self.manifest.lora.tensors)
        outputs = [f"grad.{n}" for n in names]
        kept, self.kept = self.kept, None
        if kept is not None and kept.matches(feed):
            return dict(zip(names, self.head_grad_kept.run(outputs, {**feed, **kept.saved})))
        return dict(zip(names, self.head_grad.run(outputs, feed)))

    def tail(self, hidden: np.ndarray, labels: np.ndarray, attention_mask: np.ndarray) -> tuple[float, np.ndarray]:
        """(loss, dL/dhidden_N (B, T, H)): mean next-token cross-entropy of the tail on the device."""
        if self.tail_session is None:
            raise BundleMismatch(f"bundle {self.bundle.path} has no tail.onnx: it was exported with labels "
                                 f"at the {self.manifest.labels}; export it with --labels device")
        tokens = self._token_inputs(labels, attention_mask)
        hidden = self._float(hidden, "hidden", labels.shape)
        if self.tail_chunk is None:
            return self._tail_run(hidden, tokens["input_ids"], tokens["attention_mask"])
        return chunked_tail(self._tail_run, hidden, tokens["input_ids"], tokens["attention_mask"], self.tail_chunk)

    def _tail_run(self, hidden: np.ndarray, labels: np.ndarray, attention_mask: np.ndarray) -> tuple[float, np.ndarray]:
        feed = {"hidden": hidden, "labels": labels, "attention_mask": attention_mask}
        loss, grad = self.tail_session.run(["loss", "grad_hidden"], feed)
        return float(loss), grad

    # --- input checks: a wrong shape gets our message, not onnxruntime's ------------------------

    def _token_inputs(self, ids: np.ndarray, mask: np.ndarray) -> dict[str, np.ndarray]:
        ids, mask = np.ascontiguousarray(ids, np.int64), np.ascontiguousarray(mask, np.int64)
        if ids.ndim != 2 or mask.shape != ids.shape:
            raise ValueError(f"expected token ids and mask of one shape (B, T), got {ids.shape} and {mask.shape}")
        if not 3 <= ids.shape[1] <= self.manifest.max_length:
            raise ValueError(f"sequence length must be in 3..{self.manifest.max_length} for this bundle, "
                             f"got {ids.shape[1]}")
        return {"input_ids": ids, "attention_mask": mask}

    def _float(self, x: np.ndarray, what: str, tokens_shape: tuple[int, ...]) -> np.ndarray:
        expected = (*tokens_shape, self.manifest.model.hidden_size)
        if x.shape != expected:
            raise ValueError(f"{what}: expected shape {expected}, got {x.shape}")
        return np.ascontiguousarray(x, np.float32)

    def _lora_inputs(self, loras: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ordered = ordered_tensors(loras, self.manifest.lora.tensors, what="LoRA tensor")
        return {name: np.ascontiguousarray(t, np.float32) for name, t in ordered.items()}


KEPT_GRAPHS = ("head_saved.onnx", "head_grad_kept.onnx")


def missing_kept_graphs(manifest) -> list[str]:
    """Which of the graphs a device needs to keep activations this bundle lacks (none: it was
    exported with --keep-activations)."""
    return [name for name in KEPT_GRAPHS if name not in manifest.files]


@dataclass
class Kept:
    """One forward's inputs and the activations its backward reads (export/graphs.py's head_saved).

    SmolLM2 cut at 2 keeps 7.3 MB at batch 1 x 128 and 30.1 MB at 1 x 512 (the attention mask
    grows with T^2; the probabilities are computed again, export/attention.py), held from the
    forward until the server's gradient comes back; the backward then runs without the forward
    (bench/bench_device.py)."""

    inputs: dict[str, np.ndarray]  # input_ids, attention_mask and the LoRA tensors, as fed
    saved: dict[str, np.ndarray]

    def matches(self, feed: dict[str, np.ndarray]) -> bool:
        """The same ids, mask and LoRA values as the forward that kept them (an optimizer step or
        another batch in between would make them another step's)."""
        return all(name in feed and np.array_equal(feed[name], value) for name, value in self.inputs.items())


def open_session(bundle: Bundle, name: str, *, pool: "WeightPool | None", threads: int = 0,
                 mem_arena: bool = False, mem_reuse: bool = True, order: str = SPLIT_ORDER) -> ort.InferenceSession:
    """One of the bundle's graphs, its large frozen weights taken from `pool` (None: its own copy),
    its nodes run in `order` (an onnxruntime.ExecutionOrder name; see SPLIT_ORDER).

    mem_reuse=False: onnxruntime's planner does not hand a finished activation's buffer to a later
    tensor of the same size, so each buffer is freed after its last use instead of at the run's
    end. Outputs are bit-identical; SmolLM2 q4 head_grad at 1 x 512 peaked 32 MB lower (a
    training step 209 -> 177 MB) at the cost of a fresh allocation per activation: at 1 x 128
    29.5k page faults a run instead of 17.8k, ~+15% of head_grad's time on a contended x86 core.
    """
    options = ort.SessionOptions()
    options.enable_mem_reuse = mem_reuse
    options.intra_op_num_threads = threads  # 0: onnxruntime picks (one per core)
    options.enable_cpu_mem_arena = mem_arena  # off: a step's activations go back when it ends
    options.enable_mem_pattern = mem_arena    # off: no block sized for the whole run, kept after it
    options.execution_order = getattr(ort.ExecutionOrder, os.environ.get(ORDER_ENV, order))
    # No spin-waiting after a run: the device mostly waits on the network, and spinning threads
    # burned ~25x the compute time in CPU (and battery), starving a server on the same host.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if pool and bundle.manifest.quant == "fp32":
        # A prepacked fp32 MatMul weight is a second copy beside the shared one (-50 MB for a
        # SmolLM2 head, -160 MB with its tail); the quantized kernels' packing costs nothing here.
        options.add_session_config_entry("session.disable_prepacking", "1")
    path = bundle.file(name)
    model = pool.model_bytes(path, options) if pool else str(path)
    return ort.InferenceSession(model, options, providers=PROVIDERS)


def give_back_large_blocks(threshold: int = MMAP_THRESHOLD) -> bool:
    """glibc: every allocation over `threshold` bytes gets its own mapping, unmapped when freed.

    By default glibc raises this threshold after each large free (up to 32 MiB), so with the
    arena off onnxruntime's activation buffers land on the heap and stay resident after a step.
    Fixed at 64 KiB, SmolLM2 q4 at 1 x 512 held 117 MB between steps instead of 223 MB and peaked
    at 220 MB instead of 234. False where libc is not glibc (macOS, musl): nothing changes there.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(-3, threshold))  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        return False


# --- one copy of each frozen weight ------------------------------------------------------------

class WeightPool:
    """Distinct large initializers, keyed by content, each one OrtValue shared by every session."""

    def __init__(self):
        self.values: dict[tuple, ort.OrtValue] = {}  # (data type, dims, blake2b of the bytes) -> value
        self.nbytes = 0                               # held by the pool, once
        self.served = 0                               # handed to sessions, counting each time

    def model_bytes(self, path: Path, options: ort.SessionOptions) -> bytes:
        """The model at `path` with its large weights taken from the pool (registered on `options`)."""
        path = path.resolve()  # a symlinked file: its data lies beside the target, not the link
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            large = [t for t in read_initializers(buf) if t.nbytes >= SHARE_MIN_BYTES]
            for t in large:
                if t.dtype is not None or t.packed_4bit:
                    options.add_initializer(t.name, self._value(f, t))
                    self.served += t.nbytes
            # The rest onnxruntime reads itself, from the references into the file.
            options.add_session_config_entry("session.model_external_initializers_file_folder_path",
                                             str(path.parent.resolve()))
            return without_data(buf, large, location=path.name)

    def _value(self, f, t: "Initializer") -> ort.OrtValue:
        key = (t.data_type, t.dims, _digest(f, *t.data))
        if key not in self.values:
            self.values[key] = _read_value(f, t)
            self.nbytes += t.nbytes
        return self.values[key]


def _read_value(f, t: "Initializer") -> ort.OrtValue:
    """The tensor's data in memory we own (add_initializer wants that), wrapped without a copy.

    A 4-bit tensor has no numpy type: onnxruntime takes a uint8 array of the tensor's shape and
    reads its first ceil(n/2) bytes as the packed values (tests check the outputs against a
    plain session); np.zeros maps the rest lazily, so it never becomes resident. Shared, the
    4-bit embedding of a SmolLM2 q4 head took the training step's peak from 217 to 206 MB.
    """
    if t.packed_4bit:
        array = np.zeros(t.dims, np.uint8)
        f.seek(t.data[0])
        f.readinto(memoryview(array).cast("B")[:t.nbytes])
        return ort.OrtValue.ortvalue_from_numpy_with_onnx_type(array, t.data_type)
    array = np.empty(t.dims, t.dtype)
    f.seek(t.data[0])
    f.readinto(memoryview(array).cast("B"))
    return ort.OrtValue.ortvalue_from_numpy(array)  # keeps `array` alive, no copy


def _digest(f, start: int, end: int) -> bytes:
    h = hashlib.blake2b(digest_size=16)
    f.seek(start)
    while start < end:
        chunk = f.read(min(HASH_CHUNK, end - start))
        h.update(chunk)
        start += len(chunk)
    return h.digest()


# --- the few protobuf fields of an .onnx file this needs ---------------------------------------
# ModelProto.graph = 7; GraphProto.initializer = 5; TensorProto: dims = 1, data_type = 2, name = 8,
# raw_data = 9, external_data = 13 (StringStringEntryProto: key = 1, value = 2), data_location = 14.

# TensorProto.DataType -> numpy; the 4-bit types (uint4 21, int4 22) have none (see `_read_value`).
PACKED_4BIT = (21, 22)
NUMPY_TYPES = {1: np.float32, 2: np.uint8, 3: np.int8, 4: np.uint16, 5: np.int16, 6: np.int32, 7: np.int64,
               9: np.bool_, 10: np.float16, 11: np.float64, 12: np.uint32, 13: np.uint64}


@dataclass(frozen=True)
class Initializer:
    name: str
    data_type: int
    dims: tuple[int, ...]
    data: tuple[int, int] | None  # raw_data's byte span in the file, if the data is raw
    proto: tuple[int, int]        # the TensorProto's byte span

    @property
    def nbytes(self) -> int:
        return self.data[1] - self.data[0] if self.data else 0

    @property
    def packed_4bit(self) -> bool:
        return self.data_type in PACKED_4BIT and self.nbytes == (math.prod(self.dims) + 1) // 2

    @property
    def dtype(self) -> np.dtype | None:
        """The numpy dtype of the data, if it has one and the byte count agrees with the dims."""
        dtype = NUMPY_TYPES.get(self.data_type)
        ok = dtype is not None and math.prod(self.dims) * np.dtype(dtype).itemsize == self.nbytes
        return np.dtype(dtype) if ok else None


def _varint(buf, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = buf[i]
        i += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, i
        shift += 7


def _fields(buf, start: int, end: int):
    """(field number, wire type, value, span) of each field in buf[start:end].

    value: the int of a varint, or the (start, end) of a length-delimited payload; span covers
    the whole field, key included.
    """
    i = start
    while i < end:
        key, j = _varint(buf, i)
        wire = key & 7
        if wire == 0:
            value, k = _varint(buf, j)
        elif wire == 2:
            n, p = _varint(buf, j)
            value, k = (p, p + n), p + n
        elif wire in (1, 5):
            value, k = None, j + (8 if wire == 1 else 4)
        else:
            raise ValueError(f"unsupported protobuf wire type {wire} at byte {i}")
        yield key >> 3, wire, value, (i, k)
        i = k


def _graph_span(buf) -> tuple[int, int]:
    for number, _, value, _ in _fields(buf, 0, len(buf)):
        if number == 7:
            return value
    raise ValueError("no graph in this model")


def read_initializers(buf) -> list[Initializer]:
    """The initializers of an ONNX ModelProto held in `buf` (bytes or an mmap)."""
    out = []
    for number, _, proto, _ in _fields(buf, *_graph_span(buf)):
        if number != 5:
            continue
        name, data_type, dims, data = "", 0, [], None
        for field, wire, value, _ in _fields(buf, *proto):
            if field == 1 and wire == 0:
                dims.append(value)
            elif field == 1:  # packed dims
                i = value[0]
                while i < value[1]:
                    d, i = _varint(buf, i)
                    dims.append(d)
            elif field == 2:
                data_type = value
            elif field == 8:
                name = bytes(buf[value[0]:value[1]]).decode()
            elif field == 9:
                data = value
        out.append(Initializer(name, data_type, tuple(dims), data, proto))
    return out


def _key(number: int, wire: int) -> bytes:
    return _encode_varint(number << 3 | wire)


def _encode_varint(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _delimited(number: int, payload: bytes) -> bytes:
    return _key(number, 2) + _encode_varint(len(payload)) + payload


def _external(buf, t: Initializer, location: str) -> bytes:
    """TensorProto `t` with its raw_data replaced by a reference to the same bytes in `location`."""
    kept = b"".join(bytes(buf[s:e]) for field, _, _, (s, e) in _fields(buf, *t.proto) if field in (1, 2, 8))
    entries = {"location": location, "offset": str(t.data[0]), "length": str(t.nbytes)}
    refs = b"".join(_delimited(13, _delimited(1, k.encode()) + _delimited(2, v.encode()))
                    for k, v in entries.items())
    return kept + refs + _key(14, 0) + _encode_varint(1)  # data_location = EXTERNAL


def without_data(buf, tensors: list[Initializer], *, location: str) -> bytes:
    """The model in `buf` with the data of `tensors` moved out to external references."""
    by_proto = {t.proto: t for t in tensors}
    graph = bytearray()
    for number, _, value, (s, e) in _fields(buf, *_graph_span(buf)):
        t = by_proto.get(value) if number == 5 else None
        graph += _delimited(5, _external(buf, t, location)) if t else bytes(buf[s:e])
    model = bytearray()
    for number, _, _, (s, e) in _fields(buf, 0, len(buf)):
        model += _delimited(7, bytes(graph)) if number == 7 else bytes(buf[s:e])
    return bytes(model)
