"""What every `geopush` command shares: exit codes, settings with --stores/--rules, problems
printed one a line."""

from __future__ import annotations

import argparse
import importlib
from pathlib import Path
from typing import Any, TextIO

from geopush.config import Settings, load_settings
from geopush.errors import GeopushError, Problem

OK, ERRORS, USAGE = 0, 1, 2


def settings_of(args: argparse.Namespace) -> Settings:
    """Load the settings; --stores and --rules win over the file and the environment."""
    settings = load_settings(args.config)
    update: dict[str, Path] = {}
    origin = settings.origin
    if getattr(args, "stores", None):
        update["stores_file"] = Path(args.stores).resolve()
        origin = origin.overridden(("stores_file",), "option --stores")
    if getattr(args, "rules", None):
        update["rules_dir"] = Path(args.rules).resolve()
        origin = origin.overridden(("rules_dir",), "option --rules")
    return settings.model_copy(update=update).with_origin(origin) if update else settings


def show(path: Path | None) -> str:
    """A path as the user would type it: relative to the working directory when inside it."""
    if path is None:
        return "<none>"
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def print_problem(problem: Problem, out: TextIO) -> None:
    print(problem.line(), file=out)


def print_error(error: GeopushError, out: TextIO) -> None:
    if not error.details:
        print(f"error: {error.message}", file=out)
    for problem in error.details:
        print_problem(problem, out)


def optional_attr(module: str, name: str) -> Any:
    """module.name, or None when the module (not one of its own imports) is missing."""
    try:
        found = importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name is not None and module.startswith(exc.name):
            return None
        raise
    return getattr(found, name, None)

