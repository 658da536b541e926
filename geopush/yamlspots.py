"""Line numbers for keys in YAML files, so errors can say file:line.

PyYAML's composer keeps a start mark on every node; we walk the node tree along a key path.
"""

from __future__ import annotations

from collections.abc import Sequence

import yaml


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
