"""`splitlm serve`: the connection shell around one `Strategy` (split, fedavg or distill).

Each connection runs receive -> decode -> strategy.handle -> encode -> send. The shell owns the
sockets and nothing else: before the upgrade its `auth.Gate` refuses an address over its attempt
rate, connections over the cap, and (with `--auth`) a device without a valid credential; after it,
the shell refuses a first frame that is not a matching hello, a hello whose client_id is not the
credential's, a second live session for a client_id (a stale one that no longer answers pings is
replaced), and more clients than `max_clients`; any exception while handling a message becomes an
`error` for that connection only. No connection can hold the server: an idle one is closed after
`idle_timeout_s`, a send to a peer that stops reading gives up after SEND_TIMEOUT_S, and at most
MAX_QUEUE frames wait unread per connection. What training means lives in the strategy (`strategy`, `split`, `fedavg`, `distill`).
"""

from __future__ import annotations

import asyncio
import time
import traceback
import uuid

from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from splitlm.errors import BadMessage, BundleMismatch
from splitlm.protocol import Bye, Error, Hello, codec_for, decode, encode, error_code

from . import status
from .auth import Gate, GateLimits, Keyring, server_tls
from .strategy import Conn, Strategy

HANDSHAKE_TIMEOUT_S = 30.0
SEND_TIMEOUT_S = 30.0  # a peer that reads none of a frame for this long is cut off
MAX_QUEUE = 4          # frames received and not yet handled, per connection (then TCP backpressure)
STALE_PING_S = 5.0  # a connection that does not answer a ping this fast is replaced by its client's new one


class Server:
    def __init__(self, strategy: Strategy, *, log=print):
        self.strategy, self.cfg, self.log = strategy, strategy.cfg, log
        self._sockets: dict[str, ServerConnection] = {}  # by client_id
        self._gone: dict[str, asyncio.Event] = {}        # by client_id: set once its handler finished
        cfg = self.cfg
        self.gate = Gate(keyring=Keyring(cfg.auth) if cfg.auth else None,
                         limits=GateLimits(max_connections=cfg.max_connections, max_attempts=cfg.max_attempts), log=log)
        self.tls = server_tls(cfg.tls_cert, cfg.tls_key) if cfg.tls_cert else None
        self.scheme = "wss" if self.tls else "ws"

    def listen(self):
        """An async context manager: `async with server.listen() as ws_server: ...`."""
        return serve(self.connection, self.cfg.host, self.cfg.port, max_size=self.strategy.limits.max_frame_bytes,
                     compression=None, ping_interval=self.cfg.ping_timeout_s / 3,
                     ping_timeout=self.cfg.ping_timeout_s, max_queue=MAX_QUEUE,
                     process_request=self.process_request, ssl=self.tls)

    def process_request(self, connection, request):
        """Before any upgrade: the gate (limits, and with --auth a signed credential) for everyone, the
        status page included; then the page, or None to let a websocket through."""
        refused = self.gate.process_request(connection, request)
        if refused is not None:
            return refused
        if self.cfg.status:
            return status.respond(connection, request, self.strategy.board, self.strategy)
        return None

    # ------------------------------------------------------------------ connection loop

    async def connection(self, ws: ServerConnection) -> None:
        conn = await self._handshake(ws)
        if conn is None:
            return
        try:
            while True:
                timeout = self.strategy.recv_timeout(conn)
                frame = await asyncio.wait_for(ws.recv(), timeout)
                conn.bytes_in += len(frame)
                if conn.last_sent is not None:  # the device's turn ends with this frame
                    conn.device_s += time.monotonic() - conn.last_sent
                    conn.last_sent = None
                for reply in await self.handle(conn, frame):
                    await conn.send(reply)
        except (ConnectionClosed, asyncio.TimeoutError) as e:
            reason = "disconnected"
            if isinstance(e, asyncio.TimeoutError):
                reason = f"sent nothing for {timeout:g} s ({'stalled mid-step' if conn.busy else 'idle'}); closed"
            if not conn.said_bye:
                self.log(f"client {conn.client_id}: {reason}")
        finally:
            await ws.close()
            await self.strategy.leave(conn)
            self.strategy.board.left(conn)
            self._sockets.pop(conn.client_id, None)
            self._gone.pop(conn.client_id, asyncio.Event()).set()

    async def handle(self, conn: Conn, frame: bytes | str) -> list:
        if isinstance(frame, str):
            return [Error(code="bad_message", message="expected a binary frame, got a text frame")]
        try:
            _, msg = decode(frame, limits=self.strategy.limits)
            if isinstance(msg, Bye):
                conn.said_bye = True
                await conn.close(1000, "bye")
                return []
            return await self.strategy.handle(conn, msg)
        except (BadMessage, BundleMismatch) as e:
            self.strategy.refused(conn, str(e))
            return [Error(code=error_code(e), message=str(e))]
        except ConnectionClosed:
            raise
        except Exception as e:  # a bug or a failed computation: this client hears of it, the server goes on
            self.log(f"client {conn.client_id}: internal error: {type(e).__name__}: {e}\n{traceback.format_exc()}")
            return [Error(code="internal", message=f"server error while handling this message: {type(e).__name__}: {e}")]

    def _sender(self, ws: ServerConnection, conn_ref: list):
        async def send(msg) -> None:
            conn = conn_ref[0]
            codec = codec_for(msg, activations=self.cfg.codec, parameters=self.cfg.update_codec)
            try:
                frame = encode(msg, seq=next(conn.seq), codec=codec)
            except BadMessage as e:  # e.g. a NaN the body produced: tell the client, do not crash
                frame = encode(Error(code="internal", message=f"server could not encode {msg.kind}: {e}"),
                               seq=next(conn.seq))
            conn.bytes_out += len(frame)
            try:
                await asyncio.wait_for(ws.send(frame), SEND_TIMEOUT_S)
                conn.last_sent = time.monotonic()
            except ConnectionClosed:
                pass  # its handler sees the close and the strategy hears of it there
            except asyncio.TimeoutError:  # it stopped reading: drop it rather than hold a round for it
                self.log(f"client {conn.client_id}: read nothing of a {msg.kind} for {SEND_TIMEOUT_S:g} s; cut off")
                ws.transport.abort()
        return send

    # ------------------------------------------------------------------ handshake

    async def _handshake(self, ws: ServerConnection) -> Conn | None:
        try:
            first = await asyncio.wait_for(ws.recv(), HANDSHAKE_TIMEOUT_S)
            _, hello = decode(first, limits=self.strategy.limits)
            if not isinstance(hello, Hello):
                raise BadMessage(f"first frame: expected 'hello', got {hello.kind!r}")
            self.strategy.check_hello(hello)
        except (BadMessage, BundleMismatch) as e:
            await self._refuse(ws, error_code(e), str(e))
            return None
        except (ConnectionClosed, asyncio.TimeoutError):
            return None
        identity = getattr(ws, "username", None)  # the credential's client id, set by the gate
        if self.gate.keyring is not None and hello.client_id != identity:
            await self._refuse(ws, "identity", f"hello.client_id {hello.client_id!r}: this connection's credential is "
                                               f"for {identity!r}; a device's id comes from its credential")
            return None
        if not await self._slot_free(hello.client_id):
            await self._refuse(ws, "already_connected",
                               f"client id {hello.client_id!r} is already connected and answering; "
                               "each device needs its own --client-id")
            return None
        if len(self._sockets) >= self.cfg.max_clients:
            await self._refuse(ws, "server_full", f"server full: {self.cfg.max_clients} clients already training")
            return None
        ref: list = []
        conn = Conn(session_id=uuid.uuid4().hex[:12], client_id=hello.client_id, n_samples=hello.n_samples,
                    send=self._sender(ws, ref), close=ws.close, bytes_in=len(first))  # the hello counts too
        ref.append(conn)
        try:
            replies = await self.strategy.join(conn, hello)
        except (BadMessage, BundleMismatch) as e:
            await self._refuse(ws, error_code(e), str(e))
            return None
        self._sockets[conn.client_id] = ws
        self._gone[conn.client_id] = asyncio.Event()
        self.strategy.board.joined(conn)
        for reply in replies:
            await conn.send(reply)
        return conn

    async def _slot_free(self, client_id: str) -> bool:
        """No open connection for `client_id`, or only a stale one (no pong within STALE_PING_S),
        which is closed first; its handler finishes (a body step in flight completes and counts)."""
        old = self._sockets.get(client_id)
        if old is None:
            return True
        try:
            await asyncio.wait_for(await old.ping(), STALE_PING_S)
            return False
        except (asyncio.TimeoutError, ConnectionClosed):
            pass
        self.log(f"client {client_id}: reconnected; its old connection did not answer, closing it")
        await old.close(1001, "replaced by a new connection")
        gone = self._gone.get(client_id)
        if gone is not None:
            await gone.wait()
        return True

    async def _refuse(self, ws: ServerConnection, code: str, message: str) -> None:
        self.log(f"refused a client: {message}")
        try:
            await ws.send(encode(Error(code=code, message=message), seq=0))
            await ws.close(1008, code)
        except ConnectionClosed:
            pass


async def serve_until_stopped(server: Server) -> None:
    """Serve until SIGINT or SIGTERM, or until the strategy has run its rounds; print the address
    first (port 0 picks a free one)."""
    import signal

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    strategy = server.strategy
    async with server.listen() as ws_server:
        host, port = next(iter(ws_server.sockets)).getsockname()[:2]
        server.log(f"listening on {server.scheme}://{host}:{port}  ({strategy.describe()})")
        if server.cfg.status:
            web = "https" if server.tls else "http"
            who = "; enrolled credentials only (--auth)" if server.cfg.auth else ""
            server.log(f"status page: {web}://{host}:{port}/status  (read-only; /status.json for tools{who})")
        strategy.start()
        done = asyncio.create_task(strategy.finished.wait())
        await asyncio.wait([asyncio.create_task(stop.wait()), done], return_when=asyncio.FIRST_COMPLETED)
        if done.done():
            server.log(f"finished: {strategy.cfg.rounds} rounds")
            for _ in range(50):  # let the devices read their last frames and say bye (5 s at most)
                if not strategy.conns:
                    break
                await asyncio.sleep(0.1)
        strategy.begin_stop()
    await strategy.stop()  # every connection handler has returned: no step is in flight
    strategy.board.close()
