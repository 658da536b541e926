"""`geopush check`: every problem of the config, the stores and the rules, each with file:line."""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from geopush.cli.common import ERRORS, OK, print_error, print_problem, settings_of, show
from geopush.config import GeofenceSettings, PolicySettings, RetentionSettings, Settings
from geopush.errors import ConfigError, Report, RuleLoadError, not_utf8
from geopush.geo.stores import StoreSet, parse_stores
from geopush.preflight import deployment_problems
from geopush.rules import RulePolicy, parse_rules, read_rule_files
from geopush.service.active import rule_policy


@dataclass
class _Tally:
    errors: int = 0
    warnings: int = 0
    geofences: int = 0
    stores: int = 0
    rules: int = 0

    def add(self, report: Report, out: TextIO) -> None:
        """Print a loader's problems, each on its line, and count them."""
        for problem in report.problems:
            print_problem(problem, out)
        self.errors += len(report.errors)
        self.warnings += len(report.warnings)


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
        policy = rule_policy(settings)
    else:
        stores_file = Path(args.stores).resolve() if args.stores else None
        rules_dir = Path(args.rules).resolve() if args.rules else None
        default_radius = GeofenceSettings().default_radius_m
        # the contract's defaults: the rules' own errors are still worth showing
        policy = RulePolicy(PolicySettings().store_cooldown, RetentionSettings().history)
    store_set: StoreSet | None = None
    if stores_file is None:
        print("note: stores not checked (the config did not load; give --stores FILE)", file=out)
    elif settings is not None and not stores_file.is_file():
        pass  # said above, as serve says it
    else:
        store_set = _check_stores(stores_file, default_radius, tally, out)
    if rules_dir is not None:
        _check_rules(rules_dir, policy, store_set, tally, out)
    if tally.errors:
        print(f"failed: {tally.errors} error(s), {tally.warnings} warning(s)", file=out)
        return ERRORS
    print(f"ok: {tally.geofences} geofences ({tally.stores} stores), {tally.rules} rule(s), "
          f"{tally.warnings} warning(s)", file=out)
    return OK


def _check_stores(path: Path, default_radius_m: float, tally: _Tally,
                  out: TextIO) -> StoreSet | None:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        print(f"error: {show(path)}: cannot read stores file: {exc.strerror}", file=out)
        tally.errors += 1
        return None
    except UnicodeDecodeError as exc:
        print(f"error: {show(path)}: stores file: {not_utf8(exc)}", file=out)
        tally.errors += 1
        return None
    store_set, report = parse_stores(text, source=show(path), default_radius_m=default_radius_m)
    tally.add(report, out)
    if store_set is not None:
        tally.geofences = len(store_set)
        tally.stores = len({g.store_id for g in store_set.geofences})
    return store_set


def _check_rules(rules_dir: Path, policy: RulePolicy, stores: StoreSet | None, tally: _Tally,
                 out: TextIO) -> None:
    """Every rule error; with the stores loaded, selectors that match no geofence too."""
    if not rules_dir.is_dir():
        print(f"warning: {show(rules_dir)}: rules folder not found: no rule can push",
              file=out)
        tally.warnings += 1
        return
    try:
        files = read_rule_files(rules_dir, show(rules_dir))
    except RuleLoadError as exc:
        print_error(exc, out)
        tally.errors += 1
        return
    if not files:
        # saying nothing would read as "rules are fine"
        print(f"warning: {show(rules_dir)}: no rules (*.yaml): geopush will notice enters, "
              "dwells and exits and push nothing", file=out)
        tally.warnings += 1
        return
    rule_set, report = parse_rules(files, policy, stores)
    tally.add(report, out)
    if rule_set is not None:
        tally.rules = len(rule_set)
