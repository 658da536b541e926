"""What `GET /v1/stats` answers (contract §6): per rule and in total, what was decided, what became
of the pushes, why candidates were suppressed, and whether pushing made people come back more
often than holding them out (conversions and lift).

Pure: the handler reads each device's pushes, decisions, outbox states and visits and passes them
in; nothing here touches the state store or the clock, so the counting rules are tested by tables.

Counting, per decision whose event time is in [start, end):
- `decided` are the `push` decisions, `holdout` the holdout decisions: two groups of one
  experiment, kept apart so `decided` means what the delivery report's `decided` means.
- `sent`, `failed`, `expired`, `cancelled` and `queued` (queued or sending) are the outbox states
  of the push decisions. A push without a known state (its outbox entry already purged) is in
  none of them, so they may add up to less than `decided`.
- `suppressed` counts suppressed decisions by reason, from the device's record of decisions; that
  record keeps the latest 100 of a device, so a device that was suppressed often counts only its
  latest ones.
- `opened` counts push decisions that the app reported opened.
- Conversions are counted intention-to-treat: a push decision whose push failed, expired or was
  cancelled stays in the push group; what was decided is what is compared.
Ops test pushes are left out of everything.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from geopush.rules.decide import PushRecord

Z95 = 1.959963984540054  # the 97.5 % point of the standard normal: two-sided 95 %
MIN_GROUP = 30  # lift is null while the push or the holdout group has fewer decisions (§6)
STATES = ("sent", "failed", "expired", "cancelled", "queued")
_STATE_BUCKET = {"queued": "queued", "sending": "queued", "sent": "sent", "failed": "failed",
                 "expired": "expired", "cancelled": "cancelled"}

Visit = tuple[str, float, float | None]  # store id, start, end (None: the stay is under way)


@dataclass(slots=True)
class DeviceFacts:
    """What the stats read of one device."""

    device_id: str
    pushes: list[PushRecord]  # push and holdout decisions kept for retention.history
    decisions: list[dict[str, Any]] = field(default_factory=list)  # Decision.as_record(), latest ≤100
    states: dict[str, str] = field(default_factory=dict)  # push id → outbox state
    visits: list[Visit] = field(default_factory=list)
    test_push_ids: set[str] = field(default_factory=set)


# -- intervals -------------------------------------------------------------------------------

def wilson_interval(successes: int, trials: int, z: float = Z95) -> tuple[float, float]:
    """Wilson's score interval for a proportion (Newcombe 1998a, method 3): it stays inside
    [0, 1] and is not degenerate at 0/n or n/n, where the textbook Wald interval is."""
    if trials <= 0 or not 0 <= successes <= trials:
        raise ValueError(f"wilson_interval: {successes} successes of {trials} trials "
                         "(expected 0 ≤ successes ≤ trials and trials > 0)")
    p = successes / trials
    z2 = z * z
    centre = p + z2 / (2 * trials)
    half = z * math.sqrt(p * (1 - p) / trials + z2 / (4 * trials * trials))
    scale = 1 + z2 / trials
    # clamped: at 0/n and n/n the bound is 0 or 1 exactly, up to rounding
    return max(0.0, (centre - half) / scale), min(1.0, (centre + half) / scale)


def newcombe_interval(x1: int, n1: int, x2: int, n2: int,
                      z: float = Z95) -> tuple[float, float]:
    """The interval of p1 − p2 by Newcombe's hybrid score method (Newcombe 1998b, method 10):
    each bound combines the distances from each proportion to its own Wilson bound, so it
    keeps good coverage for small groups and rates near 0 or 1 (conversion rates usually are)."""
    p1, p2 = x1 / n1, x2 / n2
    l1, u1 = wilson_interval(x1, n1, z)
    l2, u2 = wilson_interval(x2, n2, z)
    difference = p1 - p2
    return (difference - math.sqrt((p1 - l1) ** 2 + (u2 - p2) ** 2),
            difference + math.sqrt((u1 - p1) ** 2 + (p2 - l2) ** 2))


def lift(push_conversions: int, push_decisions: int, holdout_conversions: int,
         holdout_decisions: int) -> dict[str, Any]:
    """rate(push) − rate(holdout) with its 95 % interval; both null while either group has fewer
    than MIN_GROUP decisions (a difference of two tiny groups is noise that looks like news)."""
    if push_decisions < MIN_GROUP or holdout_decisions < MIN_GROUP:
        return {"value": None, "ci95": None}
    low, high = newcombe_interval(push_conversions, push_decisions, holdout_conversions,
                                  holdout_decisions)
    value = push_conversions / push_decisions - holdout_conversions / holdout_decisions
    return {"value": value, "ci95": [low, high]}


# -- attribution -----------------------------------------------------------------------------

def converted(pushes: Sequence[PushRecord], visits: Sequence[Visit], window_s: float) -> set[str]:
    """The push ids (of push and holdout decisions) that a visit converts (contract §6): a visit
    to the decision's store that starts within `window_s` after the decision's event, or is under
    way at it (the stay that triggered it counts). One visit converts at most one decision per
    rule, so a long stay does not convert every decision of a rule made during it.

    Per rule, decisions are taken earliest first and each takes, among the unused visits that
    qualify, the one that ends first (a stay under way last). That is a largest assignment: a
    visit that qualifies for a decision starts early enough for every later one too, so later
    decisions can only lose visits that end too soon for them, and the one ending first is the
    one they need least. Visits of one device at one store do not overlap in practice, and then
    this is simply the earliest unused visit. It is computed on every decision the device has,
    not only those in the asked period, so whether a decision converted does not depend on
    the period it is asked about in."""
    by_store: dict[str, list[Visit]] = defaultdict(list)
    for visit in visits:
        by_store[visit[0]].append(visit)
    by_rule: dict[str, list[PushRecord]] = defaultdict(list)
    for push in pushes:
        by_rule[push.rule_id].append(push)
    result: set[str] = set()
    for decisions in by_rule.values():
        used: set[tuple[str, int]] = set()  # (store id, position in its visits), per rule
        for decision in sorted(decisions, key=lambda d: (d.ts, d.push_id)):
            best: tuple[float, float, int] | None = None  # (end, start, position)
            for position, (_, start, end) in enumerate(by_store.get(decision.store_id, ())):
                if (decision.store_id, position) in used:
                    continue
                if start <= decision.ts + window_s and (end is None or end >= decision.ts):
                    candidate = (math.inf if end is None else end, start, position)
                    best = candidate if best is None else min(best, candidate)
            if best is not None:
                used.add((decision.store_id, best[2]))
                result.add(decision.push_id)
    return result


# -- the answer ------------------------------------------------------------------------------

@dataclass(slots=True)
class _Block:
    decided: int = 0
    holdout: int = 0
    states: Counter[str] = field(default_factory=Counter)
    suppressed: Counter[str] = field(default_factory=Counter)
    opened: int = 0
    push_conversions: int = 0
    holdout_conversions: int = 0

    def add(self, other: _Block) -> None:
        self.decided += other.decided
        self.holdout += other.holdout
        self.states.update(other.states)
        self.suppressed.update(other.suppressed)
        self.opened += other.opened
        self.push_conversions += other.push_conversions
        self.holdout_conversions += other.holdout_conversions

    def as_json(self) -> dict[str, Any]:
        return {
            "decided": self.decided,
            "holdout": self.holdout,
            **{state: self.states[state] for state in STATES},
            "suppressed": dict(sorted(self.suppressed.items())),
            "opened": self.opened,
            "conversions": {"push": self.push_conversions, "holdout": self.holdout_conversions},
            "conversion_rate": {"push": _rate(self.push_conversions, self.decided),
                                "holdout": _rate(self.holdout_conversions, self.holdout)},
            "lift": lift(self.push_conversions, self.decided, self.holdout_conversions,
                         self.holdout),
        }


def _rate(part: int, whole: int) -> float | None:
    return part / whole if whole else None


def _in_period(ts: float, start: float | None, end: float | None) -> bool:
    return (start is None or ts >= start) and (end is None or ts < end)


def compute_stats(devices: Iterable[DeviceFacts], *, window_s: float, start: float | None,
                  end: float | None) -> dict[str, Any]:
    """The body of `GET /v1/stats`: decisions whose event is in [start, end) (None: unbounded),
    visits converting them within `window_s` (attribution.window) after their event.

    `totals` adds up the rules: a visit that converts decisions of two rules counts once for
    each, as it does in each rule. Its lift pools the rules' groups; per rule is the answer to
    "does this rule work", the total an overview."""
    tally = StatsTally(window_s=window_s, start=start, end=end)
    for device in devices:
        tally.add(device)
    return tally.answer()


class StatsTally:
    """compute_stats a device at a time: each device counts on its own, so the handler adds
    a page of devices as it reads it and keeps no device's records once counted (a deployment
    of a million devices would otherwise hold all of them at once)."""

    def __init__(self, *, window_s: float, start: float | None, end: float | None) -> None:
        self.window_s, self.start, self.end = window_s, start, end
        self.rules: dict[str, _Block] = defaultdict(_Block)

    def add(self, device: DeviceFacts) -> None:
        start, end, rules = self.start, self.end, self.rules
        excluded = device.test_push_ids
        pushes = [p for p in device.pushes if p.push_id not in excluded]
        conversions = converted(pushes, device.visits, self.window_s)
        for push in pushes:
            if not _in_period(push.ts, start, end):
                continue
            block = rules[push.rule_id]
            hit = push.push_id in conversions
            if push.outcome == "holdout":
                block.holdout += 1
                block.holdout_conversions += hit
                continue
            block.decided += 1
            block.push_conversions += hit
            block.opened += push.opened_at is not None
            bucket = _STATE_BUCKET.get(device.states.get(push.push_id, ""))
            if bucket is not None:
                block.states[bucket] += 1
        for record in device.decisions:
            if record.get("outcome") != "suppressed" or record.get("push_id") in excluded:
                continue
            if _in_period(float(record["ts"]), start, end):
                rules[str(record["rule_id"])].suppressed[str(record["reason"])] += 1

    def answer(self) -> dict[str, Any]:
        rules = self.rules
        totals = _Block()
        for block in rules.values():
            totals.add(block)
        return {"from": self.start, "to": self.end, "attribution_window_s": self.window_s,
                "totals": totals.as_json(),
                "rules": {rule_id: rules[rule_id].as_json() for rule_id in sorted(rules)}}
