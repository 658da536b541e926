"""`GET /v1/stats` counting (contract §6): attribution of visits to push and holdout decisions,
one visit per decision and rule, intention-to-treat, the period, ops test pushes left out, and
lift with Newcombe's interval checked against the paper's worked examples."""

from __future__ import annotations

from typing import Any

import pytest

from geopush.delivery.stats import (
    MIN_GROUP,
    DeviceFacts,
    Visit,
    compute_stats,
    converted,
    lift,
    newcombe_interval,
    wilson_interval,
)
from geopush.rules.decide import Outcome, PushRecord

W = 100.0  # attribution window in these tables


def push(push_id: str, ts: float, rule: str = "r1", store: str = "s1", outcome: Outcome = "push",
         opened_at: float | None = None) -> PushRecord:
    return PushRecord(push_id, ts, rule, store, "marketing", outcome, opened_at)


def suppressed(ts: float, rule: str, reason: str) -> dict[str, Any]:
    return {"ts": ts, "device_id": "d", "geofence_id": "g", "store_id": "s1", "event": "enter",
            "rule_id": rule, "outcome": "suppressed", "reason": reason, "title": None,
            "body": None, "push_id": None}


# -- attribution: one decision at t=1000 and one visit -----------------------------------------

@pytest.mark.parametrize(("visit", "converts"), [
    pytest.param(("s1", 1000.0 + W, 1200.0), True, id="starts exactly at ts+window"),
    pytest.param(("s1", 1000.0 + W + 0.001, 1200.0), False, id="starts just after the window"),
    pytest.param(("s1", 1000.0, 1010.0), True, id="starts at the event"),
    pytest.param(("s1", 900.0, None), True, id="under way at the event (triggering stay)"),
    pytest.param(("s1", 900.0, 1500.0), True, id="began before, ends after the event"),
    pytest.param(("s1", 900.0, 1000.0), True, id="ends exactly at the event"),
    pytest.param(("s1", 900.0, 999.0), False, id="ended before the event"),
    pytest.param(("s2", 1010.0, 1020.0), False, id="another store"),
    pytest.param(("s2", 900.0, None), False, id="under way at another store"),
])
def test_a_visit_converts_a_decision(visit: Visit, converts: bool) -> None:
    assert converted([push("p", 1000.0)], [visit], W) == ({"p"} if converts else set())


def test_a_holdout_decision_converts_like_a_push() -> None:
    assert converted([push("h", 1000.0, outcome="holdout")], [("s1", 1050.0, 1060.0)], W) == {"h"}


@pytest.mark.parametrize(("pushes", "visits", "expected"), [
    pytest.param([push("a", 0.0), push("b", 10.0)], [("s1", 20.0, 30.0)], {"a"},
                 id="one visit, two decisions of one rule: the earliest converts"),
    pytest.param([push("b", 10.0), push("a", 0.0)], [("s1", 20.0, 30.0)], {"a"},
                 id="given out of order: still the earliest"),
    pytest.param([push("a", 0.0), push("b", 10.0)], [("s1", -5.0, None)], {"a"},
                 id="one long stay under way: converts one decision of the rule, not all"),
    pytest.param([push("a", 0.0, rule="r1"), push("b", 10.0, rule="r2")], [("s1", 20.0, 30.0)],
                 {"a", "b"}, id="one visit, decisions of two rules: one of each"),
    pytest.param([push("a", 0.0), push("b", 10.0)], [("s1", 20.0, 30.0), ("s1", 40.0, 50.0)],
                 {"a", "b"}, id="two visits, two decisions"),
    pytest.param([push("h", 0.0, outcome="holdout"), push("p", 10.0)], [("s1", 20.0, 30.0)],
                 {"h"}, id="a holdout and a push of one rule share the rule's visits"),
    pytest.param([push("a", 0.0), push("b", 50.0)], [("s1", -10.0, None), ("s1", 10.0, 20.0)],
                 {"a", "b"}, id="overlapping visits: the earlier decision takes the one that "
                                "ends first, so the later one still has the stay under way"),
    pytest.param([push("a", 0.0), push("b", 200.0)], [("s1", 10.0, 20.0)], {"a"},
                 id="a visit too early for the later decision"),
    pytest.param([push("a", 0.0, store="s1"), push("b", 0.0, store="s2", rule="r2")],
                 [("s2", 10.0, 20.0)], {"b"}, id="each decision only at its own store"),
])
def test_one_visit_converts_at_most_one_decision_per_rule(
        pushes: list[PushRecord], visits: list[Visit], expected: set[str]) -> None:
    assert converted(pushes, visits, W) == expected


# -- the answer ----------------------------------------------------------------------------

def _device(**overrides: Any) -> DeviceFacts:
    facts: dict[str, Any] = {"device_id": "d", "pushes": [], "decisions": [], "states": {},
                             "visits": [], "test_push_ids": set()}
    facts.update(overrides)
    return DeviceFacts(**facts)


def test_counts_states_opens_suppressions_and_conversions_of_one_rule() -> None:
    pushes = [push("sent", 0.0, opened_at=5.0), push("failed", 1.0), push("expired", 2.0),
              push("cancelled", 3.0), push("queued", 4.0), push("sending", 5.0),
              push("purged", 6.0), push("h1", 7.0, outcome="holdout"),
              push("h2", 8.0, outcome="holdout")]
    states = {p.push_id: p.push_id for p in pushes if p.push_id not in {"purged", "h1", "h2"}}
    device = _device(pushes=pushes, states=states,
                     decisions=[suppressed(1.0, "r1", "quiet_hours"),
                                suppressed(2.0, "r1", "quiet_hours"),
                                suppressed(3.0, "r1", "global_cap"),
                                {**suppressed(4.0, "r1", "x"), "outcome": "push", "reason": None}],
                     # the first visit converts the earliest push, the second the next one
                     # (a failed push: intention-to-treat), the third starts too late for every push (the
                     # last, at 6, allows 106) and converts the first holdout (at 7)
                     visits=[("s1", 10.0, 20.0), ("s1", 30.0, 40.0), ("s1", 106.5, 110.0)])
    stats = compute_stats([device], window_s=W, start=None, end=None)
    assert stats["rules"]["r1"] == {
        "decided": 7, "holdout": 2, "sent": 1, "failed": 1, "expired": 1, "cancelled": 1,
        "queued": 2, "suppressed": {"global_cap": 1, "quiet_hours": 2}, "opened": 1,
        "conversions": {"push": 2, "holdout": 1},
        "conversion_rate": {"push": 2 / 7, "holdout": 0.5},
        "lift": {"value": None, "ci95": None},
    }
    assert stats["totals"] == stats["rules"]["r1"]
    assert (stats["from"], stats["to"], stats["attribution_window_s"]) == (None, None, W)


def test_a_push_that_never_arrived_still_converts_in_the_push_group() -> None:
    for state in ("failed", "expired", "cancelled"):
        device = _device(pushes=[push("p", 0.0)], states={"p": state}, visits=[("s1", 1.0, 2.0)])
        block = compute_stats([device], window_s=W, start=None, end=None)["rules"]["r1"]
        assert block["conversions"] == {"push": 1, "holdout": 0}, state
        assert block["conversion_rate"]["push"] == 1.0


def test_the_period_is_from_inclusive_to_exclusive_on_the_event_time() -> None:
    device = _device(pushes=[push("before", 9.0), push("first", 10.0), push("last", 19.0),
                             push("after", 20.0), push("h", 10.0, outcome="holdout")],
                     decisions=[suppressed(9.0, "r1", "min_gap"), suppressed(10.0, "r1", "fatigue"),
                                suppressed(20.0, "r1", "late")])
    block = compute_stats([device], window_s=W, start=10.0, end=20.0)["rules"]["r1"]
    assert (block["decided"], block["holdout"], block["suppressed"]) == (2, 1, {"fatigue": 1})
    assert compute_stats([device], window_s=W, start=None, end=20.0)["totals"]["decided"] == 3
    assert compute_stats([device], window_s=W, start=10.0, end=None)["totals"]["decided"] == 3
    stats = compute_stats([device], window_s=W, start=10.0, end=20.0)
    assert (stats["from"], stats["to"]) == (10.0, 20.0)


def test_a_conversion_does_not_depend_on_the_period_asked() -> None:
    # the visit went to the decision before the period; asking for a later period must not
    # hand it to a decision that did not get it
    device = _device(pushes=[push("old", 0.0), push("new", 20.0)], visits=[("s1", 30.0, 40.0)])
    stats = compute_stats([device], window_s=W, start=10.0, end=None)
    assert stats["rules"]["r1"]["conversions"] == {"push": 0, "holdout": 0}
    assert stats["rules"]["r1"]["decided"] == 1


def test_visits_after_the_period_still_convert_its_decisions() -> None:
    device = _device(pushes=[push("p", 19.0)], visits=[("s1", 50.0, 60.0)])
    stats = compute_stats([device], window_s=W, start=10.0, end=20.0)
    assert stats["rules"]["r1"]["conversions"]["push"] == 1


def test_ops_test_pushes_are_left_out_everywhere() -> None:
    device = _device(pushes=[push("test", 0.0, opened_at=1.0), push("real", 10.0)],
                     states={"test": "sent", "real": "failed"}, visits=[("s1", 20.0, 30.0)],
                     test_push_ids={"test"})
    block = compute_stats([device], window_s=W, start=None, end=None)["rules"]["r1"]
    # without the exclusion the test push would count, be sent and opened, and take the visit
    assert (block["decided"], block["sent"], block["failed"], block["opened"]) == (1, 0, 1, 0)
    assert block["conversions"]["push"] == 1


def test_a_rule_with_only_test_pushes_does_not_appear() -> None:
    device = _device(pushes=[push("test", 0.0, rule="ops")], test_push_ids={"test"})
    assert compute_stats([device], window_s=W, start=None, end=None)["rules"] == {}


def test_totals_add_up_the_rules_and_rules_are_in_id_order() -> None:
    device = _device(pushes=[push("b1", 0.0, rule="b"), push("a1", 1.0, rule="a"),
                             push("a2", 2.0, rule="a", outcome="holdout")],
                     states={"b1": "sent", "a1": "sent"},
                     decisions=[suppressed(3.0, "c", "rule_cap"), suppressed(4.0, "a", "rule_cap")],
                     visits=[("s1", 5.0, 6.0)])
    stats = compute_stats([device], window_s=W, start=None, end=None)
    assert list(stats["rules"]) == ["a", "b", "c"]
    totals = stats["totals"]
    # the one visit converts a decision of each rule: a1 (earliest of rule a) and b1
    assert (totals["decided"], totals["holdout"], totals["sent"]) == (2, 1, 2)
    assert totals["suppressed"] == {"rule_cap": 2}
    assert totals["conversions"] == {"push": 2, "holdout": 0}
    assert totals["conversion_rate"] == {"push": 1.0, "holdout": 0.0}
    assert stats["rules"]["c"]["conversion_rate"] == {"push": None, "holdout": None}


def test_devices_are_attributed_apart() -> None:
    # a visit by one device never converts another device's decision
    one = _device(device_id="one", pushes=[push("p1", 0.0)])
    two = _device(device_id="two", pushes=[push("p2", 0.0)], visits=[("s1", 1.0, 2.0)])
    totals = compute_stats([one, two], window_s=W, start=None, end=None)["totals"]
    assert totals["conversions"]["push"] == 1


# -- lift ------------------------------------------------------------------------------------

def _groups(pushes: int, push_hits: int, holdouts: int, holdout_hits: int) -> list[DeviceFacts]:
    """One device per decision; the first `*_hits` of each group visit the store."""
    devices = []
    groups: tuple[tuple[Outcome, int, int], ...] = (("push", pushes, push_hits),
                                                    ("holdout", holdouts, holdout_hits))
    for group, size, hits in groups:
        for i in range(size):
            devices.append(_device(device_id=f"{group}{i}",
                                   pushes=[push(f"{group}{i}", 0.0, outcome=group)],
                                   visits=[("s1", 10.0, 20.0)] if i < hits else []))
    return devices


@pytest.mark.parametrize(("pushes", "holdouts"), [(MIN_GROUP - 1, 40), (40, MIN_GROUP - 1),
                                                  (0, 40), (40, 0)])
def test_lift_is_null_while_a_group_is_under_30(pushes: int, holdouts: int) -> None:
    stats = compute_stats(_groups(pushes, pushes // 2, holdouts, 0), window_s=W, start=None,
                          end=None)
    assert stats["rules"]["r1"]["lift"] == {"value": None, "ci95": None}
    assert stats["totals"]["lift"] == {"value": None, "ci95": None}


def test_lift_with_30_in_each_group() -> None:
    assert MIN_GROUP == 30
    stats = compute_stats(_groups(30, 15, 30, 6), window_s=W, start=None, end=None)
    block = stats["rules"]["r1"]
    assert block["conversion_rate"] == {"push": 0.5, "holdout": 0.2}
    assert block["lift"]["value"] == pytest.approx(0.3)
    # 15/30 − 6/30 by Newcombe's method 10, by hand: Wilson (0.33154, 0.66846) and
    # (0.09505, 0.37306); 0.3 − √(0.16846² + 0.17306²) = 0.0585, 0.3 + √(0.16846² + 0.10495²) = 0.4985
    low, high = block["lift"]["ci95"]
    assert (round(low, 4), round(high, 4)) == (0.0585, 0.4985)


# Newcombe RG (1998a), "Two-sided confidence intervals for the single proportion: comparison of
# seven methods", Stat Med 17:857-872, Table I, method 3 (Wilson score, no continuity correction).
@pytest.mark.parametrize(("x", "n", "low", "high"), [
    (81, 263, 0.2553, 0.3662),
    (15, 148, 0.0624, 0.1605),
    (0, 20, 0.0, 0.1611),
    (1, 29, 0.0061, 0.1718),
])
def test_wilson_interval_matches_newcombe_1998a(x: int, n: int, low: float, high: float) -> None:
    got = wilson_interval(x, n)
    assert (round(got[0], 4), round(got[1], 4)) == (low, high)


# Newcombe RG (1998b), "Interval estimation for the difference between independent proportions:
# comparison of eleven methods", Stat Med 17:873-890, Table II, method 10 (hybrid score, no
# continuity correction). Each row was checked by hand from the two Wilson intervals: with
# (l1, u1), (l2, u2) the Wilson bounds and d = p1 − p2,
#   low = d − √((p1 − l1)² + (u2 − p2)²),  high = d + √((u1 − p1)² + (p2 − l2)²).
#   56/70 − 48/80: Wilson (0.6918, 0.8770) and (0.4905, 0.7004); d = 0.2000 → (0.0524, 0.3339)
#   9/10 − 3/10:   (0.5958, 0.9821), (0.1078, 0.6032); d = 0.6000 → (0.1705, 0.8090)
#   6/7 − 2/7:     (0.4869, 0.9743), (0.0822, 0.6411); d = 0.5714 → (0.0582, 0.8062)
#   5/56 − 0/29:   (0.0387, 0.1926), (0, 0.1170);      d = 0.0893 → (−0.0381, 0.1926)
#   0/10 − 0/20:   (0, 0.2775), (0, 0.1611);           d = 0      → (−0.1611, 0.2775)
#   10/10 − 0/20:  (0.7225, 1), (0, 0.1611);           d = 1      → (0.6791, 1.0000)
@pytest.mark.parametrize(("x1", "n1", "x2", "n2", "difference", "low", "high"), [
    (56, 70, 48, 80, 0.2000, 0.0524, 0.3339),
    (9, 10, 3, 10, 0.6000, 0.1705, 0.8090),
    (6, 7, 2, 7, 0.5714, 0.0582, 0.8062),
    (5, 56, 0, 29, 0.0893, -0.0381, 0.1926),
    (0, 10, 0, 20, 0.0, -0.1611, 0.2775),
    (0, 10, 0, 10, 0.0, -0.2775, 0.2775),
    (10, 10, 0, 20, 1.0, 0.6791, 1.0),
    (10, 10, 0, 10, 1.0, 0.6075, 1.0),
])
def test_newcombe_interval_matches_newcombe_1998b(x1: int, n1: int, x2: int, n2: int,
                                                  difference: float, low: float,
                                                  high: float) -> None:
    assert round(x1 / n1 - x2 / n2, 4) == difference
    got = newcombe_interval(x1, n1, x2, n2)
    assert (round(got[0], 4), round(got[1], 4)) == (low, high)


def test_lift_uses_newcombe_once_both_groups_are_large_enough() -> None:
    # 56/70 − 48/80 again, through lift(): both groups ≥ 30
    result = lift(56, 70, 48, 80)
    assert result["value"] == pytest.approx(0.2)
    assert [round(v, 4) for v in result["ci95"]] == [0.0524, 0.3339]


@pytest.mark.parametrize(("x", "n"), [(0, 0), (-1, 10), (11, 10)])
def test_wilson_interval_refuses_impossible_counts(x: int, n: int) -> None:
    with pytest.raises(ValueError, match="successes"):
        wilson_interval(x, n)
