"""Error codes carried by the `error` message, and the errors the wire raises.

Every `BadMessage` that `decode` raises carries a `code` attribute naming the `error` code a
peer should be sent: "bad_message", "version" or "too_large". `error_code` maps any
exception to a code, for the one place a server turns an exception into an `error` message.
"""

from __future__ import annotations

from splitlm.errors import BadMessage, BundleMismatch, FrameTooLarge

ERROR_CODES = (
    "bad_message",      # a frame that does not decode or validate
    "version",          # a protocol version this side does not speak
    "too_large",        # a frame over the receiver's max_frame_bytes
    "bundle_mismatch",  # the client's bundle is not the model / cut / LoRA spec served
    "server_full",      # no room for another client
    "already_connected",  # a live session for this client id exists
    "unauthorized",     # no credential, or one that does not verify (also HTTP 401 before the upgrade)
    "identity",         # a hello claiming another client id than the credential's
    "internal",         # anything else; the peer is not at fault
)


def bad(text: str, *, code: str = "bad_message") -> BadMessage:
    """A BadMessage carrying `code`, ready to raise."""
    err = BadMessage(text)
    err.code = code
    return err


def too_large(text: str) -> FrameTooLarge:
    """A FrameTooLarge carrying code "too_large", ready to raise."""
    err = FrameTooLarge(text)
    err.code = "too_large"
    return err


def error_code(exc: BaseException) -> str:
    """The `error` code to send a peer for `exc`."""
    if isinstance(exc, BundleMismatch):
        return "bundle_mismatch"
    if isinstance(exc, FrameTooLarge):
        return "too_large"
    if isinstance(exc, BadMessage):
        return getattr(exc, "code", "bad_message")
    return "internal"
