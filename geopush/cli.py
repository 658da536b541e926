"""The `geopush` command: serve, check, schema, replay (contract §9).

Exit codes: 0 ok, 1 errors in the inputs (config, stores, devices, pings file), 2 usage.
Machine-readable output (`--json`, `schema`) goes to standard output alone; logs, warnings and
per-line errors of `replay` go to standard error.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import inspect
import json
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from geopush.config import GeofenceSettings, Settings, config_json_schema, load_settings
from geopush.errors import ConfigError, InvalidInput, Problem, StoreLoadError
from geopush.geo.stores import load_stores, parse_stores
from geopush.geo.transitions import Event
from geopush.geofencing import build_engine
from geopush.replay import NoDeviceColumn, Replay, ReplayResult, load_devices, parse_weather
from geopush.replay import read_pings as read_ping_file
from geopush.timeutil import format_ts

OK, ERRORS, USAGE = 0, 1, 2
RULES_NOT_BUILT = "not validated yet (rules engine not built)"
_SHOWN_PER_CODE = 20  # no_consent / out_of_order lines listed before only counting the rest


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return USAGE
    command: Any = args.handler
    return int(command(args))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="geopush", description="Geofencing push notifications that are never pushy."
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    def config_option(p: argparse.ArgumentParser) -> None:
        p.add_argument("-c", "--config", metavar="CONFIG",
                       help="settings file (default: $GEOPUSH_CONFIG or config/geopush.yaml)")

    def inputs_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--stores", metavar="FILE", help="stores GeoJSON instead of stores_file")
        p.add_argument("--rules", metavar="DIR", help="rules folder instead of rules_dir")

    serve = commands.add_parser("serve", help="run the service")
    config_option(serve)
    serve.set_defaults(handler=_serve)

    check = commands.add_parser("check", help="validate config, stores and rules")
    config_option(check)
    inputs_options(check)
    check.set_defaults(handler=_check)

    schema = commands.add_parser("schema", help="print a JSON Schema")
    schema.add_argument("what", choices=["config", "rules"])
    schema.set_defaults(handler=_schema)

    replay = commands.add_parser("replay", help="run a file of pings on a virtual clock")
    replay.add_argument("pings", metavar="PINGS",
                        help="CSV (device_id,ts,lat,lon,accuracy_m,speed_mps) or NDJSON")
    config_option(replay)
    inputs_options(replay)
    replay.add_argument("--devices", metavar="FILE",
                        help="YAML/JSON list of device profiles, each with its device_id")
    replay.add_argument("--device", metavar="ID", help="device id for a CSV without that column")
    replay.add_argument("--assume-consent", action="store_true",
                        help="devices missing from --devices consent to everything")
    replay.add_argument("--weather", metavar="K=V,...",
                        help="e.g. temperature_c=31,condition=clear (default: weather.static)")
    replay.add_argument("--json", action="store_true", help="the JSON document on stdout")
    replay.add_argument("--timeline", action="store_true",
                        help="one line per event (with --json: on stderr)")
    replay.add_argument("--summary-only", action="store_true",
                        help="leave out the lists of events and decisions")
    replay.set_defaults(handler=_replay)
    return parser


# -- settings and stores ---------------------------------------------------------------------


def _settings(args: argparse.Namespace) -> Settings:
    """Load the settings; --stores and --rules win over the file and the environment."""
    settings = load_settings(args.config)
    update: dict[str, Path] = {}
    if getattr(args, "stores", None):
        update["stores_file"] = Path(args.stores).resolve()
    if getattr(args, "rules", None):
        update["rules_dir"] = Path(args.rules).resolve()
    return settings.model_copy(update=update) if update else settings


def _show(path: Path | None) -> str:
    """A path as the user would type it: relative to the working directory when inside it."""
    if path is None:
        return "<none>"
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _print_problem(problem: Problem, out: TextIO) -> None:
    line = f"{problem.severity}: {problem.where}: {problem.message}"
    if problem.expected and "expected" not in problem.message:
        line += f"; expected {problem.expected}"
    print(line, file=out)


def _print_error(error: ConfigError | InvalidInput | StoreLoadError, out: TextIO) -> None:
    if not error.details:
        print(f"error: {error.message}", file=out)
    for problem in error.details:
        _print_problem(problem, out)


def _rule_files(rules_dir: Path | None) -> list[Path]:
    if rules_dir is None or not rules_dir.is_dir():
        return []
    return sorted([*rules_dir.glob("*.yaml"), *rules_dir.glob("*.yml")])




# -- check -------------------------------------------------------------------------------------


@dataclass
class _Tally:
    errors: int = 0
    warnings: int = 0
    geofences: int = 0
    stores: int = 0


def _check(args: argparse.Namespace) -> int:
    """Every problem of the config, the stores and the rules, each with file:line; exit 1 on
    any error. A broken config does not hide the stores' problems when --stores is given."""
    out = sys.stdout
    tally = _Tally()
    settings: Settings | None = None
    try:
        settings = _settings(args)
    except ConfigError as exc:
        _print_error(exc, out)
        tally.errors += max(1, len(exc.details))
    if settings is not None:
        stores_file: Path | None = settings.stores_file
        rules_dir: Path | None = settings.rules_dir
        default_radius = settings.geofence.default_radius_m
    else:
        stores_file = Path(args.stores).resolve() if args.stores else None
        rules_dir = Path(args.rules).resolve() if args.rules else None
        default_radius = GeofenceSettings().default_radius_m
    if stores_file is None:
        print("note: stores not checked (the config did not load; give --stores FILE)", file=out)
    else:
        _check_stores(stores_file, default_radius, tally, out)
    if rules_dir is not None:
        _check_rules(rules_dir, tally, out)
    if tally.errors:
        print(f"failed: {tally.errors} error(s), {tally.warnings} warning(s)", file=out)
        return ERRORS
    print(f"ok: {tally.geofences} geofences ({tally.stores} stores), {tally.warnings} warning(s)",
          file=out)
    return OK


def _check_stores(path: Path, default_radius_m: float, tally: _Tally, out: TextIO) -> None:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        print(f"error: {_show(path)}: cannot read stores file: {exc.strerror}", file=out)
        tally.errors += 1
        return
    store_set, report = parse_stores(text, source=_show(path), default_radius_m=default_radius_m)
    for problem in report.problems:
        _print_problem(problem, out)
    tally.errors += len(report.errors)
    tally.warnings += len(report.warnings)
    if store_set is not None:
        tally.geofences = len(store_set)
        tally.stores = len({g.store_id for g in store_set.geofences})


def _check_rules(rules_dir: Path, tally: _Tally, out: TextIO) -> None:
    if not rules_dir.is_dir():
        print(f"warning: {_show(rules_dir)}: rules folder not found", file=out)
        tally.warnings += 1
        return
    rule_files = _rule_files(rules_dir)
    if rule_files:
        # saying nothing would read as "rules are fine"; they are simply not checked yet
        print(f"warning: {_show(rules_dir)}: {len(rule_files)} rule file(s): rules: "
              f"{RULES_NOT_BUILT}", file=out)
        tally.warnings += 1


# -- schema ------------------------------------------------------------------------------------


def _schema(args: argparse.Namespace) -> int:
    if args.what == "config":
        print(json.dumps(config_json_schema(), indent=2, ensure_ascii=False))
        return OK
    schema_of_rules = _optional_attr("geopush.rules", "rules_json_schema")
    if schema_of_rules is None:
        print("error: the rules schema is not available yet (the rules engine is not built)",
              file=sys.stderr)
        return USAGE
    print(json.dumps(schema_of_rules(), indent=2, ensure_ascii=False))
    return OK


def _optional_attr(module: str, name: str) -> Any:
    """module.name, or None when the module (not one of its own imports) is missing."""
    try:
        found = importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name is not None and module.startswith(exc.name):
            return None
        raise
    return getattr(found, name, None)


# -- serve -------------------------------------------------------------------------------------


def _serve(args: argparse.Namespace) -> int:
    try:
        settings = _settings(args)
    except ConfigError as exc:
        _print_error(exc, sys.stderr)
        return ERRORS
    run = _optional_attr("geopush.app", "run")
    if run is None:
        print("error: geopush serve is not available: the service (geopush.app) is not "
              "built in this version", file=sys.stderr)
        return USAGE
    result = run(settings)
    if inspect.isawaitable(result):
        result = asyncio.run(_awaited(result))
    return result if isinstance(result, int) else OK


async def _awaited(awaitable: Any) -> Any:
    return await awaitable


# -- replay ------------------------------------------------------------------------------------


def _replay(args: argparse.Namespace) -> int:
    err = sys.stderr
    weather: dict[str, Any] | None = None
    if args.weather is not None:
        try:
            weather = parse_weather(args.weather)
        except ValueError as exc:
            print(f"error: --weather {exc}", file=err)
            return USAGE
    try:
        settings = _settings(args)
    except ConfigError as exc:
        _print_error(exc, err)
        return ERRORS
    if weather is None and settings.weather.static is not None:
        weather = settings.weather.static.model_dump(exclude_none=True) or None
    try:
        stores = load_stores(settings.stores_file,
                             default_radius_m=settings.geofence.default_radius_m)
    except StoreLoadError as exc:
        print(f"error: {exc.message}", file=err)
        _print_error(exc, err)
        return ERRORS
    if stores.warnings:
        print(f"stores: {len(stores)} geofences, {len(stores.warnings)} warning(s) "
              "(geopush check lists them)", file=err)
    if _rule_files(settings.rules_dir):
        print(f"warning: rules: not evaluated yet (rules engine not built); "
              f"{_show(settings.rules_dir)} ignored", file=err)
    print(f"weather: {weather if weather else 'unknown'}", file=err)
    devices = {}
    if args.devices:
        try:
            devices = load_devices(Path(args.devices))
        except InvalidInput as exc:
            _print_error(exc, err)
            return ERRORS
    replay = Replay(
        build_engine(settings, stores),
        devices=devices,
        assume_consent=args.assume_consent,
        keep_events=not args.summary_only,
    )
    path = Path(args.pings)
    try:
        result = replay.run(read_ping_file(path, device_id=args.device))
    except NoDeviceColumn as exc:
        print(f"error: {exc.message}", file=err)
        return USAGE
    except InvalidInput as exc:
        _print_error(exc, err)
        return ERRORS
    _report_rejections(path, result, err)
    names = {g.id: g.name for g in stores.geofences}
    if args.json:
        if args.timeline and not args.summary_only:
            _print_timeline(result.events, names, err)
        print(json.dumps(result.document(summary_only=args.summary_only), ensure_ascii=False))
    else:
        if not args.summary_only:
            _print_timeline(result.events, names, sys.stdout)
        _print_summary(result, sys.stdout)
    return OK


def _report_rejections(path: Path, result: ReplayResult, out: TextIO) -> None:
    shown: Counter[str] = Counter()
    for line, code, message in result.rejections:
        shown[code] += 1
        # every malformed line is listed; consent and order problems repeat, so a sample
        if code == "invalid" or shown[code] <= _SHOWN_PER_CODE:
            print(f"{_show(path)}:{line}: {code}: {message}", file=out)
    for code, count in sorted(result.rejected.items()):
        if code != "invalid" and count > _SHOWN_PER_CODE:
            print(f"{_show(path)}: ... and {count - _SHOWN_PER_CODE} more {code}", file=out)


def _print_timeline(events: list[Event], names: dict[str, str], out: TextIO) -> None:
    for e in events:
        kind: str = "exit (stale)" if e.stale else e.type
        if e.type == "dwell" and e.dwell_s is not None:
            kind = f"dwell {e.dwell_s:g}s"
        speed = "speed ?" if e.speed_mps is None else f"{e.speed_mps:.1f} m/s"
        print(f"{format_ts(e.ts)}  {e.device_id}  {kind:<12}  {e.geofence_id}  "
              f"{names.get(e.geofence_id, '?')}  {e.distance_m:.0f} m  {speed}", file=out)


def _print_summary(result: ReplayResult, out: TextIO) -> None:
    s = result.summary()
    rejected = ", ".join(f"{k} {v}" for k, v in s["rejected_by_code"].items())
    events = ", ".join(f"{k} {v}" for k, v in s["events"].items())
    print(f"pings {s['pings']}, rejected {s['rejected']}{f' ({rejected})' if rejected else ''}; "
          f"events: {events}; visits {result.visit_count}; pushes 0 (rules engine not built); "
          f"{s['elapsed_s']} s, {s['pings_per_s']:.0f} pings/s", file=out)
