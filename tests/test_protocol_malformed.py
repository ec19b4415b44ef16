"""Bad frames are refused with the right error class, code, and a message naming the field,
what was expected and what arrived. Frames are built by hand, bypassing `encode`."""

from __future__ import annotations

import re

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from splitlm import protocol as p
from splitlm.errors import BadMessage, BundleMismatch, FrameTooLarge

H = 8
LIMITS = p.Limits(hidden_size=H, max_batch=4, max_seq_len=32)


def raw_tensor(arr: np.ndarray, **override) -> dict:
    """A tensor map with `arr`'s bytes as is (f32 for floats, raw otherwise), then overrides."""
    arr = np.ascontiguousarray(arr)
    float_ = arr.dtype.kind == "f"
    head = {"dtype": "float32" if float_ else arr.dtype.name, "shape": list(arr.shape),
            "codec": "f32" if float_ else "raw",
            "data": arr.astype("<f4" if float_ else arr.dtype).tobytes()}
    return head | override


def frame(kind: str, **fields) -> bytes:
    return msgpack.packb({"v": 1, "kind": kind, "seq": 0} | fields, use_bin_type=True)


def forward(**override) -> bytes:
    fields = {"step": 1, "hidden": raw_tensor(np.zeros((2, 4, H), np.float32)),
              "attention_mask": raw_tensor(np.ones((2, 4), np.int64)), "labels": None}
    return frame("forward", **(fields | override))


def refused(buf: bytes, *words: str, error=BadMessage, code="bad_message",
            limits=LIMITS) -> str:
    """Assert `buf` is refused with `error`, `.code` and every word in the message."""
    with pytest.raises(error) as info:
        p.decode(buf, limits=limits)
    text = str(info.value)
    for word in words:
        assert word in text, f"{word!r} not in {text!r}"
    assert info.value.code == code
    return text


def test_a_well_formed_hand_built_frame_decodes():
    assert p.decode(forward(), limits=LIMITS)[1].hidden.shape == (2, 4, H)


# ---------------------------------------------------------------- frame level

def test_garbage_bytes_are_refused_as_msgpack_errors():
    refused(b"\xc1", "msgpack", "0xc1")
    refused(b"\xcd\x01", "truncated", "expected 2 bytes", "got 1")
    refused(b"\x01\x02", "trailing bytes")


@settings(max_examples=300, deadline=None)
@given(buf=st.binary(max_size=64))
def test_random_bytes_raise_only_bad_message(buf):
    with pytest.raises(BadMessage):
        p.decode(buf, limits=LIMITS)


def test_every_truncation_of_a_valid_frame_is_refused():
    good = p.encode(p.Backward(step=3, grad=np.ones((1, 2, H), np.float32), loss=1.0), seq=1)
    for end in range(len(good)):
        with pytest.raises(BadMessage):
            p.decode(good[:end], limits=LIMITS)


def test_a_non_map_frame_is_refused():
    refused(msgpack.packb([1, 2, 3]), "expected a msgpack map", "got list")


def test_oversized_frame_is_refused_before_parsing():
    limits = p.Limits(max_frame_bytes=100)
    refused(b"\xc1" * 101, "at most 100 bytes", "got 101", error=FrameTooLarge,
            code="too_large", limits=limits)


def test_ext_types_duplicate_keys_and_non_string_keys_are_refused():
    refused(msgpack.packb(msgpack.ExtType(1, b"x")), "type byte 0xd4")
    refused(b"\x82\xa1a\x01\xa1a\x02", "unique map keys", "'a'")
    refused(msgpack.packb({1: 2}), "string map key", "got int")


def test_huge_claimed_counts_and_deep_nesting_are_refused_without_allocating():
    refused(b"\xdf\xff\xff\xff\xff", "map of", "cannot fit")
    refused(b"\xdd\xff\xff\xff\xff", "array of", "cannot fit")
    refused(b"\x91" * 20 + b"\x00", "nesting")


def test_invalid_utf8_text_is_refused():
    refused(b"\xa2\xff\xfe", "UTF-8")


# ---------------------------------------------------------------- envelope

def test_wrong_version_is_refused_with_code_version():
    buf = msgpack.packb({"v": 2, "kind": "bye", "seq": 0, "reason": "x"})
    refused(buf, "protocol version 1", "got 2", code="version")


def test_missing_version_is_refused_with_code_version():
    refused(msgpack.packb({"kind": "bye", "seq": 0, "reason": "x"}), "'v'", code="version")


def test_unknown_kind_is_refused_naming_the_known_ones():
    refused(frame("teleport"), "frame.kind", "'forward'", "got 'teleport'")


def test_missing_or_negative_seq_is_refused():
    refused(msgpack.packb({"v": 1, "kind": "bye", "reason": "x"}), "'seq'")
    refused(msgpack.packb({"v": 1, "kind": "bye", "seq": -1, "reason": "x"}),
            "bye.seq", "non-negative int", "got int -1")


# ---------------------------------------------------------------- fields

def test_missing_field_is_refused_by_name():
    fields = msgpack.unpackb(forward())
    del fields["labels"]
    refused(msgpack.packb(fields), "forward", "expected field 'labels'")


def test_unexpected_field_is_refused_by_name():
    refused(frame("bye", reason="done", extra=1), "bye", "unexpected ['extra']")


@pytest.mark.parametrize("buf, words", [
    (forward(step="3"), ["forward.step", "non-negative int", "got str '3'"]),
    (forward(step=True), ["forward.step", "non-negative int", "got bool"]),
    (frame("backward", step=1, grad=raw_tensor(np.zeros((1, 1, H), np.float32)), loss="low"),
     ["backward.loss", "finite float", "got str"]),
    (frame("backward", step=1, grad=raw_tensor(np.zeros((1, 1, H), np.float32)),
           loss=float("nan")), ["backward.loss", "finite float", "nan"]),
    (frame("hello", client_id="c", model_hash="h", cut=2, labels="cloud", lora_rank=8,
           lora_alpha=16.0, lora_targets=["q_proj"], codecs=["f32"], n_samples=1,
           resume_step=None), ["hello.labels", "['server', 'device']", "got str 'cloud'"]),
    (frame("hello", client_id="c", model_hash="h", cut=2, labels="server", lora_rank=8,
           lora_alpha=16.0, lora_targets="q_proj", codecs=["f32"], n_samples=1,
           resume_step=None), ["hello.lora_targets", "list of strings", "got str"]),
    (frame("metrics", step=1, values={"loss": "high"}), ["metrics.values['loss']", "got str"]),
    (frame("adapter", round=1, tensors=[1], n_samples=1), ["adapter.tensors", "map", "got list"]),
    (forward(hidden=b"\x00" * 64), ["forward.hidden", "tensor map", "got memoryview"]),
])
def test_wrong_field_type_is_refused_by_name(buf, words):
    refused(buf, *words)


def test_welcome_codec_must_be_a_float_codec():
    buf = frame("welcome", session_id="s", codec="raw", steps_per_round=1, round=0, step=0,
                max_frame_bytes=1, head_adapter={})
    refused(buf, "welcome.codec", "'f16'", "got str 'raw'")


# ---------------------------------------------------------------- tensor headers

def _hidden(**override) -> bytes:
    return forward(hidden=raw_tensor(np.zeros((2, 4, H), np.float32), **override))


def test_shape_times_itemsize_must_equal_payload_length():
    refused(_hidden(shape=[2, 4, H + 1]), "forward.hidden", "expected 288 payload bytes", "got 256")


@pytest.mark.parametrize("override, words", [
    ({"codec": "bf16"}, ["forward.hidden", "codec in", "got 'bf16'"]),
    ({"codec": ["f32"]}, ["forward.hidden", "codec in", "got ['f32']"]),
    ({"dtype": "int64"}, ["forward.hidden", "dtype in ('float32',) for codec f32", "got 'int64'"]),
    ({"shape": [2, -4, H]}, ["forward.hidden", "non-negative ints", "[2, -4, 8]"]),
    ({"shape": "2x4"}, ["forward.hidden", "shape as a list", "'2x4'"]),
    ({"data": "zeros"}, ["forward.hidden.data", "expected bin", "got str"]),
    ({"scale": 2.0}, ["forward.hidden", "tensor keys", "'scale'"]),
])
def test_insane_tensor_headers_are_refused(override, words):
    refused(_hidden(**override), *words)


def test_f16_scale_must_be_a_positive_power_of_two():
    half = np.zeros((2, 4, H), "<f2").tobytes()
    for scale, words in [(3.0, "power of two"), (-2.0, "positive finite"), (0.0, "positive")]:
        refused(_hidden(codec="f16", data=half, scale=scale), "forward.hidden.scale", words)
    refused(_hidden(codec="f16", data=half), "tensor keys", "'scale'")


def test_q8_block_and_scales_must_be_consistent():
    q = np.zeros(2 * 4 * H, "i1").tobytes()  # 64 values
    scales = np.ones(4, "<f4").tobytes()     # 4 blocks of 16
    assert p.decode(_hidden(codec="q8", data=q, block=16, scales=scales), limits=LIMITS)
    refused(_hidden(codec="q8", data=q, block=8, scales=scales),
            "forward.hidden.scales", "expected 32 payload bytes (8 values x 4)", "got 16")
    refused(_hidden(codec="q8", data=q, block=0, scales=scales), "forward.hidden.block", "got 0")
    refused(_hidden(codec="q8", data=q, scales=scales), "tensor keys", "'block'")


def test_bool_payload_bytes_must_be_0_or_1():
    mask = raw_tensor(np.ones((2, 4), bool), data=b"\x01\x02" * 4)
    refused(forward(attention_mask=mask), "forward.attention_mask", "0 or 1", "got 2")


# ---------------------------------------------------------------- values, dtypes, shapes

def _bad_values(n_nan: int, n_inf: int) -> np.ndarray:
    arr = np.zeros((2, 4, H), np.float32).reshape(-1)
    arr[:n_nan] = np.nan
    arr[n_nan:n_nan + n_inf] = np.inf
    return arr.reshape(2, 4, H)


def test_nan_activations_are_rejected_with_field_name_and_count():
    refused(forward(hidden=raw_tensor(_bad_values(3, 0))),
            "forward.hidden", "finite", "3 of 64 values", "3 NaN, 0 Inf")


def test_inf_gradients_are_rejected_with_field_name_and_count():
    buf = frame("backward", step=1, grad=raw_tensor(_bad_values(0, 2)), loss=1.0)
    refused(buf, "backward.grad", "finite", "2 of 64 values", "0 NaN, 2 Inf")
    buf = frame("tail_grad", step=1, grad=raw_tensor(-_bad_values(1, 1)), loss=1.0)
    refused(buf, "tail_grad.grad", "1 NaN, 1 Inf")


def test_non_finite_values_are_caught_in_f16_and_q8_payloads_too():
    half = _bad_values(0, 1).astype("<f2").tobytes()
    refused(_hidden(codec="f16", data=half, scale=1.0), "forward.hidden", "1 Inf")
    q = np.ones(64, "i1").tobytes()
    scales = np.array([1, np.nan, 1, 1], "<f4").tobytes()
    refused(_hidden(codec="q8", data=q, block=16, scales=scales), "forward.hidden", "16 NaN")


def test_nan_in_adapter_tensors_names_the_tensor():
    bad = {"lora_A": raw_tensor(np.array([1.0, np.nan], np.float32))}
    refused(frame("adapter", round=1, tensors=bad, n_samples=1),
            "adapter.tensors['lora_A']", "1 NaN")


def test_hidden_size_mismatch_says_expected_and_got_shape():
    buf = forward(hidden=raw_tensor(np.zeros((2, 16, 512), np.float32)),
                  attention_mask=raw_tensor(np.ones((2, 16), np.int64)))
    text = refused(buf, limits=p.Limits(hidden_size=576))
    assert text == "forward.hidden: expected shape (B, T, 576), got (2, 16, 512)"


def test_hidden_must_be_3d_even_without_a_hidden_size():
    refused(forward(hidden=raw_tensor(np.zeros((2, 4), np.float32))),
            "forward.hidden", "(B, T, H)", "got (2, 4)", limits=p.Limits())


def test_batch_and_sequence_limits_are_enforced():
    big_batch = forward(hidden=raw_tensor(np.zeros((5, 4, H), np.float32)))
    refused(big_batch, "forward.hidden", "B <= 4", "got 5")
    long_seq = frame("hidden", step=0, hidden=raw_tensor(np.zeros((1, 33, H), np.float32)))
    refused(long_seq, "hidden.hidden", "T <= 32", "got 33")


def test_float_activation_sent_raw_as_int_is_refused():
    refused(forward(hidden=raw_tensor(np.zeros((2, 4, H), np.int64))),
            "forward.hidden", "float tensor", "got int64")


def test_float_labels_and_masks_are_refused():
    refused(forward(labels=raw_tensor(np.zeros((2, 4), np.float32))),
            "forward.labels", "signed integer dtype", "got float32")
    refused(forward(labels=raw_tensor(np.zeros((2, 4), np.uint8))),
            "forward.labels", "signed integer dtype", "got uint8")
    refused(forward(attention_mask=raw_tensor(np.zeros((2, 4), np.float32))),
            "forward.attention_mask", "integer or bool dtype", "got float32")


def test_mask_shape_must_match_hidden_batch_and_length():
    text = refused(forward(attention_mask=raw_tensor(np.ones((2, 3), np.int64))))
    assert text == ("forward.attention_mask: expected shape (2, 4) (hidden's (B, T)), "
                    "got (2, 3)")
    refused(forward(labels=raw_tensor(np.ones((1, 4), np.int64))), "forward.labels", "(2, 4)")
    refused(forward(attention_mask=raw_tensor(np.ones(8, np.int64))),
            "forward.attention_mask", "(B, T)", "got (8,)")


def test_logits_indices_and_values_must_match():
    buf = frame("logits", round=0, chunk=0, chunks=1, start=0, indices=raw_tensor(np.zeros((3, 4), np.int32)),
                values=raw_tensor(np.zeros((3, 5), np.float32)), n_samples=1)
    refused(buf, "logits.values", "(3, 4)", "got (3, 5)")
    buf = frame("logits", round=0, chunk=0, chunks=1, start=0, indices=raw_tensor(np.zeros((3, 4), np.float32)),
                values=raw_tensor(np.zeros((3, 4), np.float32)), n_samples=1)
    refused(buf, "logits.indices", "integer tensor", "float32")


# ---------------------------------------------------------------- sending side, codes

def test_encode_refuses_what_cannot_be_sent():
    bad_grad = p.Backward(step=1, grad=_bad_values(1, 0), loss=1.0)
    for codec in p.FLOAT_CODECS:
        with pytest.raises(BadMessage, match=re.escape("backward.grad: expected finite")):
            p.encode(bad_grad, seq=0, codec=codec)
    with pytest.raises(BadMessage, match="float codec"):
        p.encode(p.Bye(reason="x"), seq=0, codec="raw")
    with pytest.raises(BadMessage, match="encode.seq"):
        p.encode(p.Bye(reason="x"), seq=-1)
    with pytest.raises(BadMessage, match="message dataclass"):
        p.encode({"kind": "bye"}, seq=0)
    with pytest.raises(BadMessage, match="2\\*\\*127"):
        p.encode_tensor(np.array([3e38], np.float32), codec="f16")
    with pytest.raises(BadMessage, match="dtype in"):
        p.encode_tensor(np.zeros(3, np.uint32), codec="raw")


def test_building_a_forward_with_a_mismatched_mask_fails_at_once():
    with pytest.raises(BadMessage, match="forward.attention_mask"):
        p.Forward(step=0, hidden=np.zeros((2, 4, H), np.float32),
                  attention_mask=np.ones((2, 5), np.int64), labels=None)


def test_error_code_maps_every_error_to_a_known_code():
    cases = {FrameTooLarge("x"): "too_large", BadMessage("x"): "bad_message",
             BundleMismatch("x"): "bundle_mismatch", RuntimeError("x"): "internal"}
    for exc, code in cases.items():
        assert p.error_code(exc) == code in p.ERROR_CODES
    with pytest.raises(BadMessage) as info:
        p.decode(msgpack.packb({"v": 9}), limits=LIMITS)
    assert p.error_code(info.value) == "version"
