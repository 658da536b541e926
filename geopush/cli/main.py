"""The `geopush` command: serve, check, schema, replay (contract §9), erasure-hash.

Exit codes: 0 ok, 1 errors in the inputs (config, stores, devices, pings file), 2 usage.
Machine-readable output (`--json`, `schema`) goes to standard output alone; logs, warnings and
per-line errors of `replay` go to standard error.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import inspect
import sys
from collections.abc import Callable, Sequence
from importlib import metadata
from typing import Any

from geopush.cli.common import (
    ERRORS,
    OK,
    USAGE,
    optional_attr,
    print_error,
    print_problem,
    settings_of,
)
from geopush.devices import erasure_hash
from geopush.errors import ConfigError


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
    parser.add_argument("--version", action="version", version=f"geopush {_version()}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    def config_option(p: argparse.ArgumentParser) -> None:
        p.add_argument("-c", "--config", metavar="CONFIG",
                       help="settings file (default: $GEOPUSH_CONFIG or config/geopush.yaml)")

    def inputs_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--stores", metavar="FILE", help="stores GeoJSON instead of stores_file")
        p.add_argument("--rules", metavar="DIR", help="rules folder instead of rules_dir")

    serve_cmd = commands.add_parser("serve", help="run the service")
    config_option(serve_cmd)
    serve_cmd.set_defaults(handler=_serve)

    check_cmd = commands.add_parser("check", help="validate config, stores and rules")
    config_option(check_cmd)
    inputs_options(check_cmd)
    check_cmd.set_defaults(handler=_command("geopush.cli.check"))

    schema_cmd = commands.add_parser("schema", help="print a JSON Schema")
    schema_cmd.add_argument("what", choices=["config", "rules"])
    schema_cmd.set_defaults(handler=_command("geopush.cli.schema"))

    replay_cmd = commands.add_parser("replay", help="run a file of pings on a virtual clock")
    replay_cmd.add_argument("pings", metavar="PINGS",
                        help="CSV (device_id,ts,lat,lon,accuracy_m,speed_mps) or NDJSON")
    config_option(replay_cmd)
    inputs_options(replay_cmd)
    replay_cmd.add_argument("--devices", metavar="FILE",
                        help="YAML/JSON list of device profiles, each with its device_id")
    replay_cmd.add_argument("--device", metavar="ID", help="device id for a CSV without that column")
    replay_cmd.add_argument("--assume-consent", action="store_true",
                        help="devices missing from --devices consent to everything")
    replay_cmd.add_argument("--weather", metavar="K=V,...",
                        help="e.g. temperature_c=31,condition=clear (default: weather.static)")
    replay_cmd.add_argument("--json", action="store_true", help="the JSON document on stdout")
    replay_cmd.add_argument("--timeline", action="store_true",
                        help="one line per event (with --json: on stderr)")
    replay_cmd.add_argument("--summary-only", action="store_true",
                        help="leave out the lists of events and decisions")
    replay_cmd.add_argument("--explain", action="store_true",
                        help="for each event, why each rule did or did not fire: the trigger "
                             "that does not match, the condition that is false, or the policy "
                             "step that stopped it (with --json: an `explain` list)")
    replay_cmd.add_argument("--jobs", metavar="N", type=_jobs, default=None,
                            help="processes replaying devices side by side (default: one per "
                                 "CPU for a CSV over 16 MB, else 1)")
    replay_cmd.set_defaults(handler=_command("geopush.cli.replay"))

    erasure_cmd = commands.add_parser(
        "erasure-hash", help="the id of a device's erasure record (proof of consent)")
    erasure_cmd.add_argument("device_id", metavar="DEVICE_ID")
    config_option(erasure_cmd)
    erasure_cmd.set_defaults(handler=_erasure_hash)
    return parser


def _command(module: str) -> Callable[[argparse.Namespace], int]:
    """A subcommand's `run`, imported when it runs: `replay` and `schema` need not load what
    `serve` and `check` use (the senders and their HTTP client: most of a second)."""
    def run(args: argparse.Namespace) -> int:
        handler: Callable[[argparse.Namespace], int] = importlib.import_module(module).run
        return handler(args)

    return run


def _version() -> str:
    try:
        return metadata.version("geopush")
    except metadata.PackageNotFoundError:  # run from a source tree that is not installed
        return "unknown"


def _erasure_hash(args: argparse.Namespace) -> int:
    """The hash DELETE /v1/devices/{id} filed the device's erasure record under: look it up in
    the state store (Redis: HGET <key_prefix>:erasures <hash>) to answer an art. 7(1) request."""
    try:
        settings = settings_of(args)
    except ConfigError as exc:
        print_error(exc, sys.stderr)
        return ERRORS
    print(erasure_hash(args.device_id, settings.logging.pseudonym_key))
    return OK


# -- serve -------------------------------------------------------------------------------------


def _serve(args: argparse.Namespace) -> int:
    try:
        settings = settings_of(args)
    except ConfigError as exc:
        print_error(exc, sys.stderr)
        return ERRORS
    from geopush.preflight import deployment_problems

    refused = deployment_problems(settings)  # the lines `geopush check` prints
    for problem in refused:
        print_problem(problem, sys.stderr)
    if refused:
        return ERRORS
    run = optional_attr("geopush.app", "run")
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


def _jobs(text: str) -> int:
    """--jobs: a whole number of processes, 1 to 64 (argparse prints the message)."""
    if not text.strip().isascii() or not text.strip().isdigit() or not 1 <= int(text) <= 64:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a whole number of processes "
                                         "from 1 to 64")
    return int(text)
