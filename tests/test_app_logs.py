"""Logs are JSON lines and never carry a raw device id (contract §8)."""

from __future__ import annotations

import hashlib
import hmac
import io
import json
import logging

import pytest

from geopush.config import LoggingSettings
from geopush.devices import device_hash, erasure_hash
from geopush.logs import configure_logging, fields, make_formatter, pseudonym


def _record(msg: str, level: int = logging.INFO, **values: object) -> logging.LogRecord:
    record = logging.LogRecord("geopush.test", level, __file__, 1, msg, None, None)
    record.__dict__.update(fields(**values))
    return record


def test_a_json_line_has_time_level_event_and_fields() -> None:
    formatter = make_formatter(LoggingSettings(pseudonym_key="k"))
    line = json.loads(formatter.format(_record("timer_event", type="exit", n=3)))
    assert line["event"] == "timer_event" and line["level"] == "info"
    assert line["logger"] == "geopush.test" and line["ts"].endswith("Z")
    assert line["type"] == "exit" and line["n"] == 3


def _hmac(key: str, text: str) -> str:
    return hmac.new(key.encode(), text.encode(), hashlib.sha256).hexdigest()


@pytest.mark.parametrize("format_", ["json", "text"])
def test_device_ids_are_replaced_by_a_keyed_pseudonym(format_: str) -> None:
    formatter = make_formatter(LoggingSettings(format=format_, pseudonym_key="secret-key"))
    text = formatter.format(_record("event", device_id="phone-42"))
    assert "phone-42" not in text
    # as docs/security.md spells it: the log key is derived from the secret for logs alone
    expected = _hmac(_hmac("secret-key", "geopush log pseudonym v1"), "phone-42")[:16]
    assert pseudonym("phone-42", "secret-key") == expected
    assert expected in text
    # another key, another pseudonym: the logs cannot be joined without the key
    assert pseudonym("phone-42", "other-key") != expected


def test_log_pseudonyms_and_erasure_hashes_use_separate_keys() -> None:
    """A log pseudonym is not a prefix of the device's erasure hash (with one key for both,
    anyone holding the logs and the erasure records could join them)."""
    secret = "one-secret-of-the-deployment"
    log_name = pseudonym("phone-42", secret)
    record_id = erasure_hash("phone-42", secret)
    assert not record_id.startswith(log_name)
    assert record_id == _hmac(_hmac(secret, "geopush erasure record v1"), "phone-42")
    assert record_id != device_hash("phone-42", secret)
    assert not device_hash("phone-42", secret).startswith(log_name)


def test_a_field_cannot_override_the_line_s_own_keys() -> None:
    formatter = make_formatter(LoggingSettings(pseudonym_key="k"))
    record = _record("timer_event")
    record.__dict__.update(fields(ts="2001-01-01T00:00:00Z", level="x", logger="y", event="z"))
    line = json.loads(formatter.format(record))
    assert line["event"] == "timer_event" and line["level"] == "info"
    assert line["logger"] == "geopush.test"
    assert line["ts"] != "2001-01-01T00:00:00Z"  # the wall clock of the line
    assert (line["field_ts"], line["field_level"], line["field_logger"], line["field_event"]) \
        == ("2001-01-01T00:00:00Z", "x", "y", "z")


def test_an_exception_is_one_json_line_with_its_traceback() -> None:
    formatter = make_formatter(LoggingSettings())
    try:
        raise ValueError("boom")
    except ValueError:
        import sys

        record = _record("unexpected_error", logging.ERROR)
        record.exc_info = sys.exc_info()
    text = formatter.format(record)
    assert "\n" not in text
    line = json.loads(text)
    assert line["error"] == "ValueError: boom" and "Traceback" in line["traceback"]


def test_configure_logging_routes_every_logger_to_one_json_handler() -> None:
    stream = io.StringIO()
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        configure_logging(LoggingSettings(level="WARNING"), stream)
        logging.getLogger("aiohttp.access").info("not shown")
        logging.getLogger("geopush.x").warning("shown", extra=fields(device_id="d1"))
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [line["event"] for line in lines] == ["shown"]
    assert "d1" not in stream.getvalue()


@pytest.mark.parametrize("format_", ["json", "text"])
def test_an_exception_quoting_the_lines_device_id_shows_its_pseudonym(format_: str) -> None:
    import sys

    formatter = make_formatter(LoggingSettings(format=format_, pseudonym_key="k"))
    for device_id in ("alice@example.com", "a"):
        try:
            raise KeyError(f"profile of {device_id} is corrupt")
        except KeyError:
            record = _record("unexpected_error", logging.ERROR, device_id=device_id)
            record.exc_info = sys.exc_info()
        text = formatter.format(record)
        assert f"profile of <device {pseudonym(device_id, 'k')}> is corrupt" in text
        assert f" {device_id} " not in text
        assert "Traceback" in text and "KeyError" in text  # whole ids only: "a" left in words
