"""The pure rules of an outbox entry's life (geopush.delivery.outbox), as tables: what a claimed
entry does on the profile as it is now (consent, token, ttl, quiet hours at the store), what an
attempt's answer leads to (sent, failed, another attempt within the ttl, expired), and the
backoff between attempts (exponential, jittered, never under Retry-After)."""

from __future__ import annotations

import random
from datetime import datetime
from zoneinfo import ZoneInfo

import pytest

from geopush.config import PolicySettings
from geopush.delivery.outbox import (
    FIRST_RETRY_S,
    MAX_RETRY_S,
    OutboxEntry,
    after_attempt,
    began,
    entry_from_json,
    entry_to_json,
    held,
    plan_attempt,
    retry_delay,
)
from geopush.delivery.senders.base import SendResult
from geopush.devices import Consent, DeviceProfile

# 2026-06-01 12:00 in Ljubljana
NOON = datetime(2026, 6, 1, 12, 0, tzinfo=ZoneInfo("Europe/Ljubljana")).timestamp()
QUIET = PolicySettings(quiet_hours={"from": "21:00", "to": "09:00"})
NO_QUIET = PolicySettings(quiet_hours=None)


def _entry(category: str = "marketing", *, created: float = NOON, ttl: float = 1800.0,
           test: bool = False) -> OutboxEntry:
    return OutboxEntry("01JX0000000000000000000000", "dev-1", "rule-1", "store-1", "fence-1",
                       "enter", category, "Europe/Ljubljana", "Hi", "there", {"k": "v"},
                       created, created + ttl, next_attempt_at=created, updated_at=created,
                       test=test)


def _profile(*, location: bool = True, marketing: bool = True,
             token: str | None = "tok") -> DeviceProfile:
    return DeviceProfile(device_id="dev-1", push_token=token,
                         consent=Consent(location=location, marketing=marketing))


@pytest.mark.parametrize(("entry", "profile", "at", "policy", "step", "reason"), [
    (_entry(), _profile(), NOON + 5, QUIET, "send", ""),
    (_entry(), None, NOON + 5, QUIET, "cancel", "the device was erased"),
    (_entry(), _profile(marketing=False), NOON + 5, QUIET, "cancel",
     "marketing consent was revoked"),
    (_entry("service"), _profile(marketing=False), NOON + 5, QUIET, "send", ""),
    (_entry("service"), _profile(location=False), NOON + 5, QUIET, "cancel",
     "location consent was revoked"),
    (_entry(), _profile(token=None), NOON + 5, QUIET, "cancel", "the device has no push token"),
    (_entry(), _profile(), NOON + 1800, QUIET, "expire",
     "its ttl ran out before it could be sent"),
    (_entry(), _profile(), NOON + 1799.5, QUIET, "expire",  # less than a second left
     "its ttl ran out before it could be sent"),
    # decided at 20:50 store time, attempted at 21:05: held by quiet hours
    (_entry(created=NOON + 8 * 3600 + 50 * 60), _profile(), NOON + 9 * 3600 + 5 * 60, QUIET,
     "hold", "quiet hours at the store"),
    (_entry(created=NOON + 8 * 3600 + 50 * 60), _profile(), NOON + 9 * 3600 + 5 * 60, NO_QUIET,
     "send", ""),
    # service pushes and ops test pushes are not held
    (_entry("service", created=NOON + 8 * 3600 + 50 * 60), _profile(), NOON + 9 * 3600 + 300,
     QUIET, "send", ""),
    (_entry(created=NOON + 8 * 3600 + 50 * 60, test=True), _profile(), NOON + 9 * 3600 + 300,
     QUIET, "send", ""),
])
def test_plan_attempt(entry: OutboxEntry, profile: DeviceProfile | None, at: float,
                      policy: PolicySettings, step: str, reason: str) -> None:
    plan = plan_attempt(entry, profile, at, policy)
    assert (plan.step, plan.reason) == (step, reason)


def test_a_hold_looks_again_within_a_minute_and_never_past_the_ttl() -> None:
    entry = began(_entry(created=NOON + 9 * 3600 - 60), NOON + 9 * 3600 + 10)
    plan = plan_attempt(entry, _profile(), NOON + 9 * 3600 + 10, QUIET)
    assert plan.step == "hold" and plan.until == NOON + 9 * 3600 + 70
    again = held(entry, plan, NOON + 9 * 3600 + 10)
    assert (again.state, again.attempts, again.next_attempt_at) == ("queued", 0, plan.until)
    late = plan_attempt(began(_entry(created=NOON + 9 * 3600 - 1790), NOON + 9 * 3600),
                        _profile(), NOON + 9 * 3600, QUIET)
    assert late.until == NOON + 9 * 3600 + 10  # the ttl's end


@pytest.mark.parametrize(("result", "state", "error"), [
    (SendResult("sent"), "sent", None),
    (SendResult("failed", "UNREGISTERED", remove_token=True), "failed", "UNREGISTERED"),
    (SendResult("retry", "http_503"), "queued", "http_503"),
    (SendResult("retry", "QUOTA_EXCEEDED", retry_after_s=60.0), "queued", "QUOTA_EXCEEDED"),
    # the next attempt would come after the ttl: expired, never attempted past it
    (SendResult("retry", "QUOTA_EXCEEDED", retry_after_s=1800.0), "expired", "QUOTA_EXCEEDED"),
    (SendResult("retry", "RESOURCE_EXHAUSTED", pause_sender_s=3600.0), "expired",
     "RESOURCE_EXHAUSTED"),
])
def test_after_attempt(result: SendResult, state: str, error: str | None) -> None:
    entry = began(_entry(), NOON + 5)
    after = after_attempt(entry, result, NOON + 6, random.Random(1))
    assert (after.state, after.error, after.attempts) == (state, error, 1)
    if state == "sent":
        assert after.sent_at == NOON + 6
    if state == "queued":
        assert NOON + 6 < after.next_attempt_at < entry.expires_at
        assert after.next_attempt_at >= NOON + 6 + (result.retry_after_s or 0)


def test_backoff_doubles_with_jitter_up_to_a_ceiling_and_honours_retry_after() -> None:
    rng = random.Random(7)
    for attempts in range(1, 15):
        ceiling = min(MAX_RETRY_S, FIRST_RETRY_S * 2 ** (attempts - 1))
        delays = [retry_delay(attempts, None, rng) for _ in range(200)]
        assert all(ceiling / 2 <= d <= ceiling for d in delays)
        assert len({round(d, 6) for d in delays}) > 100  # jittered: retries do not march in step
    assert retry_delay(1, 120.0, rng) == 120.0
    assert retry_delay(3, 0.0, rng) >= FIRST_RETRY_S * 2


def test_an_entry_survives_its_json_and_the_nulls_lua_writes() -> None:
    entry = after_attempt(began(_entry(), NOON + 5), SendResult("retry", "timeout", "slow"),
                          NOON + 6)
    assert entry_from_json(entry_to_json(entry)) == entry
    # Redis's cjson writes an empty `data` as {} and may add fields of later releases
    value = entry_to_json(entry)
    value["data"], value["future_field"] = {}, 1
    again = entry_from_json(value)
    assert again.data == {} and again.extra == {"future_field": 1}
    assert entry_to_json(again)["future_field"] == 1
    with pytest.raises(ValueError, match="unknown state 'lost'"):
        entry_from_json({**entry_to_json(entry), "state": "lost"})
