"""`splitlm compare` end to end on a tiny model: two configurations (split, labels at the server;
fedavg LoRA), each a real server and two real edge processes; the table's numbers are checked
against what each mode's own processes wrote, and `splitlm eval` on the saved adapter."""

from __future__ import annotations

import csv
import json
import shutil
import time

import pytest

from splitlm.compare import CompareConfig, RunSpec, bundle_key, ensure_bundle
from splitlm.compare_report import read_jsonl
from splitlm.manifest import Bundle, model_folder_hash

from .conftest import run_cli

CLIENTS, ROUNDS, STEPS, BATCH, SEQ, RANK = 2, 2, 2, 2, 32, 4
ARGS = ["--modes", "split-server,fedavg-lora", "--quant", "fp32", "--max-length", "128", "--clients", str(CLIENTS),
        "--rounds", str(ROUNDS), "--local-steps", str(STEPS), "--batch-size", str(BATCH), "--seq-len", str(SEQ),
        "--ranks", str(RANK), "--eval-examples", "6", "--partition", "dirichlet:0.5", "--lr", "1e-2"]


@pytest.fixture(scope="module")
def compared(tiny_llama, tiny_bundle, tiny_whole_bundle, tmp_path_factory):
    """One `splitlm compare` run. Its bundles are the session's tiny bundles (the same export
    options; shared with the other tests, since exporting is the slow part), put where compare's
    cache looks for them."""
    root = tmp_path_factory.mktemp("compare")
    cache, out = root / "bundles", root / "out"
    cfg = CompareConfig(out=out, model=str(tiny_llama), quant="fp32", max_length=128)
    model_hash = model_folder_hash(tiny_llama)
    for spec, bundle in ((RunSpec("split", cut=2, rank=RANK), tiny_bundle("server")),
                         (RunSpec("fedavg", rank=RANK), tiny_whole_bundle("fedavg", "lora"))):
        shutil.copytree(bundle.path, cache / bundle_key(spec, cfg, model_hash))
    args = ["compare", "--model", str(tiny_llama), *ARGS, "--bundles", str(cache), "--out", str(out)]
    r = run_cli(*args, env={"OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout + r.stderr
    assert "exporting" not in r.stdout  # the cache was used
    return tiny_llama, out, args, r.stdout


def table(out) -> dict[str, dict]:
    with open(out / "results.csv") as f:
        return {row["id"]: row for row in csv.DictReader(f)}


def frame_bytes(metrics_file) -> int:
    """Every frame byte a device's meter counted: its per-step records (fedavg and distill also
    write per-round totals, `phase: "round"`, which would count them twice)."""
    return sum(r["bytes_up"] + r["bytes_down"] for r in read_jsonl(metrics_file) if r.get("phase") != "round")


def test_the_table_bytes_are_the_sum_of_the_devices_frame_bytes(compared):
    _, out, _, stdout = compared
    rows = table(out)
    assert set(rows) == {"split-server-k2-r4", "fedavg-lora-r4"}
    for run_id, row in rows.items():
        run = out / "runs" / run_id
        want = sum(frame_bytes(run / f"client-{i}.metrics.jsonl") for i in range(CLIENTS))
        assert int(row["total_bytes"]) == want > 0
        per_round = (float(row["bytes_up_per_round_per_client"]) + float(row["bytes_down_per_round_per_client"]))
        assert per_round * ROUNDS * CLIENTS == pytest.approx(want, rel=1e-9)
        assert run_id in stdout  # the printed table has the row
    # fedavg's server counts the same frames from its side: every update frame a device sent
    # (the device's total also has its hello and bye, which no round of the server's holds)
    fed = out / "runs" / "fedavg-lora-r4"
    server_up = sum(json.loads((fed / "server" / f"round-{r:04d}" / "metrics.json").read_text())["bytes_up"]
                    for r in range(ROUNDS))
    device_up = sum(r["bytes_up"] for i in range(CLIENTS) for r in read_jsonl(fed / f"client-{i}.metrics.jsonl")
                    if r.get("phase") not in ("round",))
    assert 0 < device_up - server_up < 1024 * CLIENTS


def test_the_table_loss_is_what_splitlm_eval_says_of_the_saved_adapter(compared):
    model, out, _, _ = compared
    rows = table(out)
    for run_id, row in rows.items():
        adapter = out / "runs" / run_id / "server" / f"round-{ROUNDS - 1:04d}" / "adapter"
        r = run_cli("eval", str(model), "--adapter", str(adapter), "--data", str(out / "data" / "eval.jsonl"),
                    "--seq-len", str(SEQ), "--no-base", "--json", "--max-examples", "6")
        assert r.returncode == 0, r.stderr
        evaluated = json.loads(r.stdout.strip().splitlines()[-1])
        assert float(row["final_loss"]) == pytest.approx(evaluated["loss"], rel=1e-4)
        assert float(row["final_exact_match"]) == pytest.approx(evaluated["exact_match"])


def test_every_round_has_device_cost_and_the_outputs_are_written(compared):
    _, out, _, _ = compared
    results = json.loads((out / "results.json").read_text())
    assert results["base"]["loss"] > 0 and (out / "compare.png").stat().st_size > 10_000
    for run in results["runs"]:
        assert [r["round"] for r in run["rounds"]] == list(range(ROUNDS))
        for r in run["rounds"]:
            for client in r["clients"].values():
                assert client["steps"] == STEPS and client["cpu_s"] > 0 and client["compute_s"] > 0
                assert client["flops"] > 0 and client["rss_peak_mb"] > 10
    split, fed = (next(r for r in results["runs"] if r["mode"] == m) for m in ("split", "fedavg"))
    # the split device runs 2 of the 4 blocks, the fedavg device all 4 and the LM head: fewer FLOPs
    assert split["rounds"][0]["flops"] < fed["rounds"][0]["flops"]
    partition = json.loads((out / "partition.json").read_text())
    assert partition["scheme"] == "dirichlet" and partition["alpha"] == 0.5
    assert sorted(i for c in partition["clients"] for i in c) == list(range(partition["n"]))
    shard_sizes = [len((out / "data" / f"client-{i}.jsonl").read_text().splitlines()) for i in range(CLIENTS)]
    assert shard_sizes == [len(c) for c in partition["clients"]]


def test_a_rerun_skips_finished_configurations(compared):
    _, out, args, _ = compared
    before = {p: p.stat().st_mtime_ns for p in (out / "runs").glob("*/result.json")}
    t0 = time.monotonic()
    r = run_cli(*args, env={"OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("not run again") == 2 and "starting" not in r.stdout
    assert {p: p.stat().st_mtime_ns for p in (out / "runs").glob("*/result.json")} == before
    assert time.monotonic() - t0 < 60


def test_a_cached_bundle_this_splitlm_refuses_is_exported_again(tiny_llama, tmp_path):
    """A cache filled by an older splitlm (here: a manifest format it no longer reads) is not handed
    to the devices, which would refuse it: compare says so and exports the bundle again."""
    cfg = CompareConfig(out=tmp_path / "out", model=str(tiny_llama), quant="fp32", max_length=128,
                        bundles=tmp_path / "bundles")
    spec, model_hash = RunSpec("split", cut=2, rank=RANK), model_folder_hash(tiny_llama)
    stale = tmp_path / "bundles" / bundle_key(spec, cfg, model_hash)
    stale.mkdir(parents=True)
    (stale / "manifest.json").write_text(json.dumps({"format": 0}))
    said = []
    where = ensure_bundle(spec, cfg, tiny_llama, model_hash, log=said.append)
    assert where == stale and "stale (manifest format: expected 1, got 0)" in said[0], said
    assert Bundle.open(where).manifest.cut == 2


def test_rounds_of_a_device_are_grouped_as_its_mode_reports_them():
    from splitlm.compare_report import client_rounds

    step = {"bytes_up": 10, "bytes_down": 20, "cpu_s": 1.0, "compute_s": 0.5, "wall_s": 2.0, "rss_peak_mb": 50.0,
            "loss": 3.0}
    split = client_rounds([step] * 4, split=True, steps=2, rounds=2)
    assert [r["bytes_up"] for r in split] == [20, 20] and [r["steps"] for r in split] == [2, 2]
    fed_rows = [step | {"phase": "local"}, step | {"phase": "exchange", "loss": None}, {"phase": "round"},
                step | {"phase": "local"}, {"phase": "round"}, step | {"phase": "bye", "loss": None}]
    fed = client_rounds(fed_rows, split=False, steps=1, rounds=2)
    assert [r["bytes_down"] for r in fed] == [40, 40]  # the bye counts in the last round
    assert [r["steps"] for r in fed] == [1, 1] and fed[0]["train_loss"] == 3.0


def test_bytes_to_target_is_the_cumulative_bytes_when_the_loss_first_reaches_it():
    from splitlm.compare_report import default_target, summarize

    def run(losses, bytes_per_round):
        return {"id": "x", "family": "x", "wall_s": 1.0, "device_graph_bytes": 0,
                "rounds": [{"eval": {"loss": l, "perplexity": 1.0}, "bytes_up": b, "bytes_down": b, "cpu_s": 1.0,
                            "compute_s": 1.0, "flops": 1e9, "rss_peak_mb": 1.0} for l, b in zip(losses, bytes_per_round)]}
    a, b, worse = run([3.0, 2.0, 1.0], [5, 5, 5]), run([2.5, 2.4, 2.2], [1, 1, 1]), run([4.5, 4.6, 4.7], [1, 1, 1])
    target = default_target(4.0, [a, b, worse])
    assert target == 2.2  # the worst final loss among those that beat the base (4.0)
    assert summarize(a, clients=2, target=target)["bytes_to_target"] == 20  # round 1: 2 x (5 + 5)
    assert summarize(b, clients=2, target=target)["bytes_to_target"] == 6
    assert summarize(worse, clients=2, target=target)["bytes_to_target"] is None
    assert summarize(a, clients=2, target=target)["bytes_up_per_round_per_client"] == 2.5


def test_exports_are_chained_so_distill_takes_its_train_graph_from_fedavg_lora():
    """The default grid from a cold cache: distill follows the fedavg LoRA bundle of its rank (it
    copies that train.onnx), the costliest chain first; a cached lender is used directly; a rank
    without a fedavg sibling traces its own."""
    split = RunSpec("split", labels="server", cut=2, rank=8)
    lora8, lora4, full = RunSpec("fedavg", rank=8), RunSpec("fedavg", rank=4), RunSpec("fedavg", train="full")
    kd8, kd4, kd2 = RunSpec("distill", rank=8), RunSpec("distill", rank=4), RunSpec("distill", rank=2)
    from splitlm.compare import export_chains

    assert export_chains([split, lora8, full, kd8], set()) == [[(lora8, None), (kd8, lora8)], [(full, None)],
                                                                [(split, None)]]
    assert export_chains([kd8, kd4, kd2, split], {lora8, lora4}) == [[(kd8, lora8)], [(kd4, lora4)], [(kd2, None)],
                                                                    [(split, None)]]


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_batched_greedy_completions_equal_one_prompt_at_a_time(tiny_llama, tiny_gpt2, family):
    """The judge generates 8 left-padded prompts per call; each continuation is the one it gets alone."""
    from splitlm.cloud_server.evaluate import greedy_completions, load_for_eval
    from splitlm.data import PromptExample

    loaded, tokenizer = load_for_eval(str({"llama": tiny_llama, "gpt2": tiny_gpt2}[family]))
    words = "the quick brown fox jumps over the lazy dog near the river bank every evening".split()
    pairs = [PromptExample(" ".join(words[:n]), " ".join(words[n:n + 1 + n % 4])) for n in range(1, 12)]
    batched = greedy_completions(loaded, tokenizer, pairs, batch_size=8)
    alone = greedy_completions(loaded, tokenizer, pairs, batch_size=1)
    assert len(batched) == len(pairs) and any(batched)
    assert batched == alone
