"""Validation errors of the settings as one plain line each: where, key, value, what was expected.

Pydantic's messages are written for programmers ("Input should be a valid integer", a raw
regex); these say what an operator should write instead. Secrets (API keys, the pseudonym key,
tokens, passwords in URLs) are never shown, whatever the error: the line says `***`.
"""

from __future__ import annotations

import difflib
import json
import re
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo

from geopush.config_sources import Origin, annotation_at, field_at, model_keys, model_of
from geopush.errors import Problem

HIDDEN = "***"
SECRET_MARK = "secret"  # json_schema_extra={"secret": True} marks a field as a secret
# names that are secrets wherever they appear, also in fields added later without the mark
_SECRET_NAMES = re.compile(r"^(key|password|secret|.*_secret|.*_key|.*_token|api_key)$")
_NOT_SECRET_NAMES = frozenset({"key_prefix"})
_SHOWN_CHARS = 120


def is_secret(model: type[BaseModel], loc: Sequence[str | int]) -> bool:
    names = [p for p in loc if isinstance(p, str)]
    if not names:
        return False
    info = field_at(model, loc)
    if info is not None and isinstance(info.json_schema_extra, dict) \
            and info.json_schema_extra.get(SECRET_MARK):
        return True
    last = names[-1]
    return last not in _NOT_SECRET_NAMES and bool(_SECRET_NAMES.match(last))


def hide_url_password(text: str) -> str:
    """`redis://:pw@host/0` → `redis://:***@host/0`."""
    if "://" not in text or "@" not in text:
        return text
    try:
        parts = urlsplit(text)
        if parts.password is None:
            return text
        user = parts.username or ""
        host = parts.netloc.rpartition("@")[2]
        return urlunsplit(parts._replace(netloc=f"{user}:{HIDDEN}@{host}"))
    except ValueError:
        return HIDDEN


def shown(model: type[BaseModel], loc: Sequence[str | int], value: Any) -> Any:
    """The value as an error may show it: secrets hidden, however deep in a list or mapping."""
    if is_secret(model, loc):
        return HIDDEN if value is not None else None
    if isinstance(value, str):
        return hide_url_password(value)
    if isinstance(value, Mapping):
        return {str(k): shown(model, [*loc, str(k)], v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [shown(model, [*loc, i], v) for i, v in enumerate(value)]
    if value is None or isinstance(value, int | float | bool):
        return value
    return str(value)


def _spelled(value: Any) -> str:
    if value == HIDDEN:
        return HIDDEN
    text = json.dumps(value, ensure_ascii=False) if isinstance(value, dict | list) else repr(value)
    return text if len(text) <= _SHOWN_CHARS else text[:_SHOWN_CHARS - 1] + "…"


# what a pattern means, instead of the regex
PATTERN_MEANINGS: dict[str, str] = {}


def _expected(err: Mapping[str, Any], info: FieldInfo | None, schema: str) -> str:
    kind: str = err["type"]
    ctx: Mapping[str, Any] = err.get("ctx") or {}
    simple = {
        "int_parsing": "a whole number", "int_type": "a whole number",
        "int_from_float": "a whole number", "float_parsing": "a number", "float_type": "a number",
        "bool_parsing": "true or false", "bool_type": "true or false", "string_type": "text",
        "list_type": "a list", "dict_type": "a mapping (key: value)",
        "model_type": "a mapping (key: value)", "model_attributes_type": "a mapping (key: value)",
        "path_type": "a file path", "missing": "a value (this key is required)",
        "none_required": "null",
    }
    if kind in simple:
        return simple[kind]
    if kind == "greater_than":
        return f"a number greater than {ctx.get('gt')}"
    if kind == "greater_than_equal":
        return f"a number of at least {ctx.get('ge')}"
    if kind == "less_than":
        return f"a number less than {ctx.get('lt')}"
    if kind == "less_than_equal":
        return f"a number of at most {ctx.get('le')}"
    if kind in ("literal_error", "enum"):
        return f"one of {ctx.get('expected')}"
    if kind == "string_too_short":
        return f"at least {ctx.get('min_length')} characters"
    if kind == "string_too_long":
        return f"at most {ctx.get('max_length')} characters"
    if kind == "too_short":
        return f"at least {ctx.get('min_length')} item(s)"
    if kind == "too_long":
        return f"at most {ctx.get('max_length')} item(s)"
    if kind == "string_pattern_mismatch":
        pattern = str(ctx.get("pattern"))
        meaning = PATTERN_MEANINGS.get(pattern) or (info.description if info else None)
        return meaning or f"text in the documented format (geopush schema {schema})"
    message: str = err["msg"]
    message = message.removeprefix("Value error, ").removeprefix("Assertion failed, ")
    return message[:1].lower() + message[1:]


def validation_problems(exc: ValidationError, model: type[BaseModel],
                        origin: Origin, *, schema: str = "config") -> list[Problem]:
    """One Problem per error, in the order pydantic found them; `schema` names the
    `geopush schema` that documents the model."""
    problems = []
    for err in exc.errors():
        loc = [p for p in err["loc"] if isinstance(p, str | int)]
        key = ".".join(str(p) for p in loc)
        where = origin.where(loc)
        if err["type"] == "extra_forbidden":
            problems.append(_unknown_key(model, loc, key, where, schema))
            continue
        value = shown(model, loc, err.get("input"))
        expected = _expected(err, field_at(model, loc), schema)
        if err["type"] == "missing":
            message = f"{key}: missing"
        elif err["type"] in ("value_error", "assertion_error") \
                and not expected.startswith("expected "):
            # a rule across keys ("sender fcm needs delivery.fcm.project_id"): the message says it
            problems.append(Problem(where, f"{key}: {expected}" if key else expected, field=key,
                                    value=value, expected=expected))
            continue
        else:
            message = f"{key} = {_spelled(value)}"
        expected = re.sub(r", got .*$", "", expected.removeprefix("expected "))
        problems.append(Problem(where, message, field=key, value=value, expected=expected))
    return problems


def _unknown_key(model: type[BaseModel], loc: list[str | int], key: str,
                 where: str, schema: str) -> Problem:
    parent = loc[:-1]
    sub = model_of(annotation_at(model, parent))
    keys = [k for k, _ in model_keys(sub)] if sub is not None else []
    close = difflib.get_close_matches(str(loc[-1]), keys, n=1, cutoff=0.6)
    hint = f"; did you mean {'.'.join([*map(str, parent), close[0]])}?" if close else ""
    if close:
        expected = ".".join([*map(str, parent), close[0]])
    else:
        expected = ("one of " + ", ".join(keys) if keys else "a documented key") \
            + f" (geopush schema {schema})"
    return Problem(where, f"{key}: unknown key{hint}", field=key, value=None, expected=expected)
