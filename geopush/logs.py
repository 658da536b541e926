"""Logs are JSON lines (contract §8); device ids never appear in them, only keyed pseudonyms.

Callers log an event name and fields: `log.info("timer_event", extra=fields(device_id=..., ...))`.
The formatter replaces any `device_id` field by `device`, the first 16 hex digits of the keyed
hash (`logging.pseudonym_key`), so no code path can leak a raw id into the logs.
"""

from __future__ import annotations

import logging
import re
import sys
import traceback
from typing import Any, TextIO

import orjson

from geopush.config import LoggingSettings
from geopush.devices import device_hash
from geopush.timeutil import format_ts

PSEUDONYM_HEX_DIGITS = 16  # 64 bits: enough to follow one device across lines, not to reverse
_FIELDS_ATTR = "geopush_fields"


def fields(**values: Any) -> dict[str, Any]:
    """The `extra=` of a log call: structured fields of the line."""
    return {_FIELDS_ATTR: values}


def pseudonym(device_id: str, key: str) -> str:
    return device_hash(device_id, key)[:PSEUDONYM_HEX_DIGITS]


class _Pseudonymising(logging.Formatter):
    def __init__(self, pseudonym_key: str) -> None:
        super().__init__()
        self._key = pseudonym_key

    def _fields(self, record: logging.LogRecord) -> dict[str, Any]:
        values: dict[str, Any] = dict(getattr(record, _FIELDS_ATTR, None) or {})
        device_id = values.pop("device_id", None)
        if isinstance(device_id, str):
            values["device"] = pseudonym(device_id, self._key)
        return values

    def _exception_text(self, record: logging.LogRecord, exc: BaseException) -> tuple[str, str]:
        """(error, traceback) with the line's device id, wherever the exception's message or
        a frame quotes it, replaced by its pseudonym (a KeyError('phone-1') would show it)."""
        error = f"{type(exc).__name__}: {exc}"
        trace = "".join(traceback.format_exception(exc)).rstrip()
        device_id = (getattr(record, _FIELDS_ATTR, None) or {}).get("device_id")
        if isinstance(device_id, str) and device_id:
            # whole ids only: an id "a" must not turn every "a" of the traceback into a hash
            whole = re.compile(rf"(?<![A-Za-z0-9._:@-]){re.escape(device_id)}"
                               r"(?![A-Za-z0-9._:@-])")
            shown = f"<device {pseudonym(device_id, self._key)}>"
            error, trace = whole.sub(shown, error), whole.sub(shown, trace)
        return error, trace


class JsonLinesFormatter(_Pseudonymising):
    """One JSON object a line: ts, level, logger, event, then the line's fields."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": format_ts(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": record.getMessage(),
        }
        line.update(self._fields(record))
        if record.exc_info and record.exc_info[1] is not None:
            line["error"], line["traceback"] = self._exception_text(record, record.exc_info[1])
        return orjson.dumps(line, default=str).decode()


class TextFormatter(_Pseudonymising):
    """For a terminal: `time level logger event key=value …`."""

    def format(self, record: logging.LogRecord) -> str:
        extra = " ".join(f"{k}={v}" for k, v in self._fields(record).items())
        text = (f"{format_ts(record.created)} {record.levelname.lower():7} {record.name}: "
                f"{record.getMessage()}" + (f" {extra}" if extra else ""))
        if record.exc_info and record.exc_info[1] is not None:
            text += "\n" + self._exception_text(record, record.exc_info[1])[1]
        return text


def make_formatter(settings: LoggingSettings) -> logging.Formatter:
    if settings.format == "text":
        return TextFormatter(settings.pseudonym_key)
    return JsonLinesFormatter(settings.pseudonym_key)


def configure_logging(settings: LoggingSettings, stream: TextIO | None = None) -> None:
    """Route every logger (ours, aiohttp's) to one handler on standard error."""
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(make_formatter(settings))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(settings.level)
