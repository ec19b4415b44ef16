"""`splitlm serve`: the websocket server around one `Body`.

Each connection runs receive -> decode -> handle -> encode -> send. Torch work runs on one
worker thread, so pings and other clients keep flowing while the body computes, and body steps
happen one at a time in arrival order. A U-shape step holds the body from `forward` to
`tail_grad` (no other step may move the weights in between); a client that vanishes or stalls
mid-step loses that step, releases the body, and nobody else is disturbed.

Rounds (SplitFed): after R steps each client sends `adapter`; the round closes when every
connected client (and each one whose link dropped, until it is back) has reported or the deadline
passes; the sample-weighted mean goes back to the reporters as `adapter_global`, and the round's
results are written under `out`.

Restarts (see `state`): with `save_state` the whole server state goes to OUT/server-state.safetensors
at every round end and on a clean shutdown, and `restore` continues from it. Progress is kept per
client_id, so a client that reconnects (hello.resume_step = the step it runs next) goes on where it
was: the same step, its lost backward re-sent, or back to the round end the server restarted from.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import shutil
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from splitlm.errors import BadMessage, BundleMismatch
from splitlm.protocol import (Adapter, AdapterGlobal, Backward, Bye, Error, Forward, Hello, Hidden, Limits,
                              TailGrad, Welcome, decode, encode, error_code)

from .aggregate import weighted_average
from .body import Body, PendingStep
from .state import (STATE_FILE, Progress, Resume, ServerState, StateError, describe_resume, save_state,
                    server_resume)

HANDSHAKE_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class ServeConfig:
    host: str = "127.0.0.1"
    port: int = 8765
    steps_per_round: int = 10
    codec: str = "f16"              # float tensors on the wire, both directions
    max_clients: int = 8
    max_batch: int = 16
    max_seq_len: int = 1024
    round_deadline_s: float = 300.0  # a round closes this long after its first report
    step_timeout_s: float = 120.0    # how long a U-shape step may wait for the client's tail_grad
    out: Path | None = None
    save_state: bool = False         # write OUT/server-state.safetensors at round ends and on shutdown


@dataclass
class Client:
    """One connection. Its `progress` is the client_id's, shared with its earlier connections."""
    session_id: str
    client_id: str
    ws: ServerConnection
    n_samples: int
    progress: Progress
    pending: tuple[int, PendingStep] | None = None
    seq: itertools.count = field(default_factory=itertools.count)
    said_bye: bool = False
    gone: asyncio.Event = field(default_factory=asyncio.Event)  # set once dropped


def frame_limit(cfg: ServeConfig, hidden_size: int) -> int:
    """Largest valid frame: an f32 (B, T, H) tensor plus int64 mask and labels, plus headers."""
    b, t = cfg.max_batch, cfg.max_seq_len
    return b * t * hidden_size * 4 + 2 * b * t * 8 + 64 * 1024


class SplitServer:
    def __init__(self, body: Body, cfg: ServeConfig, *, log=print):
        self.body, self.cfg, self.log = body, cfg, log
        self.limits = Limits(max_frame_bytes=frame_limit(cfg, body.hidden_size), hidden_size=body.hidden_size,
                             max_batch=cfg.max_batch, max_seq_len=cfg.max_seq_len)
        self.clients: dict[str, Client] = {}         # by session_id: the open connections
        self.progress: dict[str, Progress] = {}      # by client_id
        self.round = 0
        self.global_step = 0
        self.global_head: dict[str, np.ndarray] = {}
        self.reports: dict[str, tuple[dict[str, np.ndarray], int]] = {}  # by client_id
        self.awaited: set[str] = set()  # gone without bye, or restored: the open round waits for them
        self.stopping = False
        self._head_shapes = {n: v.shape for n, v in body.lora_tensors(head=True).items()}
        self._deadline: asyncio.Task | None = None
        self._body_lock = asyncio.Lock()
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="body")

    async def _run(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._worker, fn, *args)

    def listen(self):
        """An async context manager: `async with server.listen() as ws_server: ...`."""
        return serve(self.connection, self.cfg.host, self.cfg.port, max_size=self.limits.max_frame_bytes,
                     compression=None, ping_interval=20, ping_timeout=60)

    # ------------------------------------------------------------------ connection loop

    async def connection(self, ws: ServerConnection) -> None:
        client = await self._handshake(ws)
        if client is None:
            return
        try:
            while True:
                timeout = self.cfg.step_timeout_s if client.pending else None
                frame = await asyncio.wait_for(ws.recv(), timeout)
                for reply in await self.handle(client, frame):
                    await self.send(client, reply)
        except (ConnectionClosed, asyncio.TimeoutError) as e:
            reason = "stalled mid-step" if isinstance(e, asyncio.TimeoutError) else "disconnected"
            self.log(f"client {client.client_id}: {reason} at step {client.progress.step}")
        finally:
            await ws.close()
            await self._drop(client)
            client.gone.set()

    async def send(self, client: Client, msg) -> None:
        try:
            frame = encode(msg, seq=next(client.seq), codec=self.cfg.codec)
        except BadMessage as e:  # e.g. a NaN the body produced: tell the client, do not crash
            frame = encode(Error(code="internal", message=f"server could not encode {msg.kind}: {e}"),
                           seq=next(client.seq))
        await client.ws.send(frame)

    async def handle(self, client: Client, frame: bytes | str) -> list:
        if isinstance(frame, str):
            return [Error(code="bad_message", message="expected a binary frame, got a text frame")]
        try:
            _, msg = decode(frame, limits=self.limits)
        except BadMessage as e:
            return [Error(code=error_code(e), message=str(e))]
        handler = {Forward: self.on_forward, TailGrad: self.on_tail_grad, Adapter: self.on_adapter,
                   Bye: self.on_bye}.get(type(msg))
        if handler is None:
            return [Error(code="bad_message", message=f"unexpected {msg.kind!r} during training: expected "
                                                      "forward, tail_grad, adapter or bye")]
        return await handler(client, msg)

    # ------------------------------------------------------------------ handshake

    async def _handshake(self, ws: ServerConnection) -> Client | None:
        try:
            _, hello = decode(await asyncio.wait_for(ws.recv(), HANDSHAKE_TIMEOUT_S), limits=self.limits)
            self._check_hello(hello)
        except (BadMessage, BundleMismatch) as e:
            await self._refuse(ws, error_code(e), str(e))
            return None
        except (ConnectionClosed, asyncio.TimeoutError):
            return None
        if hello.resume_step is not None:
            await self._replace_session(hello.client_id)  # its old connection may not have noticed the drop
        if len(self.clients) >= self.cfg.max_clients:
            await self._refuse(ws, "server_full", f"server full: {self.cfg.max_clients} clients already training")
            return None
        progress = self.progress.get(hello.client_id) if hello.resume_step is not None else None
        progress = progress or Progress()
        last = progress.last_backward
        try:
            plan = server_resume(server_next=progress.step, client_next=hello.resume_step,
                                 cached_step=None if last is None else last.step)
        except StateError as e:
            await self._refuse(ws, "bad_message", str(e))
            return None
        self.progress[hello.client_id] = progress
        client = Client(uuid.uuid4().hex[:12], hello.client_id, ws, hello.n_samples, progress)
        self.clients[client.session_id] = client
        self.log(f"client {client.client_id} joined ({hello.n_samples} samples), round {self.round}; "
                 + describe_resume(plan, server_next=progress.step, client_next=hello.resume_step))
        await self.send(client, Welcome(session_id=client.session_id, codec=self.cfg.codec,
                                        steps_per_round=self.cfg.steps_per_round, round=self.round,
                                        step=progress.step, max_frame_bytes=self.limits.max_frame_bytes,
                                        head_adapter=self.global_head))
        if plan is Resume.RESEND:
            await self.send(client, last)
        return client

    async def _replace_session(self, client_id: str) -> None:
        """Close `client_id`'s open connection and wait until its handler has finished (a body step
        in flight completes and counts), so the resume decision sees its final step counter."""
        for old in [c for c in self.clients.values() if c.client_id == client_id]:
            self.log(f"client {client_id}: reconnected; closing its old connection")
            await old.ws.close(1001, "replaced by a new connection")
            await old.gone.wait()

    def _check_hello(self, hello) -> None:
        if not isinstance(hello, Hello):
            raise BadMessage(f"first frame: expected 'hello', got {hello.kind!r}")
        self.body.check_hello(hello)
        if self.cfg.codec not in hello.codecs:
            raise BadMessage(f"hello.codecs: the server sends {self.cfg.codec!r}, client decodes {list(hello.codecs)}")

    async def _refuse(self, ws: ServerConnection, code: str, message: str) -> None:
        self.log(f"refused a client: {message}")
        try:
            await ws.send(encode(Error(code=code, message=message), seq=0))
            await ws.close(1008, code)
        except ConnectionClosed:
            pass

    # ------------------------------------------------------------------ training steps

    async def on_forward(self, client: Client, msg: Forward) -> list:
        if msg.step != client.progress.step or client.pending:
            return [Error(code="bad_message", message=f"forward.step: expected {client.progress.step}, got {msg.step}")]
        wants_labels = self.body.cfg.labels == "server"
        if wants_labels != (msg.labels is not None):
            where = "at the server: forward must carry them" if wants_labels else "on the device: forward must not carry them"
            return [Error(code="bad_message", message=f"forward.labels: this server keeps labels {where}")]
        if not wants_labels:
            await self._body_lock.acquire()  # released by tail_grad, or when the client goes
            try:
                h_n, pending = await self._run(self.body.forward_u, msg.hidden, msg.attention_mask)
            except BaseException:
                self._body_lock.release()
                raise
            client.pending = (msg.step, pending)
            return [Hidden(step=msg.step, hidden=h_n)]
        async with self._body_lock:
            loss, grad = await self._run(self.body.step, msg.hidden, msg.attention_mask, msg.labels)
        return [self._finish_step(client, loss, grad)]

    async def on_tail_grad(self, client: Client, msg: TailGrad) -> list:
        if client.pending is None or client.pending[0] != msg.step:
            return [Error(code="bad_message", message=f"tail_grad.step: no pending step {msg.step}")]
        expected = tuple(client.pending[1].h_n.shape)
        if msg.grad.shape != expected:
            return [Error(code="bad_message", message=f"tail_grad.grad: expected shape {expected}, got {msg.grad.shape}")]
        _, pending = client.pending
        try:
            grad = await self._run(self.body.backward_u, pending, msg.grad)
        finally:
            client.pending = None
            self._body_lock.release()
        return [self._finish_step(client, msg.loss, grad)]

    def _finish_step(self, client: Client, loss: float, grad: np.ndarray) -> Backward:
        progress = client.progress
        step = progress.step
        progress.step += 1
        progress.losses.append(loss)
        progress.last_backward = Backward(step=step, grad=grad, loss=loss)  # re-sent if it gets lost
        self.global_step += 1
        self.log(f"step {self.global_step:5d}  client {client.client_id}  step {step:4d}  loss {loss:.4f}")
        return progress.last_backward

    # ------------------------------------------------------------------ rounds

    async def on_adapter(self, client: Client, msg: Adapter) -> list:
        if client.pending is not None:
            return [Error(code="bad_message", message=f"adapter: expected tail_grad for step {client.pending[0]} first")]
        if msg.round != self.round:  # late for a closed round: hand it the current average
            return [AdapterGlobal(round=self.round, tensors=self.global_head)]
        shapes = {n: t.shape for n, t in msg.tensors.items()}
        if shapes != self._head_shapes:
            return [Error(code="bad_message", message=f"adapter.tensors: expected {self._head_shapes}, got {shapes}")]
        self.reports[client.client_id] = ({n: np.array(t) for n, t in msg.tensors.items()}, msg.n_samples)
        if self._all_reported():
            await self.close_round()
        elif self._deadline is None:
            self._deadline = asyncio.create_task(self._close_at_deadline(self.round))
        return []

    def _all_reported(self) -> bool:
        """Every connected client, and every one gone without bye or restored and not back yet,
        has reported this round (or the deadline closes it)."""
        expected = {c.client_id for c in self.clients.values()} | self.awaited
        return bool(self.reports) and self.reports.keys() >= expected

    async def _close_at_deadline(self, round_: int) -> None:
        await asyncio.sleep(self.cfg.round_deadline_s)
        if self.round == round_ and self.reports:
            self.log(f"round {round_}: deadline passed with {len(self.reports)}/{len(self.clients)} reports")
            self._deadline = None
            await self.close_round()

    async def close_round(self) -> None:
        if self._deadline is not None and self._deadline is not asyncio.current_task():
            self._deadline.cancel()
        self._deadline = None
        reports, self.reports, self.awaited = self.reports, {}, set()
        self.global_head = weighted_average(list(reports.values()))
        finished, self.round = self.round, self.round + 1
        metrics = self._round_metrics(finished, reports)
        async with self._body_lock:  # no step in flight: body and counters in the state agree
            await self._run(self._write_round, finished, metrics, self._state())
        self.log(f"round {finished} closed: {len(reports)} clients, {metrics['samples']} samples, "
                 f"mean loss {metrics['mean_loss']:.4f}")
        for client in list(self.clients.values()):
            if client.client_id in reports:
                try:
                    await self.send(client, AdapterGlobal(round=self.round, tensors=self.global_head))
                except ConnectionClosed:
                    pass  # it gets the average when it reconnects and reports again

    def _round_metrics(self, round_: int, reports: dict) -> dict:
        per_client = {}
        for cid in reports:
            progress = self.progress.get(cid)
            if progress is not None and progress.losses:
                recent = progress.losses[-self.cfg.steps_per_round:]
                per_client[cid] = {"steps": progress.step, "mean_loss": float(np.mean(recent))}
                progress.losses.clear()
        losses = [c["mean_loss"] for c in per_client.values()]
        return {"round": round_, "global_step": self.global_step, "clients": per_client, "time": time.time(),
                "samples": int(sum(n for _, n in reports.values())),
                "mean_loss": float(np.mean(losses)) if losses else float("nan")}

    def _write_round(self, round_: int, metrics: dict, state: ServerState) -> None:
        """round-NNNN/{adapter/, head_adapter.npz, metrics.json}, written whole or not at all;
        then the server state (on the body's thread: nothing moves the body meanwhile)."""
        self.body.set_head_adapter(self.global_head)
        if self.cfg.out is None:
            return
        self.cfg.out.mkdir(parents=True, exist_ok=True)
        final = self.cfg.out / f"round-{round_:04d}"
        staging = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=self.cfg.out))
        self.body.save_adapter(staging / "adapter")
        np.savez(staging / "head_adapter.npz", **self.global_head)
        (staging / "metrics.json").write_text(json.dumps(metrics, indent=2))
        shutil.rmtree(final, ignore_errors=True)
        staging.rename(final)
        self._write_state(state)

    # ------------------------------------------------------------------ state (see `state`)

    @property
    def state_path(self) -> Path | None:
        return self.cfg.out / STATE_FILE if self.cfg.out is not None else None

    def state_config(self) -> dict:
        """What a saved state must have been saved with to be resumed here."""
        b = self.body.cfg
        return {"model_hash": self.body.model_hash, "cut": b.cut, "labels": b.labels, "lora_rank": b.lora_rank,
                "lora_alpha": float(b.lora_alpha), "lora_targets": list(self.body.targets), "full": b.full,
                "steps_per_round": self.cfg.steps_per_round}

    def _state(self) -> ServerState:
        """The counters, reports and adapters now (the body's tensors are added on its thread)."""
        progress = {cid: Progress(p.step, list(p.losses), p.last_backward) for cid, p in self.progress.items()}
        return ServerState(config=self.state_config(), round=self.round, global_step=self.global_step,
                           global_head=dict(self.global_head), progress=progress, reports=dict(self.reports),
                           awaited=self.awaited | {c.client_id for c in self.clients.values()})

    def _write_state(self, state: ServerState) -> None:
        if self.cfg.save_state and self.state_path is not None:
            state.body = self.body.training_state()
            save_state(self.state_path, state)

    def begin_stop(self) -> None:
        """Before a clean shutdown drops everyone: those connected now are awaited by the saved
        round, and their leaving does not close it."""
        self.stopping = True
        self.awaited |= {c.client_id for c in self.clients.values()}
        if self._deadline is not None:
            self._deadline.cancel()

    async def save_state(self) -> None:
        """Write the state now (a clean shutdown), once no body step is in flight."""
        async with self._body_lock:
            await self._run(self._write_state, self._state())

    def restore(self, state: ServerState) -> None:
        """Continue from `state` (loaded with `state.load_state(path, config=self.state_config())`)."""
        self.body.load_training_state(state.body)
        self.global_head = state.global_head
        if self.global_head:
            self.body.set_head_adapter(self.global_head)
        self.round, self.global_step = state.round, state.global_step
        self.progress, self.reports, self.awaited = state.progress, state.reports, state.awaited
        self.log(f"resumed: round {self.round}, {self.global_step} steps, clients "
                 + ", ".join(f"{cid} at step {p.step}" for cid, p in sorted(self.progress.items()))
                 + f"; {len(self.reports)} reported this round")

    def start_restored_deadline(self) -> None:
        """A restored round that already has reports closes at the deadline even if nobody returns."""
        if self.reports and self._deadline is None:
            self._deadline = asyncio.create_task(self._close_at_deadline(self.round))

    # ------------------------------------------------------------------ leaving

    async def on_bye(self, client: Client, msg: Bye) -> list:
        client.said_bye = True
        await client.ws.close(1000, "bye")
        return []

    async def _drop(self, client: Client) -> None:
        if self.clients.pop(client.session_id, None) is None:
            return
        if client.pending is not None:  # the step never completed: the body was not touched
            client.pending = None
            self._body_lock.release()
        self.log(f"client {client.client_id} left after {client.progress.step} steps")
        if not client.said_bye and not self.stopping:  # a lost link: it may be back before the deadline
            self.awaited.add(client.client_id)
        if not self.stopping and self._all_reported():
            await self.close_round()


async def serve_until_stopped(server: SplitServer) -> None:
    """Serve until SIGINT or SIGTERM; print the address first (port 0 picks a free one)."""
    import signal

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with server.listen() as ws_server:
        host, port = next(iter(ws_server.sockets)).getsockname()[:2]
        server.log(f"listening on ws://{host}:{port}  (model {server.body.path.name}, cut {server.body.cfg.cut}, "
                   f"labels at the {server.body.cfg.labels}, wire {server.cfg.codec})")
        server.start_restored_deadline()
        await stop.wait()
        server.begin_stop()
    await server.save_state()  # every connection handler has returned: no step is in flight
    server.log(f"stopped after {server.global_step} steps, round {server.round}")
