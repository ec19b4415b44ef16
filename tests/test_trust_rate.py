"""The per-address attempt limit, on its own auth + TLS server (no training beside it, so the only
thing measured is the gate)."""

from __future__ import annotations

import ssl
import time

import pytest

from .conftest import ServerProcess, run_cli
from .test_trust import refused_with


@pytest.fixture(scope="module")
def gated(tiny_llama, tmp_path_factory):
    root = tmp_path_factory.mktemp("rate")
    done = run_cli("enroll", "bob", "--auth", str(root / "auth"), "--out", str(root / "bob.json"))
    assert done.returncode == 0, done.stderr
    done = run_cli("certs", "--out", str(root / "tls"), "--host", "localhost", "127.0.0.1")
    assert done.returncode == 0, done.stderr
    server = ServerProcess(str(tiny_llama), "--cut", "2", "--lora-rank", "4", "--auth", str(root / "auth"),
                           "--tls-cert", str(root / "tls/server.pem"), "--tls-key", str(root / "tls/server.key"),
                           "--max-attempts", "20")
    yield dict(server=server, tls=ssl.create_default_context(cafile=str(root / "tls/ca.pem")))
    server.stop()


def test_an_address_over_its_attempt_rate_is_turned_away(gated):
    """--max-attempts 20: 127.0.0.2 (also loopback) burns its budget; 127.0.0.1 is untouched."""
    t0 = time.monotonic()
    for _ in range(20):
        refused_with(gated, 401, "no Authorization header", source_address=("127.0.0.2", 0))
    assert time.monotonic() - t0 < 55, "too slow to fill the 60 s window on this machine"
    refused_with(gated, 429, "too many connection attempts from 127.0.0.2: 20 in the last 60 s",
                 source_address=("127.0.0.2", 0))
    refused_with(gated, 401, "no Authorization header")  # 127.0.0.1 has its own budget
