"""A newcomer's first hour: every command works from the folder that holds the clone, says what it
is doing, prints no dependency noise, checks its arguments before any work, and ends by saying
what to do next.

One tiny-model demo runs once for the module, from a folder that holds a `splitlm/` folder (what
`git clone` makes); the eval tests judge the adapter it wrote with the command it printed.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from splitlm.cli import build_parser
from splitlm.launch import cli_command

# What a dependency's warning looks like in a log: Python's warnings, torch's glog-style lines,
# transformers' weight-loading bar.
NOISE = re.compile(r"Warning\b|warnings\.warn|^[WE]\d{4} |Skipping torchvision|Loading weights", re.M)
ENV = {"OMP_NUM_THREADS": "1"}


def run_in(folder: Path, *args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """`splitlm ARGS` started the way the demo starts its parts, in `folder`."""
    return subprocess.run(cli_command(*args), cwd=folder, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **ENV, **(env or {})})


def console_script() -> str:
    """The installed `splitlm` command (next to this interpreter in a virtual environment)."""
    here = Path(sys.executable).parent / "splitlm"
    return str(here) if here.exists() else shutil.which("splitlm")


@pytest.fixture(scope="module")
def clone(tmp_path_factory) -> Path:
    """A working folder with a `splitlm/` folder in it, as after `git clone .../splitlm`. Its
    `__init__.py` fails loudly, so whatever imports it instead of the installed package shows,
    whether the package is installed in place (where a clone's bare folder hides it too) or not."""
    folder = tmp_path_factory.mktemp("home")
    (folder / "splitlm").mkdir()
    (folder / "splitlm" / "__init__.py").write_text('raise ImportError("not the installed splitlm")\n')
    return folder


@pytest.fixture(scope="module")
def demo(clone, tiny_llama, tmp_path_factory):
    """`splitlm demo --model TINY --steps 5` (one round) run from `clone`."""
    cache = tmp_path_factory.mktemp("cache")
    r = run_in(clone, "demo", "--model", str(tiny_llama), "--steps", "5", "--workdir", "work",
               env={"SPLITLM_CACHE": str(cache)}, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r, clone / "work"


def test_python_m_from_such_a_folder_is_the_trap(clone):
    """The reason for `splitlm.launch`: this is what the demo used to run, and it fails here."""
    r = subprocess.run([sys.executable, "-m", "splitlm.cli", "--version"], cwd=clone, capture_output=True,
                       text=True, env={**os.environ, **ENV})
    assert r.returncode != 0 and "not the installed splitlm" in r.stderr, r.stderr
    r = run_in(clone, "--version")
    assert r.returncode == 0 and r.stdout.startswith("splitlm "), r.stderr


def test_the_demo_runs_from_a_folder_holding_a_splitlm_folder_and_names_its_result(demo):
    r, work = demo
    out = r.stdout
    for said in ("exporting a q4 bundle at K=2", "starting the server", "server at ws://127.0.0.1:"):
        assert said in out, out  # what it is doing, before each slow part
    assert "the result: the adapter of round 0 (the last one): work/server/round-0000/adapter" in out, out
    command = out.strip().splitlines()[-1].strip()
    assert shlex.split(command)[:2] == ["splitlm", "eval"], out
    assert (work / "server" / "round-0000" / "adapter" / "adapter_config.json").is_file()
    # the server waits for both clients (a slow starter once made round 0 one client's alone)
    assert "round 0 closed: 2 clients" in (work / "server.log").read_text()


def test_no_dependency_noise_in_export_serve_edge_output(demo):
    r, work = demo
    logs = {"demo and export": r.stdout + r.stderr, "server": (work / "server.log").read_text(),
            **{p.name: p.read_text() for p in work.glob("client-*.log")}}
    assert len(logs) == 4
    for name, text in logs.items():
        assert not NOISE.search(text), f"{name}:\n{text}"
    assert "joined (20 samples), round 0; new: starts at step 0" in logs["server"], logs["server"]


@pytest.fixture(scope="module")
def judged(demo):
    """The demo's own eval line, run as printed (from the same folder), in a table and in JSON."""
    r, work = demo
    printed = shlex.split(r.stdout.strip().splitlines()[-1])
    model, data = printed[2], printed[printed.index("--data") + 1]
    table = run_in(work.parent, *printed[1:])
    as_json = run_in(work.parent, *printed[1:], "--json")
    base_only = run_in(work.parent, "eval", model, "--data", data, "--json")
    for done in (table, as_json, base_only):
        assert done.returncode == 0, done.stderr
    return table, json.loads(as_json.stdout), json.loads(base_only.stdout), as_json.stderr


def test_eval_shows_base_and_adapter_side_by_side_with_progress(judged):
    table, compared, base_only, _ = judged
    rows = {line.split()[0]: line.split()[1:] for line in table.stdout.strip().splitlines()[1:]}
    assert table.stdout.split("\n")[0].split() == ["loss", "perplexity", "exact", "match"], table.stdout
    assert set(rows) == {"base", "adapter"}, table.stdout
    assert float(rows["base"][0]) == pytest.approx(compared["base"]["loss"], abs=1e-4)
    assert float(rows["adapter"][0]) == pytest.approx(compared["loss"], abs=1e-4)
    assert re.fullmatch(r"\d+\.\d% \(\d+/50\)", " ".join(rows["adapter"][2:])), table.stdout
    # the base row is the model without the adapter: the same numbers as a run without --adapter
    assert compared["base"]["loss"] == pytest.approx(base_only["loss"], rel=1e-5)
    assert compared["base"]["exact_match"] == base_only["exact_match"]
    assert compared["loss"] != pytest.approx(base_only["loss"], rel=1e-6), "the adapter changes the model"
    for part in ("base", "adapter"):  # progress on stderr, the last line of each phase complete
        assert f"{part} loss: " in table.stderr and f"{part} exact match: 50/50 examples" in table.stderr, table.stderr


def test_no_dependency_noise_in_eval_output(judged):
    table, _, _, json_stderr = judged
    for text in (table.stdout + table.stderr, json_stderr):
        assert not NOISE.search(text), text


def test_a_device_that_never_reached_a_server_stops_within_seconds(demo, tmp_path):
    import socket

    with socket.socket() as s:  # a port where nothing listens
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    _, work = demo
    bundle = next(work.glob("tiny-llama*-k2-q4"))
    t0 = time.monotonic()
    r = run_in(work, "edge", f"ws://127.0.0.1:{port}", "--bundle", str(bundle), "--data", "data/client-0.jsonl")
    assert time.monotonic() - t0 < 20, "no backoff before a first connection (8 tries would take 40 s)"
    assert r.returncode == 2 and f"nothing ever answered at ws://127.0.0.1:{port}" in r.stderr, r.stderr
    assert "link lost" not in r.stderr + r.stdout


# ---------------------------------------------------------------- help and argument checks

def subcommands() -> dict[str, "argparse.ArgumentParser"]:  # noqa: F821
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    return dict(sub.choices)


def test_every_option_has_help_and_every_command_an_example():
    for name, parser in subcommands().items():
        assert "example" in (parser.epilog or ""), name
        for action in parser._actions:
            assert action.help, f"splitlm {name} {'/'.join(action.option_strings) or action.dest}: no help"


def test_help_shows_defaults_and_choices():
    helps = {name: p.format_help() for name, p in subcommands().items()}
    assert "--quant {fp32,q8,q4,int8}" in helps["export"] and "(default: q4)" in helps["export"]
    assert "--labels {server,device}" in helps["export"]
    assert re.search(r"--port PORT .*\(default: 8765\)", helps["serve"])
    assert re.search(r"--lora-rank LORA_RANK\s+LoRA rank; must match the bundles \(default: 8\)", helps["serve"])
    assert "(default: None)" not in "".join(helps.values())


def test_bare_splitlm_prints_its_usage(clone):
    r = subprocess.run([console_script()], cwd=clone, capture_output=True, text=True, env={**os.environ, **ENV})
    assert r.returncode == 2 and r.stdout.startswith("usage: splitlm"), r.stdout + r.stderr
    assert all(c in r.stdout for c in ("export", "serve", "edge", "eval", "demo", "splitlm demo"))


@pytest.mark.parametrize("args,needle", [
    ("export default --cut 2 --quant q5 --out b", "argument --quant: invalid choice: 'q5'"),
    ("export default --cut 2 --labels devices --out b", "argument --labels: invalid choice: 'devices'"),
    ("export default --cut 2 --lora-rank 0 --out b", "--lora-rank: expected an integer >= 1, got 0"),
    ("export default --cut 2 --out b --eval-text nope.txt", "--eval-text: no such file: nope.txt"),
    ("serve default --cut 2 --port 70000", "--port: expected 0..65535"),
    ("serve ./nope --cut 2", "no such model folder: ./nope"),
    ("eval default --data nope.jsonl", "--data: no such file: nope.jsonl"),
    ("eval default --adapter nope --data x.jsonl", "--adapter: expected a PEFT adapter folder"),
    ("edge ws://127.0.0.1:1 --bundle nope --data x.jsonl", "--bundle: expected a bundle folder"),
    ("edge 127.0.0.1:8765 --bundle b --data x.jsonl", "url: expected ws://HOST:PORT"),
    ("demo --steps 0", "--steps: expected an integer >= 1, got 0"),
    ("compare --partition zipf:1", "--partition: expected iid or dirichlet:ALPHA"),
    ("compare --modes split,fedavg", "--modes: expected a comma-separated list from"),
])
def test_bad_arguments_stop_before_any_model_is_built(clone, tmp_path, args, needle):
    """With an empty cache, `default` would first build the 517 MB default model: nothing may be
    written there, and the one-line error comes in seconds."""
    (clone / "x.jsonl").write_text('{"text": "hi"}\n')
    cache = tmp_path / "cache"
    t0 = time.monotonic()
    r = subprocess.run([console_script(), *shlex.split(args)], cwd=clone, capture_output=True, text=True,
                       env={**os.environ, **ENV, "SPLITLM_CACHE": str(cache)}, timeout=60)
    assert r.returncode == 2 and needle in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not cache.exists(), "the default model was built before the arguments were checked"
    assert time.monotonic() - t0 < 30


def test_the_serve_and_edge_lines_export_prints_train_together(demo, tmp_path):
    """The demo's export printed its next steps; run them as printed (a free port, one step)."""
    from .conftest import ServerProcess

    r, work = demo
    lines = r.stdout.splitlines()
    serve = shlex.split(lines[lines.index("next, on the server:") + 1])
    edge = shlex.split(next(line for line in lines if line.strip().startswith("splitlm edge ws://SERVER:8765")))
    assert serve[:2] == ["splitlm", "serve"] and serve[-2:] == ["--out", "runs"], r.stdout
    assert edge[3] == "--bundle" and edge[-2:] == ["--data", "YOUR_DATA.jsonl"], r.stdout
    server = ServerProcess(*serve[2:-2], "--out", str(tmp_path / "runs"))  # the printed --out runs, moved here
    try:
        done = run_in(work.parent, "edge", server.url, *edge[3:-2], "--data", "work/data/client-0.jsonl",
                      "--steps", "1", timeout=120)
    finally:
        server.stop()
    assert done.returncode == 0 and "steps 1" in done.stdout, done.stdout + done.stderr
