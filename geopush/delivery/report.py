"""The periodic delivery report (contract §8): every `logging.delivery_report_every`, one log line
with what was decided, what reached a final state and why candidates were suppressed in the
window, and a warning when the delivery rate falls under `logging.delivery_rate_alert`.

Pure. The counts of a window live where the instances can share them (the state store's
shared counters, geopush.delivery.counts) as flat counter fields, `<kind>|<key>`: `decided|<rule>`,
`sent|<rule>`, `failed|<rule>`, `expired|<rule>`, `suppressed|<reason>`. Their format is decided
here alone (`counter_field`, `report_from_counters`), so the writers and the reporting job cannot
drift apart. `|` can occur in neither key: rule ids are `[a-z0-9-]+` (geopush.rules.schema) and
reasons `[a-z_]+` (geopush.rules.decide.REASONS).

The line is logged as `log.info(EVENT, extra=fields(**report))`: the logger writes the event name
itself (geopush.logs), so the report holds only the line's other fields.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from typing import Any, Literal, get_args

EVENT = "delivery_report"
SEPARATOR = "|"
MIN_FINAL = 20  # fewer final pushes than this make a rate too noisy to wake anyone for

CounterKind = Literal["decided", "sent", "failed", "expired", "suppressed"]
COUNTER_KINDS: tuple[CounterKind, ...] = get_args(CounterKind)
_PER_RULE: tuple[CounterKind, ...] = ("decided", "sent", "failed", "expired")


def counter_field(kind: CounterKind, key: str) -> str:
    """The field counting `kind` for `key` (a rule id; a reason for `suppressed`)."""
    if kind not in COUNTER_KINDS:
        raise ValueError(f"counter kind {kind!r}: expected one of {', '.join(COUNTER_KINDS)}")
    if not key or SEPARATOR in key:
        raise ValueError(f"counter key {key!r}: expected a rule id or reason, non-empty and "
                         f"without {SEPARATOR!r}")
    return f"{kind}{SEPARATOR}{key}"


def parse_counter_field(name: str) -> tuple[CounterKind, str]:
    kind, separator, key = name.partition(SEPARATOR)
    if not separator or not key or kind not in COUNTER_KINDS:
        raise ValueError(f"counter field {name!r}: expected <kind>{SEPARATOR}<key> with a kind "
                         f"of {', '.join(COUNTER_KINDS)}")
    return kind, key


def delivery_rate(sent: int, failed: int, expired: int) -> float | None:
    """sent / (sent + failed + expired): over the pushes that reached a final state in the
    window (cancelled ones were never meant to arrive); None when none did."""
    final = sent + failed + expired
    return sent / final if final else None


def report_from_counters(counters: Mapping[str, int], window_s: float) -> dict[str, Any]:
    """The report's fields, in the contract's order, from a window's counter fields. A field
    this module did not write is an error naming it: a silent skip would hide pushes."""
    by_rule: dict[str, Counter[str]] = {}
    suppressed: Counter[str] = Counter()
    for name, count in counters.items():
        kind, key = parse_counter_field(name)
        if kind == "suppressed":
            suppressed[key] += int(count)
        else:
            by_rule.setdefault(key, Counter())[kind] += int(count)
    totals: Counter[str] = Counter()
    for counts in by_rule.values():
        totals.update(counts)
    return {
        "window_s": window_s,
        **{kind: totals[kind] for kind in _PER_RULE},
        "suppressed": {reason: suppressed[reason] for reason in sorted(suppressed)},
        "delivery_rate": delivery_rate(totals["sent"], totals["failed"], totals["expired"]),
        "by_rule": {rule_id: {**{kind: by_rule[rule_id][kind] for kind in _PER_RULE},
                              "delivery_rate": delivery_rate(by_rule[rule_id]["sent"],
                                                             by_rule[rule_id]["failed"],
                                                             by_rule[rule_id]["expired"])}
                    for rule_id in sorted(by_rule)},
    }


def alert(report: Mapping[str, Any], threshold: float, min_final: int = MIN_FINAL) -> bool:
    """The report calls for the warning line: its delivery rate is under `threshold`
    (logging.delivery_rate_alert) over at least `min_final` pushes that reached a final state."""
    final = int(report["sent"]) + int(report["failed"]) + int(report["expired"])
    rate = report["delivery_rate"]
    return rate is not None and final >= min_final and float(rate) < threshold
