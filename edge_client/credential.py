"""A device's credential (from `splitlm enroll`) and its TLS trust: what `connect` presents.

The credential file is JSON: {"format", "client_id", "private_key": PEM PKCS#8 Ed25519}. It stays
on the device; every connection signs a fresh (timestamp, nonce) with it (protocol.auth).
"""

from __future__ import annotations

import json
import os
import secrets
import ssl
import time
from dataclasses import dataclass
from pathlib import Path

from splitlm.errors import AuthError
from splitlm.protocol.auth import AuthHeader, check_client_id, format_header, signed_payload

FORMAT = "splitlm-credential-v1"


@dataclass(frozen=True)
class Credential:
    client_id: str
    private_key: object  # cryptography's Ed25519PrivateKey

    @classmethod
    def load(cls, path: Path) -> "Credential":
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
        from cryptography.hazmat.primitives.serialization import load_pem_private_key

        try:
            raw = json.loads(Path(path).read_text())
            if raw.get("format") != FORMAT:
                raise ValueError(f"format: expected {FORMAT!r}, got {raw.get('format')!r}")
            key = load_pem_private_key(raw["private_key"].encode(), password=None)
            if not isinstance(key, Ed25519PrivateKey):
                raise ValueError("private_key: expected an Ed25519 key")
            return cls(check_client_id(raw["client_id"]), key)
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise AuthError(f"--credential {path}: expected a credential written by `splitlm enroll` ({e})") from e

    def header(self, *, now: float | None = None) -> str:
        """A fresh Authorization header value: signed now, with a nonce never used before."""
        ts, nonce = int(time.time() if now is None else now), secrets.token_hex(16)
        sig = self.private_key.sign(signed_payload(self.client_id, ts, nonce))
        return format_header(AuthHeader(self.client_id, ts, nonce, sig))


def write_credential(path: Path, client_id: str, private_key_pem: bytes) -> None:
    """The device's credential file, readable by its owner only."""
    text = json.dumps({"format": FORMAT, "client_id": client_id, "private_key": private_key_pem.decode()}, indent=1)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text + "\n")


def client_tls(url: str, ca: Path | None) -> ssl.SSLContext | None:
    """For wss://: verify the server against `ca` (a lab CA from `splitlm certs`) or the system's
    trust store. None for ws://."""
    if not url.startswith("wss://"):
        if ca is not None:
            raise AuthError(f"--ca is for wss:// servers; {url} is plain ws://")
        return None
    try:
        return ssl.create_default_context(cafile=str(ca) if ca else None)
    except (OSError, ssl.SSLError) as e:
        raise AuthError(f"--ca {ca}: cannot read a PEM CA certificate ({e})") from e
