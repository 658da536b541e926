"""The outbox entry of a push, and the pure rules of its life (contract §7, STYLE "save before
you send").

A push decided is an entry written in the same per-device commit as its decision, so it is
queued if and only if its cap reservation stands. It then goes queued → sending → sent, or back
to queued for another attempt, and ends sent, failed, expired (its TTL ran out) or cancelled
(consent revoked, device erased, an operator's kill switch). An entry in `sending` whose lease
ran out belonged to a process that died mid-send: it is sent again with the same push_id, which
is also the notification's collapse id, so at worst the phone replaces the first copy.

Everything here is pure: the stores keep entries, the worker (geopush.delivery.worker) does the
I/O and asks these functions what comes next.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field, replace
from typing import Any, Literal, get_args

from geopush.config import PolicySettings
from geopush.delivery.senders.base import SendResult
from geopush.devices import DeviceProfile
from geopush.rules.conditions import clock_of, in_window, local_time
from geopush.rules.decide import Decision

State = Literal["queued", "sending", "sent", "failed", "expired", "cancelled"]
STATES: tuple[State, ...] = get_args(State)
FINAL: frozenset[str] = frozenset({"sent", "failed", "expired", "cancelled"})

SEND_LEASE_S = 60.0  # delivery.send_lease's default: an attempt ends well within it
FIRST_RETRY_S = 2.0  # exponential backoff from here, doubling, with full jitter
MAX_RETRY_S = 15 * 60.0
QUIET_RECHECK_S = 60.0  # how often a push held by quiet hours looks again (until its TTL)
# an entry at most this close to its expiry is not attempted: the phone would get it too late
# to matter, and FCM wants a TTL of a second at least
MIN_TTL_LEFT_S = 1.0


@dataclass(slots=True)
class OutboxEntry:
    push_id: str
    device_id: str
    rule_id: str
    store_id: str
    geofence_id: str
    event: str  # enter | dwell | exit
    category: str  # marketing | service
    timezone: str  # the store's: quiet hours are checked again before each attempt
    title: str
    body: str
    data: dict[str, str]
    created_at: float  # the decision's event time (epoch s)
    expires_at: float  # created_at + the message's ttl: never an attempt after it
    state: State = "queued"
    attempts: int = 0
    next_attempt_at: float = 0.0  # when it is due (queued), or its lease's end (sending)
    updated_at: float = 0.0
    error: str | None = None  # the last failure's code (FCM errorCode, http_503, …)
    reason: str | None = None  # why it was cancelled or failed, in words
    test: bool = False  # an ops test push: outside caps and stats
    sent_at: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # room for what later releases add

    @property
    def final(self) -> bool:
        return self.state in FINAL


def entry_of(decision: Decision, category: str, timezone: str, now: float) -> OutboxEntry:
    """The entry of a `push` decision."""
    assert decision.outcome == "push" and decision.message is not None \
        and decision.push_id is not None and decision.ttl_s is not None
    message = decision.message
    return OutboxEntry(
        decision.push_id, decision.device_id, decision.rule_id, decision.store_id,
        decision.geofence_id, decision.event, category, timezone, message.title, message.body,
        dict(message.data), decision.ts, decision.ts + decision.ttl_s,
        next_attempt_at=now, updated_at=now)


# -- the JSON the stores keep (the memory journal, the Redis outbox hash) ----------------------
# A flat object of scalars and one object of strings (`data`): Redis's Lua changes an entry's
# state with cjson, which reads an empty JSON array back as an object; so no list anywhere.

_FIELDS = ("push_id", "device_id", "rule_id", "store_id", "geofence_id", "event", "category",
           "timezone", "title", "body", "data", "created_at", "expires_at", "state", "attempts",
           "next_attempt_at", "updated_at", "error", "reason", "test", "sent_at")


def entry_to_json(entry: OutboxEntry) -> dict[str, Any]:
    value = {name: getattr(entry, name) for name in _FIELDS}
    value.update(entry.extra)
    return value


def entry_from_json(value: dict[str, Any]) -> OutboxEntry:
    known = {name: value[name] for name in _FIELDS if name in value}
    extra = {k: v for k, v in value.items() if k not in known}
    data = known.get("data")
    known["data"] = {str(k): str(v) for k, v in data.items()} if isinstance(data, dict) else {}
    for name in ("error", "reason", "sent_at"):
        if known.get(name) is None or known.get(name) == {}:  # cjson has no null in tables
            known[name] = None
    known["test"] = bool(known.get("test", False))
    known["attempts"] = int(known.get("attempts", 0))
    if known.get("state") not in STATES:
        raise ValueError(f"outbox entry {known.get('push_id')!r}: unknown state "
                         f"{known.get('state')!r}")
    return OutboxEntry(**known, extra=extra)


# -- what the worker does with a claimed entry --------------------------------------------------

Step = Literal["send", "cancel", "expire", "hold"]


@dataclass(frozen=True, slots=True)
class Plan:
    step: Step
    reason: str = ""
    until: float | None = None  # hold: when to look again


def plan_attempt(entry: OutboxEntry, profile: DeviceProfile | None, now: float,
                 policy: PolicySettings) -> Plan:
    """What to do with an entry about to be attempted, on the profile as it is now: consent
    may have been revoked, the token removed, quiet hours begun since the decision."""
    if profile is None:
        return Plan("cancel", "the device was erased")
    if entry.category == "marketing" and not profile.consent.marketing:
        return Plan("cancel", "marketing consent was revoked")
    if not profile.consent.location:
        return Plan("cancel", "location consent was revoked")
    if not profile.push_token:
        return Plan("cancel", "the device has no push token")
    if entry.expires_at - now < MIN_TTL_LEFT_S:
        return Plan("expire", "its ttl ran out before it could be sent")
    if entry.category == "marketing" and not entry.test and policy.quiet_hours is not None:
        quiet = policy.quiet_hours
        if in_window(clock_of(local_time(now, entry.timezone)), quiet.start, quiet.end):
            # held, not dropped: quiet hours may end before the ttl does
            return Plan("hold", "quiet hours at the store", min(now + QUIET_RECHECK_S,
                                                                  entry.expires_at))
    return Plan("send")


def retry_delay(attempts: int, retry_after_s: float | None, rng: random.Random | None = None
                ) -> float:
    """How long before the next attempt after `attempts` failed ones: exponential backoff
    with full jitter (many instances retrying one outage do not come back in step), never
    less than what the server asked for (Retry-After)."""
    ceiling = min(MAX_RETRY_S, FIRST_RETRY_S * 2 ** max(0, attempts - 1))
    delay = (rng or random).uniform(ceiling / 2, ceiling)
    if retry_after_s is not None:
        delay = max(delay, retry_after_s)
    return delay


def began(entry: OutboxEntry, now: float, lease_s: float = SEND_LEASE_S) -> OutboxEntry:
    """The entry as an attempt starts: sending, under a lease (past it, another instance
    takes the push over and sends it again with the same id)."""
    return replace(entry, state="sending", attempts=entry.attempts + 1,
                   next_attempt_at=now + lease_s, updated_at=now)


def due(entry: OutboxEntry, now: float) -> bool:
    """Claimable: queued and due, or sending under a lease that ran out."""
    return not entry.final and entry.next_attempt_at <= now


def after_attempt(entry: OutboxEntry, result: SendResult, now: float,
                  rng: random.Random | None = None) -> OutboxEntry:
    """The entry once an attempt answered: sent, failed, or queued for another attempt within
    its ttl (else expired: never an attempt past it)."""
    if result.outcome == "sent":
        return replace(entry, state="sent", sent_at=now, updated_at=now, error=None,
                       reason=None)
    if result.outcome == "failed":
        return replace(entry, state="failed", updated_at=now, error=result.code,
                       reason=result.message or None)
    wait = retry_delay(entry.attempts, result.retry_after_s, rng)
    if result.pause_sender_s is not None:
        wait = max(wait, result.pause_sender_s)
    at = now + wait
    if at > entry.expires_at - MIN_TTL_LEFT_S:
        return replace(entry, state="expired", updated_at=now, error=result.code,
                       reason=f"its ttl ran out while retrying ({result.code})")
    return replace(entry, state="queued", next_attempt_at=at, updated_at=now,
                   error=result.code, reason=result.message or None)


def held(entry: OutboxEntry, plan: Plan, now: float) -> OutboxEntry:
    """Put back without an attempt (quiet hours): it did not count as one."""
    assert plan.until is not None
    return replace(entry, state="queued", attempts=entry.attempts - 1,
                   next_attempt_at=plan.until, updated_at=now, reason=plan.reason)


def ended(entry: OutboxEntry, plan: Plan, now: float) -> OutboxEntry:
    """Cancelled or expired before an attempt."""
    state: State = "cancelled" if plan.step == "cancel" else "expired"
    return replace(entry, state=state, updated_at=now, reason=plan.reason)
