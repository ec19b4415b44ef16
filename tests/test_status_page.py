"""The status page, loaded by a real headless Chromium during a real two-device split run, checked
against what the server wrote (OUT/steps.jsonl, round-NNNN/metrics.json) and what each device's
own meter counted (edge --metrics-out)."""

from __future__ import annotations

import http.client
import json
import re
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from html.parser import HTMLParser

import pytest

from splitlm.demo import write_ledger_data
from splitlm.protocol import Bye, encode

from .conftest import ServerProcess, edge_cmd

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
STEPS, PER_ROUND = 20, 10
HOLD_S = 8  # the first round waits this long for a third device that never comes: the page sees a run mid-way
IDS = ("dev-a", "<i>dev-b</i>")  # the second id is markup: the page must show it as text


def chromium(url: str, *, screenshot=None) -> str:
    """The page's DOM after Chromium loaded it (and a PNG if asked)."""
    args = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--window-size=1280,1400"]
    if screenshot is not None:
        subprocess.run([*args, f"--screenshot={screenshot}", url], capture_output=True, timeout=60, check=True)
    return subprocess.run([*args, "--dump-dom", url], capture_output=True, text=True, timeout=60, check=True).stdout


class Rows(HTMLParser):
    """Table rows by `data-client` / `data-round`, each {td class: text}; and every tag seen."""

    def __init__(self, dom: str):
        super().__init__()
        self.devices, self.rounds, self.tags, self.ids = {}, {}, [], {}
        self._row = self._cell = None
        self._id = None
        self.feed(dom)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append(tag)
        if tag == "tr" and ("data-client" in a or "data-round" in a):
            self._row = {}
            key = ("devices", a["data-client"]) if "data-client" in a else ("rounds", int(a["data-round"]))
            getattr(self, key[0])[key[1]] = self._row
        elif tag == "td" and self._row is not None:
            self._cell = a.get("class") or f"col{len(self._row)}"
            self._row[self._cell] = ""
        if "id" in a:
            self._id = (a["id"], tag)
            self.ids.setdefault(a["id"], "")

    def handle_endtag(self, tag):
        if tag == "tr":
            self._row = None
        if tag == "td":
            self._cell = None
        if self._id is not None and tag == self._id[1]:
            self._id = None

    def handle_data(self, data):
        if self._row is not None and self._cell is not None:
            self._row[self._cell] += data
        if self._id is not None:
            self.ids[self._id[0]] += data


def steps_by_client(out) -> dict[str, list[dict]]:
    rows: dict[str, list[dict]] = {}
    for line in (out / "steps.jsonl").read_text().splitlines():
        r = json.loads(line)
        rows.setdefault(r["client"], []).append(r)
    return rows


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (the README's test command installs it)")
def test_status_page_in_chromium_during_a_two_device_run(tiny_llama, tiny_bundle, tmp_path):
    bundle = tiny_bundle("server")
    m = bundle.manifest
    data = write_ledger_data(tmp_path / "data", clients=2, per_client=40, held_out=4)
    out = tmp_path / "out"
    server = ServerProcess(str(tiny_llama), "--cut", str(m.cut), "--labels", m.labels, "--lora-rank",
                           str(m.lora.rank), "--wire", "f32", "--steps-per-round", str(PER_ROUND), "--out", str(out),
                           "--min-clients", "3", "--round-deadline", str(HOLD_S))
    page = server.url.replace("ws://", "http://") + "/status"
    edges = []
    try:
        for _ in range(50):  # the line after "listening on", read by the log thread
            if f"status page: {page}" in server.log():
                break
            time.sleep(0.1)
        assert f"status page: {page}" in server.log()
        edges = [subprocess.Popen(edge_cmd(server.url, bundle.path, data[i], "--steps", str(STEPS), "--batch-size",
                                           "2", "--seq-len", "32", "--threads", "1", "--client-id", cid,
                                           "--metrics-out", str(tmp_path / f"edge-{i}.jsonl")),
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                 for i, cid in enumerate(IDS)]
        # --- during the run (both devices at the end of round 0, waiting for its average): what Chromium shows is
        # what the server had written at that moment
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if (out / "steps.jsonl").exists() and len((out / "steps.jsonl").read_text().splitlines()) >= 2 * PER_ROUND:
                break
            time.sleep(0.2)
        live = Rows(chromium(page, screenshot=tmp_path / "status-live.png"))
        written = steps_by_client(out)
        assert [row["state"] for row in live.devices.values()] == ["connected", "connected"], live.devices
        assert not (out / "round-0000").exists() and not live.rounds
        for cid, row in live.devices.items():
            assert (int(row["steps"]), int(row["last-step"])) == (PER_ROUND, PER_ROUND - 1)
            assert row["loss"] == f"{written[cid][-1]['loss']:.4f}"
        assert (tmp_path / "status-live.png").stat().st_size > 10_000  # a rendered page, not a blank one

        for e in edges:
            assert e.wait(timeout=240) == 0, e.stdout.read()

        # --- after both devices finished (the server still serves): the whole run, exactly
        final = Rows(chromium(page, screenshot=tmp_path / "status-final.png"))
        with urllib.request.urlopen(page + ".json", timeout=10) as r:
            assert r.headers["Content-Type"] == "application/json"
            snap = json.load(r)
        written = steps_by_client(out)
        assert sorted(final.devices) == sorted(IDS) == sorted(written)
        assert "i" not in final.tags  # the markup in a client id stayed text
        for i, cid in enumerate(IDS):
            row, lines = final.devices[cid], written[cid]
            dev = next(d for d in snap["devices"] if d["client_id"] == cid)
            assert [r["step"] for r in lines] == list(range(STEPS))
            assert (row["state"], int(row["steps"]), int(row["last-step"])) == ("gone", STEPS, STEPS - 1)
            assert row["loss"] == f"{lines[-1]['loss']:.4f}"
            assert dev["losses"] == [[r["step"], r["loss"]] for r in lines]
            # the server's frame bytes for this device equal what the device's own meter counted, plus the
            # closing bye (sent after the device's last meter record; seq = hello + forwards + adapters)
            meter = [json.loads(x) for x in (tmp_path / f"edge-{i}.jsonl").read_text().splitlines()]
            bye = len(encode(Bye(reason="done"), seq=1 + STEPS + STEPS // PER_ROUND))
            assert dev["bytes_in"] == sum(r["bytes_up"] for r in meter) + bye
            assert dev["bytes_out"] == sum(r["bytes_down"] for r in meter)
            assert 0 < dev["device_s"] < sum(r["wall_s"] for r in meter)
        rounds = sorted(p for p in out.glob("round-*"))
        assert len(rounds) == STEPS // PER_ROUND and sorted(final.rounds) == list(range(len(rounds)))
        for folder in rounds:
            metrics = json.loads((folder / "metrics.json").read_text())
            assert final.rounds[metrics["round"]]["round-loss"] == f"{metrics['mean_loss']:.4f}"
        assert re.search(rf"round {len(rounds)}\b", final.ids["round"])
        assert final.ids["out"] == str(out)
        assert final.ids["connected"].startswith("0 device")

        # --- read-only: anything but GET /status(.json) is no page, and the server goes on
        post = urllib.request.Request(page, data=b"x", method="POST")
        with pytest.raises((urllib.error.HTTPError, http.client.RemoteDisconnected)):  # websockets parses GET only
            urllib.request.urlopen(post, timeout=10)
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(server.url.replace("ws://", "http://") + "/", timeout=10)
        assert err.value.code == 426  # a websocket endpoint, not a page
        with urllib.request.urlopen(page + ".json", timeout=10) as r:
            assert json.load(r)["round"] == len(rounds)
    finally:
        for e in edges:
            e.kill()
        assert server.stop() == 0, server.log()


def test_a_fedavg_snapshot_renders_rounds_with_bytes_and_skips_a_nan_loss():
    from splitlm.cloud_server.status import render, status_json

    rounds = [{"round": 0, "loss": float("nan"), "samples": 80, "clients": ["a", "b"], "bytes_up": 2_500_000,
               "bytes_down": 2_400_000, "time": 0.0},
              {"round": 1, "loss": 3.25, "samples": 80, "clients": ["a", "b"], "bytes_up": 2_500_000,
               "bytes_down": 2_400_000, "time": 1.0}]
    device = {"client_id": "a", "connected": True, "since": 0.0, "n_samples": 40, "steps": 0, "reports": 2,
              "last_step": None, "last_loss": None, "bytes_in": 5_000_000, "bytes_out": 4_800_000,
              "bytes_in_per_unit": 2_500_000, "bytes_out_per_unit": 2_400_000, "device_s": 8.0,
              "device_s_per_unit": 4.0, "losses": []}
    page = Rows(render({"mode": "fedavg", "unit": "round", "describe": "tiny", "started": 0.0, "now": 9.0,
                        "uptime_s": 9.0, "round": 2, "rounds": 3, "global_step": None, "connected": 1, "out": None,
                        "results": [], "devices": [device], "round_history": rounds}))
    assert page.rounds[1]["round-loss"] == "3.2500" and page.rounds[0]["round-loss"] == "–"
    assert [page.rounds[1][c] for c in ("col4", "col5")] == ["2.50 MB", "2.40 MB"]
    assert (page.devices["a"]["steps"], page.devices["a"]["up-per-unit"], page.devices["a"]["device-s"]) == \
        ("2", "2.50 MB", "4.000")
    assert page.ids["round"] == "round 2 of 3"
    # /status.json: the NaN is null (json's allow_nan=False would make the request fail), the rest kept
    snap = {"mode": "fedavg", "round_history": rounds, "devices": [device], "inf": (float("inf"), 1.5)}
    back = json.loads(status_json(snap))
    assert [r["loss"] for r in back["round_history"]] == [None, 3.25] and back["inf"] == [None, 1.5]
    assert back["devices"][0]["bytes_in"] == 5_000_000
