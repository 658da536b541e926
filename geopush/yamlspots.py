"""YAML for geopush's own files: loaded safely, with line numbers for every key.

`load_yaml` is the one way a config or rules file is read: PyYAML's safe loader without
anchors and aliases (a few lines of `&a`/`*a` expand into gigabytes: "billion laughs"), and
every syntax error as `file:line: ...`. PyYAML's composer keeps a start mark on every node, so
`line_of` walks the node tree along a key path to say where a bad value is.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import yaml

from geopush.errors import InvalidInput, Problem


class YamlError(InvalidInput):
    """A file that is not YAML geopush reads: `problem.where` is `file:line`."""

    def __init__(self, problem: Problem) -> None:
        super().__init__(f"{problem.where}: {problem.message}", [problem])
        self.problem = problem


@dataclass(frozen=True)
class YamlDocument:
    data: Any  # None for an empty file
    tree: yaml.Node | None  # for line_of


class _Refused(yaml.MarkedYAMLError):
    """An anchor or alias: valid YAML that geopush does not read."""


class _Duplicate(yaml.MarkedYAMLError):
    """A key given twice in one mapping: PyYAML would keep the last one without a word, so a
    rule's second `title:` or a config's second `policy:` would silently undo the first."""


class _NoAliasLoader(yaml.SafeLoader):
    """The safe loader, refusing anchors (`&name`) and aliases (`*name`, `<<: *name`), and
    reading plain scalars as YAML 1.2 does: PyYAML's YAML 1.1 turns the key `on:` of a rule's
    trigger into True and an unquoted `11:00` into the base-60 number 660."""

    def compose_node(self, parent: yaml.Node | None, index: int) -> yaml.Node | None:
        event = self.peek_event()  # type: ignore[no-untyped-call]
        if isinstance(event, yaml.AliasEvent):
            raise _Refused(problem=f"alias *{event.anchor} is not allowed (anchors "
                                  "and aliases are refused; write the value out)",
                                  problem_mark=event.start_mark)  # type: ignore[arg-type]
        anchor = getattr(event, "anchor", None)
        if anchor is not None:
            raise _Refused(problem=f"anchor &{anchor} is not allowed (anchors and "
                                  "aliases are refused; write the value out)",
                                  problem_mark=event.start_mark)
        return super().compose_node(parent, index)

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        if isinstance(node, yaml.MappingNode):
            first: dict[Any, int] = {}  # key → the line it was first given on
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                try:
                    line = first.get(key)
                except TypeError:  # an unhashable key: the constructor below says so
                    continue
                if line is not None:
                    raise _Duplicate(problem=f"duplicate key {key!r} (first given on line "
                                             f"{line})",
                                     problem_mark=key_node.start_mark)
                first[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


_BOOL = "tag:yaml.org,2002:bool"
_INT = "tag:yaml.org,2002:int"
_FLOAT = "tag:yaml.org,2002:float"
_CORE_SCHEMA: dict[str, re.Pattern[str]] = {
    _BOOL: re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
    _INT: re.compile(r"^(?:[-+]?0b[0-1_]+|[-+]?0[0-7_]+|[-+]?(?:0|[1-9][0-9_]*)"
                     r"|[-+]?0x[0-9a-fA-F_]+)$"),
    _FLOAT: re.compile(r"^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+][0-9]+)?"
                       r"|\.[0-9][0-9_]*(?:[eE][-+][0-9]+)?|[-+]?\.(?:inf|Inf|INF)"
                       r"|\.(?:nan|NaN|NAN)|[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+)$"),
}
_NoAliasLoader.yaml_implicit_resolvers = {
    first: [(tag, _CORE_SCHEMA.get(tag, pattern)) for tag, pattern in resolvers]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


def load_yaml(text: str, source: str) -> YamlDocument:
    """Parse `text` (read from `source`, named in errors); raise YamlError with file:line."""
    loader = _NoAliasLoader(text)
    try:
        tree = loader.get_single_node()
        data = loader.construct_document(tree) if tree is not None else None
    except yaml.MarkedYAMLError as exc:
        raise YamlError(_problem(exc, source)) from None
    except yaml.YAMLError as exc:  # pragma: no cover - PyYAML marks every syntax error
        raise YamlError(Problem(source, f"not valid YAML: {exc}", expected="valid YAML")) from None
    finally:
        loader.dispose()
    return YamlDocument(data, tree)


def _problem(exc: yaml.MarkedYAMLError, source: str) -> Problem:
    mark = exc.problem_mark or exc.context_mark
    where = f"{source}:{mark.line + 1}" if mark is not None else source
    what = exc.problem or "syntax error"
    if isinstance(exc, _Refused):
        return Problem(where, what, expected="plain YAML without anchors and aliases")
    if isinstance(exc, _Duplicate):
        return Problem(where, what, expected="each key once in a mapping")
    if exc.context and exc.context_mark is not None and exc.context_mark is not mark:
        what = f"{exc.context} (line {exc.context_mark.line + 1}), {what}"
    elif exc.context:
        what = f"{exc.context}: {what}"
    column = f", column {mark.column + 1}" if mark is not None else ""
    return Problem(where, f"not valid YAML{column}: {what}", expected="valid YAML")


def compose(text: str) -> yaml.Node | None:
    """The YAML node tree of `text`, or None when it does not parse (the loader reports that)."""
    try:
        return yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return None


def line_of(node: yaml.Node | None, path: Sequence[str | int]) -> int | None:
    """1-based line of the deepest node found along `path` (a key or list index per step)."""
    best: int | None = node.start_mark.line + 1 if node is not None else None
    for step in path:
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                if key_node.value == step or key_node.value == str(step):
                    node = value_node
                    # an unknown or bad key is best shown at the key itself
                    best = key_node.start_mark.line + 1
                    break
            else:
                return best
        elif isinstance(node, yaml.SequenceNode) and isinstance(step, int):
            if step >= len(node.value):
                return best
            node = node.value[step]
            best = node.start_mark.line + 1
        else:
            return best
    return best


def node_at(tree: yaml.Node | None, path: Sequence[str | int]) -> yaml.Node | None:
    """The node along `path` (a key or list index per step), None when it is not there."""
    node = tree
    for step in path:
        if isinstance(node, yaml.MappingNode):
            node = next((v for k, v in node.value if k.value == step), None)
        elif isinstance(node, yaml.SequenceNode) and isinstance(step, int) \
                and step < len(node.value):
            node = node.value[step]
        else:
            return None
    return node
