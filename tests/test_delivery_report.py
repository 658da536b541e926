"""The delivery report (contract §8): its fields from a window's counters, the delivery rate over
final pushes only, and the alert under `logging.delivery_rate_alert` with at least 20 of them."""

from __future__ import annotations

import re
from typing import Any

import pytest

from geopush.delivery.report import (
    SEPARATOR,
    alert,
    counter_field,
    delivery_rate,
    parse_counter_field,
    report_from_counters,
)
from geopush.rules.decide import REASONS
from geopush.rules.schema import RULE_ID


def test_the_separator_can_occur_in_no_rule_id_or_reason() -> None:
    assert re.fullmatch(RULE_ID, f"a{SEPARATOR}b") is None
    assert re.fullmatch(RULE_ID, "hot-day-ice-cream")  # the pattern is the one checked above
    assert all(SEPARATOR not in reason for reason in REASONS)


@pytest.mark.parametrize(("kind", "key", "name"), [
    ("decided", "hot-day-ice-cream", "decided|hot-day-ice-cream"),
    ("sent", "r1", "sent|r1"),
    ("failed", "r1", "failed|r1"),
    ("expired", "r1", "expired|r1"),
    ("suppressed", "quiet_hours", "suppressed|quiet_hours"),
])
def test_counter_fields_round_trip(kind: Any, key: str, name: str) -> None:
    assert counter_field(kind, key) == name
    assert parse_counter_field(name) == (kind, key)


@pytest.mark.parametrize(("kind", "key"), [("opened", "r1"), ("sent", "a|b"), ("sent", "")])
def test_counter_field_refuses_what_could_not_be_read_back(kind: Any, key: str) -> None:
    with pytest.raises(ValueError, match=re.escape(repr(kind if kind == "opened" else key))):
        counter_field(kind, key)


def test_report_from_counters() -> None:
    counters = {"decided|a": 10, "sent|a": 8, "failed|a": 1, "expired|a": 1,
                "decided|b": 3, "sent|b": 0, "suppressed|quiet_hours": 4,
                "suppressed|global_cap": 2, "decided|c": 2}
    report = report_from_counters(counters, 60.0)
    assert report == {
        "window_s": 60.0, "decided": 15, "sent": 8, "failed": 1, "expired": 1,
        "suppressed": {"global_cap": 2, "quiet_hours": 4},
        "delivery_rate": 0.8,
        "by_rule": {
            "a": {"decided": 10, "sent": 8, "failed": 1, "expired": 1, "delivery_rate": 0.8},
            # decided but nothing final yet in the window: no rate, not 0
            "b": {"decided": 3, "sent": 0, "failed": 0, "expired": 0, "delivery_rate": None},
            "c": {"decided": 2, "sent": 0, "failed": 0, "expired": 0, "delivery_rate": None},
        },
    }
    # the contract's order of the line's fields (the logger puts "event" first)
    assert list(report) == ["window_s", "decided", "sent", "failed", "expired", "suppressed",
                            "delivery_rate", "by_rule"]


def test_an_empty_window_reports_zeros_and_no_rate() -> None:
    assert report_from_counters({}, 60.0) == {
        "window_s": 60.0, "decided": 0, "sent": 0, "failed": 0, "expired": 0, "suppressed": {},
        "delivery_rate": None, "by_rule": {}}


def test_final_pushes_of_a_rule_decided_in_an_earlier_window_count() -> None:
    # the rate is over the pushes that reached a final state in the window, whenever decided
    report = report_from_counters({"sent|a": 1, "expired|a": 1}, 60.0)
    assert report["decided"] == 0 and report["delivery_rate"] == 0.5
    assert report["by_rule"]["a"]["delivery_rate"] == 0.5


@pytest.mark.parametrize("name", ["sent", "sent|", "opened|a", "window_start"])
def test_a_field_not_written_here_is_an_error_naming_it(name: str) -> None:
    with pytest.raises(ValueError, match=re.escape(repr(name))):
        report_from_counters({name: 1}, 60.0)


@pytest.mark.parametrize(("sent", "failed", "expired", "rate"), [
    (9, 1, 0, 0.9), (9, 0, 1, 0.9), (0, 0, 0, None), (0, 2, 2, 0.0), (5, 0, 0, 1.0),
])
def test_delivery_rate(sent: int, failed: int, expired: int, rate: float | None) -> None:
    assert delivery_rate(sent, failed, expired) == rate


@pytest.mark.parametrize(("sent", "failed", "expired", "threshold", "min_final", "expected"), [
    pytest.param(17, 2, 1, 0.9, 20, True, id="0.85 over 20 final: alert"),
    pytest.param(16, 2, 1, 0.9, 20, False, id="19 final: too few to alert"),
    pytest.param(18, 1, 1, 0.9, 20, False, id="exactly at the threshold: not under it"),
    pytest.param(0, 0, 0, 0.9, 0, False, id="no final push: no rate, no alert"),
    pytest.param(0, 20, 0, 0.9, 20, True, id="all failed"),
    pytest.param(0, 0, 20, 0.9, 20, True, id="all expired"),
    pytest.param(9, 1, 0, 0.95, 10, True, id="min_final and threshold are the caller's"),
    pytest.param(19, 1, 0, 0.9, 20, False, id="0.95 is fine"),
])
def test_alert(sent: int, failed: int, expired: int, threshold: float, min_final: int,
               expected: bool) -> None:
    report = report_from_counters({"sent|a": sent, "failed|a": failed, "expired|a": expired},
                                  60.0)
    assert alert(report, threshold, min_final=min_final) is expected


def test_alert_needs_20_final_pushes_by_default() -> None:
    assert alert(report_from_counters({"sent|a": 0, "failed|a": 20}, 60.0), 0.9)
    assert not alert(report_from_counters({"sent|a": 0, "failed|a": 19}, 60.0), 0.9)


def test_the_alert_counts_decided_but_unfinished_pushes_for_nothing() -> None:
    report = report_from_counters({"decided|a": 100, "sent|a": 5, "failed|a": 5}, 60.0)
    assert not alert(report, 0.9)
