"""Device tokens (contract §13): a credential that speaks for one phone only.

`gpd1.<device_id>.<nonce>.<mac>`: the MAC (HMAC-SHA256, keyed by `auth.device_token_secret`)
covers the device id and a random nonce, so the token is checked without the state store; the
nonce is the device's current one, kept in its state, so issuing a new token, revoking it or
erasing the device makes the old one worthless (checked in the device read the ping path makes
anyway). Secrets are a list, newest first: a token made with an older secret still verifies
until that secret is dropped, so secrets rotate without logging every phone out.
Pure: no I/O, no clock.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from collections.abc import Sequence
from dataclasses import dataclass

PREFIX = "gpd1"
NONCE_BYTES = 16


@dataclass(frozen=True, slots=True)
class DeviceToken:
    device_id: str
    nonce: str


def new_nonce() -> str:
    return _b64(secrets.token_bytes(NONCE_BYTES))


def issue(device_id: str, nonce: str, secret: str) -> str:
    return f"{PREFIX}.{device_id}.{nonce}.{_mac(secret, device_id, nonce)}"


def looks_like_token(text: str) -> bool:
    """A device token's shape (the caller then verifies it; a server key never has it)."""
    return text.startswith(PREFIX + ".")


def verify(token: str, secret_list: Sequence[str]) -> DeviceToken | None:
    """The token's device and nonce when one of the secrets made it; None otherwise. Every
    secret is tried, so the time taken does not tell which one matched."""
    prefix, _, rest = token.partition(".")
    body, _, mac = rest.rpartition(".")
    device_id, _, nonce = body.rpartition(".")
    if prefix != PREFIX or not device_id or not nonce or not mac:
        return None
    presented = mac.encode()
    good = False
    for secret in secret_list:
        good |= hmac.compare_digest(presented, _mac(secret, device_id, nonce).encode())
    return DeviceToken(device_id, nonce) if good else None


def _mac(secret: str, device_id: str, nonce: str) -> str:
    message = f"{PREFIX}.{device_id}.{nonce}".encode()
    return _b64(hmac.new(secret.encode(), message, hashlib.sha256).digest())


def _b64(raw: bytes) -> str:
    # URL-safe and without padding: no '.', so the token splits unambiguously from the right
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()
