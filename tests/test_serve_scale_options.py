"""`serve --device/--body-quant/--batch-*/--replicas`: combinations that cannot work are one line, exit status 2,
before any model is loaded."""

from __future__ import annotations

import shlex

import pytest

from .conftest import run_cli


@pytest.mark.parametrize("args,needle", [
    ("--body-quant nf4 --full", "--body-quant nf4: the quantized body is frozen"),
    ("--batch-wait-ms 5 --full", "--batch-optimizer per-device: per-device gradients are recovered for LoRA only"),
    ("--batch-wait-ms 5 --labels device", "--batch-wait-ms: U-shape steps (--labels device)"),
    ("--batch-wait-ms -1", "--batch-wait-ms: expected >= 0"),
    ("--batch-max-devices 0", "--batch-max-devices: expected an integer >= 1, got 0"),
    ("--mode fedavg --body-quant nf4", "for the split body so far, not --mode fedavg"),
    ("--body-quant nf8", "argument --body-quant: invalid choice: 'nf8'"),
    ("--replicas 2 --replica-rank 2", "--replica-rank: expected 0..1 (--replicas 2), got 2"),
    ("--replicas 2 --labels device --batch-optimizer per-device",
     "--replicas does not support --labels device (a U-shape step holds one replica's body between two frames); "
     "--batch-optimizer per-device"),
    ("--replicas 2 --aggregate median", "--replicas does not support --aggregate/--clip-norm"),
    ("--replicas 2 --dist-url 127.0.0.1:29500", "--dist-url: expected tcp://HOST:PORT"),
])
def test_impossible_scale_options_are_refused_up_front(tiny_llama, args, needle):
    r = run_cli("serve", str(tiny_llama), "--cut", "2", *shlex.split(args), timeout=60)
    assert r.returncode == 2 and needle in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "loading" not in r.stdout, "the model was loaded before the options were checked"
