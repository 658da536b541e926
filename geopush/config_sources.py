"""Where a setting comes from, for errors that point at it: a line of the file, an environment
variable `GEOPUSH_<SECTION>__<KEY>`, or a command-line option.

The environment is read here rather than by pydantic-settings, so that every variable is
accounted for: one that matches no key is an error with a did-you-mean (a misspelt override
silently ignored is a production incident), a JSON value that does not parse is one line naming
the variable, and a problem in a value taken from the environment names the variable, not the file.
"""

from __future__ import annotations

import difflib
import json
import types
import typing
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from geopush.errors import Problem
from geopush.yamlspots import line_of

ENV_PREFIX = "GEOPUSH_"
ENV_DELIMITER = "__"
CONFIG_VARIABLE = "GEOPUSH_CONFIG"  # the file's path: not a key, always allowed

Loc = tuple[str | int, ...]


@dataclass(frozen=True)
class Origin:
    """Where each key of loaded settings was written: file:line, or what overrode it."""

    path: Path | None = None
    tree: yaml.Node | None = None
    overrides: Mapping[Loc, str] = field(default_factory=dict)  # key path → "environment X"

    def where(self, loc: Sequence[str | int]) -> str:
        """`environment GEOPUSH_X` / `option --stores` when that set the key (or a section
        holding it), else `file:line` of the key (or of the nearest section written)."""
        for depth in range(len(loc), 0, -1):
            label = self.overrides.get(tuple(loc[:depth]))
            if label is not None:
                return label
        if self.path is None:
            return ".".join(str(p) for p in loc) or "settings"
        line = line_of(self.tree, list(loc))
        return f"{self.path}:{line}" if line else str(self.path)

    def overridden(self, loc: Loc, label: str) -> Origin:
        return Origin(self.path, self.tree, {**self.overrides, loc: label})


# -- the shape of the settings, walked by key -----------------------------------------------


def _unwrap(annotation: Any) -> list[Any]:
    """The alternatives of an annotation: `X | None` → [X, None]; Annotated[X, ...] → [X]."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _unwrap(typing.get_args(annotation)[0])
    if origin is typing.Union or origin is types.UnionType:
        return [alt for arg in typing.get_args(annotation) for alt in _unwrap(arg)]
    return [annotation]


def model_of(annotation: Any) -> type[BaseModel] | None:
    for alt in _unwrap(annotation):
        if isinstance(alt, type) and issubclass(alt, BaseModel):
            return alt
    return None


def _container_of(annotation: Any) -> tuple[type, Any] | None:
    """(list, item) or (dict, value) for a list or mapping annotation."""
    for alt in _unwrap(annotation):
        origin = typing.get_origin(alt)
        if origin in (list, dict):
            return origin, typing.get_args(alt)[-1]
    return None


def is_complex(annotation: Any) -> bool:
    """A model, list or mapping: read from the environment as JSON."""
    return model_of(annotation) is not None or _container_of(annotation) is not None


def model_keys(model: type[BaseModel]) -> Iterator[tuple[str, FieldInfo]]:
    """(key as written in the file, field) of every field of `model`."""
    for name, info in model.model_fields.items():
        yield (info.alias or name), info


def field_at(model: type[BaseModel], loc: Sequence[str | int]) -> FieldInfo | None:
    """The field at a key path of validation errors (list indexes and mapping keys allowed)."""
    return _walk(model, loc)[0]


def annotation_at(model: type[BaseModel], loc: Sequence[str | int]) -> Any:
    """The type of the value at a key path (a list item's type under an index)."""
    return _walk(model, loc)[1]


def _walk(model: type[BaseModel], loc: Sequence[str | int]) -> tuple[FieldInfo | None, Any]:
    annotation: Any = model
    found: FieldInfo | None = None
    for step in loc:
        sub = model_of(annotation)
        if sub is not None and isinstance(step, str):
            found = next((info for key, info in model_keys(sub) if step in (key, _name(sub, info))),
                         None)
            if found is None:
                return None, None
            annotation = found.annotation
            continue
        container = _container_of(annotation)
        if container is None:
            return None, None
        annotation = container[1]
    return found, annotation


def _name(model: type[BaseModel], info: FieldInfo) -> str:
    return next(n for n, i in model.model_fields.items() if i is info)


def env_names(model: type[BaseModel]) -> list[str]:
    """Every variable that names a key or a section, for did-you-mean."""
    names = [CONFIG_VARIABLE]

    def walk(sub: type[BaseModel], prefix: str) -> None:
        for key, info in model_keys(sub):
            name = f"{prefix}{key.upper()}"
            names.append(name)
            inner = model_of(info.annotation)
            if inner is not None:
                walk(inner, name + ENV_DELIMITER)

    walk(model, ENV_PREFIX)
    return names


def did_you_mean(name: str, candidates: Sequence[str]) -> str | None:
    upper = name.upper()
    squashed = upper.replace("_", "")
    for candidate in candidates:  # GEOPUSH_STORAGE_BACKEND → GEOPUSH_STORAGE__BACKEND
        if candidate.replace("_", "") == squashed:
            return candidate
    close = difflib.get_close_matches(upper, candidates, n=1, cutoff=0.75)
    return close[0] if close else None


# -- the environment ------------------------------------------------------------------------


@dataclass
class EnvironmentOverrides:
    values: dict[str, Any] = field(default_factory=dict)  # nested, as the file would hold them
    labels: dict[Loc, str] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)


def read_environment(model: type[BaseModel], environ: Mapping[str, str]) -> EnvironmentOverrides:
    """The GEOPUSH_* variables as nested overrides; a variable matching no key, or a JSON value
    that does not parse, is a problem naming the variable (its value is not shown: it may be a
    secret)."""
    result = EnvironmentOverrides()
    found: list[tuple[Loc, str, str, FieldInfo | None]] = []
    candidates: list[str] | None = None
    for name in sorted(environ):
        if not name.upper().startswith(ENV_PREFIX) or name.upper() == CONFIG_VARIABLE:
            continue
        resolved = _resolve(model, name[len(ENV_PREFIX):].split(ENV_DELIMITER))
        if resolved is None:
            candidates = candidates or env_names(model)
            hint = did_you_mean(name, candidates)
            result.problems.append(Problem(
                f"environment {name}",
                "matches no setting" + (f"; did you mean {hint}?" if hint else ""),
                field=None, value=None,
                expected=hint or f"GEOPUSH_<SECTION>{ENV_DELIMITER}<KEY> naming a key of "
                                 "`geopush schema config`, or GEOPUSH_CONFIG"))
            continue
        loc, info = resolved
        found.append((loc, name, environ[name], info))
    # a section first, then the keys inside it on top
    for loc, name, raw, info in sorted(found, key=lambda f: len(f[0])):
        key = ".".join(str(p) for p in loc)
        value: Any = raw
        if info is not None and is_complex(info.annotation):
            try:
                value = json.loads(raw)
            except json.JSONDecodeError as exc:
                result.problems.append(Problem(
                    f"environment {name}",
                    f"{key}: not valid JSON ({exc.msg} at character {exc.pos + 1})",
                    field=key, value="***",
                    expected="JSON, e.g. " + _json_example(info.annotation)))
                continue
        _set(result.values, loc, value)
        result.labels[loc] = f"environment {name}"
    return result


def _resolve(model: type[BaseModel], parts: list[str]) -> tuple[Loc, FieldInfo | None] | None:
    """The key path (as written in the file) a variable names, or None."""
    loc: list[str | int] = []
    annotation: Any = model
    info: FieldInfo | None = None
    for part in parts:
        if not part:
            return None
        sub = model_of(annotation)
        if sub is not None:
            match = next(((key, i) for key, i in model_keys(sub)
                          if part.lower() in (key.lower(), _name(sub, i).lower())), None)
            if match is None:
                return None
            loc.append(match[0])
            info = match[1]
            annotation = info.annotation
            continue
        container = _container_of(annotation)
        if container is None or container[0] is not dict:
            return None  # a list item is set with the whole list, as JSON
        loc.append(part.lower())
        info = None
        annotation = container[1]
    return (tuple(loc), info) if loc else None


def _set(tree: dict[str, Any], loc: Loc, value: Any) -> None:
    node = tree
    for step in loc[:-1]:
        child = node.get(str(step))
        if not isinstance(child, dict):
            child = {}
            node[str(step)] = child
        node = child
    old = node.get(str(loc[-1]))
    if isinstance(old, dict) and isinstance(value, dict):
        node[str(loc[-1])] = deep_merge(old, value)
    else:
        node[str(loc[-1])] = value


def deep_merge(base: Mapping[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    """`top` over `base`, section by section (the environment over the file)."""
    merged = dict(base)
    for key, value in top.items():
        old = merged.get(key)
        if isinstance(old, dict) and isinstance(value, dict):
            merged[key] = deep_merge(old, value)
        else:
            merged[key] = value
    return merged


def _json_example(annotation: Any) -> str:
    container = _container_of(annotation)
    inner = model_of(container[1] if container is not None else annotation)
    item = ("{" + ", ".join(f'"{key}": …' for key, _ in model_keys(inner)) + "}"
            if inner is not None else '"…"')
    if container is not None and container[0] is dict:
        return '{"…": "…"}'
    return f"[{item}]" if container is not None else item
