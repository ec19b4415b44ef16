"""export: the bundle's graphs against PyTorch, its manifest, and its refusals."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch

from splitlm.export.fidelity import OnnxHead, per_token_cosine
from splitlm.manifest import Bundle, sha256_file

from .conftest import run_cli

CUT = 2


@pytest.fixture(scope="module")
def fp32_bundle(tiny_model, tiny_llama, tiny_bundle):
    return tiny_bundle("device", "llama" if tiny_model == tiny_llama else "gpt2")


def load_hf(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").eval()


def padded_batch(vocab: int, batch: int, seq: int, seed: int):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, (batch, seq)).astype(np.int64)
    mask = np.ones((batch, seq), np.int64)
    for row in range(1, batch):  # right padding of different lengths
        mask[row, seq - 2 * row:] = 0
    return ids, mask


def random_loras(bundle: Bundle, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {n: (0.05 * rng.standard_normal(s)).astype(np.float32) for n, s in bundle.manifest.lora.tensors.items()}


def test_fp32_head_matches_hf_hidden_state_token_by_token(fp32_bundle, tiny_model):
    model = load_hf(tiny_model)
    ids, mask = padded_batch(model.config.vocab_size, 3, 12, seed=1)
    with torch.no_grad():
        ref = model(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                    output_hidden_states=True).hidden_states[CUT].numpy()
    got = OnnxHead(fp32_bundle)(ids, mask)
    valid = mask.astype(bool)
    cos = per_token_cosine(got[valid], ref[valid])
    assert cos.min() >= 0.99999, f"worst token cosine {cos.min()}"


def peft_reference(model_dir, bundle: Bundle, loras: dict[str, np.ndarray]):
    """The same LoRA head built by PEFT (not by splitlm), with the bundle's tensors loaded."""
    from peft import LoraConfig, get_peft_model

    m = bundle.manifest
    model = load_hf(model_dir)
    cfg = LoraConfig(r=m.lora.rank, lora_alpha=m.lora.alpha, lora_dropout=0.0,
                     target_modules=[t.split(".")[-1] for t in m.lora.targets],
                     layers_to_transform=list(range(m.cut)), fan_in_fan_out=m.model.family == "gpt2")
    peft_model = get_peft_model(model, cfg)
    params = {}
    for name, value in loras.items():  # "model.layers.0.self_attn.q_proj.lora_A" -> PEFT's parameter
        module, _, which = name.rpartition(".")
        p = peft_model.get_parameter(f"base_model.model.{module}.{which}.default.weight")
        with torch.no_grad():
            p.copy_(torch.from_numpy(value))
        params[name] = p
    return peft_model, params


def head_grad_errors(model_dir, bundle: Bundle, batch: int, seq: int) -> dict[str, float]:
    """Relative error of head_grad.onnx against PEFT's autograd, per LoRA tensor, on a padded batch."""
    loras = random_loras(bundle, seed=seq)
    ids, mask = padded_batch(bundle.manifest.model.vocab_size, batch, seq, seed=seq)
    grad_h = np.random.default_rng(7).standard_normal((batch, seq, bundle.manifest.model.hidden_size))
    grad_h = (grad_h * mask[..., None]).astype(np.float32)

    peft_model, params = peft_reference(model_dir, bundle, loras)
    h = peft_model(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                   output_hidden_states=True).hidden_states[bundle.manifest.cut]
    h.backward(torch.from_numpy(grad_h))

    session = ort.InferenceSession(str(bundle.file("head_grad.onnx")))
    names = list(bundle.manifest.lora.tensors)
    out = session.run([f"grad.{n}" for n in names],
                      {"input_ids": ids, "attention_mask": mask, "grad_hidden": grad_h, **loras})
    return {name: float(np.abs(got - params[name].grad.numpy()).max() / np.abs(params[name].grad.numpy()).max())
            for name, got in zip(names, out)}


@pytest.mark.parametrize("batch,seq", [(3, 10), (2, 17)])
def test_head_grad_equals_peft_autograd(fp32_bundle, tiny_model, batch, seq):
    errors = head_grad_errors(tiny_model, fp32_bundle, batch, seq)
    assert max(errors.values()) < 1e-4, errors


def test_tail_loss_and_grad_equal_torch(fp32_bundle, tiny_model):
    model = load_hf(tiny_model)
    ids, mask = padded_batch(fp32_bundle.manifest.model.vocab_size, 3, 11, seed=3)
    labels = ids.copy()
    labels[0, :4] = -100  # a prompt whose tokens carry no loss
    hidden = torch.randn(3, 11, model.config.hidden_size, requires_grad=True)
    logits = model.lm_head(model.get_decoder().norm(hidden) if hasattr(model, "model")
                           else model.transformer.ln_f(hidden))
    kept = torch.from_numpy(np.where(mask.astype(bool), labels, -100))
    ref_loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                 kept[:, 1:].reshape(-1), ignore_index=-100)
    ref_loss.backward()

    session = ort.InferenceSession(str(fp32_bundle.file("tail.onnx")))
    loss, grad = session.run(["loss", "grad_hidden"], {"hidden": hidden.detach().numpy(), "labels": labels,
                                                       "attention_mask": mask})
    assert abs(float(loss) - ref_loss.item()) / ref_loss.item() < 1e-4
    ref_grad = hidden.grad.numpy()
    assert np.abs(grad - ref_grad).max() / np.abs(ref_grad).max() < 1e-4


def test_manifest_describes_every_file_and_the_lora_spec(fp32_bundle):
    m = fp32_bundle.manifest
    assert set(m.files) >= {"head.onnx", "head_grad.onnx", "tail.onnx", "tokenizer.json", "lora_init.npz"}
    for name, digest in m.files.items():
        assert sha256_file(fp32_bundle.file(name)) == digest
    assert (m.cut, m.quant, m.labels, m.lora.rank) == (CUT, "fp32", "device", 4)
    init = fp32_bundle.lora_init()
    assert set(init) == set(m.lora.tensors)
    for name, value in init.items():
        assert value.shape == tuple(m.lora.tensors[name])
        assert (np.abs(value).max() == 0) == name.endswith("lora_B"), name  # PEFT init: B = 0, A random
    # the head's graph inputs are exactly the manifest's LoRA tensors, in order
    inputs = [i.name for i in ort.InferenceSession(str(fp32_bundle.file("head.onnx"))).get_inputs()]
    assert inputs == ["input_ids", "attention_mask", *m.lora.tensors]


def test_a_tampered_bundle_is_refused(fp32_bundle, tmp_path):
    import shutil

    from splitlm.errors import BundleMismatch

    copy = tmp_path / "copy"
    shutil.copytree(fp32_bundle.path, copy)
    with open(copy / "head.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(BundleMismatch, match="head.onnx does not match its sha256"):
        Bundle.open(copy)


def test_cli_export_writes_a_bundle_and_a_fidelity_report(tiny_llama, tmp_path):
    out = tmp_path / "b"
    r = run_cli("export", str(tiny_llama), "--cut", "1", "--quant", "q8", "--out", str(out), "--max-length", "64")
    assert r.returncode == 0, r.stderr
    assert "head vs PyTorch: cosine min" in r.stdout
    assert json.loads((out / "manifest.json").read_text())["quant"] == "q8"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "staging folder left behind"


@pytest.mark.parametrize("args,needle", [
    (["--cut", "2", "MISSING"], "no such model folder"),
    (["--cut", "4", "{model}"], "--cut must be in 1..3"),
    (["--cut", "0", "{model}"], "--cut must be in 1..3"),
    (["--cut", "2", "--quant", "q3", "{model}"], "invalid choice: 'q3'"),
    (["--cut", "2", "{bert}"], "unsupported architecture 'bert'"),
    (["--cut", "2", "{empty}"], "not a Hugging Face model folder"),
])
def test_bad_export_input_is_one_line_exit_2_and_writes_nothing(tiny_llama, tmp_path, args, needle):
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))
    empty = tmp_path / "empty"
    empty.mkdir()
    args = [a.format(model=tiny_llama, bert=bert, empty=empty) for a in args]
    out = tmp_path / "out"
    r = run_cli("export", *args, "--out", str(out))
    assert r.returncode == 2
    assert needle in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not out.exists()


def test_the_graph_cleaner_matches_onnxscripts_optimizer(tiny_llama, tmp_path):
    """export.graphs.optimize_graph (fold first, then rewrite) against onnxscript's optimize_ir
    (what torch.onnx.export(optimize=True) runs) on the same raw head_grad graph: same outputs,
    and at most 2% more nodes."""
    import onnx_ir as ir
    import onnxscript.optimizer
    from torch._decomp import core_aten_decompositions
    from torch.fx.experimental.proxy_tensor import make_fx

    from splitlm.export.bundle import ExportOptions, client_graphs, load_model
    from splitlm.export.graphs import HEAD_INPUTS, OPSET, example_inputs, optimize_graph

    model, _ = load_model(str(tiny_llama))
    graphs = client_graphs(model, ExportOptions(cut=2, lora_rank=4))
    ex = example_inputs(model.config.vocab_size, model.config.hidden_size)
    loras = [torch.randn(graphs.lora.shapes[n]) * 0.01 for n in graphs.lora.names]
    args = (ex["input_ids"], ex["attention_mask"], ex["hidden"], *loras)
    gm = make_fx(lambda *a: graphs.head_grad(*a), tracing_mode="symbolic",
                 decomposition_table=core_aten_decompositions(), _allow_non_fake_inputs=True)(*args)
    names = [*HEAD_INPUTS, "grad_hidden", *graphs.lora.names]
    raw = torch.onnx.export(torch.export.export(gm, args), args, input_names=names, opset_version=OPSET,
                            dynamo=True, optimize=False, verbose=False).model
    ours, theirs = ir.from_proto(ir.to_proto(raw)), ir.from_proto(ir.to_proto(raw))
    optimize_graph(ours)
    onnxscript.optimizer.optimize_ir(theirs)
    assert len(list(ours.graph)) <= 1.02 * len(list(theirs.graph)) < len(list(raw.graph))
    feed = {n: a.numpy() for n, a in zip(names, args)}
    outs = []
    for tag, m in (("ours", ours), ("theirs", theirs)):
        ir.save(m, tmp_path / f"{tag}.onnx")
        outs.append(ort.InferenceSession(str(tmp_path / f"{tag}.onnx")).run(None, feed))
    assert len(outs[0]) == len(loras)
    for a, b in zip(*outs):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_a_whole_model_export_takes_train_onnx_from_another_bundle_and_traces_only_its_own_graphs(
        tiny_llama, tiny_whole_bundle, tmp_path):
    """`--graphs-from`: the session's distill bundle was exported from the fedavg one (conftest) and
    shares its train.onnx, with topk and kd_grad traced; a fedavg bundle taken back from the distill
    one traces nothing and is the fedavg bundle again, file for file. (That the copied graph is
    the one tracing gives: two SmolLM2 exports in separate processes wrote the same sha256.)"""
    fedavg, distill = tiny_whole_bundle("fedavg", "lora"), tiny_whole_bundle("distill", "lora")
    assert distill.manifest.files["train.onnx"] == fedavg.manifest.files["train.onnx"]
    assert {"topk.onnx", "kd_grad.onnx"} <= distill.manifest.files.keys()
    out = tmp_path / "fedavg"
    r = run_cli("export", str(tiny_llama), "--mode", "fedavg", "--quant", "fp32", "--out", str(out), "--lora-rank",
                "4", "--max-length", "128", "--graphs-from", str(distill.path))
    assert r.returncode == 0, r.stderr
    assert f"(from {distill.path})" in r.stdout
    again = Bundle.open(out).manifest
    assert again.files == fedavg.manifest.files
    assert again.mode == "fedavg" and again.topk == 0


@pytest.mark.parametrize("args,needle", [
    (["--mode", "distill", "--lora-rank", "8"], "LoRA (this export: rank 8, alpha 16"),
    (["--mode", "fedavg", "--lora-rank", "4", "--quant", "q8"], "differs in quant (this export: q8)"),
    (["--mode", "split", "--cut", "2"], "--graphs-from only applies to --mode fedavg and distill"),
])
def test_graphs_from_a_bundle_that_does_not_match_is_refused(tiny_llama, tiny_whole_bundle, tmp_path, args, needle):
    fedavg = tiny_whole_bundle("fedavg", "lora")
    out = tmp_path / "out"
    r = run_cli("export", str(tiny_llama), "--max-length", "128", "--topk", "8", *args, "--graphs-from",
                str(fedavg.path), "--out", str(out), *([] if "--quant" in args else ["--quant", "fp32"]))
    assert r.returncode == 2, r.stderr
    assert needle in r.stderr
    assert not out.exists()


def test_small_integer_powers_become_multiplications(tmp_path):
    """export/graphs.integer_powers: x**1, x**2, x**3 leave no Pow (onnxruntime's is a scalar
    std::pow per element); any other exponent keeps its Pow; the outputs stay PyTorch's."""
    import onnx

    from splitlm.export.graphs import trace_with_shapes

    def f(x):
        return x ** 1 * 0.5 + x ** 2 - x ** 3 + x.abs() ** 2.5

    x = torch.randn(3, 7)
    seq = torch.export.Dim("seq", min=2, max=64)
    trace_with_shapes(f, (x,), ({1: seq},), input_names=["x"], output_names=["y"], path=tmp_path / "f.onnx")
    ops = [n.op_type for n in onnx.load(str(tmp_path / "f.onnx")).graph.node]
    assert ops.count("Pow") == 1, ops
    session = ort.InferenceSession(str(tmp_path / "f.onnx"), providers=["CPUExecutionProvider"])
    y = torch.randn(3, 11)
    np.testing.assert_allclose(session.run(None, {"x": y.numpy()})[0], f(y).numpy(), rtol=1e-5, atol=1e-6)
