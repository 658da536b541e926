"""`geopush schema config|rules`: JSON Schema for editors and validators."""

from __future__ import annotations

import argparse
import json
import sys

from geopush.cli.common import OK, USAGE, optional_attr
from geopush.config import config_json_schema

# -- schema ------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    if args.what == "config":
        print(json.dumps(config_json_schema(), indent=2, ensure_ascii=False))
        return OK
    schema_of_rules = optional_attr("geopush.rules", "rules_json_schema")
    if schema_of_rules is None:
        print("error: the rules schema is not available yet (the rules engine is not built)",
              file=sys.stderr)
        return USAGE
    print(json.dumps(schema_of_rules(), indent=2, ensure_ascii=False))
    return OK
