"""The one exception family of geopush.

Every error a user can cause names the spot (file, line, feature or field), the bad value and
what was expected; the HTTP layer turns these into `{"error": {"code", "message", "details"}}`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Problem:
    """One thing wrong with an input: where it is, what it is, what was expected."""

    where: str
    message: str
    field: str | None = None
    value: Any = None
    expected: str | None = None
    severity: str = "error"  # "error" or "warning"

    def __str__(self) -> str:
        return f"{self.where}: {self.message}"

    def line(self) -> str:
        """As every command prints it: `severity: where: message; expected …` (the expected
        part left out when the message already says it)."""
        text = f"{self.severity}: {self.where}: {self.message}"
        if self.expected and "expected" not in self.message \
                and self.expected not in self.message:
            text += f"; expected {self.expected}"
        return text

    def as_dict(self) -> dict[str, Any]:
        return {
            "where": self.where,
            "field": self.field,
            "value": self.value,
            "expected": self.expected,
            "message": self.message,
            "severity": self.severity,
        }


def shortened(value: Any, limit: int = 60) -> Any:
    """A value as an error shows it: numbers and null as they are, anything else as text (JSON
    for structures) cut to `limit` characters."""
    if value is None or isinstance(value, bool | int | float):
        return value
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text if len(text) <= limit else text[: limit - 1] + "…"


class GeopushError(Exception):
    """Base of every error geopush raises on purpose."""

    code = "error"
    http_status = 400

    def __init__(self, message: str, details: list[Problem] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details: list[Problem] = list(details or [])

    def __str__(self) -> str:
        if not self.details:
            return self.message
        return self.message + "\n" + "\n".join(f"  {p}" for p in self.details)


class ConfigError(GeopushError):
    """The settings file or an environment override is wrong."""

    code = "config_error"


class StoreLoadError(GeopushError):
    """stores.geojson has errors; the previous stores (if any) stay active."""

    code = "store_error"
    http_status = 422


class RuleLoadError(GeopushError):
    """A rules file has errors; the previous rules (if any) stay active."""

    code = "rule_error"
    http_status = 422


class Unauthorized(GeopushError):
    """No credential, or one that is not (or no longer) valid."""

    code = "unauthorized"
    http_status = 401
    challenge = 'Bearer realm="geopush"'  # the WWW-Authenticate of the 401


class Forbidden(GeopushError):
    """A valid credential that may not do this."""

    code = "forbidden"
    http_status = 403


class InvalidInput(GeopushError):
    """A request or input file does not have the expected shape."""

    code = "invalid"


@dataclass
class Report:
    """Errors and warnings collected while loading something, in input order."""

    problems: list[Problem] = field(default_factory=list)

    def error(self, where: str, message: str, **kw: Any) -> None:
        self.problems.append(Problem(where, message, severity="error", **kw))

    def warning(self, where: str, message: str, **kw: Any) -> None:
        self.problems.append(Problem(where, message, severity="warning", **kw))

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "error"]

    @property
    def warnings(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "warning"]


def not_utf8(exc: UnicodeDecodeError) -> str:
    """What to say of a file that is not UTF-8 text, and where."""
    return (f"not UTF-8 text (byte {exc.start} is 0x{exc.object[exc.start]:02x}); "
            "expected a UTF-8 file: save it as UTF-8")
