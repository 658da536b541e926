"""Bearer keys with scopes (contract §6): `Authorization: Bearer <key>`.

Keys are compared as SHA-256 digests with hmac.compare_digest against every configured key, so
neither the time to answer nor an early exit tells which key, or how much of one, was right.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Sequence
from dataclasses import dataclass

from aiohttp import web

from geopush.api.errors import Forbidden, Unauthorized
from geopush.config import AuthKey

Scope = str
SCOPES = ("ingest", "devices", "admin")


@dataclass(frozen=True, slots=True)
class _Key:
    name: str
    digest: bytes
    scopes: frozenset[str]


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


class Authenticator:
    def __init__(self, keys: Sequence[AuthKey]) -> None:
        self._keys = tuple(_Key(k.name, _digest(k.key), frozenset(k.scopes)) for k in keys)

    @property
    def enabled(self) -> bool:
        """Without keys every request is allowed, and the server listens on loopback only."""
        return bool(self._keys)

    def check(self, request: web.Request, scope: Scope) -> str | None:
        """The name of the request's key if it may use `scope`; raise 401 or 403 otherwise."""
        if not self._keys:
            return None
        header = request.headers.get("Authorization")
        if header is None:
            raise Unauthorized("missing Authorization header: expected 'Bearer <key>'")
        kind, _, token = header.partition(" ")
        if kind.lower() != "bearer" or not token.strip():
            raise Unauthorized("Authorization header: expected 'Bearer <key>'")
        presented = _digest(token.strip())
        found: _Key | None = None
        for key in self._keys:
            if hmac.compare_digest(presented, key.digest) and found is None:
                found = key
        if found is None:
            raise Unauthorized("unknown API key")
        if scope not in found.scopes:
            raise Forbidden(f"key {found.name!r} does not have the {scope!r} scope this "
                            f"endpoint needs (it has: {', '.join(sorted(found.scopes))})")
        return found.name
