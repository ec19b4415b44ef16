"""Bad input gets a clear answer and harms nobody else.

A well-behaved edge client process trains while misbehaving clients (this test, speaking the
protocol over a real socket) send garbage, wrong shapes, NaNs, oversized frames, or vanish
mid-step. Afterwards the good client must have done every step exactly once.
"""

from __future__ import annotations

import itertools

import json
import subprocess
import time

import numpy as np
import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from splitlm.demo import write_ledger_data
from splitlm.manifest import Bundle
from splitlm.protocol import Adapter, Error, Forward, Hello, Hidden, Limits, Welcome, decode, encode

from .conftest import ServerProcess, edge_cmd

GOOD_STEPS = 300


_ids = itertools.count()


def hello_for(bundle: Bundle, **change) -> Hello:
    m = bundle.manifest
    fields = dict(client_id=f"mallory-{next(_ids)}", model_hash=m.model.hash, cut=m.cut, labels=m.labels, lora_rank=m.lora.rank,
                  lora_alpha=m.lora.alpha, lora_targets=m.lora.targets, codecs=("f32", "f16", "q8"),
                  n_samples=1, resume_step=None)
    return Hello(**{**fields, **change})


def recv(ws):
    return decode(ws.recv(timeout=30), limits=Limits())[1]


def joined(url: str, bundle: Bundle):
    ws = connect(url, max_size=None)
    ws.send(encode(hello_for(bundle), seq=0))
    assert isinstance(recv(ws), Welcome)
    return ws


def forward_frame(bundle: Bundle, *, step=0, hidden=None, mask=None, labels="auto") -> bytes:
    h = bundle.manifest.model.hidden_size
    hidden = np.zeros((2, 8, h), np.float32) if hidden is None else hidden
    mask = np.ones(hidden.shape[:2], np.int64) if mask is None else mask
    if labels == "auto":
        labels = np.zeros(hidden.shape[:2], np.int64) if bundle.manifest.labels == "server" else None
    return encode(Forward(step=step, hidden=hidden, attention_mask=mask, labels=labels), seq=1)


def nan_frame(bundle: Bundle) -> bytes:
    """A forward whose activations hold a NaN, built past the sender-side check."""
    good = bytearray(forward_frame(bundle, hidden=np.full((2, 8, bundle.manifest.model.hidden_size), 7.0, np.float32)))
    at = good.index(np.float32(7.0).tobytes())
    good[at:at + 4] = np.float32(np.nan).tobytes()
    return bytes(good)


@pytest.fixture(scope="module")
def training(tiny_llama, tiny_bundle, tmp_path_factory):
    """A server with one good client process training GOOD_STEPS steps in the background."""
    bundle = tiny_bundle("server")
    data = tmp_path_factory.mktemp("data")
    write_ledger_data(data, clients=1, per_client=40, held_out=1)
    server = ServerProcess(str(tiny_llama), "--cut", "2", "--lora-rank", "4", "--wire", "f32",
                           "--max-clients", "3", "--steps-per-round", "1000", "--max-seq-len", "64")
    metrics = data / "good.jsonl"
    good = subprocess.Popen(edge_cmd(server.url, bundle.path, data / "client-0.jsonl", "--steps", str(GOOD_STEPS),
                                     "--batch-size", "2", "--seq-len", "32", "--client-id", "good",
                                     "--metrics-out", str(metrics)),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    while not (metrics.exists() and metrics.read_text()) and time.monotonic() < deadline:
        time.sleep(0.05)  # the misbehaviour below starts once the good client is mid-training
    yield server, bundle, good, metrics
    good.kill()
    server.stop()


BAD_FRAMES = {
    "garbage bytes": (lambda b: b"\x00\xffnot msgpack at all", "bad_message", ""),
    "unknown kind": (lambda b: encode(hello_for(b), seq=1).replace(b"hello", b"hallo"),
                     "bad_message", "frame.kind: expected one of"),
    "wrong hidden size": (lambda b: forward_frame(b, hidden=np.zeros((2, 8, 5), np.float32)), "bad_message",
                          "expected shape (B, T, 64), got (2, 8, 5)"),
    "float mask": (lambda b: forward_frame(b, mask=np.ones((2, 8), np.float32)), "bad_message", "attention_mask"),
    "NaN activations": (nan_frame, "bad_message", "NaN"),
    "wrong step": (lambda b: forward_frame(b, step=5), "bad_message", "forward.step: expected 0, got 5"),
}


@pytest.mark.parametrize("case", list(BAD_FRAMES))
def test_bad_frames_get_an_error_and_the_connection_lives_on(training, case):
    server, bundle, _, _ = training
    make, code, words = BAD_FRAMES[case]
    with joined(server.url, bundle) as ws:
        ws.send(make(bundle))
        reply = recv(ws)
        assert isinstance(reply, Error) and reply.code == code, reply
        assert words in reply.message
        ws.send(forward_frame(bundle))  # the same connection still trains
        assert recv(ws).kind == "backward"


def test_an_oversized_frame_closes_only_that_connection(training):
    server, bundle, _, _ = training
    with joined(server.url, bundle) as ws:
        ws.send(b"\x00" * (64 * 1024 * 1024))
        with pytest.raises(ConnectionClosed):
            recv(ws)


def test_a_mismatched_bundle_is_refused_with_its_reason(training):
    server, bundle, _, _ = training
    with connect(server.url) as ws:
        ws.send(encode(hello_for(bundle, cut=3), seq=0))
        reply = recv(ws)
        assert reply.code == "bundle_mismatch"
        assert "cut: server serves 2, bundle has 3" in reply.message


def test_a_client_over_max_clients_is_refused(training):
    server, bundle, _, _ = training
    opened = []
    try:
        for _ in range(4):  # --max-clients 3, the good client perhaps among them
            ws = connect(server.url)
            ws.send(encode(hello_for(bundle), seq=0))
            reply = recv(ws)
            opened.append(ws)
            if not isinstance(reply, Welcome):
                break
        assert reply.code == "server_full" and "3 clients already training" in reply.message
        assert len(opened) in (3, 4)
    finally:
        for ws in opened:
            ws.close()


def test_a_second_live_session_for_a_client_id_is_refused_and_the_first_trains_on(training):
    server, bundle, _, _ = training
    first = connect(server.url, max_size=None)
    first.send(encode(hello_for(bundle, client_id="twin"), seq=0))
    assert isinstance(recv(first), Welcome)
    second = connect(server.url, max_size=None)
    try:
        second.send(encode(hello_for(bundle, client_id="twin"), seq=0))
        reply = recv(second)
        assert reply.code == "already_connected" and "'twin' is already connected" in reply.message
        first.send(forward_frame(bundle))
        assert recv(first).kind in ("backward", "hidden")  # the first session still owns its slot
    finally:
        second.close()
        first.close()


def test_an_adapter_with_no_samples_is_refused_before_it_can_void_a_round(training):
    server, bundle, _, _ = training
    ws = joined(server.url, bundle)
    try:
        ws.send(encode(Adapter(round=0, tensors=bundle.lora_init(), n_samples=0), seq=1))
        reply = recv(ws)
        assert reply.code == "bad_message" and "adapter.n_samples: expected > 0" in reply.message
    finally:
        ws.close()


def test_a_client_vanishing_mid_step_loses_only_its_own_step(training):
    server, bundle, _, _ = training
    ws = joined(server.url, bundle)
    ws.send(forward_frame(bundle))
    ws.close()  # gone before its backward


def test_the_good_client_did_every_step_exactly_once(training):
    """Runs last in this module: after every misbehaviour above."""
    server, _, good, metrics = training
    out, _ = good.communicate(timeout=300)
    assert good.returncode == 0, out
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert steps == list(range(GOOD_STEPS))
    time.sleep(0.5)
    lines = server.log().splitlines()
    good_at = [i for i, line in enumerate(lines) if "client good  step" in line]
    assert [int(lines[i].split("step")[2].split()[0]) for i in good_at] == list(range(GOOD_STEPS))
    mallory_at = [i for i, line in enumerate(lines) if "client mallory" in line]
    assert any(good_at[0] < i < good_at[-1] for i in mallory_at), "misbehaviour overlapped the good client"


def test_a_client_vanishing_mid_u_step_releases_the_body(tiny_llama, tiny_bundle):
    bundle = tiny_bundle("device")
    server = ServerProcess(str(tiny_llama), "--cut", "2", "--labels", "device", "--lora-rank", "4", "--wire", "f32")
    try:
        ws = joined(server.url, bundle)
        ws.send(forward_frame(bundle))
        assert isinstance(recv(ws), Hidden)  # the body is now held for this client's tail_grad
        ws.close()
        with joined(server.url, bundle) as other:  # a second client still gets its step through
            other.send(forward_frame(bundle))
            assert isinstance(recv(other), Hidden)
    finally:
        server.stop()
