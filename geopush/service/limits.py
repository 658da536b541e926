"""Requests per credential and instance (contract §13, `limits.key_requests_per_second`).

A token bucket per credential, in this process only (each instance allows its own rate: a
balancer in front spreads a client over them), with a burst of one second's worth. Credentials
are opaque strings, the API key's name today and per device with device tokens, so the table is
bounded: a full bucket is the same as none, and full ones are dropped whenever the table has
doubled since the last sweep. The clock is passed in (`now`, monotonic seconds), so the bucket
is pure arithmetic and tested with tables.

Each bucket is one number, as the per-device ping bucket (geopush.geo.transitions, PING RATE
LIMIT): the time it was, or would have been, empty; its level at `now` is
min(burst, (now - empty) * rate).
"""

from __future__ import annotations

import math

KEYLESS = ""  # without configured keys, every request is one credential's
_SLACK_S = 1e-6  # the sums of intervals drift by float rounding: a burst keeps its last request
_FIRST_SWEEP_AT = 1024


class RequestLimiter:
    def __init__(self, per_second: float | None) -> None:
        """`per_second` None or 0: no limit (`admit` always says 0)."""
        self.per_second = per_second or None
        self._interval = 1.0 / per_second if per_second else 0.0
        # a burst of one second's worth, and at least one request
        self._burst_s = max(1.0, per_second or 0.0) * self._interval
        self._empty: dict[str, float] = {}
        self._sweep_at = _FIRST_SWEEP_AT

    @property
    def enabled(self) -> bool:
        return self.per_second is not None

    def admit(self, credential: str, now: float) -> float:
        """Take one request from the credential's bucket: 0.0 if it may go on, else the
        seconds until it may (nothing taken)."""
        interval = self._interval
        if not interval:
            return 0.0
        empty = self._empty.get(credential)
        if empty is not None and now - empty < interval - _SLACK_S:
            return empty + interval - now
        floor = now - self._burst_s
        self._empty[credential] = (empty if empty is not None and empty > floor else floor) + interval
        if len(self._empty) >= self._sweep_at:
            self._sweep(now)
        return 0.0

    def _sweep(self, now: float) -> None:
        full_before = now - self._burst_s
        self._empty = {c: e for c, e in self._empty.items() if e > full_before}
        self._sweep_at = max(_FIRST_SWEEP_AT, 2 * len(self._empty))

    def __len__(self) -> int:
        """Credentials with a bucket that is not full (or not yet swept)."""
        return len(self._empty)


def retry_after_s(wait_s: float) -> int:
    """A Retry-After header's whole seconds for a wait: rounded up, at least 1."""
    return max(1, math.ceil(wait_s))
