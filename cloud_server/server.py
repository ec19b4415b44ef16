"""`splitlm serve`: the websocket server around one `Body`.

Each connection runs receive -> decode -> handle -> encode -> send. Torch work runs on one
worker thread, so pings and other clients keep flowing while the body computes, and body steps
happen one at a time in arrival order. A U-shape step holds the body from `forward` to
`tail_grad` (no other step may move the weights in between); a client that vanishes or stalls
mid-step loses that step, releases the body, and nobody else is disturbed.

Rounds (SplitFed): after R steps each client sends `adapter`; the round closes when every
connected client has reported or the deadline passes; the sample-weighted mean goes back to
the reporters as `adapter_global`, and the round's results are written under `out`.
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


@dataclass
class Client:
    session_id: str
    client_id: str
    ws: ServerConnection
    n_samples: int
    step: int = 0                               # the next step this client must send
    pending: tuple[int, PendingStep] | None = None
    losses: list[float] = field(default_factory=list)
    seq: itertools.count = field(default_factory=itertools.count)


def frame_limit(cfg: ServeConfig, hidden_size: int) -> int:
    """Largest valid frame: an f32 (B, T, H) tensor plus int64 mask and labels, plus headers."""
    b, t = cfg.max_batch, cfg.max_seq_len
    return b * t * hidden_size * 4 + 2 * b * t * 8 + 64 * 1024


class SplitServer:
    def __init__(self, body: Body, cfg: ServeConfig, *, log=print):
        self.body, self.cfg, self.log = body, cfg, log
        self.limits = Limits(max_frame_bytes=frame_limit(cfg, body.hidden_size), hidden_size=body.hidden_size,
                             max_batch=cfg.max_batch, max_seq_len=cfg.max_seq_len)
        self.clients: dict[str, Client] = {}
        self.round = 0
        self.global_step = 0
        self.global_head: dict[str, np.ndarray] = {}
        self.reports: dict[str, tuple[dict[str, np.ndarray], int]] = {}
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
            self.log(f"client {client.client_id}: {reason} at step {client.step}")
        finally:
            await ws.close()
            await self._drop(client)

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
        if len(self.clients) >= self.cfg.max_clients:
            await self._refuse(ws, "server_full", f"server full: {self.cfg.max_clients} clients already training")
            return None
        client = Client(uuid.uuid4().hex[:12], hello.client_id, ws, hello.n_samples)
        self.clients[client.session_id] = client
        self.log(f"client {client.client_id} joined ({hello.n_samples} samples), round {self.round}")
        await self.send(client, Welcome(session_id=client.session_id, codec=self.cfg.codec,
                                        steps_per_round=self.cfg.steps_per_round, round=self.round,
                                        step=client.step, max_frame_bytes=self.limits.max_frame_bytes,
                                        head_adapter=self.global_head))
        return client

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
        if msg.step != client.step or client.pending:
            return [Error(code="bad_message", message=f"forward.step: expected {client.step}, got {msg.step}")]
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
        step = client.step
        client.step += 1
        client.losses.append(loss)
        self.global_step += 1
        self.log(f"step {self.global_step:5d}  client {client.client_id}  step {step:4d}  loss {loss:.4f}")
        return Backward(step=step, grad=grad, loss=loss)

    # ------------------------------------------------------------------ rounds

    async def on_adapter(self, client: Client, msg: Adapter) -> list:
        if msg.round != self.round:  # late for a closed round: hand it the current average
            return [AdapterGlobal(round=self.round, tensors=self.global_head)]
        shapes = {n: t.shape for n, t in msg.tensors.items()}
        if shapes != self._head_shapes:
            return [Error(code="bad_message", message=f"adapter.tensors: expected {self._head_shapes}, got {shapes}")]
        self.reports[client.session_id] = ({n: np.array(t) for n, t in msg.tensors.items()}, msg.n_samples)
        if self.reports.keys() >= self.clients.keys():
            await self.close_round()
        elif self._deadline is None:
            self._deadline = asyncio.create_task(self._close_at_deadline(self.round))
        return []

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
        reports, self.reports = self.reports, {}
        self.global_head = weighted_average(list(reports.values()))
        finished, self.round = self.round, self.round + 1
        metrics = self._round_metrics(finished, reports)
        await self._run(self._write_round, finished, metrics)
        self.log(f"round {finished} closed: {len(reports)} clients, {metrics['samples']} samples, "
                 f"mean loss {metrics['mean_loss']:.4f}")
        for sid in reports:
            if sid in self.clients:
                await self.send(self.clients[sid], AdapterGlobal(round=self.round, tensors=self.global_head))

    def _round_metrics(self, round_: int, reports: dict) -> dict:
        per_client = {}
        for sid in reports:
            client = self.clients.get(sid)
            if client is not None:
                recent = client.losses[-self.cfg.steps_per_round:]
                per_client[client.client_id] = {"steps": client.step, "mean_loss": float(np.mean(recent))}
                client.losses.clear()
        losses = [c["mean_loss"] for c in per_client.values()]
        return {"round": round_, "global_step": self.global_step, "clients": per_client, "time": time.time(),
                "samples": int(sum(n for _, n in reports.values())),
                "mean_loss": float(np.mean(losses)) if losses else float("nan")}

    def _write_round(self, round_: int, metrics: dict) -> None:
        """round-NNNN/{adapter/, head_adapter.npz, metrics.json}, written whole or not at all."""
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

    # ------------------------------------------------------------------ leaving

    async def on_bye(self, client: Client, msg: Bye) -> list:
        await client.ws.close(1000, "bye")
        return []

    async def _drop(self, client: Client) -> None:
        if self.clients.pop(client.session_id, None) is None:
            return
        if client.pending is not None:  # the step never completed: the body was not touched
            client.pending = None
            self._body_lock.release()
        self.log(f"client {client.client_id} left after {client.step} steps")
        if self.reports and self.reports.keys() >= self.clients.keys():
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
        await stop.wait()
    server.log(f"stopped after {server.global_step} steps, round {server.round}")
