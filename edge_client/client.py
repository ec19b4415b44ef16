"""`splitlm edge`: train this device's part of the model against a splitlm server.

One step, labels at the server (one round trip):
    head.onnx -> forward{h_K, mask, labels} -> ... backward{dL/dh_K, loss} -> head_grad.onnx -> AdamW
One step, labels on the device (U-shape: no token id or label leaves the device):
    head.onnx -> forward{h_K, mask} -> hidden{h_N} -> tail.onnx -> tail_grad{dL/dh_N, loss}
              -> backward{dL/dh_K} -> head_grad.onnx -> AdamW
Every R steps: adapter{round, lora, n_samples} -> adapter_global{round, averaged lora}.

When a link that once worked drops, the client reconnects (backoff 0.5 s doubling to 8 s,
`reconnect_tries` in a row); when nothing ever answered, it stops at once (`NeverConnected`),
since retrying a wrong address or a server not yet started only hides the mistake. Given a
replicated server's replicas (`replica_order`), it starts on its own and, when that one drops and
does not answer the first reconnect, moves on to the next. It says in hello.resume_step which step it runs next; welcome.step is the server's answer and
`state.client_resume` what follows (go on / apply the re-sent backward / rewind to the round end).
With `state` set, everything training changes is saved after every step, so `resume` goes on after
the process itself died.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import ssl
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidMessage, InvalidStatus

from splitlm.errors import AuthError, SplitLMError
from splitlm.manifest import Bundle
from splitlm.protocol import (FLOAT_CODECS, Adapter, AdapterGlobal, Backward, Bye, Error, Forward, Hello,
                              Hidden, Limits, TailGrad, Welcome, codec_for, decode, encode)

from .credential import Credential, client_tls
from .data import Dataset
from .meter import Meter
from .optim import AdamW
from .privacy import PrivacySettings, Privatizer, effective
from .runtime import HeadRuntime
from .state import EdgeState, Position, Resume, StateError, client_resume, load_state, save_state


def default_client_id(data: Path) -> str:
    """A device's id when none is given: its host name and a hash of its data file's absolute
    path, so two devices (or two data files on one host) never share an id, and a restarted
    device gets the same one back (the server keeps progress by id)."""
    import hashlib
    import socket

    digest = hashlib.sha256(str(Path(data).resolve()).encode()).hexdigest()[:8]
    return f"{socket.gethostname()}-{digest}"


@dataclass(frozen=True)
class EdgeConfig:
    url: str
    bundle: Path
    data: Path
    steps: int | None = None        # total steps; None: `epochs` passes over the data
    epochs: int = 1
    batch_size: int = 4
    seq_len: int = 256
    lr: float = 1e-3                # AdamW, as the server's: betas (0.9, 0.999), eps 1e-8, no weight decay
    seed: int = 0                   # data order
    client_id: str = "edge"
    metrics_out: Path | None = None
    threads: int = 0                # onnxruntime intra-op threads; 0 = its default
    progress: bool | None = None    # None: a bar when stderr is a terminal
    state: Path | None = None       # training state file, rewritten after every step; None: none
    resume: bool = False            # continue from `state`
    reconnect_tries: int = 8        # reconnects in a row before giving up (0.5 s doubling to 8 s apart)
    privacy: PrivacySettings = PrivacySettings()  # the device's floor; the manifest can only raise it
    tail_chunk: int | None = None   # tokens per tail.onnx run (labels on device); None: the runtime's default
    keep_activations: bool = False  # keep the forward's activations for the backward (bundle exported with it)
    credential: Path | None = None  # from `splitlm enroll`: signs every connection (client_id must be its id)
    ca: Path | None = None          # wss://: the CA to trust; None: the system's trust store


class ServerError(SplitLMError):
    """The server answered with an `error` message."""


class LinkLost(SplitLMError):
    """The server stayed unreachable through every reconnect try."""


class NeverConnected(SplitLMError):
    """The first connection failed: nothing at the address ever answered as a splitlm server."""


def replica_order(url: str, client_id: str) -> list[str]:
    """The addresses a device tries, in order: `url` may list a replicated server's replicas
    (comma-separated); the device's own comes first, picked by a stable hash of its client id (the
    same device always lands on the same replica), then the ones after it, round the list."""
    import hashlib

    urls = url.split(",")
    home = int.from_bytes(hashlib.sha256(client_id.encode()).digest()[:8], "big") % len(urls)
    return urls[home:] + urls[:home]


def open_connection(cfg: EdgeConfig, url: str | None = None):
    """`async with open_connection(cfg) as ws:` one connection to the server (`url`, default cfg.url):
    TLS for wss://, and a freshly signed credential header when the device has one (a new signature
    each call)."""
    headers = None
    if cfg.credential is not None:
        credential = Credential.load(cfg.credential)
        if credential.client_id != cfg.client_id:
            raise AuthError(f"client id {cfg.client_id!r}: the credential is for {credential.client_id!r}")
        headers = {"Authorization": credential.header()}
    url = url or cfg.url
    return connect(url, max_size=None, compression=None, ping_interval=20, ping_timeout=120,
                   additional_headers=headers, ssl=client_tls(url, cfg.ca))


def refusal(url: str, e: BaseException) -> AuthError | None:
    """What a failed connection means when retrying cannot help: the server refused this device
    (HTTP 401/403), or the two sides disagree on TLS. None for the rest (a link that may come back)."""
    if isinstance(e, InvalidStatus) and e.response.status_code in (401, 403):
        body = (e.response.body or b"").decode("utf-8", "replace").strip()
        return AuthError(f"the server at {url} refused this device (HTTP {e.response.status_code}): {body}")
    if url.startswith("ws://") and isinstance(e, InvalidMessage):
        return AuthError(f"the server at {url} did not answer in plain HTTP: it probably speaks TLS; connect "
                         "with wss:// (and --ca if its certificate is from `splitlm certs`)")
    if url.startswith("wss://") and isinstance(e, ssl.SSLError):
        what = "its certificate does not verify" if isinstance(e, ssl.SSLCertVerificationError) else "TLS failed"
        return AuthError(f"the server at {url}: {what} ({e.reason or e}); a plain server needs ws://, a lab "
                         "certificate needs --ca CA.pem")
    return None


async def send_metered(ws: ClientConnection, msg, *, seq: int, codecs: tuple[str, str], meter: Meter) -> None:
    """Encode `msg` with the session's (activations, parameters) codecs, count its bytes, send it."""
    frame = encode(msg, seq=seq, codec=codec_for(msg, activations=codecs[0], parameters=codecs[1]))
    meter.count_up(len(frame))
    await ws.send(frame)


async def recv_metered(ws: ClientConnection, *, limits: Limits, expected: tuple[type, ...], meter: Meter):
    """The next frame (its wait and bytes counted) as one of `expected`; see `read_reply`."""
    with meter.wait():
        frame = await ws.recv()
    meter.count_down(len(frame))
    return read_reply(frame, limits=limits, expected=expected)


def read_reply(frame: bytes, *, limits: Limits, expected: tuple[type, ...]):
    """The server's message in `frame`, if it is one of `expected`; its `error`, or anything else,
    as a ServerError saying what came instead."""
    _, msg = decode(frame, limits=limits)
    if isinstance(msg, Error):
        raise ServerError(f"server error ({msg.code}): {msg.message}")
    if not isinstance(msg, expected):
        raise ServerError(f"expected {' or '.join(t.kind for t in expected)} from the server, got {msg.kind!r}")
    return msg


def make_client(cfg: EdgeConfig):
    """The client for the bundle's mode: split (EdgeClient), or fedavg / distill (FederatedClient)."""
    mode = Bundle.open(cfg.bundle, verify=False).manifest.mode
    if mode == "split":
        return EdgeClient(cfg)
    if cfg.privacy != PrivacySettings():
        raise SplitLMError(f"--clip/--noise/--grad-*: a {mode} device sends no activations or gradients, "
                           "only what the round exchanges; these options are for split bundles")
    if cfg.state is not None or cfg.resume:
        raise SplitLMError(f"--state/--resume: a {mode} device keeps no state file yet (split only); after a "
                           "dropped link it rejoins the open round from the server's global without one")
    from .federated import FederatedClient
    return FederatedClient(cfg)


def backoff_s(failures: int) -> float:
    """Seconds before reconnect try `failures` (1, 2, ...): 0.5, 1, 2, 4, 8, 8, ..."""
    return min(0.5 * 2 ** (failures - 1), 8.0)


class Reconnects:
    """The edge's reconnect policy, the same in every mode: run a session on a connection to the
    server until it returns; when a link that once worked drops, reconnect with backoff
    (`reconnect_tries` in a row; the session calls `joined()` once the server took it back, which
    resets the count); when nothing ever answered, or the server refused the device, stop at once.

    `cfg.url` may list a replicated server's replicas (`replica_order`): the device starts on its
    own, moves on at once past one that never answered, and fails over to the next when its
    replica does not come back at the first reconnect."""

    def __init__(self, cfg: EdgeConfig):
        self.cfg, self.failures = cfg, 0
        self.urls = replica_order(cfg.url, cfg.client_id)  # one, or a replicated server's replicas
        self.at = 0  # which of them this device is on

    def joined(self) -> None:
        self.failures = 0

    async def run(self, session, *, where) -> None:
        """`session(ws)` until it returns; `where()` says how far the device got, for messages."""
        answered = False
        while True:
            url = self.urls[self.at]
            try:
                async with open_connection(self.cfg, url) as ws:
                    answered = True
                    await session(ws)
                return
            except (ConnectionClosed, InvalidHandshake, OSError) as e:  # OSError: refused, timed out
                fatal = refusal(url, e)  # refused (always final), or TLS on one side only (final at first)
                if fatal is not None and (not answered or isinstance(e, InvalidStatus)):
                    raise fatal from e
                if not answered and self.at == len(self.urls) - 1:
                    raise NeverConnected(f"nothing ever answered at {', '.join(self.urls)} ({type(e).__name__}: {e}): "
                                         "is `splitlm serve` running there? (reconnects with backoff follow only "
                                         "a link that once worked)") from e
                if not answered:  # a replica not answering: the next one, at once
                    self.at += 1
                    continue
                self.failures += 1
                if len(self.urls) > 1 and self.failures > 1:  # its replica did not come back: fail over
                    self.at = (self.at + 1) % len(self.urls)
                if self.failures > self.cfg.reconnect_tries:
                    raise LinkLost(f"lost the server at {url} {where()} ({type(e).__name__}: {e}); gave up "
                                   f"after {self.cfg.reconnect_tries} reconnect tries") from e
                delay = backoff_s(self.failures)
                to = f" to {self.urls[self.at]}" if len(self.urls) > 1 else ""
                print(f"{self.cfg.client_id}: link lost {where()} ({type(e).__name__}); reconnecting{to} in "
                      f"{delay:g} s (try {self.failures}/{self.cfg.reconnect_tries})", file=sys.stderr, flush=True)
                await asyncio.sleep(delay)


class EdgeClient:
    """One device's training loop over one websocket connection."""

    def __init__(self, cfg: EdgeConfig):
        self.cfg = cfg
        self.bundle = Bundle.open(cfg.bundle)
        m = self.bundle.manifest
        self.data = Dataset.from_file(cfg.data, self.bundle, seq_len=min(cfg.seq_len, m.max_length),
                                      batch_size=cfg.batch_size, seed=cfg.seed)
        self.runtime = HeadRuntime(self.bundle, threads=cfg.threads, keep_activations=cfg.keep_activations,
                                   **({"tail_chunk": cfg.tail_chunk} if cfg.tail_chunk else {}))
        self.lora = self.bundle.lora_init()
        self.optim = AdamW(lr=cfg.lr)
        self.meter = Meter(metrics_out=cfg.metrics_out)
        # Applied to every h_K and tail_grad before encode; nothing the server sends changes it.
        self.privatizer = Privatizer(effective(cfg.privacy, PrivacySettings.from_dict(m.privacy)))
        if self.privatizer.settings != PrivacySettings():
            print(f"{cfg.client_id}: privacy {self.privatizer.settings.as_dict()} applied before anything is sent",
                  file=sys.stderr)
        self.limits = Limits(hidden_size=m.model.hidden_size)
        self.total_steps = cfg.steps if cfg.steps is not None else cfg.epochs * self.data.steps_per_epoch
        self._seq = itertools.count()
        self.codec = "f32"              # activations, from the welcome
        self.update_codec = "f32"       # parameters (adapter), from the welcome
        self.round = 0
        self.step = 0                   # the next step to run
        self.steps_per_round = 0        # from the server's welcome
        self.exchange_due = False       # the last step closed a round; its adapter exchange is still to do
        self.last_loss = math.nan
        self.snapshot: Position | None = None  # at the last round end; None until the first welcome
        if cfg.resume:
            self._load()

    # ------------------------------------------------------------------ state

    def _meta(self) -> dict:
        m = self.bundle.manifest
        return {"client_id": self.cfg.client_id, "model_hash": m.model.hash, "cut": m.cut, "labels": m.labels,
                "seed": self.cfg.seed, "batch_size": self.cfg.batch_size, "n_samples": self.data.n_samples}

    def _position(self) -> Position:
        return Position(self.step, self.round, self.exchange_due, self.last_loss,
                        {n: a.copy() for n, a in self.lora.items()}, self.optim.state_dict())

    def _restore(self, pos: Position) -> None:
        pos = pos.copy()
        self.step, self.round, self.exchange_due, self.last_loss = pos.step, pos.round, pos.exchange_due, pos.loss
        self.lora = {n: np.asarray(pos.lora[n], np.float32) for n in self.lora}
        self.optim.load_state_dict(pos.optim)

    def _save(self) -> None:
        if self.cfg.state is not None:
            save_state(self.cfg.state, EdgeState(self._meta(), self._position(), self.snapshot))

    def _load(self) -> None:
        if self.cfg.state is None:
            raise StateError("--resume needs --state FILE")
        state = load_state(self.cfg.state, meta=self._meta())
        self._restore(state.now)
        self.snapshot = state.snapshot
        print(f"{self.cfg.client_id}: resuming from {self.cfg.state} at step {self.step}, round {self.round}",
              file=sys.stderr)

    # ------------------------------------------------------------------ wire

    async def _send(self, ws: ClientConnection, msg) -> None:
        await send_metered(ws, msg, seq=next(self._seq), codecs=(self.codec, self.update_codec), meter=self.meter)

    async def _recv(self, ws: ClientConnection, *expected: type):
        return await recv_metered(ws, limits=self.limits, expected=expected, meter=self.meter)

    async def _hello(self, ws: ClientConnection) -> Welcome:
        """Join, fresh or resuming, and leave client and server at the same step."""
        m = self.bundle.manifest
        resuming = self.snapshot is not None
        await self._send(ws, Hello(client_id=self.cfg.client_id, model_hash=m.model.hash, cut=m.cut,
                                   labels=m.labels, lora_rank=m.lora.rank, lora_alpha=m.lora.alpha,
                                   lora_targets=m.lora.targets, codecs=FLOAT_CODECS,
                                   n_samples=self.data.n_samples, resume_step=self.step if resuming else None))
        welcome = await self._recv(ws, Welcome)
        if welcome.mode != "split":
            raise ServerError(f"the server runs {welcome.mode!r}; this bundle is for split learning")
        self.codec, self.update_codec = welcome.codec, welcome.update_codec
        self.steps_per_round = welcome.steps_per_round
        self.limits = Limits(max_frame_bytes=welcome.max_frame_bytes, hidden_size=m.model.hidden_size)
        if not resuming:
            await self._start(welcome)
        else:
            await self._resume(ws, welcome)
        return welcome

    async def _start(self, welcome: Welcome) -> None:
        self.step, self.round = welcome.step, welcome.round
        if welcome.head_adapter:
            self._adopt(welcome.head_adapter)
        self.snapshot = self._position()  # where a server that restarts from scratch sends us back to
        self._save()

    async def _resume(self, ws: ClientConnection, welcome: Welcome) -> None:
        action = client_resume(client_next=self.step, server_next=welcome.step, snapshot_step=self.snapshot.step)
        if action is not Resume.GO_ON:
            print(f"{self.cfg.client_id}: at step {self.step}, the server at {welcome.step}: {action.value}",
                  file=sys.stderr)
        if action is Resume.REWIND:
            self._restore(self.snapshot)
            self._save()
        elif action is Resume.APPLY_RESENT:  # the batch is a function of the step; the LoRA did not move
            backward = await self._recv(ws, Backward)
            self._apply(self.data.batch(self.step), backward)
            self._advance(float(backward.loss))

    def _adopt(self, tensors: dict[str, np.ndarray]) -> None:
        self.lora = {name: np.array(tensors[name], np.float32) for name in self.lora}

    # ------------------------------------------------------------------ training

    async def train_step(self, ws: ClientConnection, step: int) -> float:
        """One step, up to the optimizer's update; returns the loss."""
        batch = self.data.batch(step)  # input_ids, attention_mask, labels: (B, T)
        on_device = self.bundle.manifest.labels == "device"
        with self.meter.compute():
            h_k = self.runtime.forward(batch.input_ids, batch.attention_mask, self.lora)  # (B, T, H)
        sent = self.privatizer.hidden(h_k)  # the device's clip + noise, if any: nothing else leaves
        # 5 bytes a token beside the activations: the mask as uint8, labels as int32.
        await self._send(ws, Forward(step=step, hidden=sent, attention_mask=batch.attention_mask.astype(np.uint8),
                                     labels=None if on_device else batch.labels.astype(np.int32)))
        if on_device:
            hidden = await self._recv(ws, Hidden)
            with self.meter.compute():
                loss, grad_n = self.runtime.tail(hidden.hidden, batch.labels, batch.attention_mask)
            await self._send(ws, TailGrad(step=step, grad=self.privatizer.tail_grad(grad_n), loss=float(loss)))
        backward = await self._recv(ws, Backward)
        self._apply(batch, backward)
        return float(backward.loss)

    def _apply(self, batch, backward: Backward) -> None:
        """dL/dh_K -> LoRA gradients -> AdamW. No await inside: a dropped link never splits it."""
        if backward.step != self.step:
            raise ServerError(f"backward.step: expected {self.step}, got {backward.step}")
        with self.meter.compute():
            grads = self.runtime.lora_grads(batch.input_ids, batch.attention_mask, backward.grad, self.lora)
            self.optim.step(self.lora, grads)

    def _advance(self, loss: float) -> None:
        """Step done: count it, save, and record it unless the round exchange it opened is still to do."""
        self.step += 1
        self.last_loss = loss
        self.exchange_due = self.step % self.steps_per_round == 0
        self._save()
        if not self.exchange_due:
            self.meter.end_step(step=self.step - 1, loss=loss)

    async def end_round(self, ws: ClientConnection) -> None:
        await self._send(ws, Adapter(round=self.round, tensors=self.lora, n_samples=self.data.n_samples))
        reply = await self._recv(ws, AdapterGlobal)
        self._adopt(reply.tensors)
        self.round, self.exchange_due = reply.round, False
        self.snapshot = self._position()
        self._save()
        self.meter.end_step(step=self.step - 1, loss=self.last_loss)  # its bytes count in the closing step

    async def _session(self, ws: ClientConnection) -> None:
        await self._hello(ws)
        self.link.joined()
        bar = self._progress()
        while True:
            if self.exchange_due:
                await self.end_round(ws)
            if self.step >= self.total_steps:
                break
            self._advance(await self.train_step(ws, self.step))
            bar.update(self.step)
        bar.close()
        await self._send(ws, Bye(reason="done"))

    async def run(self) -> dict:
        """Train to the last step, reconnecting when the link drops; the meter's summary."""
        self.link = Reconnects(self.cfg)
        await self.link.run(self._session, where=lambda: f"at step {self.step}")
        return self.meter.summary()

    def _progress(self) -> "_Bar":
        show = self.cfg.progress if self.cfg.progress is not None else sys.stderr.isatty()
        if not show:
            return _Bar()
        from tqdm import tqdm

        return _Bar(tqdm(total=self.total_steps, initial=self.step, desc=f"{self.cfg.client_id}", unit="step"))


class _Bar:
    """A tqdm bar set to an absolute step, or nothing."""

    def __init__(self, bar=None):
        self.bar = bar

    def update(self, step: int) -> None:
        if self.bar is not None:
            self.bar.update(step - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
