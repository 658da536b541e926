"""Marketers' rules (contract §3): their schema, loading, and message templates. Pure."""

from geopush.rules.load import (
    LoadedRule,
    RuleFile,
    RulePolicy,
    RuleSet,
    parse_rules,
    read_rule_files,
    rules_from_files,
)
from geopush.rules.schema import Rule, rules_json_schema

__all__ = ["LoadedRule", "Rule", "RuleFile", "RulePolicy", "RuleSet", "parse_rules",
           "read_rule_files", "rules_from_files", "rules_json_schema"]
