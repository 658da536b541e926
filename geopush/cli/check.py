"""`geopush check`: every problem of the config, the stores and the rules, each with file:line."""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from geopush.cli.common import ERRORS, OK, print_error, print_problem, rule_files, settings_of, show
from geopush.config import GeofenceSettings, Settings
from geopush.errors import ConfigError
from geopush.geo.stores import parse_stores
from geopush.preflight import deployment_problems

RULES_NOT_BUILT = "not validated yet (rules engine not built)"


@dataclass
class _Tally:
    errors: int = 0
    warnings: int = 0
    geofences: int = 0
    stores: int = 0


def run(args: argparse.Namespace) -> int:
    """Every problem of the config, the stores and the rules, each with file:line; exit 1 on
    any error. A broken config does not hide the stores' problems when --stores is given."""
    out = sys.stdout
    tally = _Tally()
    settings: Settings | None = None
    try:
        settings = settings_of(args)
    except ConfigError as exc:
        print_error(exc, out)
        tally.errors += max(1, len(exc.details))
    if settings is not None:
        # what serve would refuse, with the lines serve prints
        for problem in deployment_problems(settings):
            print_problem(problem, out)
            tally.errors += 1
        stores_file: Path | None = settings.stores_file
        rules_dir: Path | None = settings.rules_dir
        default_radius = settings.geofence.default_radius_m
    else:
        stores_file = Path(args.stores).resolve() if args.stores else None
        rules_dir = Path(args.rules).resolve() if args.rules else None
        default_radius = GeofenceSettings().default_radius_m
    if stores_file is None:
        print("note: stores not checked (the config did not load; give --stores FILE)", file=out)
    elif settings is not None and not stores_file.is_file():
        pass  # said above, as serve says it
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
        print(f"error: {show(path)}: cannot read stores file: {exc.strerror}", file=out)
        tally.errors += 1
        return
    store_set, report = parse_stores(text, source=show(path), default_radius_m=default_radius_m)
    for problem in report.problems:
        print_problem(problem, out)
    tally.errors += len(report.errors)
    tally.warnings += len(report.warnings)
    if store_set is not None:
        tally.geofences = len(store_set)
        tally.stores = len({g.store_id for g in store_set.geofences})


def _check_rules(rules_dir: Path, tally: _Tally, out: TextIO) -> None:
    if not rules_dir.is_dir():
        print(f"warning: {show(rules_dir)}: rules folder not found", file=out)
        tally.warnings += 1
        return
    files = rule_files(rules_dir)
    if files:
        # saying nothing would read as "rules are fine"; they are simply not checked yet
        print(f"warning: {show(rules_dir)}: {len(files)} rule file(s): rules: "
              f"{RULES_NOT_BUILT}", file=out)
        tally.warnings += 1
