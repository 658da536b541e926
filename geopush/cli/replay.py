"""`geopush replay`: a file of pings through the engine on a virtual clock (contract §9).

Each device's clock is its latest ping's ts: its due timers fire before its next ping (the
tracker fires every timer due by a ping's time before applying it), and at the end of the input
its clock runs on to its last ping + stale_after, so every stay ends as it would live. Nothing
is `late` in replay. Pings are taken in file order and fed to the engine in chunks; a ping older
than its device's clock is `out_of_order` here, before the engine sees it, because the engine
sorts each device's pings within a batch and would otherwise accept it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO, get_args

from pydantic import ValidationError

from geopush.cli.common import (
    ERRORS,
    OK,
    USAGE,
    print_error,
    settings_of,
    show,
)
from geopush.cli.ping_files import BadLine, NoDeviceColumn, read_pings
from geopush.collector import tuned_for_batch
from geopush.config import WeatherCondition
from geopush.devices import Consent, DeviceProfile, has_location_consent
from geopush.engine import DeviceOutcome, DeviceSnapshot, Engine
from geopush.errors import (
    ConfigError,
    InvalidInput,
    Problem,
    RuleLoadError,
    StoreLoadError,
    not_utf8,
    shortened,
)
from geopush.geo.model import DeviceState, Event, Ping, Visit
from geopush.geo.stores import load_stores
from geopush.pings import DEVICE_ID, DEVICE_ID_EXPECTED
from geopush.rules import read_rule_files, rules_from_files
from geopush.rules.conditions import Weather
from geopush.rules.decide import Decision, DeviceHistory, Explanation
from geopush.service.active import build_engine, rule_policy
from geopush.timeutil import format_ts, parse_ts
from geopush.yamlspots import line_of, load_yaml

# --assume-consent: every device can be pushed to
ASSUMED_TOKEN = "replay-assumed-token"
_ASSUMED_CONSENT = Consent(location=True, marketing=True)
# pings per engine call: one index query per chunk, and a device's pings of one chunk share its
# bookkeeping (bench_replay_core.py, 100,000 devices: 20.5 s with chunks of 10,000, 17.1 s with
# 100,000, 16.4 s with 250,000 for 90 MB more)
CHUNK = 100_000
KEPT_REJECTIONS = 1000  # per code other than `invalid`, kept with their line and message
EVENT_TYPES = ("enter", "dwell", "exit")
WEATHER_CONDITIONS: tuple[str, ...] = get_args(WeatherCondition)


# -- devices and weather ------------------------------------------------------------------


def load_devices(path: Path) -> dict[str, DeviceProfile]:
    """A YAML/JSON list of device profiles (as PUT /v1/devices takes, each with its device_id),
    or a mapping with that list under `devices`. Raises InvalidInput listing every error."""
    return load_devices_and_visits(path)[0]


def load_devices_and_visits(path: Path
                            ) -> tuple[dict[str, DeviceProfile], dict[str, list[Visit]]]:
    """The profiles, and the earlier visits some of them carry (`visits: [{store_id, start,
    end}]`, to preview win-back rules)."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise InvalidInput(f"{path}: cannot read devices file: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise InvalidInput(f"{path}: devices file: {not_utf8(exc)}") from None
    document = load_yaml(text, str(path))  # JSON is YAML too; YamlError names file:line
    doc, tree = document.data, document.tree
    prefix: list[str | int] = []
    if isinstance(doc, dict) and "devices" in doc:
        doc, prefix = doc["devices"], ["devices"]
    if not isinstance(doc, list):
        raise InvalidInput(f"{path}: expected a list of device profiles, got "
                           f"{type(doc).__name__}")
    problems: list[Problem] = []
    devices: dict[str, DeviceProfile] = {}
    visits: dict[str, list[Visit]] = {}
    for i, item in enumerate(doc):
        where = f"{path}:{line_of(tree, [*prefix, i]) or 1}: device #{i}"
        earlier: list[Visit] = []
        if isinstance(item, dict) and "visits" in item:
            item = dict(item)
            at: list[str | int] = [*prefix, i, "visits"]

            def where_of(loc: list[str | int], at: list[str | int] = at, i: int = i) -> str:
                return f"{path}:{line_of(tree, [*at, *loc]) or 1}: device #{i}"

            earlier = _visits(item.pop("visits"), str(item.get("device_id")), where_of,
                              problems)
        try:
            profile = DeviceProfile.model_validate(item)
        except ValidationError as exc:
            for err in exc.errors():
                loc = [p for p in err["loc"] if isinstance(p, str | int)]
                key = ".".join(str(p) for p in loc)
                line = line_of(tree, [*prefix, i, *loc]) or 1
                if err["type"] == "missing":
                    text, value, expected = f"{key} is missing", None, f"a {key}"
                else:
                    value = _shown(err.get("input"))
                    text, expected = f"{key} = {value}: {err['msg']}", err["msg"]
                problems.append(Problem(f"{path}:{line}: device #{i}", text, field=key,
                                        value=value, expected=expected))
            continue
        if not DEVICE_ID.match(profile.device_id):
            # the pings of such a device would all be refused: say so here, once
            line = line_of(tree, [*prefix, i, "device_id"]) or 1
            problems.append(Problem(f"{path}:{line}: device #{i}",
                                    f"device_id = {profile.device_id!r}: expected "
                                    f"{DEVICE_ID_EXPECTED}", field="device_id",
                                    value=profile.device_id, expected=DEVICE_ID_EXPECTED))
            continue
        if profile.device_id in devices:
            problems.append(Problem(where, f"device_id {profile.device_id!r} is listed twice",
                                    field="device_id", value=profile.device_id,
                                    expected="each device once"))
            continue
        devices[profile.device_id] = profile
        if earlier:
            visits[profile.device_id] = earlier
    if problems:
        raise InvalidInput(f"{path}: {len(problems)} error(s) in devices file", problems)
    return devices, visits


def _shown(value: Any) -> str:
    """A value of the devices file as its author wrote it (YAML), not as Python holds it."""
    if isinstance(value, datetime.date):  # a datetime is a date too
        return value.isoformat()
    if isinstance(value, str):
        return repr(shortened(value))
    short = shortened(value)  # structures as JSON text; numbers, booleans and null as such
    return short if isinstance(short, str) else json.dumps(short)


def _visits(raw: Any, device_id: str, where: Callable[[list[str | int]], str],
            problems: list[Problem]) -> list[Visit]:
    expected = "a list of {store_id, start, end} with RFC 3339 times, start before end"
    if not isinstance(raw, list):
        problems.append(Problem(where([]), f"visits = {raw!r}", field="visits",
                                value=repr(raw), expected=expected))
        return []
    visits = []
    for j, entry in enumerate(raw):
        try:
            if not isinstance(entry, dict) or set(entry) != {"store_id", "start", "end"}:
                raise ValueError("keys")
            start, end = parse_ts(str(entry["start"])), parse_ts(str(entry["end"]))
            if not isinstance(entry["store_id"], str) or start >= end:
                raise ValueError("order")
        except ValueError:
            problems.append(Problem(where([j]), f"visits.{j} = {entry!r}", field=f"visits.{j}",
                                    value=repr(entry), expected=expected))
            continue
        visits.append(Visit(device_id, entry["store_id"], entry["store_id"], start, end))
    return visits


def parse_weather(text: str) -> dict[str, Any]:
    """`temperature_c=31,condition=clear` → {"temperature_c": 31.0, "condition": "clear"}."""
    weather: dict[str, Any] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = part.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not value:
            raise ValueError(f"{part!r}: expected key=value, e.g. temperature_c=31,condition=clear")
        if key == "temperature_c":
            try:
                weather[key] = float(value)
            except ValueError:
                raise ValueError(f"temperature_c = {value!r}: expected a number") from None
            if not math.isfinite(weather[key]):
                raise ValueError(f"temperature_c = {value!r}: expected a finite number")
        elif key == "condition":
            if value not in WEATHER_CONDITIONS:
                raise ValueError(f"condition = {value!r}: expected one of "
                                 + ", ".join(WEATHER_CONDITIONS))
            weather[key] = value
        else:
            raise ValueError(f"{key!r}: unknown weather key; expected temperature_c or condition")
    return weather


# -- the run ----------------------------------------------------------------------------------


@dataclass
class ReplayResult:
    pings: int = 0
    rejected: Counter[str] = field(default_factory=Counter)  # code → count
    rejections: list[tuple[int, str, str]] = field(default_factory=list)  # line, code, message
    events: list[Event] = field(default_factory=list)  # kept unless summary_only
    event_counts: Counter[str] = field(default_factory=Counter)
    visits: list[Visit] = field(default_factory=list)  # kept unless summary_only
    visit_count: int = 0
    decisions: list[Decision] = field(default_factory=list)  # kept unless summary_only
    explanations: list[Explanation] = field(default_factory=list)  # with --explain
    explained: bool = False  # --explain was asked
    outcomes: Counter[str] = field(default_factory=Counter)  # push / holdout / suppressed
    suppressed: Counter[str] = field(default_factory=Counter)  # reason → count
    elapsed_s: float = 0.0

    @property
    def pings_per_s(self) -> float:
        return self.pings / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def summary(self) -> dict[str, Any]:
        return {
            "pings": self.pings,
            "rejected": sum(self.rejected.values()),
            "rejected_by_code": dict(sorted(self.rejected.items())),
            "events": {t: self.event_counts[t] for t in EVENT_TYPES},
            "pushes": self.outcomes["push"],
            "holdouts": self.outcomes["holdout"],
            "suppressed": dict(sorted(self.suppressed.items())),
            "visits": self.visit_count,
            "elapsed_s": round(self.elapsed_s, 3),
            "pings_per_s": round(self.pings_per_s, 1),
        }

    def document(self, *, summary_only: bool = False,
                 names: Mapping[str, str] | None = None) -> dict[str, Any]:
        """The `--json` document of contract §9; `names`: geofence id → store name."""
        doc: dict[str, Any] = {"summary": self.summary()}
        if not summary_only:
            doc["events"] = [event_json(e, names) for e in self.events]
            doc["visits"] = [{"device_id": v.device_id, "store_id": v.store_id,
                              "geofence_id": v.geofence_id, "start": format_ts(v.start),
                              "end": format_ts(v.end)} for v in self.visits]
            doc["decisions"] = [{"ts": format_ts(d.ts), **d.as_json()} for d in self.decisions]
            if self.explained:
                doc["explain"] = [{"ts": format_ts(line.ts), **line.as_json()}
                                  for line in self.explain()]
        return doc

    def explain(self) -> list[Explanation | Decision]:
        """Every rule for every event (--explain): the decisions of the candidates and why the
        other rules were not candidates, in time order, each event's rules by id."""
        lines: list[Explanation | Decision] = [*self.explanations, *self.decisions]
        lines.sort(key=lambda x: (x.ts, x.device_id, x.geofence_id, x.event, x.rule_id))
        return lines


def event_json(event: Event, names: Mapping[str, str] | None = None) -> dict[str, Any]:
    """An event as contract §9 lists it: what the timeline shows, machine-readable."""
    return {"ts": format_ts(event.ts), "device_id": event.device_id,
            "geofence_id": event.geofence_id, "store_id": event.store_id, "type": event.type,
            "store_name": (names or {}).get(event.geofence_id),
            "distance_m": round(event.distance_m, 1),
            "speed_mps": round(event.speed_mps, 2) if event.speed_mps is not None else None,
            "stale": event.stale}


def sort_result(result: ReplayResult) -> None:
    """The lists in the order they are shown: by time, then device (stable: a device's events
    at one time keep their order), whatever order devices were replayed in, one process or a
    split one; the rejections by line, a sample of each code past KEPT_REJECTIONS."""
    result.events.sort(key=lambda e: (e.ts, e.device_id))
    result.visits.sort(key=lambda v: (v.end, v.device_id))
    result.decisions.sort(key=lambda d: (d.ts, d.device_id))
    result.rejections.sort(key=lambda r: r[0])
    kept: Counter[str] = Counter()
    sample = []
    for rejection in result.rejections:
        kept[rejection[1]] += 1
        if rejection[1] == "invalid" or kept[rejection[1]] <= KEPT_REJECTIONS:
            sample.append(rejection)
    result.rejections = sample


class Replay:
    """One replay run: an engine, the devices it knows, and each device's virtual clock."""

    def __init__(
        self,
        engine: Engine,
        *,
        devices: Mapping[str, DeviceProfile] | None = None,
        assume_consent: bool = False,
        keep_events: bool = True,
        chunk: int = CHUNK,
        weather: Weather | None = None,
        visits: Mapping[str, list[Visit]] | None = None,
        explain: bool = False,
    ) -> None:
        self.engine = engine
        engine.explain = explain
        engine.virtual_clock = True
        self.weather = weather
        # per device: pushes decided so far and visits ended, as the policy and rules read them
        self.histories: dict[str, DeviceHistory] = {
            d: DeviceHistory(visits=list(v)) for d, v in (visits or {}).items()}
        self.assume_consent = assume_consent
        self.keep_events = keep_events
        self.chunk = chunk
        self.profiles: dict[str, DeviceProfile] = dict(devices or {})
        # each device's tracker state, which the engine updates in place chunk after chunk
        self.states: dict[str, DeviceState | None] = {}
        self.clock: dict[str, float] = {}  # device → its latest accepted ping's ts
        self.result = ReplayResult(explained=explain)

    def run(self, records: Iterable[tuple[int, Ping | BadLine]]) -> ReplayResult:
        started = time.perf_counter()
        pending: list[Ping] = []
        lines: list[int] = []
        for number, record in records:
            self.result.pings += 1
            if isinstance(record, BadLine):
                self._reject(number, "invalid", record.message)
                continue
            if not self._admit(number, record):
                continue
            pending.append(record)
            lines.append(number)
            if len(pending) >= self.chunk:
                self._ingest(pending, lines)
                pending, lines = [], []
        if pending:
            self._ingest(pending, lines)
        self._run_clocks_out()
        sort_result(self.result)
        self.result.elapsed_s = time.perf_counter() - started
        return self.result

    def _admit(self, number: int, ping: Ping) -> bool:
        device = ping.device_id
        clock = self.clock.get(device)
        # a device with a clock has had a ping admitted, so its consent (which a replay never
        # changes) was checked then
        if clock is None and not self._consents(device):
            self._reject(number, "no_consent",
                         f"device {device!r} is unknown or has not given location consent")
            return False
        if clock is not None and ping.ts < clock:
            self._reject(number, "out_of_order",
                         f"ts {format_ts(ping.ts)} is older than this device's last ping "
                         f"({format_ts(clock)})")
            return False
        self.clock[device] = ping.ts
        return True

    def _consents(self, device: str) -> bool:
        profile = self.profiles.get(device)
        if profile is None and self.assume_consent:
            # --assume-consent: a device missing from --devices consents to everything, with
            # a push token
            profile = self.profiles[device] = DeviceProfile(
                device_id=device, push_token=ASSUMED_TOKEN, consent=_ASSUMED_CONSENT)
        return profile is not None and has_location_consent(profile)

    def _ingest(self, pings: list[Ping], lines: list[int]) -> None:
        # consent was checked in _admit, ping by ping, in file order; the states are updated
        # in place; the virtual clock stands at each moment: nothing is late in replay
        outcomes = self.engine.replay(pings, self.states, self.profiles, lines,
                                      weather=self._weather)
        for device, outcome in outcomes.items():
            for rejected in outcome.rejected:
                self._reject(rejected.index, rejected.code, rejected.message)
            self._record(device, outcome)

    def _run_clocks_out(self) -> None:
        states = self.states
        for device, last in self.clock.items():
            outcome = self.engine.fire(
                device, DeviceSnapshot(self.profiles[device], states.get(device)),
                last + self.engine.tracker.stale_after_s, weather=self._weather)
            if outcome.state is not None:
                states[device] = outcome.state
            self._record(device, outcome)

    def _weather(self, _lat: float, _lon: float) -> Weather | None:
        return self.weather

    def _record(self, device: str, outcome: DeviceOutcome) -> None:
        for event in outcome.events:
            self.result.event_counts[event.type] += 1
        self.result.visit_count += len(outcome.visits)
        if self.keep_events:
            self.result.events.extend(outcome.events)
            self.result.visits.extend(outcome.visits)
        if not self.engine.decides or (outcome.decide is None and not outcome.visits):
            return  # most outcomes: nothing to decide, nothing for a later decision to read
        history = self.histories.get(device)
        if history is None:
            history = self.histories[device] = DeviceHistory()
        if outcome.decide is not None:
            # as the service does (geopush.engine, DECISIONS IN TWO STEPS), on the history
            # this replay has built; it adds the outcome's visits and pushes to it
            outcome.decide(history)
            outcome.decide = None  # it closes over the outcome: a cycle for the collector
            del history.visits[:outcome.visits_forgotten]
            if outcome.forgotten:  # past retention.history, as the store forgets them
                gone = set(outcome.forgotten)
                history.pushes = [p for p in history.pushes if p.push_id not in gone]
        else:
            history.visits.extend(outcome.visits)
        for decision in outcome.decisions:
            self.result.outcomes[decision.outcome] += 1
            if decision.reason is not None:
                self.result.suppressed[decision.reason] += 1
            if self.keep_events:
                self.result.decisions.append(decision)
        if self.keep_events:
            self.result.explanations += outcome.explanations

    def _reject(self, line: int, code: str, message: str) -> None:
        self.result.rejected[code] += 1
        # every malformed line is kept to be reported; consent and order rejections repeat
        # for whole devices, so a sample is kept and the rest only counted (big files)
        if code == "invalid" or self.result.rejected[code] <= KEPT_REJECTIONS:
            self.result.rejections.append((line, code, message))


# -- the command ---------------------------------------------------------------------------


_SHOWN_PER_CODE = 20  # no_consent / out_of_order lines listed before only counting the rest


def run(args: argparse.Namespace) -> int:
    with tuned_for_batch():
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    err = sys.stderr
    weather: dict[str, Any] | None = None
    if args.weather is not None:
        try:
            weather = parse_weather(args.weather)
        except ValueError as exc:
            print(f"error: --weather {exc}", file=err)
            return USAGE
    try:
        settings = settings_of(args)
    except ConfigError as exc:
        print_error(exc, err)
        return ERRORS
    if weather is None and settings.weather.static is not None:
        weather = settings.weather.static.model_dump(exclude_none=True) or None
    try:
        stores = load_stores(settings.stores_file,
                             default_radius_m=settings.geofence.default_radius_m)
    except StoreLoadError as exc:
        if exc.details:  # a heading over the problems; alone, print_error says it
            print(f"error: {exc.message}", file=err)
        print_error(exc, err)
        return ERRORS
    if stores.warnings:
        print(f"stores: {len(stores)} geofences, {len(stores.warnings)} warning(s) "
              "(geopush check lists them)", file=err)
    try:
        rules = rules_from_files(read_rule_files(settings.rules_dir, show(settings.rules_dir)),
                                 rule_policy(settings), stores)
    except RuleLoadError as exc:
        if exc.details:  # a heading over the problems; alone, print_error says it
            print(f"error: {exc.message}", file=err)
        print_error(exc, err)
        return ERRORS
    if not Path(settings.rules_dir).is_dir():
        print(f"warning: {show(settings.rules_dir)}: rules folder not found: nothing is "
              "decided", file=err)
    warned = f", {len(rules.warnings)} warning(s) (geopush check lists them)" \
        if rules.warnings else ""
    print(f"rules: {len(rules)} loaded{warned}", file=err)
    print(f"weather: {weather if weather else 'unknown'}", file=err)
    devices: dict[str, DeviceProfile] = {}
    device_visits: dict[str, list[Visit]] = {}
    if args.devices:
        try:
            devices, device_visits = load_devices_and_visits(Path(args.devices))
        except InvalidInput as exc:
            print_error(exc, err)
            return ERRORS
    replay = Replay(
        build_engine(settings, stores, rules),
        devices=devices,
        assume_consent=args.assume_consent,
        keep_events=not args.summary_only,
        weather=Weather(weather.get("temperature_c"), weather.get("condition"))
        if weather else None,
        visits=device_visits,
        explain=args.explain,
    )
    path = Path(args.pings)
    from geopush.cli.replay_shards import ShardFailed, jobs_for, replay_split

    jobs = jobs_for(path, args.jobs)
    try:
        if jobs > 1:
            result = replay_split(replay, path, device_id=args.device, jobs=jobs)
        else:
            result = replay.run(read_pings(path, device_id=args.device))
    except NoDeviceColumn as exc:
        print(f"error: {exc.message}", file=err)
        return USAGE
    except InvalidInput as exc:
        print_error(exc, err)
        return ERRORS
    except ShardFailed as exc:  # one of its processes died (out of memory?): say which, once
        print(f"error: replay over {jobs} processes failed: {exc}; `--jobs 1` replays in "
              "this process alone", file=err)
        return ERRORS
    _report_rejections(path, result, err)
    names = {g.id: g.name for g in stores.geofences}
    if args.json:
        if args.timeline and not args.summary_only:
            _print_timeline(result.events, names, err)
        print(json.dumps(result.document(summary_only=args.summary_only, names=names),
                         ensure_ascii=False))
    else:
        if not args.summary_only and args.explain:
            _print_explained(result, names, sys.stdout)
        elif not args.summary_only:
            _print_timeline(result.events, names, sys.stdout)
            _print_decisions(result.decisions, sys.stdout)
        _print_summary(result, sys.stdout)
    return OK


def _report_rejections(path: Path, result: ReplayResult, out: TextIO) -> None:
    shown: Counter[str] = Counter()
    for line, code, message in result.rejections:
        shown[code] += 1
        # every malformed line is listed; consent and order problems repeat, so a sample
        if code == "invalid" or shown[code] <= _SHOWN_PER_CODE:
            print(f"{show(path)}:{line}: {code}: {message}", file=out)
    for code, count in sorted(result.rejected.items()):
        if code != "invalid" and count > _SHOWN_PER_CODE:
            print(f"{show(path)}: ... and {count - _SHOWN_PER_CODE} more {code}", file=out)


def _print_timeline(events: list[Event], names: dict[str, str], out: TextIO) -> None:
    for e in events:
        kind: str = "exit (stale)" if e.stale else e.type
        if e.type == "dwell" and e.dwell_s is not None:
            kind = f"dwell {e.dwell_s:g}s"
        speed = "speed ?" if e.speed_mps is None else f"{e.speed_mps:.1f} m/s"
        print(f"{format_ts(e.ts)}  {e.device_id}  {kind:<12}  {e.geofence_id}  "
              f"{names.get(e.geofence_id, '?')}  {e.distance_m:.0f} m  {speed}", file=out)


def _print_decisions(decisions: list[Decision], out: TextIO) -> None:
    for d in decisions:
        what = f"{d.outcome} {d.reason}" if d.reason else d.outcome
        text = f"  {d.message.title!r}: {d.message.body!r}" if d.message else ""
        print(f"{format_ts(d.ts)}  {d.device_id}  {what:<22}  {d.rule_id}  {d.geofence_id}"
              f"{text}", file=out)


def _print_explained(result: ReplayResult, names: dict[str, str], out: TextIO) -> None:
    """Each event, then one line per rule: what it decided, or why it was not a candidate."""
    by_event: dict[tuple[float, str, str, str], list[Explanation | Decision]] = {}
    for line in result.explain():
        by_event.setdefault((line.ts, line.device_id, line.geofence_id, line.event),
                            []).append(line)
    for e in result.events:
        _print_timeline([e], names, out)
        for line in by_event.pop((e.ts, e.device_id, e.geofence_id, e.type), []):
            if isinstance(line, Explanation):
                print(f"    {line.rule_id}: not a candidate: {line.why}", file=out)
            else:
                what = f"{line.outcome} ({line.reason})" if line.reason else line.outcome
                text = (f": {line.message.title!r} / {line.message.body!r}"
                        if line.message else "")
                print(f"    {line.rule_id}: {what}{text}", file=out)


def _print_summary(result: ReplayResult, out: TextIO) -> None:
    s = result.summary()
    rejected = ", ".join(f"{k} {v}" for k, v in s["rejected_by_code"].items())
    events = ", ".join(f"{k} {v}" for k, v in s["events"].items())
    print(f"pings {s['pings']}, rejected {s['rejected']}{f' ({rejected})' if rejected else ''}; "
          f"events: {events}; visits {result.visit_count}; pushes {s['pushes']}, holdouts "
          f"{s['holdouts']}, suppressed {sum(s['suppressed'].values())}; "
          f"{s['elapsed_s']} s, {s['pings_per_s']:.0f} pings/s", file=out)
