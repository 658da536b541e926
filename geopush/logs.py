"""Logs are JSON lines (contract §8); device ids never appear in them, only keyed pseudonyms.

Callers log an event name and fields: `log.info("timer_event", extra=fields(device_id=..., ...))`.
The formatter replaces any `device_id` field by `device`, the first 16 hex digits of a keyed
hash (its key derived from `logging.pseudonym_key` for logs alone, geopush.devices), so no code
path can leak a raw id into the logs. A line's own keys (ts, level, logger, event) cannot be
overridden by a field: a field of that name is written as `field_<name>`.

Changes made through the API leave an audit line on the `geopush.audit` logger: which
credential (the auth key's name; null without keys), which device (pseudonymised), what changed
(field names and consents, never the values: they are personal data).
"""

from __future__ import annotations

import logging
import re
import sys
import traceback
from typing import Any, TextIO

import orjson

from geopush.config import LoggingSettings
from geopush.devices import LOG_PURPOSE, DeviceProfile, derived_key, device_hash
from geopush.timeutil import format_ts

PSEUDONYM_HEX_DIGITS = 16  # 64 bits: enough to follow one device across lines, not to reverse
_FIELDS_ATTR = "geopush_fields"
RESERVED = ("ts", "level", "logger", "event", "error", "traceback")
audit_log = logging.getLogger("geopush.audit")


def fields(**values: Any) -> dict[str, Any]:
    """The `extra=` of a log call: structured fields of the line."""
    return {_FIELDS_ATTR: values}


def pseudonym(device_id: str, secret: str) -> str:
    """The device's name in logs, from the secret `logging.pseudonym_key`."""
    return _pseudonym(device_id, derived_key(secret, LOG_PURPOSE))


def _pseudonym(device_id: str, log_key: str) -> str:
    return device_hash(device_id, log_key)[:PSEUDONYM_HEX_DIGITS]


class _Pseudonymising(logging.Formatter):
    def __init__(self, pseudonym_key: str) -> None:
        super().__init__()
        self._log_key = derived_key(pseudonym_key, LOG_PURPOSE)  # derived once, not per line

    def _fields(self, record: logging.LogRecord) -> dict[str, Any]:
        values: dict[str, Any] = dict(getattr(record, _FIELDS_ATTR, None) or {})
        for name in RESERVED:
            if name in values:
                values[f"field_{name}"] = values.pop(name)
        device_id = values.pop("device_id", None)
        if isinstance(device_id, str):
            values["device"] = _pseudonym(device_id, self._log_key)
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
            shown = f"<device {_pseudonym(device_id, self._log_key)}>"
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
    # APScheduler says "Running job"/"executed successfully" at INFO for every run of every
    # job: the jobs' own lines (delivery_report, retention_purged) say what matters
    logging.getLogger("apscheduler").setLevel(max(logging.WARNING, root.level))


# -- audit lines ------------------------------------------------------------------------------

_PROFILE_FIELDS = ("push_token", "platform", "locale", "timezone", "attributes", "segments",
                   "consent")


def log_device_change(credential: str | None, before: DeviceProfile | None,
                      after: DeviceProfile, method: str) -> None:
    """PUT/PATCH /v1/devices/{id}: the names of the fields that changed and the consents."""
    changed = [name for name in _PROFILE_FIELDS
               if before is None or getattr(before, name) != getattr(after, name)]
    values: dict[str, Any] = {"credential": credential, "device_id": after.device_id,
                              "method": method, "created": before is None, "changed": changed}
    if before is None or before.consent != after.consent:
        values["consent"] = after.consent.model_dump()
    audit_log.info("device_changed", extra=fields(**values))


def log_erasure(credential: str | None, device_id: str) -> None:
    """DELETE /v1/devices/{id}: the device is pseudonymised like every other line."""
    audit_log.info("device_erased", extra=fields(credential=credential, device_id=device_id))


def log_device_token(credential: str | None, device_id: str, *, issued: bool) -> None:
    """POST / DELETE /v1/devices/{id}/token: a token issued (the one before is revoked) or
    revoked. Never the token or its nonce."""
    audit_log.info("device_token_issued" if issued else "device_token_revoked",
                   extra=fields(credential=credential, device_id=device_id))


def log_reload(credential: str | None, *, version: str | None = None,
               geofences: int | None = None, rules: int | None = None,
               errors: int | None = None) -> None:
    """POST /v1/admin/reload: the set swapped in, or how many errors refused it."""
    if errors is not None:
        audit_log.warning("reload_refused", extra=fields(credential=credential, errors=errors))
    else:
        audit_log.info("reloaded", extra=fields(credential=credential, version=version,
                                                geofences=geofences, rules=rules))
