"""Retry-After, as FCM and webhook receivers send it: whole seconds or an HTTP date.

RFC 9110 §10.2.3 allows both forms, and both are met in practice (Google's front ends send
seconds, many proxies and CDNs send a date). An unreadable value is treated as absent, never
as an error: the worker then backs off on its own, which is what the sender would do anyway.
"""

from __future__ import annotations

import math
import time
from datetime import UTC
from email.utils import parsedate_to_datetime


def retry_after_s(value: str | None, *, now: float | None = None) -> float | None:
    """Seconds to wait from a Retry-After header value, or None when absent or unreadable.

    `now` (epoch seconds) is the clock an HTTP date is measured against; a date in the past
    means "now" (0), never a negative wait.
    """
    if value is None:
        return None
    text = value.strip()
    if not text:
        return None
    try:
        # delta-seconds; a decimal is not RFC but harmless to honour
        seconds = float(text)
    except ValueError:
        pass
    else:
        return seconds if math.isfinite(seconds) and seconds >= 0 else None
    try:
        moment = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if moment.tzinfo is None:  # the obsolete "-0000" form: UTC by RFC 5322 §3.3
        moment = moment.replace(tzinfo=UTC)
    return max(0.0, moment.timestamp() - (time.time() if now is None else now))
