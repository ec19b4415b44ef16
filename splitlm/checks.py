"""Arguments checked before any work: a typo costs a second, not a model load or an export.

Each subcommand's check looks only at the arguments and the file system (no torch, no model),
and raises `SplitLMError` with one line that names the option, what it expects and what it got.
What needs the model itself (e.g. `--cut` against the number of layers) is checked where the
model's config is first read, still before any weight is.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from splitlm.errors import SplitLMError


def check_args(args: argparse.Namespace) -> None:
    check = _CHECKS.get(args.command)
    if check is not None:
        check(args)


def _export(args) -> None:
    _model(args.model)
    _at_least(args, lora_rank=1, max_length=3, topk=1, public_seq_len=3)  # --cut's range: export, once it read config.json
    if args.mode == "split" and args.cut is None:
        raise SplitLMError("--cut K is required with --mode split (the device runs blocks 0..K-1)")
    if args.public:
        _file("--public", args.public)
    _positive(lora_alpha=args.lora_alpha)
    if args.eval_text:
        _file("--eval-text", args.eval_text)


def _serve(args) -> None:
    _model(args.model)
    _at_least(args, cut=1, lora_rank=1, steps_per_round=1, max_clients=1, max_batch=1, max_seq_len=2, threads=0)
    _positive(lora_alpha=args.lora_alpha, lr=args.lr, round_deadline=args.round_deadline)
    if not 0 <= args.port <= 65535:
        raise SplitLMError(f"--port: expected 0..65535 (0 picks a free one), got {args.port}")
    _at_least(args, rounds=0, topk=1, min_clients=1)
    if args.mode == "split" and args.cut is None:
        raise SplitLMError("--cut K is needed with --mode split: the layer the devices' bundles were cut at")
    if args.resume and args.mode != "split":
        raise SplitLMError(f"--resume: only split servers save their state so far, not {args.mode}")
    for option in ("public", "eval"):
        if getattr(args, option):
            _file(f"--{option}", getattr(args, option))
    _trust(args)
    _serve_scale(args)


def _trust(args) -> None:
    """TLS and auth options make sense together, and a server reachable beyond this host has both."""
    if bool(args.tls_cert) != bool(args.tls_key):
        raise SplitLMError("--tls-cert and --tls-key go together (`splitlm certs --out DIR` makes a lab pair)")
    for option in ("tls_cert", "tls_key"):
        if getattr(args, option):
            _file(f"--{option.replace('_', '-')}", getattr(args, option))
    if args.auth and not (Path(args.auth) / "devices").is_dir():
        raise SplitLMError(f"--auth {args.auth}: no devices/ folder; enrol a device first "
                           f"(`splitlm enroll CLIENT_ID --auth {args.auth} --out CREDENTIAL`)")
    _positive(clip_norm=args.clip_norm)
    _at_least(args, max_connections=1, max_attempts=1)
    if args.idle_timeout < 0 or not args.step_timeout > 0:
        raise SplitLMError("--idle-timeout: expected >= 0 (0: never); --step-timeout: expected > 0")
    from splitlm.cloud_server.aggregate import parse_aggregator  # numpy only

    try:
        parse_aggregator(args.aggregate)
    except ValueError as e:
        raise SplitLMError(f"--aggregate: {e}") from e
    missing = [what for what, have in (("TLS (--tls-cert/--tls-key)", args.tls_cert), ("--auth", args.auth)) if not have]
    if missing and not args.insecure and not is_loopback(args.host):
        raise SplitLMError(f"--host {args.host} is reachable beyond this machine, and this server has no "
                           f"{' and no '.join(missing)}: anyone on the network could join, read the model and push "
                           "updates. Add them (`splitlm certs`, `splitlm enroll`), or pass --insecure to accept that")


def is_loopback(host: str) -> bool:
    """True when every address `host` names is a loopback one (127.0.0.0/8, ::1)."""
    import ipaddress
    import socket

    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    return bool(infos) and all(ipaddress.ip_address(info[4][0].split("%")[0]).is_loopback for info in infos)


def _serve_scale(args) -> None:
    """--device, --body-quant and --batch-*: the split body's options, and what they cannot be combined with."""
    if (args.device != "auto" or args.body_quant != "none" or args.batch_wait_ms > 0) and args.mode != "split":
        raise SplitLMError(f"--device/--body-quant/--batch-wait-ms: for the split body so far, not --mode {args.mode}")
    if args.body_quant != "none" and args.full:
        raise SplitLMError(f"--body-quant {args.body_quant}: the quantized body is frozen, --full trains every body weight")
    if args.batch_wait_ms < 0:
        raise SplitLMError(f"--batch-wait-ms: expected >= 0 (0: no batching), got {args.batch_wait_ms}")
    _at_least(args, batch_max_devices=1)
    if args.batch_wait_ms > 0 and args.labels == "device":
        raise SplitLMError("--batch-wait-ms: U-shape steps (--labels device) hold the body from forward to tail_grad "
                           "and run one at a time; batching is for --labels server so far")
    if args.batch_wait_ms > 0 and (args.batch_optimizer or "per-device") == "per-device" and args.full \
            and args.replicas == 1:
        raise SplitLMError("--batch-optimizer per-device: per-device gradients are recovered for LoRA only; "
                           "with --full use --batch-optimizer per-batch")
    _replicas(args)


def _replicas(args) -> None:
    """--replicas N: split, labels at the server, a LoRA body, per-batch steps, mean aggregation, a fresh start."""
    _at_least(args, replicas=1)
    if not 0 <= args.replica_rank < args.replicas:
        raise SplitLMError(f"--replica-rank: expected 0..{args.replicas - 1} (--replicas {args.replicas}), "
                           f"got {args.replica_rank}")
    if args.replicas == 1:
        return
    wrong = [what for what, bad in (
        (f"--mode {args.mode} (replicas are split bodies)", args.mode != "split"),
        ("--labels device (a U-shape step holds one replica's body between two frames)", args.labels == "device"),
        ("--full (replicas keep a LoRA body)", args.full),
        ("--batch-optimizer per-device (replicas step on the mean over all devices: per-batch)",
         args.batch_optimizer == "per-device"),
        ("--aggregate/--clip-norm (the head average is summed across replicas)",
         args.aggregate != "mean" or args.clip_norm is not None),
        ("--resume (each replica's state is its own; start the replicas afresh)", args.resume)) if bad]
    if wrong:
        raise SplitLMError("--replicas does not support " + "; ".join(wrong))
    if not args.dist_url.startswith(("tcp://", "file://", "env://")):
        raise SplitLMError(f"--dist-url: expected tcp://HOST:PORT (or file://, env://), got {args.dist_url!r}")


def _edge(args) -> None:
    from splitlm.edge_client.privacy import Noise  # torch-free: its own checks say what is wrong

    Noise(args.clip, args.noise)
    Noise(args.grad_clip, args.grad_noise)
    if args.resume and not args.state:
        raise SplitLMError("--resume needs --state FILE: the state to continue from")
    for url in args.url.split(","):  # several: a replicated server's replicas (`serve --replicas`)
        if not url.startswith(("ws://", "wss://")):
            raise SplitLMError(f"url: expected ws://HOST:PORT or wss://HOST:PORT (or several, comma-separated: "
                               f"the replicas of one server), got {url!r}")
    for option in ("credential", "ca"):
        if getattr(args, option):
            _file(f"--{option}", getattr(args, option))
    if args.ca and not all(url.startswith("wss://") for url in args.url.split(",")):
        raise SplitLMError(f"--ca is for wss:// servers; {args.url} is plain ws://")
    bundle = Path(args.bundle)
    if not (bundle / "manifest.json").is_file():
        what = "no such folder" if not bundle.is_dir() else "no manifest.json in it"
        raise SplitLMError(f"--bundle: expected a bundle folder written by `splitlm export`, got {args.bundle} ({what})")
    _file("--data", args.data)
    _at_least(args, steps=1, epochs=1, batch_size=1, seq_len=2, threads=0, reconnect_tries=0)
    _positive(lr=args.lr)


def _eval(args) -> None:
    _model(args.model)
    if args.adapter and not (Path(args.adapter) / "adapter_config.json").is_file():
        raise SplitLMError(f"--adapter: expected a PEFT adapter folder (with adapter_config.json), got {args.adapter}")
    _file("--data", args.data)
    _at_least(args, seq_len=2, batch_size=1, max_examples=1, threads=0)


def _demo(args) -> None:
    _model(args.model)
    _at_least(args, steps=1, clients=1)


def _compare(args) -> None:
    from splitlm.partition import parse_scheme

    _model(args.model)
    for option in ("data", "eval"):
        if getattr(args, option):
            _file(f"--{option}", getattr(args, option))
    if args.eval and not args.data:
        raise SplitLMError("--eval needs --data: the default ledger data brings its own held-out set")
    _at_least(args, clients=1, rounds=1, local_steps=1, batch_size=1, seq_len=3, max_length=3, topk=1,
              eval_examples=1)
    _positive(lr=args.lr)
    parse_scheme(args.partition)
    _int_list("--cuts", args.cuts, low=1)
    _int_list("--ranks", args.ranks, low=1)
    from splitlm.compare import MODES as COMPARE_MODES

    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    wrong = [m for m in modes if m not in COMPARE_MODES]
    if not modes or wrong:
        raise SplitLMError(f"--modes: expected a comma-separated list from {', '.join(COMPARE_MODES)}, got {args.modes!r}")


def _int_list(option: str, text: str, *, low: int) -> None:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        values = []
    if not values or min(values) < low:
        raise SplitLMError(f"{option}: expected comma-separated integers >= {low}, got {text!r}")


def _enroll(args) -> None:
    if not args.revoke and not args.out:
        raise SplitLMError("--out FILE is needed to enrol: the credential to hand to the device")


_CHECKS = {"export": _export, "serve": _serve, "edge": _edge, "eval": _eval, "demo": _demo, "compare": _compare,
           "enroll": _enroll}


def _model(model: str) -> None:
    if model == "default":
        return
    path = Path(model)
    if not path.is_dir():
        raise SplitLMError(f"no such model folder: {model} (expected a Hugging Face folder or 'default')")
    if not (path / "config.json").is_file():
        raise SplitLMError(f"{model} is not a Hugging Face model folder: no config.json")


def _file(option: str, path: str) -> None:
    if not Path(path).is_file():
        raise SplitLMError(f"{option}: no such file: {path}")


def _at_least(args, **minimum: int) -> None:
    """Each named option (dest name) is an integer >= its minimum, or unset (None)."""
    for dest, low in minimum.items():
        value = getattr(args, dest, None)
        if value is not None and value < low:
            raise SplitLMError(f"--{dest.replace('_', '-')}: expected an integer >= {low}, got {value}")


def _positive(**values: float) -> None:
    for dest, value in values.items():
        if value is not None and not value > 0:
            raise SplitLMError(f"--{dest.replace('_', '-')}: expected a number > 0, got {value}")
