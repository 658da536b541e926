"""Rules (contract §3): loading with errors that point at the spot, templates that cannot hang or
exhaust the process, and the dwell plan the rules give the tracker, replayed on a real trace."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from geopush.cli.replay import BadLine, Replay, read_pings
from geopush.config import load_settings
from geopush.errors import Problem, RuleLoadError
from geopush.geo.model import Ping
from geopush.geo.stores import StoreSet, parse_stores
from geopush.rules import RuleFile, RulePolicy, RuleSet, parse_rules, read_rule_files, templates
from geopush.rules.templates import TemplateFailure, TemplateProblem, compile_template
from geopush.service.active import ConfigSet, build_engine

REPO = Path(__file__).parent.parent
MUNICH = Path(__file__).parent / "fixtures" / "traces" / "barefoot_munich_x0001-001.csv"
POLICY = RulePolicy(store_cooldown_s=86_400, history_s=180 * 86_400)
GOOD = """\
id: {id}
trigger: {{on: enter, geofences: {{tags: [shop:supermarket]}}}}
message: {{title: "Hello", body: "at {{{{ store.name }}}}"}}
"""


def _problems(*texts: str, stores: StoreSet | None = None) -> list[Problem]:
    files = [RuleFile(f"rules/r{i}.yaml", text) for i, text in enumerate(texts)]
    rules, report = parse_rules(files, POLICY, stores)
    assert (rules is None) == bool(report.errors)
    return report.problems


def _rule(**overrides: Any) -> str:
    rule: dict[str, Any] = {"id": "r", "trigger": {"on": "enter",
                                                   "geofences": {"tags": ["shop:supermarket"]}},
                            "message": {"title": "t", "body": "b"}}
    for key, value in overrides.items():
        rule[key] = value
    return json.dumps(rule)  # JSON is YAML


# -- loading ---------------------------------------------------------------------------------


def test_the_bundled_rules_load_with_the_bundled_stores_and_config() -> None:
    settings = load_settings(REPO / "config" / "geopush.yaml")
    from geopush.service.active import load_geofencing

    geofencing = load_geofencing(settings)
    assert [r.id for r in geofencing.rules.rules] == [
        "hot-day-drinks", "order-ready", "rainy-day", "weekend-special", "welcome-back"]
    assert geofencing.rules.warnings == ()


@pytest.mark.parametrize(("text", "line", "says"), [
    (_rule(category="service", holdout=0.1), 1, "expected no holdout on a category: service"),
    (_rule(caps={"store_cooldown": "2h"}), 1,
     "caps.store_cooldown = 2h is shorter than policy.store_cooldown (1d)"),
    (_rule(caps={"per_device": [{"max": 1, "per": "365d"}]}), 1,
     "caps.per_device[0].per = 365d is longer than retention.history (180d)"),
    (_rule(message={"title": "t", "body": "b", "data": {"google.x": "1"}}), 1,
     "message.data key 'google.x' is reserved"),
    (_rule(message={"title": "t", "body": "b", "data": {"n": 1}}), 1,
     "message.data.n = 1; expected text"),
    (_rule(trigger={"on": "exit", "dwell": "5m", "geofences": {"ids": ["a"]}}), 1,
     "expected no trigger.dwell with on: exit"),
    (_rule(when={"local_time": {"from": "09:00", "to": "09:00"}}), 1,
     "expected from and to to differ"),
    (_rule(when={"activity": ["flying"]}), 1, "when.activity.0 = 'flying'; expected one of"),
    (_rule(id="Hot Day"), 1, "id = 'Hot Day'; expected lower-case letters, digits and -"),
    ("id: a\nrules: []\n", 1, "id: unknown key next to `rules:`"),
    ("rules:\n  - 5\n", 2, "a rule is int 5; expected a mapping with id, trigger and message"),
    ("base: &b {on: enter}\n", 1, "anchor &b is not allowed"),
    # PyYAML would keep the second title without a word
    ("id: a\ntrigger:\n  on: enter\n  geofences: {tags: [x]}\nmessage:\n  title: t\n"
     "  body: b\n  title: u\n", 8,
     "duplicate key 'title' (first given on line 6); expected each key once in a mapping"),
    ("id: a\ntrigger: {on: enter\n", 3, "not valid YAML"),
    ("id: a\ntrigger:\n  on: enter\n  geofences: {tags: [x]}\nmessage:\n  title: t\n"
     "  body: b\n  colour: red\n", 8, "message.colour: unknown key"),
    ("id: a\ntrigger:\n  on: enter\n  geofences: {tags: [x]}\nmessage:\n  title: t\n"
     "  body: '{{ 9 ** }}'\n", 7, "message.body: template syntax error"),
])
def test_a_bad_rule_is_one_error_at_its_line(text: str, line: int, says: str) -> None:
    problems = _problems(text)
    errors = [p for p in problems if p.severity == "error"]
    assert len(errors) == 1, problems
    rendered = f"{errors[0].message}; expected {errors[0].expected}"
    assert errors[0].where == f"rules/r0.yaml:{line}", errors[0]
    assert says in rendered, rendered


def test_yaml_1_2_reading_keeps_on_a_key_and_times_text() -> None:
    # PyYAML's YAML 1.1 reads `on:` as True and 11:00 as 660: both would be errors here
    text = ("id: lunch\ntrigger:\n  on: enter\n  geofences: {tags: [shop:supermarket]}\n"
            "when:\n  local_time: {from: 11:00, to: 14:00}\nmessage: {title: t, body: b}\n")
    assert _problems(text) == []


def test_ids_are_unique_across_files_and_the_second_place_names_the_first() -> None:
    problems = _problems(GOOD.format(id="same"), GOOD.format(id="same"))
    assert [(p.where, p.message) for p in problems] == [
        ("rules/r1.yaml:1", "rule same: id is already used at rules/r0.yaml:1")]


def test_a_selector_matching_no_geofence_is_a_warning_and_an_empty_file_too() -> None:
    stores, _ = parse_stores(json.dumps({"type": "FeatureCollection", "features": [{
        "type": "Feature", "id": "node/1", "properties": {"shop": "bakery"},
        "geometry": {"type": "Point", "coordinates": [14.1, 46.4]}}]}))
    problems = _problems(GOOD.format(id="a"), "", stores=stores)
    assert [(p.severity, p.where) for p in problems] == [
        ("warning", "rules/r1.yaml:1"), ("warning", "rules/r0.yaml:1")]
    assert "matches no geofence" in problems[1].message


def test_unreadable_rules_files_are_one_line_each(tmp_path: Path) -> None:
    for name, make in [
        ("huge.yaml", lambda p: p.write_bytes(b"#" * (2 << 20))),
        ("zero.yaml", lambda p: p.symlink_to("/dev/zero")),  # reports 0 bytes, never ends
        ("latin.yaml", lambda p: p.write_bytes("id: caf\xe9\n".encode("latin-1"))),
    ]:
        folder = tmp_path / name.removesuffix(".yaml")
        folder.mkdir()
        make(folder / name)
        with pytest.raises(RuleLoadError) as raised:
            read_rule_files(folder, "rules")
        assert raised.value.message.startswith(f"rules/{name}: ")
        assert "\n" not in raised.value.message


def test_the_published_version_names_the_rules_too() -> None:
    stores = '{"type": "FeatureCollection", "features": []}'
    bare = ConfigSet("s", stores)
    one = ConfigSet("s", stores, (RuleFile("rules/a.yaml", GOOD.format(id="a")),))
    other = ConfigSet("s", stores, (RuleFile("rules/a.yaml", GOOD.format(id="b")),))
    assert len({bare.version, one.version, other.version}) == 3
    assert ConfigSet.from_bytes(one.to_bytes()) == one


# -- templates -------------------------------------------------------------------------------


CONTEXT = {"store": {"name": "Mercator", "tags": ["shop:supermarket"] * 5}, "device": {},
           "weather": {"temperature_c": 31.4}, "distance_m": 120, "event": "enter",
           "visits": {"count_90d": 0}}


def test_the_contract_example_renders() -> None:
    template = compile_template("It's {{ weather.temperature_c | round | int }}°C, "
                                "{{ device.first_name | default('hello') }}!")
    assert not isinstance(template, TemplateProblem)
    assert template.render(CONTEXT) == "It's 31°C, hello!"


@pytest.mark.parametrize("source", [
    "{{ 9**9**9 }}", "{{ 'x'*10**9 }}", "{{ [1]*10**9 }}", "{{ range(10**9)|list }}",
    "{% for i in range(1000) %}{{ 'x'*4000 }}{% endfor %}",
    "{% for i in range(999) %}{{ range(999)|join }}{% endfor %}",
    "{{ ''.__class__.__mro__ }}", "{{ weather.nothing_here }}",
])
def test_huge_operands_and_escapes_fail_at_render_quickly(source: str) -> None:
    template = compile_template(source)
    assert not isinstance(template, TemplateProblem), template
    started = time.perf_counter()
    with pytest.raises(TemplateFailure):
        template.render(CONTEXT)
    assert time.perf_counter() - started < 1.0


class _Clock:
    """A clock that moves `step` seconds at each reading."""

    def __init__(self, step: float) -> None:
        self.now, self.step = 0.0, step

    def __call__(self) -> float:
        self.now += self.step
        return self.now


@pytest.mark.parametrize(("wall_step", "cpu_step", "fails"), [
    (1.0, 0.0, False),  # descheduled, or a collection elsewhere: the render's own CPU counts
    (1.0, 1.0, True),  # the render itself over budget
    (0.0, 1.0, False),  # the wall clock within budget: the CPU time (never ahead of it) unread
])
def test_the_render_budget_is_the_threads_cpu_time_read_once_the_wall_clock_is_over(
        monkeypatch: pytest.MonkeyPatch, wall_step: float, cpu_step: float,
        fails: bool) -> None:
    template = compile_template("{% for tag in store.tags %}{{ tag }} {% endfor %}")
    assert not isinstance(template, TemplateProblem)
    monkeypatch.setattr(templates.time, "perf_counter", _Clock(wall_step))
    monkeypatch.setattr(templates.time, "thread_time", _Clock(cpu_step))
    if fails:
        with pytest.raises(TemplateFailure, match="render took over 50 ms"):
            template.render(CONTEXT)
    else:
        assert template.render(CONTEXT).startswith("shop:supermarket shop:supermarket")


@pytest.mark.parametrize(("source", "says"), [
    ("{% macro f(n) %}{{ f(n) }}{{ f(n) }}{% endmacro %}{{ f(0) }}", "{% macro %} is not"),
    ("{% set a = 'x'*4000 %}{% set b = a ~ a %}{{ b }}", "{% set %} is not allowed"),
    ("{% for a in store.tags %}{% for b in store.tags %}x{% endfor %}{% endfor %}",
     "a loop inside a loop"),
    ("{{ store.name | center(1000000000) }}", "filter 'center' is not available"),
    ("{{ lipsum(1000000) }}", "unknown name 'lipsum'"),
    ("{% include 'x' %}", "{% include %} is not allowed"),
    ("{{ name }}", "unknown name 'name': templates see device, distance_m, event, store"),
])
def test_constructs_that_could_hang_or_reach_outside_are_load_errors(source: str,
                                                                     says: str) -> None:
    problem = compile_template(source)
    assert isinstance(problem, TemplateProblem)
    assert says in problem.message


# -- the dwell plan, on a real trace -----------------------------------------------------------


def _munich() -> list[Ping]:
    pings = []
    for _, record in read_pings(MUNICH, device_id="phone"):
        assert not isinstance(record, BadLine)
        pings.append(record)
    return pings


def _stores_on(pings: list[Ping]) -> StoreSet:
    """Fences at points of the drive (its stops at lights make stays of varied length)."""
    features = [{"type": "Feature", "id": f"f{i}",
                 "properties": {"radius_m": 60,
                                "shop": "bakery" if (i // 150) % 2 else "kiosk"},
                 "geometry": {"type": "Point", "coordinates": [pings[i].lon, pings[i].lat]}}
                for i in range(150, len(pings), 150)]
    stores, report = parse_stores(json.dumps({"type": "FeatureCollection",
                                              "features": features}))
    assert stores is not None, report.problems
    return stores


def _replay(pings: list[Ping], stores: StoreSet, rules: RuleSet) -> list[tuple[str, str, float]]:
    settings = load_settings(REPO / "config" / "geopush.yaml")
    result = Replay(build_engine(settings, stores, rules), assume_consent=True).run(
        enumerate(pings, start=2))
    return [(e.geofence_id, e.type, e.ts) for e in result.events]


def test_dwells_fire_for_exactly_the_durations_rules_ask_of_each_geofence() -> None:
    pings = _munich()
    stores = _stores_on(pings)
    rules_text = """\
rules:
  - id: bakery-20s
    trigger: {on: dwell, dwell: 20s, geofences: {tags: [shop:bakery]}}
    message: {title: t, body: b}
  - id: f300-45s
    trigger: {on: dwell, dwell: 45s, geofences: {ids: [f300]}}
    message: {title: t, body: b}
  - id: off-10s
    enabled: false
    trigger: {on: dwell, dwell: 10s, geofences: {tags: [shop:kiosk, shop:bakery]}}
    message: {title: t, body: b}
  - id: enter-only
    trigger: {on: enter, geofences: {tags: [shop:kiosk]}}
    message: {title: t, body: b}
"""
    rules, report = parse_rules([RuleFile("rules/dwell.yaml", rules_text)], POLICY, stores)
    assert rules is not None, report.problems

    without = _replay(pings, stores, RuleSet())
    assert not [e for e in without if e[1] == "dwell"]  # no rule asks: no dwell timers
    stays: list[tuple[str, float, float]] = []  # (fence, enter ts, exit ts)
    open_at: dict[str, float] = {}
    for fid, kind, ts in without:
        if kind == "enter":
            open_at[fid] = ts
        elif kind == "exit":
            stays.append((fid, open_at.pop(fid), ts))
    plan = {g.id: ([20.0] if "shop:bakery" in g.tags else []) + ([45.0] if g.id == "f300" else [])
            for g in stores.geofences}
    expected = sorted((fid, "dwell", enter + d) for fid, enter, exit_ in stays
                      for d in plan[fid] if enter + d <= exit_)
    assert len(expected) >= 3, stays  # the drive's stops make some stays long enough

    with_rules = _replay(pings, stores, rules)
    assert sorted(e for e in with_rules if e[1] == "dwell") == expected
    assert [e for e in with_rules if e[1] != "dwell"] == without  # enters and exits unchanged
