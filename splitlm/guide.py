"""What `splitlm` tells a person about the next step: help examples and the commands that follow
an export. Plain strings and pure functions, so tests read them and `--help` needs no torch."""

from __future__ import annotations

import shlex
from pathlib import Path

EPILOGS = {
    "splitlm": """\
a first run (default model, a q4 bundle, a server and two devices on this machine):
  splitlm demo

the steps one by one:
  splitlm export default --cut 2 --quant q4 --out bundle
  splitlm serve default --cut 2 --out runs
  splitlm edge ws://127.0.0.1:8765 --bundle bundle --data mine.jsonl
  splitlm eval default --adapter runs/round-0000/adapter --data held_out.jsonl

`splitlm COMMAND --help` for each command's options.""",
    "default-model": """\
example:
  splitlm default-model        # prints ~/.cache/splitlm/SmolLM2-135M-Instruct (built on first use, ~20 s)""",
    "export": """\
examples:
  splitlm export default --cut 2 --quant q4 --out bundle
  splitlm export ./my-model --cut 4 --quant q8 --labels device --out bundle-u

at the end it prints the `splitlm serve` and `splitlm edge` lines that match the bundle.""",
    "serve": """\
examples:
  splitlm serve default --cut 2 --out runs
  splitlm serve default --mode fedavg --rounds 3 --local-steps 10 --min-clients 2 --out runs
  splitlm serve default --cut 2 --host 0.0.0.0 --auth auth --tls-cert tls/server.pem --tls-key tls/server.key
  splitlm serve default --mode fedavg --rounds 3 --clip-norm 1 --aggregate trimmed:0.2 --out runs
  splitlm serve default --cut 2 --device cuda --body-quant nf4 --batch-wait-ms 20 --out runs

each round writes OUT/round-NNNN/adapter, a PEFT adapter of the whole model. Beyond loopback the
server needs TLS and --auth (`splitlm certs`, `splitlm enroll`), or --insecure.""",
    "enroll": """\
examples:
  splitlm enroll pi-1 --auth auth --out pi-1.credential      # then copy pi-1.credential to the device
  splitlm enroll pi-1 --auth auth --revoke                    # refused from its next connection

the server keeps only the device's public key in auth/devices/; the credential holds its private key.""",
    "status": """\
examples:
  splitlm status ws://127.0.0.1:8765                                   # or open http://127.0.0.1:8765/status
  splitlm status wss://server:8765 --ca tls/ca.pem --credential ops.credential --html status.html

with --auth the page admits enrolled credentials only (`splitlm enroll ops ...` makes one for a person).""",
    "certs": """\
example:
  splitlm certs --out tls --host lab-server.local 192.168.1.20

then: splitlm serve ... --tls-cert tls/server.pem --tls-key tls/server.key, and on each device
splitlm edge wss://lab-server.local:8765 --ca tls/ca.pem ...""",
    "edge": """\
examples:
  splitlm edge ws://127.0.0.1:8765 --bundle bundle --data mine.jsonl
  splitlm edge ws://server:8765 --bundle bundle --data notes.txt --steps 100 --state edge.state --client-id pi-1
  splitlm edge wss://server:8765 --ca ca.pem --credential pi-1.credential --bundle bundle --data notes.txt

--data: .txt, or .jsonl lines {"text": ...} or {"prompt": ..., "completion": ...}.""",
    "eval": """\
examples:
  splitlm eval default --adapter runs/round-0003/adapter --data held_out.jsonl
  splitlm eval default --data held_out.jsonl --json

with --adapter it prints the base model and the adapter side by side.""",
    "audit": """\
examples:
  splitlm audit default --bundle bundle --data mine.jsonl
  splitlm audit default --bundle bundle --data mine.jsonl --json > audit.json

it plays a curious server that holds the model: the share of the device's tokens each attack reads
back from what the device would send (with the device's --clip/--noise applied).""",
    "demo": """\
examples:
  splitlm demo
  splitlm demo --steps 40 --workdir /tmp/demo

it ends with the round whose adapter is the result and the `splitlm eval` line that judges it.""",
    "compare": """\
examples:
  splitlm compare --modes split-server,split-device,fedavg-lora --rounds 3 --out cmp
  splitlm compare --data mine.jsonl --partition dirichlet:0.3 --partition-field topic --cuts 2,4 --ranks 4,8

each configuration runs as a real server and --clients edge processes on 127.0.0.1; a rerun with the
same --out skips finished configurations. Bundles are exported once and cached (whole-model fedavg and
distill bundles of a 135M model take tens of minutes on 2 cores). Writes results.json, results.csv,
rounds.csv, table.md, compare.png and partition.json under --out.""",
}

# serve's defaults for what must match a bundle: only a value that differs goes into the line
_SERVE_DEFAULTS = {"labels": "server", "rank": 8, "alpha": 16.0}


def export_next_steps(model: str, out: str | Path, manifest) -> list[str]:
    """The `splitlm serve` and `splitlm edge` lines that match the bundle `manifest` at `out`."""
    if manifest.mode == "split":
        serve = ["splitlm", "serve", model, "--cut", str(manifest.cut)]
    else:
        serve = ["splitlm", "serve", model, "--mode", manifest.mode, "--rounds", "3"]
        serve += ["--train", manifest.train] if manifest.train != "lora" else []
        serve += ["--topk", str(min(manifest.topk, 16))] if manifest.mode == "distill" else []
    if manifest.labels != _SERVE_DEFAULTS["labels"]:
        serve += ["--labels", manifest.labels]
    lora = manifest.lora
    if manifest.train != "full":  # a full-parameter bundle has no LoRA spec to match
        if lora.rank != _SERVE_DEFAULTS["rank"]:
            serve += ["--lora-rank", str(lora.rank)]
        if float(lora.alpha) != _SERVE_DEFAULTS["alpha"]:
            serve += ["--lora-alpha", f"{lora.alpha:g}"]
        if tuple(lora.targets) != _default_targets(manifest.model.family):
            serve += ["--lora-targets", *lora.targets]
    serve += ["--out", "runs"]
    edge = ["splitlm", "edge", "ws://SERVER:8765", "--bundle", str(out), "--data", "YOUR_DATA.jsonl"]
    return ["next, on the server:", "  " + shlex.join(serve),
            "and on each device (copy the bundle there; it needs no torch):", "  " + shlex.join(edge)]


def _default_targets(family: str) -> tuple[str, ...]:
    from splitlm.export.arch import DEFAULT_TARGETS  # torch: only export calls this

    return tuple(DEFAULT_TARGETS.get(family, ()))
