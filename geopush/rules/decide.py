"""The decision for one moment of one device: at most one push, by the rules, under the policy
that keeps pushes rare (contract §4). Pure: the caller gives the device's history and the clock.

The events of one ping (or of one timer firing) are decided together. Candidates are the rules
whose trigger and `when` match an event; rules that do not match leave no record. Each candidate
is then judged in the contract's order, the checks that are once per device first: consent →
no_token → late → quiet_hours → global_cap → min_gap → fatigue (service rules skip quiet hours,
global caps, min_gap and fatigue), then rule_cap → store_cooldown → holdout → template. The first
candidate (by priority, then distance to the store, then id) that passes is the push; a holdout
ends the decision; every other candidate is suppressed with the first reason that stopped it, or
`outranked` when a better one won.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

import orjson

from geopush.config import PolicySettings
from geopush.devices import DeviceProfile
from geopush.geo.model import Event, Visit
from geopush.geo.stores import Geofence
from geopush.rules.conditions import (
    Moment,
    VisitStats,
    Weather,
    clock_of,
    false_condition,
    holds,
    in_window,
    local_time,
    not_triggered,
)
from geopush.rules.load import LoadedRule, RuleSet
from geopush.rules.templates import MAX_OUTPUT_CHARS, TemplateFailure

Outcome = Literal["push", "suppressed", "holdout"]
Reason = Literal["no_consent", "no_token", "late", "quiet_hours", "global_cap", "min_gap",
                 "fatigue", "rule_cap", "store_cooldown", "template_error", "outranked"]
REASONS: tuple[Reason, ...] = get_args(Reason)
DAY_S = 86_400.0
JUDGED_AFTER_S = DAY_S  # a push not opened within 24 h counts as ignored
VISIT_WINDOW_S = 90 * DAY_S


@dataclass(slots=True)
class PushRecord:
    """A push or holdout decided for the device: what caps, gaps and fatigue count."""

    push_id: str
    ts: float  # the event's time: cap windows are measured at event time
    rule_id: str
    store_id: str
    category: str
    outcome: Outcome  # "push" or "holdout"
    opened_at: float | None = None


@dataclass(slots=True)
class DeviceHistory:
    """What the policy and `when.visits` read of a device: its pushes and ended visits."""

    pushes: list[PushRecord] = field(default_factory=list)
    visits: list[Visit] = field(default_factory=list)

    def visit_stats(self, store_id: str, at: float) -> VisitStats:
        ended = [v for v in self.visits if v.store_id == store_id and v.end < at]
        if not ended:
            return VisitStats()
        last_end = max(v.end for v in ended)
        return VisitStats(count_90d=sum(1 for v in ended if v.end > at - VISIT_WINDOW_S),
                          last_visit_days=(at - last_end) / DAY_S)

    def marketing(self) -> list[PushRecord]:
        return [p for p in self.pushes if p.category == "marketing"]


@dataclass(frozen=True, slots=True)
class Rendered:
    title: str
    body: str
    data: dict[str, str]


@dataclass(frozen=True, slots=True)
class Decision:
    ts: float
    device_id: str
    geofence_id: str
    store_id: str
    event: str
    rule_id: str
    outcome: Outcome
    reason: Reason | None
    message: Rendered | None = None
    push_id: str | None = None
    ttl_s: float | None = None

    def as_json(self) -> dict[str, Any]:
        return {"device_id": self.device_id, "geofence_id": self.geofence_id,
                "store_id": self.store_id, "event": self.event, "rule_id": self.rule_id,
                "outcome": self.outcome, "reason": self.reason,
                "title": self.message.title if self.message else None,
                "body": self.message.body if self.message else None}

    def as_record(self) -> dict[str, Any]:
        """What the device's record of decisions keeps (the export: "why did I (not) get
        it?"): times in epoch seconds, as the other records of the export."""
        return {"ts": self.ts, **self.as_json(), "push_id": self.push_id}


@dataclass(frozen=True, slots=True)
class Explanation:
    """Why a rule is not a candidate for an event (`geopush replay --explain`); candidates are
    explained by their decisions."""

    ts: float
    device_id: str
    geofence_id: str
    store_id: str
    event: str
    rule_id: str
    why: str

    def as_json(self) -> dict[str, Any]:
        return {"device_id": self.device_id, "geofence_id": self.geofence_id,
                "store_id": self.store_id, "event": self.event, "rule_id": self.rule_id,
                "outcome": "not_candidate", "reason": None, "why": self.why}


def in_holdout(rule_id: str, device_id: str, share: float) -> bool:
    """First 8 bytes of SHA-256(`rule_id:device_id`) / 2**64 < share: stable everywhere."""
    if share <= 0:
        return False
    digest = hashlib.sha256(f"{rule_id}:{device_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < share


_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
PUSH_ID_CHARS = 26


def push_id_of(device_id: str, rule_id: str, event: Event, key: bytes = b"") -> str:
    """A ULID (contract §6: 26 characters, fits the 64-byte APNs collapse id): the event's time
    in ms, then 80 bits of a keyed hash of the moment, so the same moment gives the same id on
    every retry and instance (a decision computed again after a conflict names the same push).
    Keyed (the service derives `key` from logging.pseudonym_key): the id goes to logs, FCM and
    webhooks with the rule, store and time, and an unkeyed hash would let anyone holding those
    confirm a guessed device id."""
    digest = hmac.new(key, f"{device_id}|{rule_id}|{event.geofence_id}|{event.type}|"
                           f"{event.ts!r}".encode(), hashlib.sha256).digest()
    return ulid(event.ts, int.from_bytes(digest[:10], "big"))


def ulid(at: float, low_bits: int) -> str:
    """26 Crockford base-32 characters: `at` in ms (48 bits), then `low_bits` (80)."""
    millis = max(0, min(int(at * 1000), 2**48 - 1))
    value = (millis << 80) | (low_bits & (2**80 - 1))
    return "".join(_CROCKFORD[(value >> shift) & 31] for shift in range(125, -1, -5))


def push_time(push_id: str) -> float:
    """The event time (epoch seconds) a push id carries in its first 48 bits."""
    millis = 0
    for char in push_id[:10]:
        millis = millis * 32 + _CROCKFORD.index(char)
    return millis / 1000


def is_push_id(text: str) -> bool:
    return (len(text) == PUSH_ID_CHARS and text[0] in "01234567"
            and all(c in _CROCKFORD for c in text))


@dataclass(frozen=True)
class _Candidate:
    rule: LoadedRule
    moment: Moment


class Decider:
    """Rules + policy → decisions; built once per active set of stores and rules."""

    def __init__(self, rules: RuleSet, geofences: Mapping[str, Geofence],
                 policy: PolicySettings, *, history_s: float = 180 * DAY_S,
                 push_id_key: bytes = b"") -> None:
        self.rules = rules.enabled
        self.disabled = tuple(r for r in rules.rules if not r.rule.enabled)
        self.geofences = geofences
        self.policy = policy
        self.history_s = history_s  # retention.history: older pushes are forgotten
        self.push_id_key = push_id_key
        self._selecting: dict[str, tuple[LoadedRule, ...]] = {}  # geofence id → its rules
        # geofence id → the (event type, dwell) its rules' triggers match: `triggers` asks it
        # of every event, and most events match none
        self._trigger_keys: dict[str, frozenset[tuple[str, float | None]]] = {}

    def _selecting_rules(self, geofence_id: str) -> tuple[LoadedRule, ...]:
        """The rules whose trigger selects the geofence, in id order. Worked out once per
        geofence (selectors compare tags), when it first has an event: every ping's event
        asks, and most fences never have one."""
        selecting = self._selecting.get(geofence_id)
        if selecting is None:
            geofence = self.geofences.get(geofence_id)
            selecting = tuple(r for r in self.rules if geofence is not None and r.selects(geofence))
            self._selecting[geofence_id] = selecting
            # a trigger's dwell is set for on: dwell only, as an event's dwell_s is
            self._trigger_keys[geofence_id] = frozenset(
                (r.rule.trigger.on, r.rule.trigger.dwell) for r in selecting)
        return selecting

    def _triggered(self, event: Event) -> list[LoadedRule]:
        """The rules whose trigger matches the event, in id order."""
        return [r for r in self._selecting_rules(event.geofence_id)
                if r.rule.trigger.on == event.type
                and (event.type != "dwell" or r.rule.trigger.dwell == event.dwell_s)]

    def triggers(self, events: Sequence[Event]) -> bool:
        """Some rule's trigger matches one of the events: the moment has a candidate, so the
        device's history is worth reading (contract §4: `when` is judged on it)."""
        keys = self._trigger_keys
        for event in events:
            matched = keys.get(event.geofence_id)
            if matched is None:
                self._selecting_rules(event.geofence_id)
                matched = keys[event.geofence_id]
            if (event.type, event.dwell_s) in matched:
                return True
        return False

    def not_candidates(self, device_id: str, events: Sequence[Event], profile: DeviceProfile,
                       history: DeviceHistory, *, weather: Weather | None,
                       activity: str | None = None) -> list[Explanation]:
        """For each event, every rule that is not a candidate, and why: the trigger that does
        not match, or the first condition of `when` that is false. Judged on the history as
        `decide` would judge it, so call it first."""
        explained = []
        for event in events:
            geofence = self.geofences.get(event.geofence_id)
            if geofence is None:
                continue
            moment: Moment | None = None
            for rule in self.disabled:
                explained.append(Explanation(event.ts, device_id, event.geofence_id,
                                             event.store_id, event.type, rule.id,
                                             "enabled: false"))
            for rule in self.rules:
                why = not_triggered(rule, event, geofence)
                if why is None:
                    if moment is None:
                        moment = Moment(event, geofence, profile, weather,
                                        history.visit_stats(event.store_id, event.ts), activity)
                    why = false_condition(rule.rule.when, moment)
                if why is not None:
                    explained.append(Explanation(event.ts, device_id, event.geofence_id,
                                                 event.store_id, event.type, rule.id, why))
        return explained

    def forgotten(self, history: DeviceHistory, now: float) -> list[str]:
        """The pushes (and holdouts) past retention.history: no cap or gap looks back that far
        (a cap's `per` longer than retention is a load error)."""
        return [p.push_id for p in history.pushes if p.ts < now - self.history_s]

    def decide(self, device_id: str, events: Sequence[Event], profile: DeviceProfile,
               history: DeviceHistory, *, weather: Weather | None, now: float,
               activity: str | None = None) -> list[Decision]:
        """The decisions of one moment: one per candidate, at most one `push` or `holdout`.
        The chosen push (or holdout) is appended to `history`."""
        candidates = self._candidates(events, profile, history, weather, activity)
        if not candidates:
            return []
        # the geofence id last: two fences at the same distance are decided alike in every
        # process (the tracker's events of one ping come in no fixed order)
        candidates.sort(key=lambda c: (-c.rule.rule.priority, c.moment.event.distance_m,
                                       c.rule.id, c.moment.event.geofence_id))
        decisions: list[Decision] = []
        chosen: PushRecord | None = None  # reserved once the moment is decided: every
        # candidate is judged on the history before this moment
        for candidate in candidates:
            event = candidate.moment.event
            # the checks once per device come first, so they name why a candidate was stopped
            # even when a better one won
            reason = self._device_reason(candidate, profile, history, now)
            if chosen is not None:
                decisions.append(self._record(device_id, candidate, "suppressed",
                                              reason or "outranked"))
                continue
            if reason is None:
                reason = self._candidate_reason(candidate, history)
            if reason is not None:
                decisions.append(self._record(device_id, candidate, "suppressed", reason))
                continue
            rule = candidate.rule
            push_id = push_id_of(device_id, rule.id, event, self.push_id_key)
            if in_holdout(rule.id, device_id, rule.rule.holdout):
                decisions.append(self._record(device_id, candidate, "holdout", None,
                                              push_id=push_id))
                chosen = PushRecord(push_id, event.ts, rule.id, event.store_id,
                                    rule.rule.category, "holdout")
                continue
            try:
                message = render(rule, candidate.moment)
            except TemplateFailure:
                decisions.append(self._record(device_id, candidate, "suppressed",
                                              "template_error"))
                continue
            decisions.append(self._record(device_id, candidate, "push", None, message, push_id))
            chosen = PushRecord(push_id, event.ts, rule.id, event.store_id, rule.rule.category,
                                "push")
        if chosen is not None:
            history.pushes.append(chosen)
        return decisions

    # -- candidates --------------------------------------------------------------------------

    def _candidates(self, events: Sequence[Event], profile: DeviceProfile,
                    history: DeviceHistory, weather: Weather | None,
                    activity: str | None) -> list[_Candidate]:
        found = []
        for event in events:
            geofence = self.geofences.get(event.geofence_id)
            if geofence is None:
                continue
            moment: Moment | None = None
            for rule in self._triggered(event):
                if moment is None:
                    moment = Moment(event, geofence, profile, weather,
                                    history.visit_stats(event.store_id, event.ts), activity)
                if holds(rule.rule.when, moment):
                    found.append(_Candidate(rule, moment))
        return found

    # -- the policy --------------------------------------------------------------------------

    def _device_reason(self, candidate: _Candidate, profile: DeviceProfile,
                       history: DeviceHistory, now: float) -> Reason | None:
        """consent → no_token → late → quiet_hours → global_cap → min_gap → fatigue (the last
        four for marketing rules only)."""
        rule = candidate.rule.rule
        event = candidate.moment.event
        marketing = rule.category == "marketing"
        policy = self.policy
        if marketing and not profile.consent.marketing:
            return "no_consent"
        if not profile.consent.location:
            return "no_consent"
        if not profile.push_token:
            return "no_token"
        if now - event.ts > policy.max_event_lag:
            return "late"
        if marketing:
            quiet = policy.quiet_hours
            if quiet is not None and in_window(
                    clock_of(local_time(event.ts, candidate.moment.geofence.timezone)),
                    quiet.start, quiet.end):
                return "quiet_hours"
            sent = history.marketing()
            for cap in policy.max_per_device:
                if sum(1 for p in sent if p.ts > event.ts - cap.per) >= cap.max:
                    return "global_cap"
            if policy.min_gap > 0 and any(p.ts > event.ts - policy.min_gap for p in sent):
                return "min_gap"
            if self._fatigued(sent, now):
                return "fatigue"
        return None

    def _candidate_reason(self, candidate: _Candidate, history: DeviceHistory) -> Reason | None:
        """rule_cap → store_cooldown (marketing rules only)."""
        rule = candidate.rule.rule
        event = candidate.moment.event
        marketing = rule.category == "marketing"
        policy = self.policy
        own = [p for p in history.pushes if p.rule_id == rule.id]
        for rule_cap in rule.caps.per_device:
            if sum(1 for p in own if p.ts > event.ts - rule_cap.per) >= rule_cap.max:
                return "rule_cap"
        if marketing:
            cooldown = max(policy.store_cooldown, rule.caps.store_cooldown or 0.0)
            if any(p.store_id == event.store_id and p.ts > event.ts - cooldown
                   for p in history.marketing()):
                return "store_cooldown"
        return None

    def _fatigued(self, sent: list[PushRecord], now: float) -> bool:
        """The `ignored_in_a_row`-th push in a row not opened within 24 h starts a pause; an
        open ends it. Only for devices that have ever opened one; holdouts do not count."""
        pushes = [p for p in sent if p.outcome == "push"]
        if not any(p.opened_at is not None for p in pushes):
            return False
        fatigue = self.policy.fatigue
        ignored = 0
        paused_until = -1.0
        for push in sorted(pushes, key=lambda p: p.ts):
            judged_at = push.ts + JUDGED_AFTER_S
            if push.opened_at is not None and push.opened_at <= judged_at:
                ignored, paused_until = 0, -1.0
                continue
            if judged_at > now:
                continue  # pending: not judged yet
            if judged_at < paused_until:
                continue  # sent during a pause that already runs
            ignored += 1
            if ignored >= fatigue.ignored_in_a_row:
                paused_until = judged_at + fatigue.pause
                ignored = 0
        return now < paused_until

    def _record(self, device_id: str, candidate: _Candidate, outcome: Outcome,
                reason: Reason | None, message: Rendered | None = None,
                push_id: str | None = None) -> Decision:
        event = candidate.moment.event
        return Decision(event.ts, device_id, event.geofence_id, event.store_id, event.type,
                        candidate.rule.id, outcome, reason, message, push_id,
                        candidate.rule.rule.message.ttl if message is not None else None)


def template_context(moment: Moment) -> dict[str, Any]:
    profile, event = moment.profile, moment.event
    weather: dict[str, Any] = {}
    if moment.weather is not None:
        weather = {k: v for k, v in (("temperature_c", moment.weather.temperature_c),
                                     ("condition", moment.weather.condition)) if v is not None}
    visits: dict[str, Any] = {"count_90d": moment.visits.count_90d}
    if moment.visits.last_visit_days is not None:
        visits["last_visit_days"] = int(moment.visits.last_visit_days)
    device = {**profile.attributes, "segments": list(profile.segments)}
    if profile.locale is not None:
        device["locale"] = profile.locale
    return {"store": dict(moment.geofence.properties), "device": device, "weather": weather,
            "distance_m": round(event.distance_m), "event": event.type, "visits": visits}


def render(rule: LoadedRule, moment: Moment) -> Rendered:
    """The message in the device's locale (`fr-CA` → `fr` → the default); TemplateFailure when
    a template fails or title + body + data exceed 4 KB as JSON."""
    context = template_context(moment)
    message = rule.message
    title, body = message.title, message.body
    locale = (moment.profile.locale or "").replace("_", "-")
    while locale:
        if locale in message.locales:
            title, body = message.locales[locale]
            break
        locale = locale.rpartition("-")[0]
    rendered = Rendered(title.render(context), body.render(context),
                        {k: t.render(context) for k, t in message.data.items()})
    size = len(orjson.dumps({"title": rendered.title, "body": rendered.body,
                             "data": rendered.data}))
    if size > MAX_OUTPUT_CHARS:
        raise TemplateFailure(f"title + body + data are {size} bytes as JSON (at most "
                              f"{MAX_OUTPUT_CHARS})")
    return rendered
