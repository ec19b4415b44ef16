"""Bad fedavg and distill frames get an error for that connection only, and the round they were
sent into still closes on the good reports: a wire-level client against a real server."""

from __future__ import annotations

import numpy as np
import pytest
from websockets.sync.client import connect

from splitlm.manifest import model_folder_hash, sha256_file
from splitlm.protocol import Global, Hello, Limits, Logits, Update, Welcome, decode, encode
from splitlm.public import default_public

from .conftest import ServerProcess

TARGETS = ("self_attn.q_proj", "self_attn.v_proj")


def hello(model, mode: str, client_id: str) -> Hello:
    return Hello(client_id=client_id, model_hash=model_folder_hash(model), cut=4, labels="server", lora_rank=4,
                 lora_alpha=16.0, lora_targets=TARGETS, codecs=("f32", "f16"), n_samples=3, resume_step=None,
                 mode=mode, public_hash=sha256_file(default_public()) if mode == "distill" else None,
                 public_seq_len=128 if mode == "distill" else None)


def recv(ws):
    return decode(ws.recv(timeout=60), limits=Limits())[1]


def join(url, model, mode, client_id):
    ws = connect(url, max_size=None)
    ws.send(encode(hello(model, mode, client_id), seq=0))
    welcome = recv(ws)
    assert isinstance(welcome, Welcome), welcome
    glob = {}
    for _ in range(welcome.global_chunks):
        glob.update({n: np.array(t) for n, t in recv(ws).tensors.items()})
    return ws, welcome, glob


def refused(ws, frame: bytes, *words: str) -> None:
    ws.send(frame)
    reply = recv(ws)
    assert reply.kind == "error", reply
    for w in words:
        assert w in reply.message, reply.message


def test_bad_updates_are_refused_and_the_round_closes_on_the_good_one(tiny_llama):
    server = ServerProcess(str(tiny_llama), "--mode", "fedavg", "--lora-rank", "4", "--rounds", "1")
    try:
        ws, welcome, glob = join(server.url, tiny_llama, "fedavg", "mallory")
        names = list(glob)
        zeros = {n: np.zeros_like(glob[n]) for n in names}
        wrong = {names[0]: np.zeros((3, 3), np.float32)}
        refused(ws, encode(Update(round=0, chunk=0, chunks=1, tensors=wrong, n_samples=3), seq=1),
                f"update.tensors[{names[0]!r}]: expected shape {glob[names[0]].shape}, got (3, 3)")
        refused(ws, encode(Update(round=0, chunk=0, chunks=1, tensors={"nope": np.zeros(2, np.float32)}, n_samples=3),
                           seq=2), "'nope' is not a trainable tensor")
        missing = {n: zeros[n] for n in names[1:]}
        refused(ws, encode(Update(round=0, chunk=0, chunks=1, tensors=missing, n_samples=3), seq=3),
                "all 1 chunks arrived without 1 tensors", repr(names[0]))
        first = {names[0]: zeros[names[0]]}
        ws.send(encode(Update(round=0, chunk=0, chunks=2, tensors=first, n_samples=3), seq=4))
        refused(ws, encode(Update(round=0, chunk=0, chunks=2, tensors=first, n_samples=3), seq=5),
                "chunk 0 of round 0 arrived twice")
        refused(ws, encode(Logits(round=0, chunk=0, chunks=1, start=0, indices=np.zeros((1, 2), np.int32),
                                  values=np.zeros((1, 2), np.float32), n_samples=1), seq=6),
                "unexpected 'logits' in fedavg")
        delta = {n: np.full_like(glob[n], 0.25) for n in names}
        ws.send(encode(Update(round=0, chunk=0, chunks=1, tensors=delta, n_samples=3), seq=7))
        answer = recv(ws)
        assert isinstance(answer, Global) and answer.delta and answer.round == 1
        for n, t in answer.tensors.items():
            np.testing.assert_array_equal(t, delta[n])  # the good update alone, nothing of the refused ones
        ws.close()
        assert server.proc.wait(timeout=60) == 0  # --rounds 1: it finished
    finally:
        if server.proc.poll() is None:
            server.stop()


@pytest.mark.parametrize("bad,words", [
    ({"indices": np.full((4, 8), 10_000, np.int32)}, ["token ids in 0..", "got 10000"]),
    ({"start": 10 ** 9}, ["past the public set's"]),
    ({"indices": np.zeros((4, 5), np.int32), "values": np.zeros((4, 5), np.float32)}, ["expected k = 8 columns, got 5"]),
    ({"values": np.full((4, 8), 3.0, np.float32)}, ["expected log-probabilities", "summing to 160.7"]),  # raw logits: 8 e^3
    ({"values": np.full((4, 8), np.log(0.2), np.float32)}, ["expected log-probabilities", "summing to 1.6"]),
])
def test_bad_logits_are_refused_with_what_is_wrong(tiny_llama, bad, words):
    server = ServerProcess(str(tiny_llama), "--mode", "distill", "--lora-rank", "4", "--topk", "8")
    try:
        ws, welcome, _ = join(server.url, tiny_llama, "distill", "mallory")
        fields = dict(round=0, chunk=0, chunks=2, start=0, indices=np.zeros((4, 8), np.int32),
                      values=np.full((4, 8), np.log(1 / 8), np.float32), n_samples=3) | bad
        refused(ws, encode(Logits(**fields), seq=1), *words)
        ws.close()
    finally:
        server.stop()


def test_a_device_whose_bundle_packs_the_public_set_otherwise_is_refused(tiny_llama):
    """Same public text, another --public-seq-len: row i of its logits would be another token."""
    import dataclasses

    server = ServerProcess(str(tiny_llama), "--mode", "distill", "--lora-rank", "4", "--topk", "8",
                           "--public-seq-len", "64")
    try:
        with connect(server.url, max_size=None) as ws:
            ws.send(encode(hello(tiny_llama, "distill", "packed-at-128"), seq=0))
            reply = recv(ws)
            assert reply.kind == "error" and reply.message.startswith(
                "hello.public_seq_len: this server packs the public set into sequences of 64 tokens, the bundle "
                "into 128 (serve --public-seq-len 128 matches it)"), reply
        with connect(server.url, max_size=None) as ws:
            ws.send(encode(dataclasses.replace(hello(tiny_llama, "distill", "packed-at-64"), public_seq_len=64), seq=0))
            assert isinstance(recv(ws), Welcome)
    finally:
        server.stop()
