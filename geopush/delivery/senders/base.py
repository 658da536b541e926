"""The one interface every sender implements, and what it is given and answers.

A sender makes one attempt at one push and says how it went; it never sleeps, never retries and
never touches the state store. The worker (geopush.delivery.worker) decides what comes next from
the answer: when to try again (within the TTL left), whether to remove the token, whether to
pause the whole sender.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Protocol

Platform = Literal["android", "ios", "web"]
SendOutcome = Literal["sent", "retry", "failed"]


@dataclass(frozen=True, slots=True)
class OutgoingPush:
    """One attempt at one push, with what the attempt needs from the device's profile."""

    push_id: str  # also the collapse key: a duplicate replaces the first notification
    device_id: str
    push_token: str
    platform: Platform | None
    title: str
    body: str
    data: dict[str, str]
    category: str  # marketing | service: the Android channel
    rule_id: str
    store_id: str
    geofence_id: str
    event: str  # enter | dwell | exit
    created_at: float  # epoch seconds: the decision's event time
    ttl_left_s: float  # > 0: what every attempt carries (android.ttl, apns-expiration, TTL)
    test: bool = False  # an ops test push: outside caps and stats


@dataclass(frozen=True, slots=True)
class SendResult:
    outcome: SendOutcome
    # what went wrong, for metrics and reports: the FCM errorCode (UNREGISTERED, …), or
    # "http_503", "timeout", "connection", "bad_response", … (None when sent)
    code: str | None = None
    message: str = ""
    remove_token: bool = False  # the token is dead: remove it from the profile (no retry)
    retry_after_s: float | None = None  # the least wait before the next attempt (Retry-After)
    # the whole sender must wait this long (a project-wide quota), not only this push
    pause_sender_s: float | None = None
    alert: bool = False  # ops must act (THIRD_PARTY_AUTH_ERROR: credentials, not tokens)
    extra: dict[str, str] = field(default_factory=dict)


class Sender(Protocol):
    """Sends pushes; `send` is safe to call concurrently (the worker bounds how many)."""

    name: str

    async def send(self, push: OutgoingPush) -> SendResult: ...

    async def close(self) -> None: ...
