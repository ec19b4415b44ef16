"""The device's credential on the wire, before the websocket opens (sans-I/O: strings and bytes).

A device proves who it is with one HTTP header on the upgrade request:

    Authorization: SplitLM-Ed25519 id=<client_id>, ts=<unix seconds>, nonce=<32 hex>, sig=<base64url>

`sig` is the device's Ed25519 signature over `signed_payload(id, ts, nonce)`. The server holds only
the device's public key; it admits a header whose signature verifies, whose `ts` is within
`CLOCK_SKEW_S` of its clock, and whose nonce it has not seen in that window (so a recorded header
cannot be replayed). Signing lives in `edge_client.credential`, checking in `cloud_server.auth`;
this module is the contract between them.
"""

from __future__ import annotations

import base64
import re
from dataclasses import dataclass

from .codes import bad

SCHEME = "SplitLM-Ed25519"
CONTEXT = b"splitlm-auth-v1"   # domain separation: this signature means "open a session", nothing else
CLOCK_SKEW_S = 60              # a header's ts may be this far from the server's clock, either way
CLIENT_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


@dataclass(frozen=True)
class AuthHeader:
    client_id: str
    ts: int          # unix seconds when the device signed
    nonce: str       # 32 lowercase hex digits, fresh for every connection
    sig: bytes       # 64-byte Ed25519 signature over signed_payload(client_id, ts, nonce)


def check_client_id(client_id: str) -> str:
    if not isinstance(client_id, str) or not CLIENT_ID.fullmatch(client_id):
        raise bad(f"client id: expected 1-64 of A-Z a-z 0-9 . _ - (starting with a letter or digit), "
                  f"got {client_id!r}", code="unauthorized")
    return client_id


def signed_payload(client_id: str, ts: int, nonce: str) -> bytes:
    return b"\n".join([CONTEXT, client_id.encode(), str(int(ts)).encode(), nonce.encode()])


def format_header(h: AuthHeader) -> str:
    sig = base64.urlsafe_b64encode(h.sig).decode().rstrip("=")
    return f"{SCHEME} id={h.client_id}, ts={h.ts}, nonce={h.nonce}, sig={sig}"


def parse_header(text: str | None) -> AuthHeader:
    """The header's fields, or BadMessage (code "unauthorized") saying what is wrong with it."""
    if not text:
        raise bad("no Authorization header: this server admits enrolled devices only "
                  "(run the device with --credential FILE from `splitlm enroll`)", code="unauthorized")
    scheme, _, rest = text.strip().partition(" ")
    if scheme != SCHEME:
        raise bad(f"Authorization: expected the {SCHEME} scheme, got {scheme[:32]!r}", code="unauthorized")
    fields = dict(part.strip().partition("=")[::2] for part in rest.split(","))
    if sorted(fields) != ["id", "nonce", "sig", "ts"]:
        raise bad(f"Authorization: expected id, ts, nonce and sig, got {sorted(fields)[:8]}", code="unauthorized")
    if not re.fullmatch(r"[0-9]{1,12}", fields["ts"]) or not re.fullmatch(r"[0-9a-f]{32}", fields["nonce"]):
        raise bad("Authorization: ts must be unix seconds and nonce 32 hex digits", code="unauthorized")
    try:
        sig = base64.urlsafe_b64decode(fields["sig"] + "=" * (-len(fields["sig"]) % 4))
    except ValueError:
        sig = b""
    if len(sig) != 64:
        raise bad("Authorization: sig must be a base64url Ed25519 signature (64 bytes)", code="unauthorized")
    return AuthHeader(check_client_id(fields["id"]), int(fields["ts"]), fields["nonce"], sig)
