"""What the HTTP senders (fcm, webhook) share: one keep-alive pool each, and the reading of a
failed connection as a SendResult.

The session is opened on first use, not in the constructor: aiohttp binds a connector to the
running loop, and a sender may be built before the loop runs (`build_sender` at start-up).
"""

from __future__ import annotations

import aiohttp

from geopush.delivery.senders.base import SendResult

DEFAULT_TIMEOUT_S = 10.0  # per attempt, connect included: a hung send must not hold a worker slot
DEFAULT_POOL_LIMIT = 100  # open connections per sender; the worker bounds concurrency too
_MESSAGE_CHARS = 300
HIDDEN = "<redacted>"


class HttpPool:
    """One aiohttp session with a bounded keep-alive connection pool."""

    def __init__(self, *, limit: int = DEFAULT_POOL_LIMIT, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        if limit < 1:
            raise ValueError(f"pool limit must be at least 1, got {limit}")
        if not timeout_s > 0:
            raise ValueError(f"timeout must be positive, got {timeout_s}")
        self.limit = limit
        self.timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._session: aiohttp.ClientSession | None = None
        self._closed = False

    def session(self) -> aiohttp.ClientSession:
        if self._closed:
            raise RuntimeError("the sender is closed")
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self.limit),
                timeout=self.timeout,
                headers={"User-Agent": "geopush"},
            )
        return self._session

    async def close(self) -> None:
        self._closed = True
        if self._session is not None:
            await self._session.close()
            self._session = None


def transport_failure(exc: BaseException, *secrets: str) -> SendResult:
    """No answer: a timeout or a connection refused, reset or closed before the answer. The
    push may or may not have arrived; sending again is safe (the push_id collapses duplicates)."""
    # ServerTimeoutError is also a ClientConnectionError: test the timeout first
    code = "timeout" if isinstance(exc, TimeoutError) else "connection"
    return SendResult("retry", code=code, message=scrubbed(f"{type(exc).__name__}: {exc}", *secrets))


def scrubbed(text: str, *secrets: str) -> str:
    """`text` cut short, with every secret (a push token, an access token) taken out: messages
    end up in logs and reports, and an answer may quote what it was sent."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, HIDDEN)
    return text if len(text) <= _MESSAGE_CHARS else text[: _MESSAGE_CHARS - 1] + "…"
