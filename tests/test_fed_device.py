"""fedavg / distill bundles and the device's whole-model trainer against PyTorch.

Two bundles, each of a 2-layer tiny model, fp32: a Llama distill bundle with LoRA (train, top-k and
KD graphs) and a GPT-2 fedavg bundle training every block weight (Conv1D included).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from splitlm.edge_client.data import Dataset
from splitlm.edge_client.local import LocalTrainer
from splitlm.errors import DataError, ExportError
from splitlm.manifest import Bundle
from splitlm.public import PublicSet

from .conftest import TEXT, build_tiny_model

LR = 1e-2
STEPS = 3
# Relative error of the final trainables (norm of the difference over the norm of torch's). AdamW
# divides by sqrt(v): a near-zero gradient's float noise becomes an update of up to lr, so
# zero-initialised tensors (GPT-2 biases) differ most: 8e-4 after 3 steps here.
PARAM_RTOL = 1e-3
PUBLIC_SEQ = 24


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    from splitlm.export.bundle import ExportOptions, export_bundle

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("fed")
    public = root / "public.txt"
    public.write_text(" ".join(TEXT[::-1] * 3))
    made = {}
    for family, mode, train in (("llama", "distill", "lora"), ("gpt2", "fedavg", "full")):
        model = build_tiny_model(family, root / family, layers=2)
        out = root / f"{family}-{mode}-{train}"
        export_bundle(str(model), out, ExportOptions(mode=mode, train=train, quant="fp32", lora_rank=4, max_length=64,
                                                     topk=8, public=public, public_seq_len=PUBLIC_SEQ),
                      log=lambda *_: None)
        made[family] = (model, Bundle.open(out))
    return made


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("fed-data") / "mine.txt"
    path.write_text(" ".join(TEXT * 6))
    return path


def torch_reference(model_dir, bundle: Bundle):
    """The model with the bundle's initial trainables, and those trainables as torch parameters by name."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="eager", dtype=torch.float32)
    model.requires_grad_(False)
    init = bundle.trainables_init()
    if bundle.manifest.train == "full":
        return model, {n: model.get_parameter(n).requires_grad_(True) for n in init}
    from peft import LoraConfig, get_peft_model

    lora = bundle.manifest.lora
    model = get_peft_model(model, LoraConfig(r=lora.rank, lora_alpha=lora.alpha, target_modules=list(lora.targets),
                                             lora_dropout=0.0))
    params = {}
    for name, value in init.items():
        module, which = name.rsplit(".", 1)  # "...q_proj", "lora_A"
        params[name] = model.get_parameter(f"base_model.model.{module}.{which}.default.weight")
        params[name].data.copy_(torch.from_numpy(value))
    return model, params


def relative_error(ours: np.ndarray, theirs: np.ndarray) -> float:
    return float(np.linalg.norm(ours - theirs) / max(np.linalg.norm(theirs), 1e-12))


def feed(batch):
    return {"input_ids": torch.from_numpy(batch.input_ids), "attention_mask": torch.from_numpy(batch.attention_mask)}


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_local_steps_equal_torch_adamw_on_the_same_data(bundles, data_file, family):
    model_dir, bundle = bundles[family]
    trainer = LocalTrainer(bundle, lr=LR, threads=1)
    data = Dataset.from_file(data_file, bundle, batch_size=2, seq_len=20, seed=3)
    model, params = torch_reference(model_dir, bundle)
    optim = torch.optim.AdamW(list(params.values()), lr=LR, weight_decay=0.0)
    for step in range(STEPS):
        batch = data.batch(step)
        loss = trainer.train_step(batch)
        out = model(**feed(batch), labels=torch.from_numpy(batch.labels))
        optim.zero_grad()
        out.loss.backward()
        optim.step()
        assert loss == pytest.approx(out.loss.item(), rel=1e-5)
    init = bundle.trainables_init()
    for name, p in params.items():
        theirs = p.detach().numpy()
        assert relative_error(trainer.params[name], theirs) < PARAM_RTOL, name
        assert not np.allclose(theirs, init[name])  # it did move


def test_full_trainables_are_the_hf_state_dict_minus_the_embedding(bundles):
    model_dir, bundle = bundles["gpt2"]
    m = bundle.manifest
    _, params = torch_reference(model_dir, bundle)
    assert m.mode == "fedavg" and m.train == "full" and m.cut == m.model.num_layers == 2
    assert m.trainables["transformer.h.0.attn.c_attn.weight"] == (64, 192)  # Conv1D keeps (in, out)
    assert "transformer.ln_f.weight" in m.trainables
    assert not any(n.startswith(("transformer.wte", "transformer.wpe", "lm_head")) for n in m.trainables)
    assert {n: tuple(p.shape) for n, p in params.items()} == m.trainables
    assert set(m.files) >= {"train.onnx", "full_init.npz"} and "topk.onnx" not in m.files


def test_topk_equals_torch_topk_at_the_mask_one_positions(bundles):
    model_dir, bundle = bundles["llama"]
    trainer = LocalTrainer(bundle, threads=1)
    rng = np.random.default_rng(0)
    trainer.set_params({n: a + rng.standard_normal(a.shape).astype(np.float32) * 0.05
                        for n, a in trainer.params.items()})  # nonzero LoRA B
    model, params = torch_reference(model_dir, bundle)
    for name, p in params.items():
        p.data.copy_(torch.from_numpy(trainer.params[name]))
    public = PublicSet.from_bundle(bundle)
    _, batch = next(public.in_order(3, pad_token_id=bundle.manifest.pad_token_id))
    indices, values = trainer.topk(batch, 5)
    with torch.no_grad():
        logits = model(**feed(batch)).logits[torch.from_numpy(batch.attention_mask).bool()]  # (N, V)
    want_values, want_indices = torch.topk(torch.log_softmax(logits, -1), 5)  # log-probabilities, not logits
    assert indices.shape == (batch.n_tokens, 5) and indices.dtype == np.int32 and values.dtype == np.float32
    np.testing.assert_allclose(values, want_values.numpy(), rtol=1e-4, atol=1e-5)
    assert (indices == want_indices.numpy()).mean() > 0.999  # ties aside, the same ids in the same order


def test_a_distill_bundle_from_before_the_rest_bucket_is_refused(bundles):
    """Its topk.onnx sends raw logits, which the server now refuses: the device says so at load."""
    from splitlm.errors import BundleMismatch
    from splitlm.manifest import Manifest

    _, bundle = bundles["llama"]
    old = json.loads(bundle.manifest.to_json())
    assert old.pop("topk_values") == "logprobs"
    with pytest.raises(BundleMismatch, match="returns raw logits .* export it again"):
        Manifest.from_json(json.dumps(old))


def test_the_chunked_lm_loss_and_its_gradient_equal_autograd_through_the_full_logits():
    """The train graph's loss (LM head in row chunks, an online softmax) against cross-entropy on
    the whole (B, T, V) logits, with chunks of unequal size, padding and a label in every chunk."""
    from splitlm.export.graphs import causal_lm_loss
    from splitlm.export.whole import chunked_lm_loss

    gen = torch.Generator().manual_seed(0)
    h = torch.randn(3, 7, 16, generator=gen, dtype=torch.float64) * 2
    table = torch.randn(50, 16, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, 50, (3, 7), generator=gen)
    labels[0, :4] = torch.tensor([0, 17, 33, 49])  # the first and last row of the table, and between
    mask = torch.ones(3, 7, dtype=torch.int64)
    mask[2, 5:] = 0
    full = h.clone().requires_grad_(True)
    want = causal_lm_loss(full @ table.T, labels, mask)
    want.backward()
    loss, grad = chunked_lm_loss(h, table, labels, mask, chunk=16)  # chunks of 16, 16, 16 and 2 rows
    assert loss.item() == pytest.approx(want.item(), rel=1e-12)
    torch.testing.assert_close(grad, full.grad, rtol=1e-10, atol=1e-12)


def test_the_kd_loss_leaves_a_student_that_already_is_its_teacher_alone():
    """With the rest bucket the loss is a proper cross-entropy: a student whose distribution is the
    teacher's gets no gradient. The renormalised top-k target would still push it (sharpening)."""
    from splitlm.export.whole import kd_loss

    z = torch.randn(2, 5, 50, generator=torch.Generator().manual_seed(0)) * 2
    values, indices = torch.topk(torch.log_softmax(z, -1), 8)  # the teacher is the student itself
    mask = torch.ones(2, 5)
    student = z.clone().requires_grad_(True)
    kd_loss(student, indices, values, mask).backward()
    assert student.grad.abs().max() < 1e-6
    renormalised = z.clone().requires_grad_(True)
    kd_loss(renormalised, indices, torch.log_softmax(values, -1), mask).backward()  # p_rest = 0
    assert renormalised.grad.abs().max() > 1e-2


def test_kd_loss_and_gradients_equal_autograd(bundles):
    model_dir, bundle = bundles["llama"]
    trainer = LocalTrainer(bundle, threads=1)
    rng = np.random.default_rng(1)
    trainer.set_params({n: a + rng.standard_normal(a.shape).astype(np.float32) * 0.05
                        for n, a in trainer.params.items()})
    model, params = torch_reference(model_dir, bundle)
    for name, p in params.items():
        p.data.copy_(torch.from_numpy(trainer.params[name]))
    public = PublicSet.from_bundle(bundle)
    seqs = [1, 0]
    batch = public.batch(seqs, pad_token_id=0)
    vocab, k = bundle.manifest.model.vocab_size, 6
    table_idx = rng.integers(0, vocab, (public.n_rows, k)).astype(np.int32)
    table_lp = np.log(rng.dirichlet(np.ones(k), public.n_rows)).astype(np.float32) - 0.3  # not normalised
    t_idx, t_lp = public.rows(seqs, table_idx), public.rows(seqs, table_lp)
    names = list(bundle.manifest.trainables)
    loss, *grads = trainer.kd_session.run(["kd_loss", *[f"grad.{n}" for n in names]],
                                          {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask,
                                           "teacher_indices": t_idx, "teacher_logprobs": t_lp, **trainer.params})
    logp = torch.log_softmax(model(**feed(batch)).logits, -1)
    p = torch.from_numpy(t_lp).exp()                                       # (B, T, k): sums to e^-0.3
    picked = torch.gather(logp, -1, torch.from_numpy(t_idx).long())
    rest = -(1 - p.sum(-1)) * torch.log(1 - picked.exp().sum(-1))          # the mass outside the k
    per_position = -(p * picked).sum(-1) + rest
    mask = torch.from_numpy(batch.attention_mask).float()
    want = (per_position * mask).sum() / mask.sum()
    want.backward()
    assert float(loss) == pytest.approx(want.item(), rel=1e-5)
    for name, g in zip(names, grads):
        assert relative_error(g, params[name].grad.numpy()) < 1e-4, name
    before = {n: a.copy() for n, a in trainer.params.items()}
    assert trainer.distill_step(batch, t_idx, t_lp) == pytest.approx(want.item(), rel=1e-5)
    assert any(not np.array_equal(before[n], trainer.params[n]) for n in names)


def test_public_rows_are_the_packed_stream_and_a_wrong_file_is_refused(bundles, tmp_path):
    _, bundle = bundles["llama"]
    public = PublicSet.from_bundle(bundle)
    m = bundle.manifest
    assert public.n_rows == m.public["tokens"] and public.sha256 == m.public["sha256"]
    assert all(len(s.ids) == PUBLIC_SEQ for s in public.sequences[:-1])
    stream = np.concatenate([s.ids for s in public.sequences])
    first, batch = list(public.in_order(2, pad_token_id=0))[1]
    assert first == 2 * PUBLIC_SEQ
    np.testing.assert_array_equal(batch.input_ids[batch.attention_mask == 1], stream[first:first + batch.n_tokens])
    other = tmp_path / "public.txt"
    other.write_text(bundle.file("public.txt").read_text() + " one more sentence.")
    with pytest.raises(DataError, match=f"expected sha256 {m.public['sha256']}"):
        PublicSet.from_bundle(bundle, other)


def test_manifest_names_lora_trainables_like_the_split_bundle(bundles):
    _, bundle = bundles["llama"]
    m = bundle.manifest
    raw = json.loads(bundle.file("manifest.json").read_text())
    assert raw["mode"] == "distill" and raw["train"] == "lora" and raw["topk"] == 8
    assert m.trainables == m.lora.tensors
    assert m.trainables["model.layers.1.self_attn.q_proj.lora_A"] == (4, 64)
    assert m.trainables["model.layers.1.self_attn.v_proj.lora_B"] == (32, 4)
    assert set(m.files) >= {"train.onnx", "topk.onnx", "kd_grad.onnx", "lora_init.npz", "public.txt"}


def test_a_topk_above_the_bundle_k_is_refused(bundles):
    _, bundle = bundles["llama"]
    trainer = LocalTrainer(bundle, threads=1)
    batch = PublicSet.from_bundle(bundle).batch([0], pad_token_id=0)
    with pytest.raises(ValueError, match="k must be in 1..8 for this bundle, got 9"):
        trainer.topk(batch, 9)


@pytest.mark.parametrize("opts, message", [
    ({"mode": "fedavg", "cut": 1}, "--cut only applies to --mode split"),
    ({"mode": "fedavg", "train": "all"}, "--train must be one of lora, full, got 'all'"),
    ({"mode": "gossip"}, "--mode must be one of split, fedavg, distill, got 'gossip'"),
])
def test_bad_export_options_are_refused_before_any_work(bundles, tmp_path, opts, message):
    from splitlm.export.bundle import ExportOptions, export_bundle

    model_dir, _ = bundles["gpt2"]
    with pytest.raises(ExportError, match=message):
        export_bundle(str(model_dir), tmp_path / "b", ExportOptions(**opts), log=lambda *_: None)
    assert not (tmp_path / "b").exists()


# --- the session loop against a scripted server on 127.0.0.1 --------------------------------------

def client_config(url, bundle, data_file, tmp_path):
    from splitlm.edge_client.client import EdgeConfig

    return EdgeConfig(url=url, bundle=bundle.path, data=data_file, batch_size=2, seq_len=20, lr=LR, seed=3,
                      threads=1, client_id="dev-1", metrics_out=tmp_path / "metrics.jsonl")


async def serve_script(script):
    """A websockets server on 127.0.0.1 running `script(ws, recv, send)` for one connection."""
    from websockets.asyncio.server import serve

    from splitlm.protocol import Limits, decode, encode

    log = {"up": 0, "down": 0}

    async def handler(ws):
        async def recv():
            frame = await ws.recv()
            log["up"] += len(frame)
            return decode(frame, limits=Limits())[1]

        async def send(msg):
            frame = encode(msg, seq=0, codec="f32")
            log["down"] += len(frame)
            await ws.send(frame)

        log["result"] = await script(recv, send)

    server = await serve(handler, "127.0.0.1", 0, max_size=None)
    port = server.sockets[0].getsockname()[1]
    return server, f"ws://127.0.0.1:{port}", log


def welcome(**kw):
    from splitlm.protocol import Welcome

    base = dict(session_id="s", codec="f32", steps_per_round=2, round=0, step=0, max_frame_bytes=100_000,
                head_adapter={}, mode="fedavg", update_codec="f32", rounds=2, topk=0, global_chunks=0)
    return Welcome(**{**base, **kw})


def test_fedavg_rounds_send_chunked_deltas_and_apply_the_global(bundles, data_file, tmp_path):
    import asyncio

    from splitlm.edge_client.federated import FederatedClient, chunk_tensors
    from splitlm.protocol import Bye, Global, Hello, Update

    _, bundle = bundles["gpt2"]
    start = {n: a + 0.01 for n, a in bundle.trainables_init().items()}
    reference = LocalTrainer(bundle, lr=LR, threads=1)
    data = Dataset.from_file(data_file, bundle, batch_size=2, seq_len=20, seed=3)

    async def script(recv, send):
        hello = await recv()
        assert isinstance(hello, Hello) and (hello.mode, hello.train, hello.cut) == ("fedavg", "full", 2)
        values = chunk_tensors(start, max_frame_bytes=100_000)
        await send(welcome(global_chunks=len(values)))
        for i, tensors in enumerate(values):
            await send(Global(round=0, chunk=i, chunks=len(values), tensors=tensors, delta=False))
        reference.set_params(start)
        chunk_counts = []
        for round in range(2):
            begin = {n: a.copy() for n, a in reference.params.items()}
            for step in (2 * round, 2 * round + 1):
                reference.train_step(data.batch(step))
            parts = []
            while not parts or len(parts) < parts[0].chunks:
                parts.append(await recv())
                assert isinstance(parts[-1], Update) and parts[-1].round == round
            chunk_counts.append(len(parts))
            delta = {n: a for p in parts for n, a in p.tensors.items()}
            for n in begin:
                np.testing.assert_allclose(delta[n], reference.params[n] - begin[n], rtol=1e-5, atol=1e-7)
            half = {n: d * 0.5 for n, d in delta.items()}  # as if averaged with a client that did not move
            reference.set_params({n: begin[n] + half[n] for n in begin})
            for i, tensors in enumerate(chunks := chunk_tensors(half, max_frame_bytes=100_000)):
                await send(Global(round=round + 1, chunk=i, chunks=len(chunks), tensors=tensors, delta=True))
        assert isinstance(await recv(), Bye)
        return chunk_counts

    async def main():
        server, url, log = await serve_script(script)
        client = FederatedClient(client_config(url, bundle, data_file, tmp_path))
        async with server:
            summary = await client.run()
        return client, summary, log

    client, summary, log = asyncio.run(main())
    assert min(log["result"]) > 2  # a 100 kB frame limit split each update
    for n, a in reference.params.items():
        np.testing.assert_allclose(client.trainer.params[n], a, rtol=1e-5, atol=1e-7)
    assert client.round == 2 and summary["rounds"] == 2
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["phase"] for r in lines if r["phase"] != "local"] == ["exchange", "round"] * 2 + ["bye"]
    assert sum(r["bytes_up"] for r in lines if r["phase"] != "round") == log["up"]
    assert sum(r["bytes_down"] for r in lines if r["phase"] == "round") == log["down"]
    assert sum(r["bytes_up"] for r in lines if r["phase"] == "exchange") > 2 * sum(a.nbytes for a in start.values())
    assert all(r["rss_peak_mb"] > 0 and r["compute_s"] > 0 for r in lines if r["phase"] == "local")


def test_distill_round_uploads_public_topk_and_distills_toward_the_aggregate(bundles, data_file, tmp_path):
    import asyncio

    from splitlm.edge_client.federated import FederatedClient
    from splitlm.protocol import Bye, Hello, Logits

    _, bundle = bundles["llama"]
    public = PublicSet.from_bundle(bundle)
    reference = LocalTrainer(bundle, lr=LR, threads=1)
    data = Dataset.from_file(data_file, bundle, batch_size=2, seq_len=20, seed=3)
    k = 4

    async def script(recv, send):
        hello = await recv()
        assert isinstance(hello, Hello) and hello.public_hash == bundle.manifest.public["sha256"]
        await send(welcome(mode="distill", topk=k, rounds=1, steps_per_round=1))
        reference.train_step(data.batch(0))
        parts = [await recv()]
        while len(parts) < parts[0].chunks:
            parts.append(await recv())
        assert all(isinstance(p, Logits) for p in parts) and parts[0].start == 0
        indices = np.concatenate([p.indices for p in parts])
        values = np.concatenate([p.values for p in parts])
        want = [reference.topk(b, k) for _, b in public.in_order(2, pad_token_id=0)]
        assert indices.shape == (public.n_rows, k) and indices.dtype == np.uint16
        np.testing.assert_array_equal(indices, np.concatenate([w[0] for w in want]))
        np.testing.assert_allclose(values, np.concatenate([w[1] for w in want]), rtol=1e-5, atol=1e-6)
        assert (np.exp(values).sum(1) < 1).all()  # top-k log-probabilities over the whole vocabulary
        logprobs = values.astype(np.float32)     # one device: the aggregate is its own top-k
        half = public.n_rows // 2  # the aggregate comes back in two chunks of rows
        for i, (s, e) in enumerate([(0, half), (half, public.n_rows)]):
            await send(Logits(round=0, chunk=i, chunks=2, start=s, indices=indices[s:e].astype(np.int32),
                              values=logprobs[s:e], n_samples=10))
        seqs = Dataset(public.sequences, batch_size=2, pad_token_id=0, seed=3).indices(0)
        reference.distill_step(public.batch(seqs, pad_token_id=0), public.rows(seqs, indices.astype(np.int32)),
                               public.rows(seqs, logprobs))
        assert isinstance(await recv(), Bye)
        return len(parts)

    async def main():
        server, url, log = await serve_script(script)
        client = FederatedClient(client_config(url, bundle, data_file, tmp_path))
        async with server:
            summary = await client.run()
        return client, summary, log

    client, summary, log = asyncio.run(main())
    for n, a in reference.params.items():
        np.testing.assert_allclose(client.trainer.params[n], a, rtol=1e-5, atol=1e-7)
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["phase"] for r in lines] == ["local", "exchange", "kd", "round", "bye"]
    # Bytes up: the public set's top-k, k x (2-byte index + 4-byte value) a row, plus hello, headers, bye.
    payload = public.n_rows * k * (2 + 4)
    assert payload < log["up"] < payload + 2_000 and log["up"] == sum(r["bytes_up"] for r in lines[:-2]) + lines[-1]["bytes_up"]


def test_a_server_in_another_mode_is_refused_by_the_device(bundles, data_file, tmp_path):
    import asyncio

    from splitlm.edge_client.federated import FederatedClient

    _, bundle = bundles["llama"]

    async def script(recv, send):
        await recv()
        await send(welcome(mode="fedavg"))

    async def main():
        server, url, _ = await serve_script(script)
        async with server:
            await FederatedClient(client_config(url, bundle, data_file, tmp_path)).run()

    from splitlm.errors import BundleMismatch

    with pytest.raises(BundleMismatch, match="the server runs mode 'fedavg', this bundle is a 'distill' bundle"):
        asyncio.run(main())


def test_chunking_keeps_whole_tensors_under_the_frame_limit_and_refuses_repeats():
    from splitlm.edge_client.federated import Chunks, ProtocolViolation, chunk_tensors, row_chunks
    from splitlm.protocol import Global

    tensors = {f"t{i}": np.ones(1000 * (i + 1), np.float32) for i in range(5)}  # 4 kB .. 20 kB
    chunks = chunk_tensors(tensors, max_frame_bytes=30_000)
    assert [list(c) for c in chunks] == [["t0", "t1", "t2"], ["t3"], ["t4"]]
    with pytest.raises(ValueError, match="tensor t4 .* over the frame budget"):
        chunk_tensors(tensors, max_frame_bytes=20_000)
    assert row_chunks(10, bytes_per_row=1000, max_frame_bytes=5_000) == [(0, 3), (3, 6), (6, 9), (9, 10)]
    parts = Chunks("global", 1)
    parts.add(Global(round=1, chunk=1, chunks=2, tensors={}, delta=True))
    with pytest.raises(ProtocolViolation, match="global chunk 1/2: expected one of the 2 chunks not yet received"):
        parts.add(Global(round=1, chunk=1, chunks=2, tensors={}, delta=True))
    with pytest.raises(ProtocolViolation, match="global.round: expected 1, got 2"):
        parts.add(Global(round=2, chunk=0, chunks=2, tensors={}, delta=True))
    parts.add(Global(round=1, chunk=0, chunks=2, tensors={}, delta=True))
    assert parts.complete


@pytest.mark.parametrize("wire", ["f32", "q8"])
def test_one_fedavg_round_against_splitlm_serve_ends_with_the_servers_global(bundles, data_file, tmp_path, wire):
    """The real server (a subprocess): the device's weights after the round are the global it wrote,
    also through a lossy update codec (the join's values go exact, the deltas lossy on both sides)."""
    import asyncio

    from safetensors.numpy import load_file

    from splitlm.edge_client.federated import FederatedClient

    from .conftest import ServerProcess

    model_dir, bundle = bundles["gpt2"]
    server = ServerProcess(str(model_dir), "--mode", "fedavg", "--train", "full", "--rounds", "1",
                           "--steps-per-round", "2", "--lr", str(LR), "--out", str(tmp_path / "out"),
                           "--update-wire", wire)
    try:
        client = FederatedClient(client_config(server.url, bundle, data_file, tmp_path))
        summary = asyncio.run(client.run())
    finally:
        server.stop()
    assert summary["rounds"] == 1 and summary["local_steps"] == 2, server.log()
    written = load_file(tmp_path / "out" / "round-0000" / "model" / "model.safetensors")
    for name, value in client.trainer.params.items():
        np.testing.assert_allclose(value, written[name], rtol=0, atol=1e-6, err_msg=name)
    assert any(not np.allclose(v, bundle.trainables_init()[n]) for n, v in client.trainer.params.items())
