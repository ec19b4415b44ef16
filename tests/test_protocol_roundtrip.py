"""Messages and tensors survive encode -> decode: bytes in, typed messages out, no I/O."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from splitlm import protocol as p
from splitlm.errors import BadMessage
from splitlm.protocol.reader import MAX_DEPTH, read_frame

H = 16
LIMITS = p.Limits(hidden_size=H, max_batch=8, max_seq_len=64)
FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def tensor_roundtrip(arr: np.ndarray, *, codec: str, **kw) -> np.ndarray:
    """encode_tensor -> msgpack -> zero-copy reader -> decode_tensor."""
    wire = msgpack.packb({"t": p.encode_tensor(arr, codec=codec, **kw)}, use_bin_type=True)
    return p.decode_tensor(read_frame(memoryview(wire))["t"], where="t")


def float_arrays(*, max_dims: int = 4, max_side: int = 9):
    """Float32 arrays of random shape (empty and 0-d included) at magnitudes 1e-12 .. 1e12."""
    shapes = hnp.array_shapes(min_dims=0, max_dims=max_dims, min_side=0, max_side=max_side)
    unit = st.floats(-1, 1, width=32)
    return st.tuples(hnp.arrays(np.float32, shapes, elements=unit), st.integers(-12, 12)).map(
        lambda pair: np.asarray(pair[0] * np.float32(10.0 ** pair[1]), dtype=np.float32))


# ---------------------------------------------------------------- codecs

@FAST
@given(arr=float_arrays())
def test_f32_roundtrip_is_exact(arr):
    out = tensor_roundtrip(arr, codec="f32")
    assert out.dtype == np.float32 and out.shape == arr.shape
    np.testing.assert_array_equal(out, arr)


@FAST
@given(arr=float_arrays())
def test_f16_error_is_within_1e3_of_max_abs_at_any_magnitude(arr):
    out = tensor_roundtrip(arr, codec="f16")
    assert out.dtype == np.float32 and out.shape == arr.shape
    max_abs = float(np.abs(arr).max()) if arr.size else 0.0
    assert np.all(np.abs(out - arr) <= 1e-3 * max_abs)


@FAST
@given(arr=float_arrays(), block=st.sampled_from([1, 7, 64, 100]))
def test_q8_error_is_within_block_max_abs_over_127(arr, block):
    out = tensor_roundtrip(arr, codec="q8", block=block)
    assert out.dtype == np.float32 and out.shape == arr.shape
    flat, err = arr.reshape(-1), np.abs(out - arr).reshape(-1)
    for start in range(0, flat.size, block):
        block_max = float(np.abs(flat[start:start + block]).max())
        # below float32's smallest normal number, max/127 itself is not representable
        assert err[start:start + block].max() <= block_max / 127 * (1 + 1e-6) + np.finfo(np.float32).tiny


@FAST
@given(arr=hnp.arrays(st.sampled_from(["int64", "int32", "int8", "uint8", "bool"]),
                      hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=9)))
def test_raw_roundtrip_keeps_dtype_and_values(arr):
    out = tensor_roundtrip(arr, codec="raw")
    assert out.dtype == arr.dtype and out.shape == arr.shape
    np.testing.assert_array_equal(out, arr)


def test_f16_scale_keeps_tiny_gradients_that_plain_f16_flushes_to_zero():
    grad = (np.random.default_rng(0).standard_normal((4, 512, 8)) * 1e-8).astype(np.float32)
    plain = grad.astype(np.float16).astype(np.float32)
    assert np.mean(plain == 0) > 0.4          # unscaled: most values underflow
    out = tensor_roundtrip(grad, codec="f16")
    max_abs = float(np.abs(grad).max())
    assert np.abs(out - grad).max() <= 1e-3 * max_abs
    assert np.count_nonzero(out == 0) == np.count_nonzero(grad == 0)


def test_f16_scale_is_a_power_of_two_putting_max_abs_below_f16_max():
    head = p.encode_tensor(np.array([3e-9, -1e-7], np.float32), codec="f16")
    scaled_max = 1e-7 * head["scale"]
    assert 2**14 <= scaled_max < 2**15 < 65504
    assert np.frexp(head["scale"])[0] == 0.5


def test_all_zero_tensors_roundtrip_with_every_float_codec():
    zeros = np.zeros((3, 5), np.float32)
    for codec in p.FLOAT_CODECS:
        np.testing.assert_array_equal(tensor_roundtrip(zeros, codec=codec), zeros)


def test_float64_and_float16_inputs_arrive_as_float32():
    for dtype in (np.float64, np.float16):
        arr = np.arange(6, dtype=dtype).reshape(2, 3)
        out = tensor_roundtrip(arr, codec="f32")
        assert out.dtype == np.float32
        np.testing.assert_array_equal(out, arr.astype(np.float32))


def test_non_contiguous_input_is_encoded_in_c_order():
    arr = np.arange(24, dtype=np.float32).reshape(4, 6).T
    np.testing.assert_array_equal(tensor_roundtrip(arr, codec="f32"), arr)


# ---------------------------------------------------------------- messages

def _rng_floats(*shape):
    return np.random.default_rng(1).standard_normal(shape).astype(np.float32)


def _lora():
    return {"layers.0.q_proj.lora_A": _rng_floats(4, H),
            "layers.0.q_proj.lora_B": _rng_floats(H, 4)}


B, T = 2, 5
SAMPLES = [
    p.Hello(client_id="pi-1", model_hash="sha256:ab12", cut=2, labels="device", lora_rank=8,
            lora_alpha=16.0, lora_targets=("q_proj", "v_proj"), codecs=("f32", "f16"),
            n_samples=120, resume_step=None),
    p.Hello(client_id="pi-2", model_hash="x", cut=1, labels="server", lora_rank=4,
            lora_alpha=8.0, lora_targets=(), codecs=("q8",), n_samples=0, resume_step=40),
    p.Welcome(session_id="s1", codec="f16", steps_per_round=10, round=3, step=30,
              max_frame_bytes=8 << 20, head_adapter=_lora()),
    p.Welcome(session_id="s2", codec="f32", steps_per_round=1, round=0, step=0,
              max_frame_bytes=1 << 20, head_adapter={}),
    p.Forward(step=7, hidden=_rng_floats(B, T, H), attention_mask=np.ones((B, T), np.int64),
              labels=np.full((B, T), -100, np.int64)),
    p.Forward(step=8, hidden=_rng_floats(B, T, H), attention_mask=np.ones((B, T), bool),
              labels=None),
    p.Hidden(step=8, hidden=_rng_floats(B, T, H)),
    p.TailGrad(step=8, grad=_rng_floats(B, T, H) * np.float32(1e-7), loss=2.5),
    p.Backward(step=8, grad=_rng_floats(B, T, H), loss=3.25),
    p.Adapter(round=1, tensors=_lora(), n_samples=64),
    p.AdapterGlobal(round=1, tensors=_lora()),
    p.Update(round=2, chunk=0, chunks=2, tensors={"w": _rng_floats(3, 3)}, n_samples=5),
    p.Global(round=2, chunk=1, chunks=2, tensors={"w": _rng_floats(3, 3)}, delta=True),
    p.Logits(round=4, chunk=0, chunks=1, start=0, indices=np.arange(12, dtype=np.int32).reshape(3, 4),
             values=_rng_floats(3, 4), n_samples=3),
    p.Logits(round=4, chunk=2, chunks=3, start=96, indices=np.arange(12, dtype=np.uint16).reshape(3, 4),
             values=_rng_floats(3, 4), n_samples=3),
    p.Metrics(step=9, values={"loss": 2.0, "tokens_per_s": 812.5, "rss_mb": 410.0}),
    p.Error(code="bundle_mismatch", message="expected cut 2, got 3"),
    p.Bye(reason="done"),
    p.Hello(client_id="pi-3", model_hash="x", cut=30, labels="server", lora_rank=0,
            lora_alpha=0.0, lora_targets=(), codecs=("f32",), n_samples=9, resume_step=None,
            mode="distill", train="full", public_hash="sha256:cd"),
    p.Welcome(session_id="s3", codec="f16", steps_per_round=10, round=2, step=0,
              max_frame_bytes=1 << 20, head_adapter={}, mode="fedavg", update_codec="q8",
              rounds=3, topk=0, global_chunks=4),
]


def assert_same(a, b, *, codec: str):
    assert type(a) is type(b)
    for field in dataclasses.fields(a):
        _assert_value(getattr(a, field.name), getattr(b, field.name), codec=codec)


def _assert_value(x, y, *, codec: str):
    if isinstance(x, dict):
        assert x.keys() == y.keys()
        for k in x:
            _assert_value(x[k], y[k], codec=codec)
    elif isinstance(x, np.ndarray):
        assert y.shape == x.shape
        tol = {"f32": 0, "f16": 1e-3, "q8": 1 / 127}[codec] if x.dtype.kind == "f" else 0
        max_abs = float(np.abs(x).max()) if x.size else 0.0
        assert np.abs(y.astype(np.float64) - x).max(initial=0) <= tol * max_abs
    else:
        assert x == y and type(x) is type(y)


def test_every_kind_has_a_sample():
    assert {m.kind for m in SAMPLES} == set(p.KINDS)


@pytest.mark.parametrize("codec", p.FLOAT_CODECS)
@pytest.mark.parametrize("msg", SAMPLES, ids=lambda m: m.kind)
def test_every_message_kind_roundtrips(msg, codec):
    frame = p.encode(msg, seq=41, codec=codec)
    seq, out = p.decode(frame, limits=LIMITS)
    assert seq == 41
    assert_same(msg, out, codec=codec)


def test_control_messages_decode_with_default_limits():
    for msg in SAMPLES:
        if msg.kind in ("hello", "welcome", "metrics", "error", "bye"):
            assert p.decode(p.encode(msg, seq=0), limits=p.Limits())[1].kind == msg.kind


def test_integer_tensors_go_raw_whatever_the_float_codec():
    msg = next(m for m in SAMPLES if m.kind == "forward" and m.labels is not None)
    _, out = p.decode(p.encode(msg, seq=1, codec="q8"), limits=LIMITS)
    assert out.labels.dtype == np.int64 and out.attention_mask.dtype == np.int64
    np.testing.assert_array_equal(out.labels, msg.labels)


def test_parameters_use_the_update_codec_and_activations_the_activation_codec():
    update = next(m for m in SAMPLES if m.kind == "update")
    forward = next(m for m in SAMPLES if m.kind == "forward")
    assert p.codec_for(update, activations="f16", parameters="f32") == "f32"
    assert p.codec_for(forward, activations="f16", parameters="f32") == "f16"
    values = p.Global(round=0, chunk=0, chunks=1, tensors={"w": _rng_floats(2)}, delta=False)
    assert p.codec_for(values, activations="f16", parameters="q8") == "f32"  # a joining device gets exact values
    frame = p.encode(update, seq=0, codec=p.codec_for(update, activations="f16", parameters="f32"))
    np.testing.assert_array_equal(p.decode(frame, limits=LIMITS)[1].tensors["w"], update.tensors["w"])


@pytest.mark.parametrize("kind", ["update", "global", "logits"])
def test_a_chunk_number_outside_its_count_is_refused(kind):
    msg = next(m for m in SAMPLES if m.kind == kind)
    raw = msgpack.unpackb(p.encode(msg, seq=0), raw=False)
    raw["chunk"] = raw["chunks"]
    with pytest.raises(BadMessage, match=rf"{kind}.chunk: expected 0 <= chunk < chunks = {raw['chunks']}"):
        p.decode(msgpack.packb(raw, use_bin_type=True), limits=LIMITS)


def test_numpy_scalars_are_sent_as_python_numbers():
    msg = p.Backward(step=1, grad=_rng_floats(1, 2, H), loss=np.float32(1.5))
    assert p.decode(p.encode(msg, seq=0), limits=LIMITS)[1].loss == 1.5


def test_messages_are_frozen_and_keyword_only():
    with pytest.raises(dataclasses.FrozenInstanceError):
        SAMPLES[-1].reason = "x"
    with pytest.raises(TypeError):
        p.Bye("done")


def test_metrics_ints_arrive_as_floats():
    msg = p.Metrics(step=1, values={"tokens": 512})
    assert p.decode(p.encode(msg, seq=0), limits=LIMITS)[1].values == {"tokens": 512.0}


def test_decode_accepts_bytearray_and_memoryview():
    frame = p.encode(SAMPLES[6], seq=3)
    for buf in (bytearray(frame), memoryview(frame)):
        assert p.decode(buf, limits=LIMITS)[0] == 3


# ---------------------------------------------------------------- zero copy, size

def test_decoded_f32_and_raw_tensors_are_read_only_views_of_the_frame():
    frame = p.encode(SAMPLES[4], seq=0, codec="f32")
    _, msg = p.decode(frame, limits=LIMITS)
    frame_bytes = np.frombuffer(frame, np.uint8)
    for arr in (msg.hidden, msg.attention_mask, msg.labels):
        assert np.shares_memory(arr, frame_bytes)
        assert not arr.flags.writeable


def test_adapter_tensors_are_views_of_the_frame_too():
    frame = p.encode(SAMPLES[9], seq=0)
    _, msg = p.decode(frame, limits=LIMITS)
    assert all(np.shares_memory(t, np.frombuffer(frame, np.uint8)) for t in msg.tensors.values())


def test_f16_forward_frame_is_payload_plus_under_300_header_bytes():
    b, t, h = 4, 512, 576
    msg = p.Forward(step=123456, hidden=np.ones((b, t, h), np.float32),
                    attention_mask=np.ones((b, t), np.uint8), labels=None)
    frame = p.encode(msg, seq=10**6, codec="f16")
    header = len(frame) - b * t * h * 2 - b * t * 1
    print(f"f16 forward {b}x{t}x{h}: {len(frame)} bytes, header {header}")
    assert header < 300


# ---------------------------------------------------------------- the reader matches msgpack

def _depth(obj) -> int:
    if isinstance(obj, (list, dict)):
        items = obj.values() if isinstance(obj, dict) else obj
        return 1 + max((_depth(x) for x in items), default=0)
    return 0


def _as_bytes(obj):
    if isinstance(obj, memoryview):
        return obj.tobytes()
    if isinstance(obj, list):
        return [_as_bytes(x) for x in obj]
    if isinstance(obj, dict):
        return {k: _as_bytes(x) for k, x in obj.items()}
    return obj


MSGPACK_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.binary(max_size=300)
    | st.floats(allow_nan=False) | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=20) | st.dictionaries(st.text(max_size=8), inner,
                                                                  max_size=20),
    max_leaves=40,
)


@settings(max_examples=200, deadline=None)
@given(obj=MSGPACK_VALUES, single=st.booleans())
def test_reader_agrees_with_msgpack_unpackb(obj, single):
    assume(_depth(obj) <= MAX_DEPTH)
    try:
        wire = msgpack.packb(obj, use_bin_type=True, use_single_float=single)
    except OverflowError:  # a float64 too large for float32
        assume(False)
    assert _as_bytes(read_frame(memoryview(wire))) == msgpack.unpackb(wire, raw=False)


def test_reader_handles_16_and_32_bit_lengths():
    obj = {"s" * 70000: ["x" * 300, b"y" * 70000, list(range(70000))]}
    wire = msgpack.packb(obj, use_bin_type=True)
    assert _as_bytes(read_frame(memoryview(wire))) == msgpack.unpackb(wire, raw=False)


def test_protocol_imports_no_io_and_no_torch():
    code = ("import sys, splitlm.protocol; "
            "print(sorted({'torch', 'transformers', 'asyncio', 'websockets'} & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
