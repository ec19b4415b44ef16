"""Who may open a connection: enrolment, the credential check, and per-address limits.

Everything here runs in websockets' `process_request`, before the upgrade, so a refused attempt
costs one HTTP exchange and never reaches a strategy. `Gate.process_request` answers, in order:

    429  this address made more than `max_attempts` attempts in the last `ATTEMPT_WINDOW_S`
    503  `max_connections` connections are open (handshakes included)
    401  no credential, a malformed one, a signature that does not verify, a stale or replayed one
    403  a revoked credential, or an id nobody enrolled
    None admitted: `connection.username` is the credential's client id

The auth folder (`splitlm enroll ... --auth DIR`) holds public keys only, nothing secret:

    DIR/devices/<client_id>.pub     the enrolled device's Ed25519 public key (PEM)
    DIR/revoked/<client_id>.<fingerprint>.pub   keys that `--revoke` withdrew

Files are read at each attempt, so enrol and revoke take effect without a restart.
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict, deque
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path

from splitlm.errors import AuthError, BadMessage
from splitlm.protocol.auth import (CLOCK_SKEW_S, SCHEME, AuthHeader, check_client_id, parse_header,
                                   signed_payload)

ATTEMPT_WINDOW_S = 60.0
MAX_TRACKED_ADDRESSES = 10_000


# ---------------------------------------------------------------- enrolment (the CLI's side)

def enroll(auth_dir: Path, client_id: str, out: Path) -> str:
    """A new key pair: the public half into the auth folder, the credential (private half) into
    `out`. Returns the key's fingerprint."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from splitlm.atomic import write_atomic
    from splitlm.edge_client.credential import write_credential

    _valid_id(client_id)
    pub_path = Path(auth_dir) / "devices" / f"{client_id}.pub"
    if pub_path.exists():
        raise AuthError(f"{client_id!r} is already enrolled in {auth_dir}; `splitlm enroll {client_id} --auth "
                        f"{auth_dir} --revoke` first to issue a new credential")
    key = Ed25519PrivateKey.generate()
    pem = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    write_credential(out, client_id, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                       serialization.NoEncryption()))
    write_atomic(pub_path, lambda f: f.write(pem))
    return fingerprint(pem)


def revoke(auth_dir: Path, client_id: str) -> str:
    """Withdraw `client_id`'s key: it moves to revoked/, so the server can say why it refuses it."""
    _valid_id(client_id)
    pub_path = Path(auth_dir) / "devices" / f"{client_id}.pub"
    if not pub_path.is_file():
        raise AuthError(f"{client_id!r} is not enrolled in {auth_dir}: nothing to revoke")
    pem = pub_path.read_bytes()
    gone = Path(auth_dir) / "revoked" / f"{client_id}.{fingerprint(pem)}.pub"
    gone.parent.mkdir(parents=True, exist_ok=True)
    pub_path.replace(gone)
    return fingerprint(pem)


def fingerprint(pem: bytes) -> str:
    return hashlib.sha256(pem).hexdigest()[:16]


def _valid_id(client_id: str) -> None:
    try:
        check_client_id(client_id)
    except BadMessage as e:
        raise AuthError(str(e)) from e


# ---------------------------------------------------------------- checking (the server's side)

class Refused(Exception):
    def __init__(self, status: HTTPStatus, message: str):
        super().__init__(message)
        self.status = status


class Keyring:
    """The auth folder, read at each check; verifies a header and remembers its nonce."""

    def __init__(self, auth_dir: Path, *, skew_s: float = CLOCK_SKEW_S):
        self.dir, self.skew_s = Path(auth_dir), skew_s
        if not (self.dir / "devices").is_dir():
            raise AuthError(f"--auth {auth_dir}: no devices/ folder; enrol a device first "
                            f"(`splitlm enroll CLIENT_ID --auth {auth_dir} --out CREDENTIAL`)")
        self._seen: OrderedDict[tuple[str, str], float] = OrderedDict()  # (id, nonce) -> when it expires

    def verify(self, text: str | None, *, now: float | None = None) -> str:
        """The client id `text` (an Authorization header) proves, or Refused."""
        now = time.time() if now is None else now
        self._expire(now)
        try:
            h = parse_header(text)
        except BadMessage as e:
            raise Refused(HTTPStatus.UNAUTHORIZED, str(e)) from e
        if self._signed_by(h, self.dir / "revoked", f"{h.client_id}.*.pub"):
            raise Refused(HTTPStatus.FORBIDDEN, f"device {h.client_id!r}: its credential was revoked on this server; "
                                                "enrol the device again for a new one")
        enrolled = self.dir / "devices" / f"{h.client_id}.pub"
        if not enrolled.is_file():
            raise Refused(HTTPStatus.FORBIDDEN, f"no device {h.client_id!r} is enrolled on this server")
        if not self._signed_by(h, self.dir / "devices", f"{h.client_id}.pub"):
            raise Refused(HTTPStatus.UNAUTHORIZED, f"device {h.client_id!r}: the signature does not verify against "
                                                   "its enrolled key (a credential from another enrolment or server?)")
        if abs(now - h.ts) > self.skew_s:
            raise Refused(HTTPStatus.UNAUTHORIZED, f"device {h.client_id!r}: the handshake was signed {now - h.ts:+.0f} s "
                                                   f"from the server's clock (allowed ±{self.skew_s:.0f} s): a stale "
                                                   "or replayed handshake, or the device's clock is off")
        if (h.client_id, h.nonce) in self._seen:
            raise Refused(HTTPStatus.UNAUTHORIZED, f"device {h.client_id!r}: replayed handshake (this signed nonce was "
                                                   "already used; every connection signs a fresh one)")
        self._seen[h.client_id, h.nonce] = h.ts + self.skew_s  # after that, ts alone refuses it
        return h.client_id

    @staticmethod
    def _signed_by(h: AuthHeader, folder: Path, pattern: str) -> bool:
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives.serialization import load_pem_public_key

        for path in folder.glob(pattern) if folder.is_dir() else ():
            try:
                load_pem_public_key(path.read_bytes()).verify(h.sig, signed_payload(h.client_id, h.ts, h.nonce))
                return True
            except (InvalidSignature, ValueError, OSError):
                continue
        return False

    def _expire(self, now: float) -> None:
        """Forget nonces whose timestamps have left the window (insertion order ~ time order)."""
        while self._seen and next(iter(self._seen.values())) < now:
            self._seen.popitem(last=False)


@dataclass
class GateLimits:
    max_connections: int = 64        # open sockets, handshakes included
    max_attempts: int = 120          # connection attempts per address per ATTEMPT_WINDOW_S


class Gate:
    """websockets' process_request: rate limit, connection cap, credential. The shell calls
    `process_request(connection, request)`; an HTTP status page can go behind the same gate."""

    def __init__(self, *, keyring: Keyring | None, limits: GateLimits, log=print):
        self.keyring, self.limits, self.log = keyring, limits, log
        self._attempts: OrderedDict[str, deque] = OrderedDict()  # address -> attempt times, in the window
        self._told: dict[str, float] = {}  # address -> when its last 429 was logged (once a window, not per attempt)
        self.refused = 0

    def process_request(self, connection, request):
        try:
            self._count_attempt(connection.remote_address[0] if connection.remote_address else "?")
            if len(connection.server.all_connections) > self.limits.max_connections:
                raise Refused(HTTPStatus.SERVICE_UNAVAILABLE,
                              f"server busy: {self.limits.max_connections} connections open; try again later")
            if self.keyring is not None:
                connection.username = self.keyring.verify(request.headers.get("Authorization"))
        except Refused as e:
            self.refused += 1
            address = connection.remote_address[0] if connection.remote_address else "?"
            if self._worth_logging(address, e.status):
                self.log(f"refused a connection from {address}: HTTP {e.status.value}: {e}")
            response = connection.respond(e.status, str(e) + "\n")
            if e.status == HTTPStatus.UNAUTHORIZED:
                response.headers["WWW-Authenticate"] = SCHEME
            return response
        return None

    def _worth_logging(self, address: str, status: HTTPStatus) -> bool:
        """Every refusal but 429, which is logged once a window per address (a flood is one line)."""
        if status != HTTPStatus.TOO_MANY_REQUESTS:
            return True
        now = time.monotonic()
        if now - self._told.get(address, -ATTEMPT_WINDOW_S) < ATTEMPT_WINDOW_S:
            return False
        self._told[address] = now
        if len(self._told) > MAX_TRACKED_ADDRESSES:
            self._told.clear()
        return True

    def _count_attempt(self, address: str, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        times = self._attempts.pop(address, None) or deque()
        self._attempts[address] = times  # most recent last: the oldest address is evicted first
        while times and times[0] < now - ATTEMPT_WINDOW_S:
            times.popleft()
        if len(times) >= self.limits.max_attempts:
            raise Refused(HTTPStatus.TOO_MANY_REQUESTS,
                          f"too many connection attempts from {address}: {self.limits.max_attempts} in the last "
                          f"{ATTEMPT_WINDOW_S:.0f} s; wait and retry")
        times.append(now)
        while len(self._attempts) > MAX_TRACKED_ADDRESSES:
            self._attempts.popitem(last=False)


def server_tls(cert: Path, key: Path):
    """The ssl context `serve --tls-cert/--tls-key` listens with (TLS 1.2+)."""
    import ssl

    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(str(cert), str(key))
    except (OSError, ssl.SSLError) as e:
        raise AuthError(f"--tls-cert {cert} / --tls-key {key}: cannot load them as a PEM certificate chain and "
                        f"its key ({e})") from e
    return ctx
