"""The credential check as pure functions: the header's format, and the keyring's verdicts over time
(a clock passed in, no sockets). The same checks against a real server are in test_trust."""

from __future__ import annotations

import pytest

from splitlm.cloud_server.auth import Keyring, Refused, enroll, revoke
from splitlm.edge_client.credential import Credential
from splitlm.errors import AuthError, BadMessage
from splitlm.protocol.auth import CLOCK_SKEW_S, parse_header

NOW = 1_800_000_000.0


@pytest.fixture()
def keyring(tmp_path):
    for device in ("alice", "bob"):
        enroll(tmp_path / "auth", device, tmp_path / f"{device}.json")
    return Keyring(tmp_path / "auth"), {d: Credential.load(tmp_path / f"{d}.json") for d in ("alice", "bob")}


@pytest.mark.parametrize("header,words", [
    (None, "no Authorization header"),
    ("Basic YWxpY2U6cHc=", "expected the SplitLM-Ed25519 scheme"),
    ("SplitLM-Ed25519 id=alice, ts=1", "expected id, ts, nonce and sig"),
    ("SplitLM-Ed25519 id=alice, ts=x, nonce=00, sig=AA", "ts must be unix seconds and nonce 32 hex digits"),
    ("SplitLM-Ed25519 id=alice, ts=1, nonce=" + "0" * 32 + ", sig=AAAA", "sig must be a base64url Ed25519 signature"),
    ("SplitLM-Ed25519 id=../etc, ts=1, nonce=" + "0" * 32 + ", sig=" + "A" * 86, "client id: expected 1-64 of"),
])
def test_a_malformed_header_says_what_is_wrong(header, words):
    with pytest.raises(BadMessage, match=words.replace(".", r"\.")) as caught:
        parse_header(header)
    assert caught.value.code == "unauthorized"


def test_a_header_verifies_once_within_the_window_and_never_after(keyring):
    ring, cred = keyring
    header = cred["alice"].header(now=NOW)
    assert ring.verify(header, now=NOW + 1) == "alice"
    with pytest.raises(Refused, match="replayed handshake"):
        ring.verify(header, now=NOW + 2)
    with pytest.raises(Refused, match=r"signed \+61 s from the server's clock"):
        ring.verify(header, now=NOW + CLOCK_SKEW_S + 1)  # its nonce is forgotten by now; its age refuses it
    assert ring._seen == {}  # the replay memory holds only headers still inside the window
    with pytest.raises(Refused, match=r"signed -140 s"):
        ring.verify(cred["bob"].header(now=NOW + 200), now=NOW + 60)  # a device clock ahead beyond the skew


def test_a_signature_made_for_another_id_does_not_verify(keyring):
    ring, cred = keyring
    forged = cred["bob"].header(now=NOW).replace("id=bob", "id=alice")
    with pytest.raises(Refused, match="'alice': the signature does not verify") as caught:
        ring.verify(forged, now=NOW)
    assert caught.value.status == 401


def test_revoke_takes_effect_at_once_and_says_so(keyring, tmp_path):
    ring, cred = keyring
    revoke(tmp_path / "auth", "bob")
    with pytest.raises(Refused, match="'bob': its credential was revoked") as caught:
        ring.verify(cred["bob"].header(now=NOW), now=NOW)
    assert caught.value.status == 403
    enroll(tmp_path / "auth", "bob", tmp_path / "bob-2.json")  # a new credential works, the old one stays revoked
    assert ring.verify(Credential.load(tmp_path / "bob-2.json").header(now=NOW), now=NOW) == "bob"
    with pytest.raises(Refused, match="revoked"):
        ring.verify(cred["bob"].header(now=NOW), now=NOW)


def test_enrolling_twice_or_revoking_a_stranger_is_a_clear_error(keyring, tmp_path):
    with pytest.raises(AuthError, match="'alice' is already enrolled"):
        enroll(tmp_path / "auth", "alice", tmp_path / "again.json")
    with pytest.raises(AuthError, match="'carol' is not enrolled"):
        revoke(tmp_path / "auth", "carol")
    with pytest.raises(AuthError, match="expected a credential written by `splitlm enroll`"):
        Credential.load(tmp_path / "auth" / "devices" / "alice.pub")
