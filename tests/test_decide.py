"""Decisions (contract §3, §4): which rules are candidates, the policy in the contract's order,
at most one push per moment, and the holdout bucket. The pure Decider, on stores and rules as a
marketer writes them; then `geopush replay` deciding on a real trace."""

from __future__ import annotations

import hashlib
import json
from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from geopush.cli.replay import BadLine, Replay, read_pings
from geopush.config import Fatigue, PolicySettings, load_settings
from geopush.devices import Consent, DeviceProfile
from geopush.geo.model import Event, EventType, Ping, Visit
from geopush.geo.stores import StoreSet, parse_stores
from geopush.rules import RuleFile, RulePolicy, RuleSet, parse_rules
from geopush.rules.conditions import Weather, clock_of, local_time
from geopush.rules.decide import (
    Decider,
    Decision,
    DeviceHistory,
    Explanation,
    PushRecord,
    in_holdout,
    is_push_id,
    push_id_of,
)
from geopush.service.active import build_engine

REPO = Path(__file__).parent.parent
MUNICH = Path(__file__).parent / "fixtures" / "traces" / "barefoot_munich_x0001-001.csv"
BLED = ZoneInfo("Europe/Ljubljana")
HOUR = 3600.0
DAY = 86_400.0


def _stores() -> StoreSet:
    features = [
        {"type": "Feature", "id": "node/1",
         "properties": {"name": "Mercator Bled", "shop": "supermarket",
                        "opening_hours": "Mo-Su 08:00-21:00"},
         "geometry": {"type": "Point", "coordinates": [14.1146, 46.3683]}},
        {"type": "Feature", "id": "node/2",
         "properties": {"name": "Pekarna", "shop": "bakery"},
         "geometry": {"type": "Point", "coordinates": [14.1150, 46.3690]}},
    ]
    stores, report = parse_stores(json.dumps({"type": "FeatureCollection",
                                              "features": features}))
    assert stores is not None, report.problems
    return stores


STORES = _stores()


def _rules(text: str) -> RuleSet:
    rules, report = parse_rules([RuleFile("rules/test.yaml", text)],
                                RulePolicy(DAY, 180 * DAY), STORES)
    assert rules is not None, report.problems
    return rules


def _decider(text: str, **policy: Any) -> Decider:
    return Decider(_rules(text), {g.id: g for g in STORES.geofences}, PolicySettings(**policy))


def _at(text: str) -> float:
    """Local time at the stores (Bled)."""
    return datetime.fromisoformat(text).replace(tzinfo=BLED).timestamp()


def _event(ts: float, kind: EventType = "enter", fence: str = "node/1", *,
           distance_m: float = 20.0, speed_mps: float | None = 1.0,
           dwell_s: float | None = None) -> Event:
    return Event("phone", fence, fence, kind, ts, 46.3683, 14.1146, distance_m, speed_mps,
                 dwell_s)


def _profile(**changes: Any) -> DeviceProfile:
    values: dict[str, Any] = {"device_id": "phone", "push_token": "fcm-token", "locale": "sl",
                              "consent": Consent(location=True, marketing=True),
                              "attributes": {"first_name": "Ana"}, "segments": ["regular"]}
    values.update(changes)
    return DeviceProfile(**values)


def _decide(decider: Decider, events: list[Event], *, profile: DeviceProfile | None = None,
            history: DeviceHistory | None = None, now: float | None = None,
            weather: Weather | None = None, activity: str | None = None) -> list[Decision]:
    return decider.decide("phone", events, profile or _profile(), history or DeviceHistory(),
                          weather=weather, now=now if now is not None else events[0].ts,
                          activity=activity)


def _outcomes(decisions: list[Decision]) -> list[tuple[str, str, str | None]]:
    return [(d.rule_id, d.outcome, d.reason) for d in decisions]


NOON = _at("2026-06-03T12:00")  # a Wednesday
WELCOME = """\
rules:
  - id: welcome
    priority: 10
    trigger: {on: enter, geofences: {tags: [shop:supermarket]}}
    message:
      title: "Hello {{ device.first_name | default('there') }}"
      body: "{{ store.name }}, {{ distance_m }} m"
      locales: {fr: {title: "Bonjour", body: "{{ store.name }}"}}
"""


def test_a_push_renders_the_message_and_enters_the_history() -> None:
    history = DeviceHistory()
    [decision] = _decide(_decider(WELCOME), [_event(NOON)], history=history)
    assert (decision.outcome, decision.reason) == ("push", None)
    assert decision.message is not None
    assert (decision.message.title, decision.message.body) == ("Hello Ana", "Mercator Bled, 20 m")
    assert decision.ttl_s == 1800.0 and decision.push_id is not None
    assert [(p.rule_id, p.outcome, p.ts) for p in history.pushes] == [("welcome", "push", NOON)]


def test_no_matching_rule_leaves_no_record() -> None:
    decider = _decider(WELCOME)
    assert _decide(decider, [_event(NOON, "exit")]) == []
    assert _decide(decider, [_event(NOON, fence="node/2")]) == []


def test_a_moment_has_a_candidate_when_a_trigger_matches_type_dwell_and_geofence() -> None:
    """`triggers` is asked of every event and decides whether the history is read at all."""
    decider = _decider(WELCOME + """\
  - id: lingered
    trigger: {on: dwell, dwell: 5m, geofences: {ids: [node/2]}}
    message: {title: t, body: b}
""")
    matching = [[_event(NOON)], [_event(NOON, "dwell", "node/2", dwell_s=300.0)],
                [_event(NOON, "exit"), _event(NOON, "dwell", "node/2", dwell_s=300.0)]]
    other = [[_event(NOON, "exit")], [_event(NOON, fence="node/2")],
             [_event(NOON, "dwell", "node/2", dwell_s=120.0)],
             [_event(NOON, "dwell", "node/1", dwell_s=300.0)],
             [_event(NOON, fence="node/404")], []]
    assert [decider.triggers(events) for events in matching] == [True] * len(matching)
    assert [decider.triggers(events) for events in other] == [False] * len(other)


def test_locale_falls_back_from_region_to_language_to_the_default() -> None:
    decider = _decider(WELCOME)
    for locale, title in (("fr-CA", "Bonjour"), ("fr", "Bonjour"), ("de-AT", "Hello Ana")):
        [decision] = _decide(decider, [_event(NOON)], profile=_profile(locale=locale))
        assert decision.message is not None and decision.message.title == title, locale


SERVICE_AND_MARKETING = WELCOME + """\
  - id: order
    category: service
    trigger: {on: enter, geofences: {ids: [node/1]}}
    when: {attributes: {order_ready: [true]}}
    message: {title: "Order ready", body: "at {{ store.name }}"}
"""


@pytest.mark.parametrize(("case", "reason"), [
    ("no marketing consent", "no_consent"),
    ("no push token", "no_token"),
    ("late", "late"),
    ("quiet hours", "quiet_hours"),
    ("global cap", "global_cap"),
    ("min gap", "min_gap"),
    ("store cooldown", "store_cooldown"),
])
def test_each_policy_reason_stops_marketing_and_service_rules_skip_the_marketing_ones(
        case: str, reason: str) -> None:
    at = NOON
    profile = _profile(attributes={"order_ready": True})
    history = DeviceHistory()
    now = None
    policy: dict[str, Any] = {}
    if case == "no marketing consent":
        profile = _profile(attributes={"order_ready": True},
                           consent=Consent(location=True, marketing=False))
    elif case == "no push token":
        profile = _profile(attributes={"order_ready": True}, push_token=None)
    elif case == "late":
        now = at + 601  # policy.max_event_lag is 10 min
    elif case == "quiet hours":
        at = _at("2026-06-03T22:30")
    elif case == "global cap":  # 1 a day: one 20 h ago at another store
        history.pushes.append(PushRecord("p", at - 20 * HOUR, "x", "node/2", "marketing", "push"))
    elif case == "min gap":  # caps raised by ops, the 4 h gap still holds
        policy = {"max_per_device": [{"max": 10, "per": DAY}]}
        history.pushes.append(PushRecord("p", at - 3 * HOUR, "x", "node/2", "marketing", "push"))
    elif case == "store cooldown":  # this store, 5 h ago: past min_gap, within 24 h
        policy = {"max_per_device": [{"max": 10, "per": DAY}]}
        history.pushes.append(PushRecord("p", at - 5 * HOUR, "x", "node/1", "marketing", "push"))
    decider = _decider(SERVICE_AND_MARKETING, **policy)
    decisions = _decide(decider, [_event(at)], profile=profile, history=history, now=now)
    by_rule = {d.rule_id: (d.outcome, d.reason) for d in decisions}
    assert by_rule["welcome"] == ("suppressed", reason)
    if reason in ("no_token", "late"):  # these stop service pushes too
        assert by_rule["order"] == ("suppressed", reason)
    else:
        assert by_rule["order"] == ("push", None)


def test_one_push_per_moment_by_priority_then_distance_then_id() -> None:
    text = """\
rules:
  - {id: b-low, trigger: {on: enter, geofences: {ids: [node/1, node/2]}}, message: {title: t, body: b}}
  - {id: a-low, trigger: {on: enter, geofences: {ids: [node/1, node/2]}}, message: {title: t, body: b}}
  - {id: high, priority: 5, trigger: {on: enter, geofences: {ids: [node/2]}}, message: {title: t, body: b}}
"""
    decider = _decider(text)
    near, far = _event(NOON, fence="node/1", distance_m=5), _event(NOON, fence="node/2",
                                                                     distance_m=50)
    decisions = _decide(decider, [far, near])  # the events of one ping, decided together
    assert _outcomes(decisions) == [("high", "push", None), ("a-low", "suppressed", "outranked"),
                                    ("b-low", "suppressed", "outranked"),
                                    ("a-low", "suppressed", "outranked"),
                                    ("b-low", "suppressed", "outranked")]
    assert [d.geofence_id for d in decisions[1:]] == ["node/1", "node/1", "node/2", "node/2"]


def test_a_rule_cap_or_a_template_error_falls_through_to_the_next_candidate() -> None:
    text = """\
rules:
  - id: capped
    priority: 9
    trigger: {on: enter, geofences: {ids: [node/1]}}
    caps: {per_device: [{max: 1, per: 30d}]}
    message: {title: t, body: b}
  - id: broken
    priority: 8
    trigger: {on: enter, geofences: {ids: [node/1]}}
    message: {title: "{{ weather.temperature_c }}", body: b}
  - id: fallback
    trigger: {on: enter, geofences: {ids: [node/1]}}
    message: {title: t, body: b}
"""
    history = DeviceHistory([PushRecord("p", NOON - 10 * DAY, "capped", "node/1", "marketing",
                                        "push")])
    decisions = _decide(_decider(text), [_event(NOON)], history=history)  # weather unknown
    assert _outcomes(decisions) == [("capped", "suppressed", "rule_cap"),
                                    ("broken", "suppressed", "template_error"),
                                    ("fallback", "push", None)]


def test_fatigue_pauses_after_three_ignored_in_a_row_and_an_open_ends_it() -> None:
    decider = _decider(WELCOME, max_per_device=[{"max": 99, "per": DAY}], min_gap=0,
                       store_cooldown=0, fatigue=Fatigue(ignored_in_a_row=3, pause=14 * DAY))
    opened = PushRecord("o", NOON - 20 * DAY, "x", "node/2", "marketing", "push",
                        opened_at=NOON - 20 * DAY + 60)
    ignored = [PushRecord(f"i{n}", NOON - (10 - n) * DAY, "x", "node/2", "marketing", "push")
               for n in range(3)]
    assert _outcomes(_decide(decider, [_event(NOON)],
                             history=DeviceHistory([opened, *ignored]))) == [
        ("welcome", "suppressed", "fatigue")]
    # never opened one: fatigue does not apply
    assert _outcomes(_decide(decider, [_event(NOON)], history=DeviceHistory(list(ignored)))) == [
        ("welcome", "push", None)]
    # the third was opened: no run of three
    ignored[2].opened_at = ignored[2].ts + 600
    assert _outcomes(_decide(decider, [_event(NOON)],
                             history=DeviceHistory([opened, *ignored]))) == [
        ("welcome", "push", None)]
    # the pause is over 14 days after the third was judged
    ignored[2].opened_at = None
    later = NOON + 15 * DAY
    assert _outcomes(_decide(decider, [_event(later)], now=later,
                             history=DeviceHistory([opened, *ignored]))) == [
        ("welcome", "push", None)]


def test_the_holdout_bucket_is_the_contracts_hash_and_reserves_like_a_push() -> None:
    def bucket(rule_id: str, device_id: str) -> float:
        digest = hashlib.sha256(f"{rule_id}:{device_id}".encode()).digest()
        return int.from_bytes(digest[:8], "big") / 2**64

    devices = [f"d{n}" for n in range(10_000)]
    held = [d for d in devices if in_holdout("welcome", d, 0.1)]
    assert held == [d for d in devices if bucket("welcome", d) < 0.1]
    assert 900 < len(held) < 1100
    decider = _decider(WELCOME.replace("    trigger:", "    holdout: 0.1\n    trigger:"))
    history = DeviceHistory()
    decisions = decider.decide(held[0], [_event(NOON)], _profile(device_id=held[0]), history,
                               weather=None, now=NOON)
    assert _outcomes(decisions) == [("welcome", "holdout", None)]
    assert decisions[0].message is None
    [reserved] = history.pushes
    assert reserved.outcome == "holdout"  # counts toward caps: the next moment is capped
    again = decider.decide(held[0], [_event(NOON + HOUR)], _profile(device_id=held[0]),
                           history, weather=None, now=NOON + HOUR)
    assert _outcomes(again) == [("welcome", "suppressed", "global_cap")]


WHEN = """\
rules:
  - id: w
    trigger: {on: dwell, dwell: 5m, geofences: {tags: [shop:supermarket]}}
    when: %s
    message: {title: t, body: b}
"""


CONDITIONS = [
    ("{local_time: {from: '21:00', to: '13:00'}}", {}, True),  # wraps midnight
    ("{local_time: {from: '13:00', to: '21:00'}}", {}, False),
    ("{local_time: {days: [sat, sun]}}", {}, False),
    ("{dates: {from: 2026-06-03, to: 2026-06-03}}", {}, True),
    ("{dates: {to: 2026-06-02}}", {}, False),
    ("{store_open: true}", {}, True),
    ("{weather: {temperature_c: {min: 25}}}", {"weather": Weather(31.0, "clear")}, True),
    ("{weather: {temperature_c: {min: 25}}}", {"weather": Weather(20.0, "clear")}, False),
    ("{weather: {condition: [clear]}}", {}, False),  # unknown weather is never true
    ("{segments: {any: [regular], none: [staff]}}", {}, True),
    ("{segments: {none: [regular]}}", {}, False),
    ("{speed_mps: {max: 2}}", {}, True),
    ("{speed_mps: {max: 2}}", {"speed": None}, False),  # unknown speed
    ("{activity: [walking]}", {"activity": "walking"}, True),
    ("{activity: [walking]}", {}, False),  # unknown activity
    ("{attributes: {vip: [true]}}", {"attributes": {"vip": True}}, True),
    ("{attributes: {vip: [1]}}", {"attributes": {"vip": True}}, False),  # true is not 1
    ("{visits: {last_visit_days: {min: 21}}}", {}, False),  # no earlier visit
    ("{visits: {last_visit_days: {min: 21}}}", {"visit_days_ago": 30}, True),
    ("{visits: {count_90d: {min: 1}}}", {"visit_days_ago": 100}, False),
]


def _judge(when: str, kwargs: dict[str, Any]
           ) -> tuple[list[Decision], list[Explanation]]:
    decider = _decider(WHEN % when)
    history = DeviceHistory()
    if "visit_days_ago" in kwargs:
        end = NOON - kwargs["visit_days_ago"] * DAY
        history.visits.append(Visit("phone", "node/1", "node/1", end - 600, end))
    profile = _profile(attributes=kwargs.get("attributes", {}))
    event = _event(NOON, "dwell", dwell_s=300.0, speed_mps=kwargs.get("speed", 1.0))
    explained = decider.not_candidates("phone", [event], profile, history,
                                       weather=kwargs.get("weather"),
                                       activity=kwargs.get("activity"))
    decisions = _decide(decider, [event], profile=profile, history=history,
                        weather=kwargs.get("weather"), activity=kwargs.get("activity"))
    return decisions, explained


@pytest.mark.parametrize(("when", "kwargs", "matches"), CONDITIONS)
def test_conditions(when: str, kwargs: dict[str, Any], matches: bool) -> None:
    decisions, _ = _judge(when, kwargs)
    assert bool(decisions) == matches


@pytest.mark.parametrize(("when", "kwargs", "matches"), CONDITIONS)
def test_replay_explain_names_the_condition_that_is_false(
        when: str, kwargs: dict[str, Any], matches: bool) -> None:
    """`--explain`: a rule that is not a candidate says which condition of `when` failed, and
    one that is a candidate is not explained away."""
    _, explained = _judge(when, kwargs)
    if matches:
        assert explained == []
        return
    [line] = explained
    condition = when.strip("{}").split(":")[0]
    assert line.why.startswith(f"when.{condition}"), line.why
    assert line.rule_id == "w" and line.event == "dwell"


@pytest.mark.parametrize(("event", "why"), [
    (("enter", None), "trigger.on is dwell, the event is enter"),
    (("dwell", 600.0), "trigger.dwell is 300s, this dwell is 600s"),
])
def test_replay_explain_names_the_trigger_that_does_not_match(
        event: tuple[EventType, float | None], why: str) -> None:
    decider = _decider(WHEN % "{}")
    explained = decider.not_candidates("phone", [_event(NOON, event[0], dwell_s=event[1])],
                                       _profile(), DeviceHistory(), weather=None)
    assert [x.why for x in explained] == [why]


def test_a_dwell_rule_matches_its_own_duration_only() -> None:
    decider = _decider(WHEN % "{}")
    assert _decide(decider, [_event(NOON, "dwell", dwell_s=600.0)]) == []
    assert len(_decide(decider, [_event(NOON, "dwell", dwell_s=300.0)])) == 1


# -- replay on a real trace --------------------------------------------------------------------


def test_replay_decides_on_a_real_drive_within_the_policy() -> None:
    pings: list[Ping] = []
    for _, record in read_pings(MUNICH, device_id="car"):
        assert not isinstance(record, BadLine)
        pings.append(record)
    features = [{"type": "Feature", "id": f"f{i}", "properties": {"radius_m": 60,
                                                                  "shop": "bakery"},
                 "geometry": {"type": "Point", "coordinates": [pings[i].lon, pings[i].lat]}}
                for i in range(150, len(pings), 150)]
    stores, _ = parse_stores(json.dumps({"type": "FeatureCollection", "features": features}))
    assert stores is not None
    rules, report = parse_rules([RuleFile("rules/r.yaml", """\
id: bakery
trigger: {on: enter, geofences: {tags: [shop:bakery]}}
message: {title: "Fresh bread", body: "at {{ store.name }}"}
""")], RulePolicy(DAY, 180 * DAY), stores)
    assert rules is not None, report.problems
    settings = load_settings(REPO / "config" / "geopush.yaml")
    settings = settings.model_copy(update={"policy": PolicySettings(quiet_hours=None)})
    result = Replay(build_engine(settings, stores, rules), assume_consent=True).run(
        enumerate(pings, start=2))
    enters = [e for e in result.events if e.type == "enter"]
    assert len(enters) >= 3
    # the first enter pushes; the drive's later enters fall within a day: the global cap
    assert [(d.geofence_id, d.outcome, d.reason) for d in result.decisions] == [
        (enters[0].geofence_id, "push", None),
        *[(e.geofence_id, "suppressed", "global_cap") for e in enters[1:]]]
    assert result.summary()["pushes"] == 1
    assert result.summary()["suppressed"] == {"global_cap": len(enters) - 1}
    doc = result.document()
    assert doc["decisions"][0]["title"] == "Fresh bread"
    assert doc["decisions"][0]["body"] == f"at {enters[0].geofence_id}"


def test_nothing_is_late_in_replay_not_even_a_dwell_fired_when_the_input_ends() -> None:
    """Contract §9: at the end of the input the clock runs on to the last ping + stale_after;
    a dwell that falls due then is decided at its own time, as it would be live."""
    rules = _rules("""\
id: stay
trigger: {on: dwell, dwell: 5m, geofences: {ids: [node/1]}}
message: {title: t, body: b}
""")
    settings = load_settings(REPO / "config" / "geopush.yaml")
    settings = settings.model_copy(update={"policy": PolicySettings(quiet_hours=None)})
    one_ping = Ping("phone", NOON, 46.3683, 14.1146, accuracy_m=10.0)  # and then silence
    result = Replay(build_engine(settings, STORES, rules), assume_consent=True).run(
        [(2, one_ping)])
    assert ("node/1", "dwell", NOON + 300) in [(e.geofence_id, e.type, e.ts)
                                               for e in result.events]
    assert [(d.rule_id, d.outcome, d.reason) for d in result.decisions] == [
        ("stay", "push", None)]


def test_push_ids_are_keyed_ulids_so_no_log_confirms_a_guessed_device() -> None:
    event = _event(NOON)
    first = push_id_of("phone", "welcome", event, b"key-1")
    assert first == push_id_of("phone", "welcome", event, b"key-1")  # every instance, retry
    assert is_push_id(first) and len(first) == 26
    # the ULID's time part is the event's time in ms (ids sort by time)
    millis = 0
    for char in first[:10]:
        millis = millis * 32 + "0123456789ABCDEFGHJKMNPQRSTVWXYZ".index(char)
    assert millis == int(NOON * 1000)
    # without the key, rule, store and time (all in the push_decided line) do not give it
    assert first != push_id_of("phone", "welcome", event, b"key-2")
    assert first != push_id_of("phone", "welcome", event)
    assert push_id_of("other", "welcome", event, b"key-1") != first


@pytest.mark.parametrize("ts", [_at("2026-03-29T01:59"), _at("2026-03-29T03:00"),
                                _at("2026-10-25T02:30"), _at("2026-06-03T00:05"),
                                _at("2026-06-03T23:59"), NOON])
def test_the_local_clock_is_what_strftime_writes(ts: float) -> None:
    local = local_time(ts, "Europe/Ljubljana")
    assert clock_of(local) == local.strftime("%H:%M")
