"""What a mode decides, apart from the connection shell (Flower's `Strategy` split).

The shell (`server.Server`) owns sockets: it decodes each frame, refuses strangers and twins, and
turns any exception into an `error` for that connection only. A `Strategy` owns what training
means in its mode: what a hello must match, what to say in the welcome, how each message is
handled and when a round closes. The aggregation math is in `aggregate` (pure functions), the disk
work in `writer`.

    Strategy.check_hello(hello)           raise BundleMismatch / BadMessage to refuse
    Strategy.join(conn, hello) -> [msg]   the welcome and what follows it
    Strategy.handle(conn, msg) -> [msg]   replies to that connection
    Strategy.leave(conn)                  the connection is gone (bye or not)

`Rounds` is the round bookkeeping every mode shares: who has reported, who is awaited, the
deadline, and closing once (a round closes on the last expected report, on the deadline, or when
the last missing client leaves: three triggers, one `maybe_close`).
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from splitlm.errors import BadMessage, BundleMismatch
from splitlm.protocol import Hello, Limits

from .aggregate import robust_update, weighted_average
from .status import Board


@dataclass(frozen=True)
class ServeConfig:
    host: str = "127.0.0.1"
    port: int = 8765
    mode: str = "split"              # split, fedavg or distill
    steps_per_round: int = 10        # split: steps between adapter averages; fedavg/distill: local steps
    rounds: int = 0                  # stop after this many rounds (0: run until stopped)
    codec: str = "f16"               # activations and their gradients, both directions
    update_codec: str = "f32"        # parameters: adapters, updates, globals
    max_clients: int = 8
    min_clients: int = 1             # a round closes on its expected reports only once this many have reported
    max_batch: int = 16
    max_seq_len: int = 1024
    max_chunk_bytes: int = 8 << 20   # update / global / logits chunks stay under this
    topk: int = 16                   # distill: k of the devices' top-k logits
    round_deadline_s: float = 300.0  # a round closes this long after its first report
    step_timeout_s: float = 120.0    # how long a U-shape step may wait for the client's tail_grad
    out: Path | None = None
    save_state: bool = False         # split: write OUT/server-state.safetensors at round ends and on shutdown
    # trust (see `auth` and `aggregate.robust_update`)
    auth: Path | None = None         # enrolled devices' public keys; None: anyone may connect
    tls_cert: Path | None = None     # with tls_key: listen for wss://
    tls_key: Path | None = None
    idle_timeout_s: float = 600.0    # a connection that sends nothing this long (and is owed nothing) is closed
    ping_timeout_s: float = 60.0     # a connection that answers no ping this long is closed (pinged every third of it)
    max_connections: int = 64        # open sockets, handshakes included
    max_attempts: int = 120          # connection attempts per address per minute
    clip_norm: float | None = None   # each device's update to the global is clipped to this L2 norm
    aggregate: str = "mean"          # mean (sample-weighted), median or trimmed:F (unweighted)
    status: bool = True              # answer GET /status and /status.json on the same port


@dataclass
class Conn:
    """One connection, as strategies see it. `client_id` is unique among open connections."""
    session_id: str
    client_id: str
    n_samples: int
    send: Callable[[object], Awaitable[None]]      # encode with the session's codecs and send
    close: Callable[[int, str], Awaitable[None]]
    seq: itertools.count = field(default_factory=itertools.count)
    said_bye: bool = False
    busy: bool = False    # a step of this connection is half done (the server waits for its next frame)
    bytes_in: int = 0     # frame bytes received from this connection, headers included
    bytes_out: int = 0    # frame bytes sent to it
    device_s: float = 0.0  # seconds from each frame the server sent it to its next frame (device compute + network)
    last_sent: float | None = None  # monotonic time of the server's last frame to it, until the device answers


def refuse_mismatch(want: dict, got: dict) -> None:
    """Raise BundleMismatch listing every field where the hello differs from what is served."""
    wrong = [f"{k}: server serves {want[k]!r}, bundle has {got[k]!r}" for k in want if want[k] != got[k]]
    if wrong:
        raise BundleMismatch("bundle does not match this server: " + "; ".join(wrong))


class Strategy:
    """The base: the mode's name, the frame limits, and the checks every mode makes."""

    mode: str = ""

    def __init__(self, cfg: ServeConfig, *, log=print):
        self.cfg, self.log = cfg, log
        self.finished = asyncio.Event()   # set once `cfg.rounds` rounds have closed
        self.conns: dict[str, Conn] = {}  # by client_id: the open connections
        self.board = Board(mode=self.mode, out=cfg.out)  # what the status page shows
        self.refusals: dict[str, list[str]] = {}  # by client_id: messages refused in the open round

    limits: Limits
    rounds: "Rounds"

    def check_hello(self, hello: Hello) -> None:
        if hello.mode != self.mode:
            raise BundleMismatch(f"hello.mode: this server runs {self.mode!r}, the bundle is for {hello.mode!r}; "
                                 f"export a bundle with --mode {self.mode} or serve with --mode {hello.mode}")
        if self.cfg.codec not in hello.codecs or self.cfg.update_codec not in hello.codecs:
            raise BadMessage(f"hello.codecs: the server sends {self.cfg.codec!r} and {self.cfg.update_codec!r}, "
                             f"the client decodes {list(hello.codecs)}")

    async def join(self, conn: Conn, hello: Hello) -> list:
        raise NotImplementedError

    async def handle(self, conn: Conn, msg) -> list:
        raise NotImplementedError

    async def leave(self, conn: Conn) -> None:
        raise NotImplementedError

    def recv_timeout(self, conn: Conn) -> float | None:
        """How long the shell waits for `conn`'s next frame (None: as long as pings answer): the idle
        timeout, except while `conn` waits on the server (its report is in for the open round)."""
        if conn.client_id in self.rounds.reports:
            return None
        return self.cfg.idle_timeout_s or None

    def refused(self, conn: Conn, message: str) -> None:
        """The shell refused one of `conn`'s messages: kept (the first few) for the round's metrics."""
        kept = self.refusals.setdefault(conn.client_id, [])
        if len(kept) < 3:
            kept.append(message[:300])

    def combine(self, round_: int, updates: dict[str, tuple[dict[str, np.ndarray], int]]
                ) -> tuple[dict[str, np.ndarray], dict[str, dict]]:
        """The round's aggregate of the devices' updates (each relative to the round's global), and
        per device its norm and whether it was clipped: `cfg.clip_norm` and `cfg.aggregate` (see
        `aggregate.robust_update`). Without either, the plain sample-weighted mean."""
        if self.cfg.clip_norm is None and self.cfg.aggregate == "mean":
            return weighted_average(list(updates.values())), {}
        agg, info = robust_update(updates, clip=self.cfg.clip_norm, method=self.cfg.aggregate)
        for cid, i in sorted(info.items()):
            if i["clipped"]:
                self.log(f"round {round_}: clipped {cid}'s update from norm {i['norm']:.4g} to {self.cfg.clip_norm:g}")
        return agg, info

    def take_refusals(self) -> dict[str, list[str]]:
        """The open round's refusals, for its metrics; the next round starts with none."""
        refusals, self.refusals = self.refusals, {}
        return refusals

    def start(self) -> None:
        """Once listening (e.g. a restored round's deadline starts)."""

    def begin_stop(self) -> None:
        """Before a clean shutdown drops everyone."""

    async def stop(self) -> None:
        """A clean shutdown: every connection handler has returned."""

    def describe(self) -> str:
        return self.mode


class Rounds:
    """Reports by client_id for the open round, the clients it waits for, and its deadline.

    A round waits for every connected client and every one gone without a bye (or restored from a
    saved state) until it is back; it closes when they have all reported (and at least
    `min_reports` have), or `deadline_s` after its first report. `close` is the strategy's round
    end; it runs at most once per round.
    """

    def __init__(self, *, deadline_s: float, close: Callable[[dict], Awaitable[None]], min_reports: int = 1,
                 log=print):
        self.number = 0
        self.min_reports = min_reports
        self.reports: dict[str, object] = {}
        self.awaited: set[str] = set()
        self._deadline_s, self._close, self.log = deadline_s, close, log
        self._deadline: asyncio.Task | None = None

    def complete(self, connected: set[str]) -> bool:
        """Every expected client has reported, and at least `min_reports` have (Flower's min_fit_clients:
        a server started before its devices does not close round 0 with the first one alone)."""
        return len(self.reports) >= max(self.min_reports, 1) and self.reports.keys() >= connected | self.awaited

    async def report(self, client_id: str, report: object, connected: set[str]) -> None:
        self.reports[client_id] = report
        await self.maybe_close(connected)
        if self.reports and self._deadline is None:
            self.start_deadline()

    async def maybe_close(self, connected: set[str]) -> None:
        if self.complete(connected):
            await self.close()

    def start_deadline(self) -> None:
        if self.reports and self._deadline is None:
            self._deadline = asyncio.create_task(self._close_at_deadline(self.number))

    async def _close_at_deadline(self, number: int) -> None:
        await asyncio.sleep(self._deadline_s)
        if self.number == number and self.reports:
            self.log(f"round {number}: deadline passed with {len(self.reports)} reports")
            self._deadline = None
            await self.close()

    async def close(self, **kw) -> None:
        """Close the open round with the reports it has: the strategy aggregates them (`kw`: what the
        strategy's close takes besides them, e.g. a replicated server's head averaged over replicas)."""
        if self._deadline is not None and self._deadline is not asyncio.current_task():
            self._deadline.cancel()
        self._deadline = None
        reports, self.reports, self.awaited = self.reports, {}, set()
        self.number += 1
        await self._close(reports, **kw)

    def cancel_deadline(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
