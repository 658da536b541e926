"""Credentials (contract §6, §13): server keys with scopes, and device tokens.

A server key (`auth.keys`) is a backend's: it speaks for any device within its scopes. A device
token (geopush.tokens, issued by POST /v1/devices/{id}/token) is a phone's: it speaks for its
own device's pings, stream and opens only, and nothing else. Both come as
`Authorization: Bearer <credential>` (the client endpoints also take a token from Basic auth's
password or the query string: `credential` takes the raw string).

Keys are compared as SHA-256 digests with hmac.compare_digest against every configured key, so
neither the time to answer nor an early exit tells which key, or how much of one, was right.
A device token is checked by its MAC alone, here, without the state store; whether it is
still the device's current one is checked in the device read the ping path makes anyway
(geopush.service.ingest), so a revoked token costs no extra round trip either.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass

from aiohttp import web

from geopush import tokens
from geopush.config import AuthSettings
from geopush.errors import Forbidden, GeopushError, Unauthorized
from geopush.tokens import DeviceToken

Scope = str
SCOPES = ("ingest", "devices", "admin", "relay")
DEVICE_TOKEN = "device-token"  # the credential name of every device token (logs never hold ids)


class NotConfigured(GeopushError):
    """Device tokens were asked for, but auth.device_token_secret is empty."""

    code = "not_configured"
    http_status = 409


@dataclass(frozen=True, slots=True)
class Credential:
    """Who sent a request: a server key (its name and scopes), a device token (the one device it
    speaks for), or nobody (no auth.keys: loopback only, everything allowed)."""

    name: str | None  # the key's name; DEVICE_TOKEN; None without auth.keys
    scopes: frozenset[str]
    token: DeviceToken | None = None

    @property
    def device_id(self) -> str | None:
        """The one device this credential may send for; None: any device."""
        return self.token.device_id if self.token is not None else None

    @property
    def identity(self) -> str:
        """Stable per credential, for counting requests per credential (rate limits). Holds a
        device id for a device token: never log it."""
        if self.token is not None:
            return f"device:{self.token.device_id}"
        return f"key:{self.name}" if self.name is not None else "keyless"


KEYLESS = Credential(None, frozenset(SCOPES))


@dataclass(frozen=True, slots=True)
class _Key:
    name: str
    digest: bytes
    scopes: frozenset[str]


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


_BEARER = "expected 'Bearer <key>'"
_INVALID_TOKEN = ("device token not valid: not issued here, damaged, or made with a secret that "
                  "is no longer in auth.device_token_secret; ask your backend for a new one")


class Authenticator:
    def __init__(self, settings: AuthSettings) -> None:
        self._keys = tuple(_Key(k.name, _digest(k.key), frozenset(k.scopes))
                           for k in settings.keys)
        self._secrets = tuple(settings.device_token_secret)
        self._required = settings.device_tokens == "required"

    @property
    def enabled(self) -> bool:
        """Without keys every request is allowed, and the server listens on loopback only."""
        return bool(self._keys)

    def issue(self, device_id: str, nonce: str) -> str:
        """A device token for `device_id` and its new nonce, made with the newest secret."""
        if not self._secrets:
            raise NotConfigured("device tokens are off: set auth.device_token_secret (a list of "
                                "random secrets of 32+ characters, newest first)")
        return tokens.issue(device_id, nonce, self._secrets[0])

    def check(self, request: web.Request, scope: Scope) -> str | None:
        """The name of the request's server key if it may use `scope`; raise 401 or 403
        otherwise (a device token: 403, it speaks for its device's pings only)."""
        if not self._keys:
            return None
        presented = bearer(request)
        if tokens.looks_like_token(presented):
            if self._verify(presented) is None:
                raise Unauthorized(_INVALID_TOKEN)
            raise Forbidden(f"a device token may send its own device's pings, stream and "
                            f"opens only: this endpoint needs a server key with the {scope!r} "
                            "scope")
        found = self._find(presented)
        if scope not in found.scopes:
            raise _no_scope(found, scope)
        return found.name

    def ping_credential(self, request: web.Request, *, server_keys: bool = True,
                        relay: bool = True) -> Credential:
        """The credential of a ping endpoint's request, from `Authorization: Bearer`: see
        `credential`. Without auth.keys a request without a device token is allowed (KEYLESS),
        unless `server_keys` is False."""
        try:
            presented = bearer(request)
        except Unauthorized:
            if not self._keys and server_keys:
                return KEYLESS
            raise
        return self.credential(presented, server_keys=server_keys, relay=relay)

    def credential(self, presented: str, *, server_keys: bool = True,
                   relay: bool = True) -> Credential:
        """The credential a raw string stands for (a Bearer value, Basic auth's password, a
        query parameter), for an endpoint that takes pings (or opens):

        - a device token: its device's alone, if its MAC is right (401 if not; whether it was
          revoked is found in the device's read, later);
        - a server key, when `server_keys`: one with the `ingest` scope, or the `relay` scope
          where `relay` (/v1/pings, /v1/stream); with `auth.device_tokens: required` only a
          relay key (403 for an ingest key). Without auth.keys anything that is not a device
          token is KEYLESS.
        With `server_keys` False (OwnTracks' password, OsmAnd) only a device token will do:
        a server key there is 401, as if unknown, even without auth.keys."""
        if tokens.looks_like_token(presented):
            token = self._verify(presented)
            if token is None:
                raise Unauthorized(_INVALID_TOKEN)
            return Credential(DEVICE_TOKEN, frozenset(), token)
        if not server_keys:
            raise Unauthorized("not a device token: this endpoint takes a device token only "
                               "(POST /v1/devices/{id}/token issues one), never a server key")
        if not self._keys:
            return KEYLESS
        found = self._find(presented)
        scopes = found.scopes
        if relay and "relay" in scopes:
            return Credential(found.name, scopes)
        if self._required:
            raise Forbidden(
                f"key {found.name!r} may not send pings: auth.device_tokens is required, so "
                "phones must use their device tokens, and a backend relaying pings needs a key "
                "with the 'relay' scope")
        if "ingest" not in scopes:
            raise _no_scope(found, "ingest")
        return Credential(found.name, scopes)

    def _verify(self, presented: str) -> DeviceToken | None:
        return tokens.verify(presented, self._secrets) if self._secrets else None

    def _find(self, presented: str) -> _Key:
        digest = _digest(presented)
        found: _Key | None = None
        for key in self._keys:
            if hmac.compare_digest(digest, key.digest) and found is None:
                found = key
        if found is None:
            raise Unauthorized("unknown API key")
        return found


def bearer(request: web.Request) -> str:
    header = request.headers.get("Authorization")
    if header is None:
        raise Unauthorized(f"missing Authorization header: {_BEARER}")
    kind, _, presented = header.partition(" ")
    if kind.lower() != "bearer" or not presented.strip():
        raise Unauthorized(f"Authorization header: {_BEARER}")
    return presented.strip()


def _no_scope(key: _Key, scope: Scope) -> Forbidden:
    return Forbidden(f"key {key.name!r} does not have the {scope!r} scope this endpoint needs "
                     f"(it has: {', '.join(sorted(key.scopes))})")
