"""`geopush schema config|rules`: JSON Schema for editors and validators."""

from __future__ import annotations

import argparse
import json

from geopush.cli.common import OK
from geopush.config import config_json_schema
from geopush.rules import rules_json_schema

# -- schema ------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    schema = config_json_schema() if args.what == "config" else rules_json_schema()
    print(json.dumps(schema, indent=2, ensure_ascii=False))
    return OK
