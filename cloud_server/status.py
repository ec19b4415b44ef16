"""The status page: what a person watching `splitlm serve` wants to see, on the server's own port.

    GET /status        an HTML page (server-rendered, inline SVG charts, no JavaScript, refreshes
                       itself every few seconds): the devices, the round and step, loss curves per
                       device and per round, bytes and device time per step, where results go
    GET /status.json   the same facts as JSON, for tools

Read-only: nothing here changes training, and any other HTTP method is refused. `Board` is where a
strategy records what happened (a device joined, a step finished, a round closed), bounded in
memory; `render` draws a snapshot of it. The shell answers these requests from websockets'
`process_request` hook, before any websocket upgrade, so a page load costs the training loop one
snapshot and nothing else.

Device time is measured by the server, not reported by the device (the wire carries no device
meter, so its bytes stay what the protocol says): for each frame a device sends, the time since
the server's previous frame to it. That is the device's compute plus the network round trip; on
loopback it is the device's compute. The device's own meter (`edge --metrics-out`) has the split
into compute and wait.
"""

from __future__ import annotations

import html
import json
import math
import time
from collections import deque
from dataclasses import dataclass, field
from http import HTTPStatus
from pathlib import Path

HISTORY = 2000          # per-device step points kept for the charts (the steps file has them all)
STEPS_FILE = "steps.jsonl"
REFRESH_S = 3


@dataclass
class DeviceRow:
    client_id: str
    connected: bool = True
    since: float = field(default_factory=time.time)
    n_samples: int = 0
    steps: int = 0
    last_step: int | None = None
    last_loss: float | None = None
    bytes_in: int = 0
    bytes_out: int = 0
    device_s: float = 0.0
    reports: int = 0                  # fedavg/distill: rounds this device reported
    base: tuple = (0, 0, 0.0)         # counters of its earlier connections (a reconnect adds to them)
    points: deque = field(default_factory=lambda: deque(maxlen=HISTORY))  # (step, loss)


class Board:
    """What the page shows, recorded as it happens. In split mode each step is also appended as one
    JSON line to OUT/steps.jsonl (client, step, loss, cumulative bytes, device seconds)."""

    def __init__(self, *, mode: str, out: Path | None):
        self.mode, self.out = mode, out
        self.started = time.time()
        self.devices: dict[str, DeviceRow] = {}
        self.rounds: list[dict] = []
        self._steps_file = None
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)
            self._steps_file = open(out / STEPS_FILE, "a", buffering=1)

    def joined(self, conn) -> None:
        row = self.devices.get(conn.client_id)
        if row is None:
            row = self.devices[conn.client_id] = DeviceRow(conn.client_id)
        row.connected, row.since, row.n_samples = True, time.time(), conn.n_samples
        row.base = (row.bytes_in, row.bytes_out, row.device_s)

    def left(self, conn) -> None:
        row = self.devices.get(conn.client_id)
        if row is not None:
            self._sync(row, conn)
            row.connected = False

    def _sync(self, row: DeviceRow, conn) -> None:
        b_in, b_out, dev = row.base
        row.bytes_in, row.bytes_out, row.device_s = b_in + conn.bytes_in, b_out + conn.bytes_out, dev + conn.device_s

    def step(self, conn, step: int, loss: float) -> None:
        row = self.devices.get(conn.client_id)
        if row is None:
            return
        self._sync(row, conn)
        row.steps += 1
        row.last_step, row.last_loss = step, float(loss)
        row.points.append((step, float(loss)))
        if self._steps_file is not None:
            self._steps_file.write(json.dumps({
                "time": time.time(), "client": conn.client_id, "step": step, "loss": float(loss),
                "bytes_in": row.bytes_in, "bytes_out": row.bytes_out, "device_s": round(row.device_s, 6)}) + "\n")

    def reported(self, conn) -> None:
        """fedavg/distill: a device's whole report for the round arrived."""
        row = self.devices.get(conn.client_id)
        if row is not None:
            self._sync(row, conn)
            row.reports += 1

    def round_closed(self, metrics: dict) -> None:
        self.rounds.append(metrics)

    def close(self) -> None:
        if self._steps_file is not None:
            self._steps_file.close()
            self._steps_file = None

    def snapshot(self, strategy) -> dict:
        """Every fact the page shows, as JSON-ready values."""
        for cid, conn in strategy.conns.items():
            if cid in self.devices:
                self._sync(self.devices[cid], conn)
        now = time.time()
        results = sorted(p.name for p in self.out.glob("round-*")) if self.out is not None and self.out.is_dir() else []
        split = self.mode == "split"
        devices = []
        for row in sorted(self.devices.values(), key=lambda r: r.client_id):
            n = row.steps if split else row.reports   # per step (split) or per round reported
            frames = max(n, 1)
            devices.append({
                "client_id": row.client_id, "connected": row.connected, "since": row.since,
                "n_samples": row.n_samples, "steps": row.steps, "reports": row.reports, "last_step": row.last_step,
                "last_loss": row.last_loss, "bytes_in": row.bytes_in, "bytes_out": row.bytes_out,
                "bytes_in_per_unit": row.bytes_in / frames if n else None,
                "bytes_out_per_unit": row.bytes_out / frames if n else None,
                "device_s": row.device_s, "device_s_per_unit": row.device_s / frames if n else None,
                "losses": [list(p) for p in row.points]})
        return {"mode": self.mode, "unit": "step" if split else "round", "describe": strategy.describe(), "started": self.started, "now": now,
                "uptime_s": now - self.started, "round": getattr(strategy, "round", None),
                "rounds": strategy.cfg.rounds, "global_step": getattr(strategy, "global_step", None),
                "connected": sum(d["connected"] for d in devices), "out": str(self.out) if self.out else None,
                "results": results, "devices": devices, "round_history": [_round_row(m) for m in self.rounds]}


def _round_row(metrics: dict) -> dict:
    """A round's metrics.json, reduced to what the page tables and charts use."""
    loss = metrics.get("mean_loss") if metrics.get("mode") == "split" else metrics.get("eval_loss")
    return {"round": metrics["round"], "loss": loss, "samples": metrics.get("samples"),
            "clients": sorted(metrics.get("clients", {})), "bytes_up": metrics.get("bytes_up"),
            "bytes_down": metrics.get("bytes_down"), "time": metrics.get("time")}


# ---------------------------------------------------------------- HTTP

def status_json(snap) -> bytes:
    """The snapshot as strict JSON: a NaN or infinite number (a split round with no steps, a NaN
    held-out loss) is written as null, as the HTML page shows it as "–"."""
    def clean(x):
        if isinstance(x, float) and not math.isfinite(x):
            return None
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [clean(v) for v in x]
        return x
    return json.dumps(clean(snap), allow_nan=False).encode()


def respond(connection, request, board: Board, strategy):
    """websockets' `process_request`: answer /status and /status.json; None lets a websocket through."""
    path = request.path.split("?", 1)[0]
    if path not in ("/status", "/status.json"):
        return None
    snap = board.snapshot(strategy)
    if path == "/status.json":
        body, ctype = status_json(snap), "application/json"
    else:
        body, ctype = render(snap).encode(), "text/html; charset=utf-8"
    response = connection.respond(HTTPStatus.OK, "")
    for name, value in (("Content-Type", ctype), ("Content-Length", str(len(body))), ("Cache-Control", "no-store")):
        if name in response.headers:
            del response.headers[name]  # websockets' Headers keeps repeats: replace, do not add
        response.headers[name] = value
    response.body = body
    return response


# ---------------------------------------------------------------- HTML

COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf")


def _fmt(x, spec: str = ".4f", none: str = "–") -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return none
    return format(x, spec)


def _bytes(n) -> str:
    if n is None:
        return "–"
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return ""


def chart(series: dict[str, list], *, title: str, xlabel: str, width: int = 560, height: int = 220) -> str:
    """An inline SVG line chart of {name: [(x, y), ...]}; non-finite points are skipped."""
    pts = {k: [(float(x), float(y)) for x, y in v if y is not None and math.isfinite(y)] for k, v in series.items()}
    pts = {k: v for k, v in pts.items() if v}
    esc = html.escape
    if not pts:
        return f'<figure><figcaption>{esc(title)}</figcaption><p class="empty">no data yet</p></figure>'
    xs = [x for v in pts.values() for x, _ in v]
    ys = [y for v in pts.values() for _, y in v]
    x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
    x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1e-6)
    left, right, top, bottom = 52, 10, 10, 30
    sx = lambda x: left + (x - x0) / (x1 - x0) * (width - left - right)  # noqa: E731
    sy = lambda y: top + (y1 - y) / (y1 - y0) * (height - top - bottom)  # noqa: E731
    parts = [f'<svg width="{width}" height="{height}" role="img" aria-label="{esc(title)}">',
             f'<rect x="{left}" y="{top}" width="{width - left - right}" height="{height - top - bottom}" '
             'fill="none" stroke="#bbb"/>',
             f'<text x="4" y="{top + 10}" font-size="11">{y1:.3g}</text>',
             f'<text x="4" y="{height - bottom}" font-size="11">{y0:.3g}</text>',
             f'<text x="{left}" y="{height - 8}" font-size="11">{x0:g}</text>',
             f'<text x="{width - right - 40}" y="{height - 8}" font-size="11">{x1:g}</text>',
             f'<text x="{width // 2 - 20}" y="{height - 8}" font-size="11">{esc(xlabel)}</text>']
    for i, (name, v) in enumerate(sorted(pts.items())):
        color = COLORS[i % len(COLORS)]
        path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in v)
        if len(v) == 1:
            parts.append(f'<circle cx="{sx(v[0][0]):.1f}" cy="{sy(v[0][1]):.1f}" r="3" fill="{color}"/>')
        else:
            parts.append(f'<polyline points="{path}" fill="none" stroke="{color}" stroke-width="1.5"/>')
    parts.append("</svg>")
    legend = " ".join(f'<span style="color:{COLORS[i % len(COLORS)]}">■ {esc(k)}</span>'
                      for i, k in enumerate(sorted(pts)))
    return f'<figure><figcaption>{esc(title)}</figcaption>{"".join(parts)}<div class="legend">{legend}</div></figure>'


def render(snap: dict) -> str:
    esc = html.escape
    split, unit = snap["mode"] == "split", snap["unit"]
    per_round = "mean device loss" if snap["mode"] == "split" else "held-out loss of the global model"
    rounds_of = f" of {snap['rounds']}" if snap["rounds"] else ""
    step = f", {snap['global_step']} steps" if snap["global_step"] is not None else ""
    rows = []
    for d in snap["devices"]:
        rows.append(
            f'<tr data-client="{esc(d["client_id"])}"><td class="client">{esc(d["client_id"])}</td>'
            f'<td class="state">{"connected" if d["connected"] else "gone"}</td>'
            f'<td class="samples">{d["n_samples"]}</td><td class="steps">{d["steps" if split else "reports"]}</td>'
            f'<td class="last-step">{_fmt(d["last_step"], "d")}</td><td class="loss">{_fmt(d["last_loss"])}</td>'
            f'<td class="bytes-up">{_bytes(d["bytes_in"])}</td><td class="bytes-down">{_bytes(d["bytes_out"])}</td>'
            f'<td class="up-per-unit">{_bytes(d["bytes_in_per_unit"])}</td>'
            f'<td class="down-per-unit">{_bytes(d["bytes_out_per_unit"])}</td>'
            f'<td class="device-s">{_fmt(d["device_s_per_unit"], ".3f")}</td></tr>')
    rrows = [f'<tr data-round="{r["round"]}"><td>{r["round"]}</td><td class="round-loss">{_fmt(r["loss"])}</td>'
             f'<td>{r["samples"]}</td><td class="devices">{esc(", ".join(r["clients"]))}</td>'
             + ("" if split else f'<td>{_bytes(r["bytes_up"])}</td><td>{_bytes(r["bytes_down"])}</td>') + "</tr>"
             for r in reversed(snap["round_history"])]
    results = ("".join(f"<li>{esc(r)}</li>" for r in snap["results"][-10:]) or "<li>none yet</li>")
    out = esc(snap["out"]) if snap["out"] else "nowhere (serve without --out writes no results)"
    device_chart = chart({d["client_id"]: d["losses"] for d in snap["devices"]},
                         title="training loss per device", xlabel="device step")
    round_chart = chart({per_round: [(r["round"], r["loss"]) for r in snap["round_history"]]},
                        title=f"per round: {per_round}", xlabel="round")
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><meta http-equiv="refresh" content="{REFRESH_S}">
<title>splitlm {esc(snap['mode'])}: round {snap['round']}</title>
<style>body{{font-family:sans-serif;margin:1.2em;color:#222}} table{{border-collapse:collapse;margin:.6em 0}}
td,th{{border:1px solid #ccc;padding:2px 8px;text-align:right}} td.client,td.state{{text-align:left}}
figure{{display:inline-block;margin:0 1.5em 1em 0}} figcaption{{font-weight:bold}} .legend{{font-size:12px}}
.muted{{color:#666;font-size:13px}}</style></head>
<body>
<h1>splitlm serve: {esc(snap['mode'])}</h1>
<p id="summary"><span id="round">round {snap['round']}{rounds_of}</span>{step},
<span id="connected">{snap['connected']} device(s) connected</span>, up {snap['uptime_s']:.0f} s.
<span class="muted">{esc(snap['describe'])}</span></p>
{device_chart}{round_chart}
<h2>Devices</h2>
<table id="devices"><tr><th>device</th><th>state</th><th>samples</th><th>{"steps" if split else "rounds reported"}</th>
<th>last step</th><th>last loss</th><th>bytes up</th><th>bytes down</th><th>up / {unit}</th><th>down / {unit}</th>
<th>device s / {unit}</th></tr>
{''.join(rows)}</table>
<p class="muted">Bytes are whole frames, headers included, as the server counted them. Device s / {unit} is
measured by the server: the time from its previous frame to the device until the device's next frame (device
compute plus network).{"" if split else " Fedavg and distill devices train locally: their per-step losses stay on the device."}</p>
<h2>Rounds</h2>
<table id="rounds"><tr><th>round</th><th>{esc(per_round)}</th><th>samples</th><th>devices</th>
{"" if split else "<th>bytes up</th><th>bytes down</th>"}</tr>{''.join(rrows)}</table>
<h2>Results</h2><p>written to <code id="out">{out}</code></p><ul id="results">{results}</ul>
<p class="muted">Read-only; refreshes every {REFRESH_S} s. The same facts as JSON: <a href="/status.json">/status.json</a></p>
</body></html>
"""
