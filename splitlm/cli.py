"""The `splitlm` command. Each subcommand imports its component only when it runs, so
`splitlm edge` and every `--help` work on a device install without torch. Arguments are checked
(`splitlm.checks`) before any of that work starts."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from splitlm import __version__
from splitlm.checks import check_args
from splitlm.errors import SplitLMError
from splitlm.guide import EPILOGS, export_next_steps
from splitlm.compare import MODES as COMPARE_MODES
from splitlm.manifest import LABEL_PLACEMENTS, QUANT_PRESETS
from splitlm.quiet import quiet_dependencies


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line on stderr, exit status 2."""

    def error(self, message: str):  # noqa: D401 - argparse's name
        self.exit(2, f"{self.prog}: error: {message}\n")


class _Help(argparse.RawDescriptionHelpFormatter):
    """Every option's default in its help (unless it has none), and examples kept as written."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help = action.help or ""
        no_default = action.default is None or action.default is False or action.default is argparse.SUPPRESS
        if action.option_strings and not no_default and "%(default)" not in help:
            help += " (default: %(default)s)"
        return help


def _cmd_default_model(args: argparse.Namespace) -> None:
    from splitlm.export.default_model import default_model_dir

    print(default_model_dir())


def _cmd_export(args: argparse.Namespace) -> None:
    from splitlm.export.bundle import ExportOptions, export_bundle, load_model
    from splitlm.export.fidelity import fidelity_report

    floor = {k: v for k, v in _privacy_settings(args).as_dict().items() if v}  # noise without a clip: refused here
    if floor and args.mode != "split":
        raise SplitLMError(f"--{next(iter(floor)).replace('_', '-')}: a privacy floor is for split bundles, whose "
                           f"devices send activations; a {args.mode} device sends parameters or logits")
    if args.labels == "server" and {"grad_clip", "grad_noise"} & floor.keys():
        raise SplitLMError("--grad-clip/--grad-noise: tail_grad exists only with --labels device (U-shape)")
    opts = ExportOptions(cut=args.cut or 0, quant=args.quant, labels=args.labels, lora_rank=args.lora_rank,
                         lora_alpha=args.lora_alpha, lora_targets=tuple(args.lora_targets or ()) or None,
                         lora_seed=args.lora_seed, max_length=args.max_length, mode=args.mode, train=args.train,
                         topk=args.topk, public=Path(args.public) if args.public else None,
                         public_seq_len=args.public_seq_len, privacy=floor,
                         graphs_from=Path(args.graphs_from) if args.graphs_from else None,
                         keep_activations=args.keep_activations)
    eval_text = _read_text(args.eval_text) if args.eval_text else None
    manifest = export_bundle(args.model, args.out, opts, log=lambda line: print(line, flush=True))
    if args.mode != "split":  # the fidelity report compares a head; a whole-model bundle has none
        print("\n".join(export_next_steps(args.model, args.out, manifest)))
        return
    print("checking the bundle against PyTorch ...", flush=True)
    model, _ = load_model(args.model)
    print("fidelity:")
    for line in fidelity_report(Path(args.out), model, eval_text=eval_text).lines():
        print(line)
    print("\n".join(export_next_steps(args.model, args.out, manifest)))


def _cmd_serve(args: argparse.Namespace) -> None:
    import asyncio

    from splitlm.cloud_server.server import Server, serve_until_stopped
    from splitlm.cloud_server.state import STATE_FILE, load_state
    from splitlm.cloud_server.strategy import ServeConfig

    out = Path(args.out) if args.out else None
    if args.resume and (out is None or not (out / STATE_FILE).is_file()):  # say so before loading the model
        where = "no --out given" if out is None else f"no {STATE_FILE} in {out}"
        raise SplitLMError(f"--resume: {where}; the state is written under --out at each round end and on shutdown")
    _check_serve_hardware(args)
    role = f"its blocks from {args.cut} on" if args.mode == "split" else f"the global model ({args.mode})"
    print(f"loading {args.model}; this server runs {role} ...", flush=True)
    if args.threads > 0:
        import torch

        torch.set_num_threads(args.threads)
    log = lambda line: print(line, flush=True)  # noqa: E731
    cfg = ServeConfig(host=args.host, port=args.port, mode=args.mode, steps_per_round=args.steps_per_round,
                      rounds=args.rounds, codec=args.wire, update_codec=args.update_wire, topk=args.topk,
                      max_clients=args.max_clients, min_clients=args.min_clients, max_batch=args.max_batch,
                      max_seq_len=args.max_seq_len,
                      round_deadline_s=args.round_deadline, out=out, save_state=out is not None,
                      auth=_path(args.auth), tls_cert=_path(args.tls_cert), tls_key=_path(args.tls_key),
                      idle_timeout_s=args.idle_timeout, ping_timeout_s=args.ping_timeout, step_timeout_s=args.step_timeout,
                      max_connections=args.max_connections, max_attempts=args.max_attempts,
                      clip_norm=args.clip_norm, aggregate=args.aggregate,
                      status=not args.no_status)
    strategy = _strategy(args, cfg, log)
    if args.resume:
        strategy.restore(load_state(strategy.state_path, config=strategy.state_config()))
    asyncio.run(serve_until_stopped(Server(strategy, log=log)))


def _path(value: str | None) -> Path | None:
    return Path(value) if value else None


def _cmd_status(args: argparse.Namespace) -> None:
    """GET the server's /status.json (or /status as HTML), signed with a credential when given."""
    import urllib.error
    import urllib.request

    from splitlm.edge_client.credential import Credential, client_tls

    if not args.url.startswith(("ws://", "wss://")):
        raise SplitLMError(f"URL: expected ws://HOST:PORT or wss://HOST:PORT (the address devices use), got {args.url!r}")
    web = args.url.replace("wss://", "https://", 1).replace("ws://", "http://", 1).rstrip("/")
    page = web + ("/status" if args.html else "/status.json")
    headers = {"Authorization": Credential.load(Path(args.credential)).header()} if args.credential else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(page, headers=headers), timeout=30,
                                    context=client_tls(args.url, Path(args.ca) if args.ca else None)) as r:
            body = r.read()
    except urllib.error.HTTPError as e:
        raise SplitLMError(f"{page}: HTTP {e.code}: {e.read().decode(errors='replace').strip()}") from e
    except OSError as e:
        raise SplitLMError(f"{page}: nothing answered ({e})") from e
    if args.html:
        Path(args.html).write_bytes(body)
        print(f"wrote {args.html}")
    else:
        print(body.decode())


def _cmd_enroll(args: argparse.Namespace) -> None:
    from splitlm.cloud_server.auth import enroll, revoke

    if args.revoke:
        print(f"revoked {args.client_id} (key {revoke(Path(args.auth), args.client_id)}); "
              "a running server refuses it from its next connection")
        return
    key = enroll(Path(args.auth), args.client_id, Path(args.out))
    print(f"enrolled {args.client_id} (key {key}) in {args.auth}\n"
          f"credential: {args.out}  (give it to the device only; it holds the device's private key)\n"
          f"on the device: splitlm edge wss://HOST:PORT --credential {Path(args.out).name} ...")


def _cmd_certs(args: argparse.Namespace) -> None:
    from splitlm.cloud_server.certs import make_lab_certs

    paths = make_lab_certs(Path(args.out), args.host)
    print(f"CA: {paths['ca']}   server certificate: {paths['cert']}   key: {paths['key']}  (for {', '.join(args.host)})\n"
          f"serve: splitlm serve ... --host HOST --tls-cert {paths['cert']} --tls-key {paths['key']} --auth DIR\n"
          f"edge:  splitlm edge wss://{args.host[0]}:PORT --ca {paths['ca']} --credential FILE ...\n"
          f"keep {paths['ca'].with_suffix('.key')} off the server: it can sign certificates for any name")


def _check_serve_hardware(args: argparse.Namespace) -> None:
    """--device cuda needs a GPU torch sees, --body-quant needs bitsandbytes: said before the model loads."""
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise SplitLMError("--device cuda: torch sees no CUDA GPU (install a CUDA build of torch==2.13.0, see README)")
    if args.body_quant != "none":
        import importlib.util

        if importlib.util.find_spec("bitsandbytes") is None:
            raise SplitLMError(f"--body-quant {args.body_quant}: bitsandbytes is not installed "
                               "(pip install -e '.[server]')")


def _strategy(args: argparse.Namespace, cfg, log):
    targets = tuple(args.lora_targets or ()) or None
    if args.mode == "split":
        from splitlm.cloud_server.body import Body, BodyConfig
        from splitlm.cloud_server.split import SplitStrategy

        from splitlm.cloud_server.step_queue import BatchConfig

        body = Body(BodyConfig(model=args.model, cut=args.cut, labels=args.labels, lora_rank=args.lora_rank,
                               lora_alpha=args.lora_alpha, lora_targets=targets, lr=args.lr, full=args.full,
                               seed=args.seed, device=args.device, quant=args.body_quant))
        optimizer = args.batch_optimizer or ("per-batch" if args.replicas > 1 else "per-device")
        batching = BatchConfig(wait_s=args.batch_wait_ms / 1000, max_devices=args.batch_max_devices,
                               optimizer=optimizer)
        replicas = None
        if args.replicas > 1:
            from splitlm.cloud_server.replicas import ReplicaConfig, ReplicaGroup

            log(f"replica {args.replica_rank} of {args.replicas}: joining the group at {args.dist_url} ...")
            replicas = ReplicaGroup(ReplicaConfig(world=args.replicas, rank=args.replica_rank, dist_url=args.dist_url,
                                                  timeout_s=args.dist_timeout), device=body.device, log=log)
        return SplitStrategy(body, cfg, batching=batching, replicas=replicas, log=log)
    from splitlm.cloud_server.global_model import GlobalConfig, GlobalModel

    model = GlobalModel(GlobalConfig(model=args.model, train=args.train, lora_rank=args.lora_rank,
                                     lora_alpha=args.lora_alpha, lora_targets=targets, lr=args.lr, seed=args.seed))
    eval_data = Path(args.eval) if args.eval else None
    if args.mode == "fedavg":
        from splitlm.cloud_server.fedavg import FedAvgStrategy

        return FedAvgStrategy(model, cfg, eval_data=eval_data, log=log)
    from splitlm.cloud_server.distill import DistillStrategy

    device_hash = None
    if args.device_model:
        from splitlm.manifest import model_folder_hash

        device_hash = model_folder_hash(Path(args.device_model))
    return DistillStrategy(model, cfg, public=Path(args.public) if args.public else None, eval_data=eval_data,
                           public_seq_len=args.public_seq_len, device_model_hash=device_hash, log=log)


def _cmd_edge(args: argparse.Namespace) -> None:
    import asyncio

    from splitlm.edge_client.client import EdgeConfig, default_client_id, make_client

    if args.credential:  # the device's id is its credential's
        from splitlm.edge_client.credential import Credential

        credential_id = Credential.load(Path(args.credential)).client_id
        if args.client_id and args.client_id != credential_id:
            raise SplitLMError(f"--client-id {args.client_id}: the credential is for {credential_id!r}, and the "
                               "server takes a device's id from its credential; drop --client-id")
        args.client_id = credential_id
    cfg = EdgeConfig(url=args.url, bundle=Path(args.bundle), data=Path(args.data), steps=args.steps,
                     epochs=args.epochs, batch_size=args.batch_size, seq_len=args.seq_len, lr=args.lr,
                     seed=args.seed, client_id=args.client_id or default_client_id(Path(args.data)),
                     threads=args.threads,
                     metrics_out=Path(args.metrics_out) if args.metrics_out else None,
                     state=Path(args.state) if args.state else None, resume=args.resume,
                     reconnect_tries=args.reconnect_tries, privacy=_privacy_settings(args),
                     credential=_path(args.credential), ca=_path(args.ca),
                     keep_activations=args.keep_activations)
    if args.max_memory is not None:  # before any connection: refuse what cannot fit
        from splitlm.edge_client.fit import fit_config
        from splitlm.manifest import Bundle

        if Bundle.open(cfg.bundle, verify=False).manifest.mode != "split":
            raise SplitLMError("--max-memory: the memory model covers split bundles so far, not fedavg or distill")
        cfg = fit_config(cfg, args.max_memory, log=lambda line: print(line, flush=True))
    summary = asyncio.run(make_client(cfg).run())
    print(f"{cfg.client_id}: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                            for k, v in summary.items()))


def _privacy_settings(args: argparse.Namespace):
    from splitlm.edge_client.privacy import Noise, PrivacySettings

    return PrivacySettings(Noise(args.clip, args.noise), Noise(args.grad_clip, args.grad_noise))


def _cmd_eval(args: argparse.Namespace) -> None:
    import json

    print(f"loading {args.model}" + (f" with the adapter {args.adapter}" if args.adapter else "") + " ...",
          file=sys.stderr, flush=True)
    import torch

    from splitlm.cloud_server.evaluate import compare, evaluate

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    kw = dict(seq_len=args.seq_len, batch_size=args.batch_size, max_examples=args.max_examples, progress=None)
    if args.adapter and not args.no_base:
        result = compare(args.model, args.data, adapter=args.adapter, **kw)
        print(json.dumps(result.as_dict()) if args.json else result.table())
    else:
        result = evaluate(args.model, args.data, adapter=args.adapter, **kw)
        print(json.dumps(result.as_dict()) if args.json else result.line())


def _cmd_audit(args: argparse.Namespace) -> None:
    import json

    from splitlm.audit.run import AuditConfig, run_audit

    cfg = AuditConfig(model=args.model, bundle=Path(args.bundle), data=Path(args.data),
                      public=Path(args.public) if args.public else None, attacks=tuple(args.attacks),
                      privacy=_privacy_settings(args), max_tokens=args.max_tokens, seq_len=args.seq_len,
                      batch_size=args.batch_size, frame_log=Path(args.frames) if args.frames else None,
                      seed=args.seed, progress=sys.stderr.isatty() or args.progress)
    result = run_audit(cfg, log=lambda line: print(line, file=sys.stderr, flush=True))
    print(json.dumps(result.as_dict()) if args.json else "\n".join(result.lines()))


def _cmd_demo(args: argparse.Namespace) -> None:
    from splitlm.demo import DemoConfig, default_workdir, run_demo

    run_demo(DemoConfig(workdir=Path(args.workdir) if args.workdir else default_workdir(),
                        steps=args.steps, clients=args.clients, model=args.model))


def _cmd_compare(args: argparse.Namespace) -> None:
    from splitlm.compare import config_from_args, run_compare

    run_compare(config_from_args(args), log=lambda line: print(line, flush=True))


def _read_text(path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise SplitLMError(f"cannot read {path}: {e.strerror}") from e


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="splitlm", description="Split-learning fine-tuning of causal LMs across edge devices.",
                     epilog=EPILOGS["splitlm"], formatter_class=_Help)
    parser.add_argument("--version", action="version", version=f"splitlm {__version__}")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser, metavar="COMMAND")

    p = sub.add_parser("default-model", help="print the folder of the embedded default model (SmolLM2-135M-Instruct)")
    p.set_defaults(run=_cmd_default_model)

    p = sub.add_parser("export", help="cut a model at layer K and write a client bundle")
    p.add_argument("model", help="a Hugging Face causal-LM folder, or 'default'")
    p.add_argument("--cut", type=int, help="--mode split (required there): the device runs embeddings + blocks 0..K-1")
    p.add_argument("--mode", default="split", choices=("split", "fedavg", "distill"),
                   help="split: the device runs the head; fedavg / distill: the whole model")
    p.add_argument("--train", default="lora", choices=("lora", "full"),
                   help="fedavg / distill: train LoRA on every block, or every block weight + final norm")
    p.add_argument("--topk", type=int, default=32, help="distill: the largest k a session may ask for")
    p.add_argument("--public", help="distill: the public set (.txt; default the packaged splitlm/data/public.txt)")
    p.add_argument("--public-seq-len", type=int, default=128, help="distill: the public set's sequence length")
    p.add_argument("--quant", default="q4", choices=QUANT_PRESETS, help="weight preset of the device's graphs")
    p.add_argument("--out", required=True, help="bundle folder to write (replaced atomically)")
    p.add_argument("--lora-rank", type=int, default=8, help="LoRA rank r (the server must use the same)")
    p.add_argument("--lora-alpha", type=float, default=16.0, help="LoRA alpha: updates scale by alpha/r")
    p.add_argument("--lora-targets", nargs="+", help="module names inside a block (default: q and v projections)")
    p.add_argument("--lora-seed", type=int, default=0, help="seed of the initial LoRA tensors")
    p.add_argument("--labels", default="server", choices=LABEL_PLACEMENTS,
                   help="where labels live: device keeps tokens and labels on the device (adds tail.onnx)")
    p.add_argument("--max-length", type=int, default=2048, help="longest sequence the graphs accept")
    p.add_argument("--graphs-from", metavar="BUNDLE",
                   help="fedavg / distill: copy train.onnx from this fedavg or distill bundle of the same model, "
                        "trainables, quant and max length instead of tracing it again (checked by its manifest)")
    p.add_argument("--keep-activations", action="store_true",
                   help="split: also write head_saved.onnx and head_grad_kept.onnx, so a device started with "
                        "--keep-activations keeps the forward's activations for the backward instead of running "
                        "the forward again (faster step, more memory)")
    p.add_argument("--eval-text", help="a text file: report perplexity of the model vs this bundle's head")
    p.add_argument("--clip", type=float, help="privacy floor in the manifest: every device clips each token's h_K "
                                              "to this L2 norm at least (a device may go stronger, never weaker)")
    p.add_argument("--noise", type=float, default=0.0, help="privacy floor: Gaussian noise on h_K, expected norm "
                                                            "NOISE x CLIP per token (needs --clip)")
    p.add_argument("--grad-clip", type=float, help="privacy floor, --labels device: clip each token's tail_grad")
    p.add_argument("--grad-noise", type=float, default=0.0, help="privacy floor: noise on tail_grad, as --noise")
    p.set_defaults(run=_cmd_export)

    p = sub.add_parser("serve", help="host the body (split) or the global model (fedavg, distill) for edge clients")
    p.add_argument("model", help="a Hugging Face causal-LM folder, or 'default'")
    p.add_argument("--mode", default="split", choices=("split", "fedavg", "distill"),
                   help="split: devices run blocks 0..K-1; fedavg: devices train the whole model and the server "
                        "averages; distill: devices share top-k logits on a public set")
    p.add_argument("--cut", type=int, help="split only: the layer K the bundles were cut at")
    p.add_argument("--train", default="lora", choices=("lora", "full"),
                   help="fedavg/distill: what is trained, LoRA tensors or every decoder weight")
    p.add_argument("--rounds", type=int, default=0, help="stop after this many rounds (0: run until stopped)")
    p.add_argument("--topk", type=int, default=16, help="distill: k of the top-k logits devices send")
    p.add_argument("--public", help="distill: the public text file (default: the one shipped with splitlm)")
    p.add_argument("--public-seq-len", type=int, default=128,
                   help="distill: the public set's sequence length (as the bundle's export --public-seq-len)")
    p.add_argument("--device-model", help="distill: the model folder the devices' bundles were exported from, when "
                                          "it is not the served one (it must share the tokenizer)")
    p.add_argument("--eval", help="fedavg/distill: held-out data; each round's metrics get the global model's loss on it")
    p.add_argument("--update-wire", default="f32", choices=("f32", "f16", "q8"),
                   help="float codec for parameters on the wire (adapters, updates, globals)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8765, help="0 picks a free port (printed at start)")
    p.add_argument("--labels", default="server", choices=LABEL_PLACEMENTS,
                   help="where labels live; must match the bundles' --labels")
    p.add_argument("--lora-rank", type=int, default=8, help="LoRA rank; must match the bundles")
    p.add_argument("--lora-alpha", type=float, default=16.0, help="LoRA alpha; must match the bundles")
    p.add_argument("--lora-targets", nargs="+", help="module names inside a block; must match the bundles "
                                                     "(default: q and v projections)")
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate of the body")
    p.add_argument("--full", action="store_true", help="train every body parameter instead of LoRA")
    p.add_argument("--seed", type=int, default=0, help="seed of the body's LoRA init")
    p.add_argument("--steps-per-round", "--local-steps", type=int, default=10,
                   help="split: steps between adapter averages; fedavg/distill: local steps per round")
    p.add_argument("--round-deadline", type=float, default=300.0, help="seconds a round waits for late clients")
    p.add_argument("--wire", default="f16", choices=("f32", "f16", "q8"), help="float codec on the wire")
    p.add_argument("--max-clients", type=int, default=8, help="clients training at once; more are refused")
    p.add_argument("--min-clients", type=int, default=1,
                   help="a round closes on its reports only once this many clients have reported (or at its deadline)")
    p.add_argument("--max-batch", type=int, default=16, help="largest batch a client may send")
    p.add_argument("--max-seq-len", type=int, default=1024, help="longest sequence a client may send")
    p.add_argument("--out", help="folder for per-round adapters and metrics, and the server state "
                                 "(server-state.safetensors, written at every round end and on SIGINT/SIGTERM)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/server-state.safetensors")
    p.add_argument("--no-status", action="store_true",
                   help="do not answer the read-only status page (http://HOST:PORT/status and /status.json)")
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads (0: torch's default). Use 1 when clients share this host's cores: "
                        "torch's thread pool slows ~100x when its cores are contended")
    t = p.add_argument_group("trust (see README: Trust)")
    t.add_argument("--auth", metavar="DIR", help="admit only devices enrolled in DIR (`splitlm enroll`)")
    t.add_argument("--tls-cert", help="PEM certificate (chain): serve wss:// (with --tls-key)")
    t.add_argument("--tls-key", help="PEM private key of --tls-cert")
    t.add_argument("--insecure", action="store_true",
                   help="allow a non-loopback --host without TLS and --auth (anyone on the network can join)")
    t.add_argument("--clip-norm", type=float, help="clip each device's update to the global to this L2 norm")
    t.add_argument("--aggregate", default="mean", metavar="{mean,median,trimmed:F}",
                   help="mean: sample-weighted FedAvg; median / trimmed:F: coordinate-wise, unweighted, robust to "
                        "a minority of bad devices (e.g. trimmed:0.2 drops 20%% at each end)")
    t.add_argument("--idle-timeout", type=float, default=600.0,
                   help="close a connection that sends nothing this long while nothing is owed to it (0: never)")
    t.add_argument("--ping-timeout", type=float, default=60.0,
                   help="close a connection that answers no websocket ping this long (pinged every third of it); "
                        "a device answers pings while it computes")
    t.add_argument("--step-timeout", type=float, default=120.0,
                   help="U-shape: how long a step holds the body waiting for the device's tail_grad")
    t.add_argument("--max-connections", type=int, default=64, help="open connections, handshakes included")
    t.add_argument("--max-attempts", type=int, default=120, help="connection attempts per address per minute")
    p.add_argument("--device", default="auto", choices=("cpu", "cuda", "auto"),
                   help="split: where the body, its adapters and optimizer live (auto: cuda when torch sees a GPU)")
    p.add_argument("--body-quant", default="none", choices=("none", "nf4", "int8"),
                   help="split: the frozen body in 4-bit NF4 or 8-bit through bitsandbytes, LoRA on top (QLoRA)")
    p.add_argument("--batch-wait-ms", type=float, default=0.0,
                   help="split, labels at the server: run steps from different devices that arrive within this many "
                        "ms as one body batch (0: one step at a time)")
    p.add_argument("--batch-max-devices", type=int, default=8, help="a batch closes at once with this many devices")
    p.add_argument("--batch-optimizer", choices=("per-device", "per-batch"),
                   help="per-device (default): one AdamW step per device's gradient (all taken at the batch's "
                        "weights); per-batch (default and only choice with --replicas): one AdamW step on the mean "
                        "of the devices' gradients")
    r = p.add_argument_group("replicas (split; see README: the server at scale)")
    r.add_argument("--replicas", type=int, default=1,
                   help="body replicas in all, each a `splitlm serve` of its own; gradients all-reduced each step")
    r.add_argument("--replica-rank", type=int, default=0, help="this replica's number, 0..REPLICAS-1")
    r.add_argument("--dist-url", default="tcp://127.0.0.1:29500",
                   help="torch.distributed init address: replica 0 listens there, the others connect")
    r.add_argument("--dist-timeout", type=float, default=60.0,
                   help="seconds a collective waits for a hung replica before the others go on without it")
    p.set_defaults(run=_cmd_serve)

    p = sub.add_parser("edge", help="train on this device against a splitlm server (no torch needed)")
    p.add_argument("url", help="ws://HOST:PORT, or a replicated server's replicas comma-separated "
                               "(ws://A:8765,ws://B:8765: this device's own by a hash of its client id, then the next)")
    p.add_argument("--bundle", required=True, help="the bundle folder `splitlm export` wrote")
    p.add_argument("--data", required=True, help=".txt, or .jsonl of {text} or {prompt, completion}")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--steps", type=int, help="steps to train (instead of --epochs)")
    group.add_argument("--epochs", type=int, default=1, help="passes over --data")
    p.add_argument("--batch-size", type=int, default=4, help="sequences per step")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per sequence (longer ones are cut)")
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate of this device's LoRA")
    p.add_argument("--seed", type=int, default=0, help="seed of the data order")
    p.add_argument("--client-id", help="this device's id on the server (default: host name + a hash of --data's path)")
    p.add_argument("--threads", type=int, default=0, help="onnxruntime threads (0: its default)")
    p.add_argument("--metrics-out", help="a file to append one JSON object per step to")
    p.add_argument("--state", help="training state file (LoRA, optimizer, step), rewritten after every step")
    p.add_argument("--resume", action="store_true", help="continue from --state after this process died")
    p.add_argument("--reconnect-tries", type=int, default=8,
                   help="reconnects in a row before giving up when the link drops (0.5 s doubling to 8 s apart)")
    p.add_argument("--clip", type=float, help="clip each token's h_K to this L2 norm before it leaves the device")
    p.add_argument("--noise", type=float, default=0.0,
                   help="Gaussian noise on h_K after the clip, expected norm NOISE x CLIP per token (needs --clip)")
    p.add_argument("--grad-clip", type=float, help="U-shape: clip each token's tail_grad to this L2 norm")
    p.add_argument("--grad-noise", type=float, default=0.0, help="U-shape: noise on tail_grad, as --noise")
    p.add_argument("--credential", help="this device's credential from `splitlm enroll` (its id is the client id)")
    p.add_argument("--ca", help="wss://: the CA certificate to trust (`splitlm certs`); default: the system's")
    p.add_argument("--max-memory", type=float, metavar="MB",
                   help="peak memory this device may use: picks the batch size (<= --batch-size) and tail chunk "
                        "that fit, measured on this device, or refuses before connecting")
    p.add_argument("--keep-activations", action="store_true",
                   help="split: keep the forward's activations until the server's gradient comes back instead of "
                        "running the forward again (a faster step, more memory; the bundle must be exported with "
                        "--keep-activations)")
    p.set_defaults(run=_cmd_edge)

    p = sub.add_parser("enroll", help="issue a device credential (or --revoke one) for `serve --auth DIR`")
    p.add_argument("client_id", help="the device's id (letters, digits, . _ -); the server knows it by this")
    p.add_argument("--auth", required=True, metavar="DIR", help="the server's auth folder (public keys only)")
    p.add_argument("--out", help="the credential file to write for the device (its private key, mode 600)")
    p.add_argument("--revoke", action="store_true", help="withdraw CLIENT_ID's credential instead")
    p.set_defaults(run=_cmd_enroll)

    p = sub.add_parser("status", help="what a server's status page shows, as JSON (or its HTML page to a file)")
    p.add_argument("url", help="the address devices use: ws://HOST:PORT or wss://HOST:PORT")
    p.add_argument("--credential", help="an enrolled credential (needed when the server runs with --auth)")
    p.add_argument("--ca", help="wss://: the lab CA that signed the server's certificate (default: system trust)")
    p.add_argument("--html", metavar="FILE", help="write the HTML page to FILE instead of printing the JSON")
    p.set_defaults(run=_cmd_status)

    p = sub.add_parser("certs", help="a self-signed CA and a server certificate for wss:// in a lab")
    p.add_argument("--out", required=True, help="folder for ca.pem, server.pem, server.key (and ca.key)")
    p.add_argument("--host", nargs="+", default=["localhost", "127.0.0.1"],
                   help="names and addresses the devices use to reach the server (the certificate's SANs)")
    p.set_defaults(run=_cmd_certs)

    p = sub.add_parser("eval", help="loss, perplexity and exact match of a model (+ PEFT adapter) on data")
    p.add_argument("model", help="a Hugging Face causal-LM folder, or 'default'")
    p.add_argument("--adapter", help="a PEFT adapter folder, e.g. OUT/round-0003/adapter")
    p.add_argument("--data", required=True, help=".txt, or .jsonl of {text} or {prompt, completion}")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per sequence, as the edge's --seq-len")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass for the loss")
    p.add_argument("--max-examples", type=int, help="only the first N examples of --data")
    p.add_argument("--json", action="store_true",
                   help="one JSON object instead of a table (with --adapter: the adapter's numbers, the base's under \"base\")")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (0: torch's default, which is slow when other processes share the cores)")
    p.add_argument("--no-base", action="store_true", help="with --adapter: skip the base model's numbers")
    p.set_defaults(run=_cmd_eval)

    from splitlm.audit import ATTACKS, CHEAP

    p = sub.add_parser("audit", help="play a curious server: how much of a device's text its frames give away")
    p.add_argument("model", help="the server's model folder, or 'default'")
    p.add_argument("--bundle", required=True, help="the device's bundle (split), as the server that built it has it")
    p.add_argument("--data", required=True, help="the device's data (.txt or .jsonl), read as the edge reads it")
    p.add_argument("--public", help="the server's own text, to fit the inverter on")
    p.add_argument("--attacks", nargs="+", default=list(CHEAP), choices=ATTACKS, help="which attacks to run")
    p.add_argument("--frames", help="a recorded frame log (msgpack bin frames) to score instead of running the device")
    p.add_argument("--max-tokens", type=int, default=2048, help="device tokens to attack")
    p.add_argument("--seq-len", type=int, default=64, help="tokens per sequence, as the device's --seq-len")
    p.add_argument("--batch-size", type=int, default=4, help="sequences per step, as the device's --batch-size")
    p.add_argument("--seed", type=int, help="the device's noise seed (default: OS entropy, as on a device)")
    p.add_argument("--clip", type=float, help="the device's --clip")
    p.add_argument("--noise", type=float, default=0.0, help="the device's --noise")
    p.add_argument("--grad-clip", type=float, help="the device's --grad-clip")
    p.add_argument("--grad-noise", type=float, default=0.0, help="the device's --grad-noise")
    p.add_argument("--progress", action="store_true", help="a progress bar even when stderr is not a terminal")
    p.add_argument("--json", action="store_true", help="one JSON object on stdout")
    p.set_defaults(run=_cmd_audit)

    p = sub.add_parser("demo", help="default model, a q4 bundle, a server and two edge clients on 127.0.0.1")
    p.add_argument("--steps", type=int, default=20, help="steps per client (a round every 5)")
    p.add_argument("--clients", type=int, default=2, help="edge clients, each with its own slice of the data")
    p.add_argument("--workdir", help="where data, logs and results go (default ./splitlm-demo)")
    p.add_argument("--model", default="default", help="'default' (SmolLM2-135M-Instruct) or a Hugging Face folder")
    p.set_defaults(run=_cmd_demo)
    _compare_parser(sub)
    _guide(sub)
    return parser


def _compare_parser(sub) -> None:
    p = sub.add_parser("compare", help="split learning, FedAvg and distillation on the same data, side by side")
    p.add_argument("--model", default="default", help="'default' (SmolLM2-135M-Instruct) or a Hugging Face folder")
    p.add_argument("--data", help=".jsonl or .txt to partition over the clients (default: the demo's ledger task)")
    p.add_argument("--eval", help="held-out data (default: held out from --data)")
    p.add_argument("--clients", type=int, default=2, help="edge processes per configuration")
    p.add_argument("--rounds", type=int, default=3, help="rounds per configuration")
    p.add_argument("--local-steps", type=int, default=5, help="device steps per round (split: between averages)")
    p.add_argument("--batch-size", type=int, default=4, help="sequences per device step")
    p.add_argument("--seq-len", type=int, default=64, help="tokens per sequence (training and held-out)")
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate everywhere")
    p.add_argument("--partition", default="iid", help="iid or dirichlet:ALPHA (non-IID over --partition-field)")
    p.add_argument("--partition-field", default="label",
                   help="the JSONL field Dirichlet splits over; length buckets when a record lacks it")
    p.add_argument("--modes", default=",".join(COMPARE_MODES), help="comma-separated, from " + ", ".join(COMPARE_MODES))
    p.add_argument("--cuts", default="2", help="split: comma-separated cuts K")
    p.add_argument("--ranks", default="8", help="LoRA modes: comma-separated ranks")
    p.add_argument("--quant", default="q8", choices=QUANT_PRESETS, help="weight preset of every device bundle")
    p.add_argument("--max-length", type=int, default=512, help="longest sequence the bundles accept")
    p.add_argument("--topk", type=int, default=16, help="distill: k of the top-k logits")
    p.add_argument("--wire", default="f16", choices=("f32", "f16", "q8"), help="codec of activations and logits")
    p.add_argument("--update-wire", default="f32", choices=("f32", "f16", "q8"),
                   help="codec of adapters, updates and globals")
    p.add_argument("--eval-examples", type=int, default=64, help="held-out examples judged per round")
    p.add_argument("--target-loss", type=float,
                   help="for 'bytes to target' (default: the worst final loss among configurations that improved)")
    p.add_argument("--seed", type=int, default=0, help="partition, data order (client i: seed + i), held-out split")
    p.add_argument("--bundles", help="bundle cache folder (default: $SPLITLM_CACHE/compare-bundles)")
    p.add_argument("--export-jobs", type=int, default=0,
                   help="bundles exported at a time before the runs, one thread each (default: one per core)")
    p.add_argument("--out", default="splitlm-compare", help="results folder; a rerun skips finished configurations")
    p.set_defaults(run=_cmd_compare)


def _guide(sub) -> None:
    """Every command's help shows defaults and examples, and says what the command is for."""
    for action in sub._choices_actions:
        p = sub.choices[action.dest]
        p.formatter_class, p.epilog = _Help, EPILOGS.get(action.dest)
        p.description = p.description or action.help


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:  # bare `splitlm`: what it can do
        parser.print_help()
        return 2
    quiet_dependencies()
    try:
        check_args(args)
        args.run(args)
    except SplitLMError as e:
        print(f"splitlm {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
