"""The log sender (contract §7): one JSON line per push, counted as sent, with the device
pseudonymised and no message text (it may carry personal data)."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from typing import Any

import pytest

from geopush.config import DeliverySettings, LoggingSettings
from geopush.delivery.senders.base import OutgoingPush, SendResult
from geopush.delivery.senders.build import build_sender
from geopush.delivery.senders.log import LogSender
from geopush.logs import make_formatter, pseudonym

KEY = "a-test-pseudonym-key-0123456789"


def push(**changes: Any) -> OutgoingPush:
    values: dict[str, Any] = dict(
        push_id="p-7f3a", device_id="phone-of-anna", push_token="fcm-token-secret",
        platform="android", title="Anna, your bread is ready", body="Pick it up at Lidl Bled",
        data={"customer": "anna@example.com"}, category="service", rule_id="bread",
        store_id="s-1", geofence_id="g-1", event="enter", created_at=1_780_000_000.0,
        ttl_left_s=599.25, test=True)
    values.update(changes)
    return OutgoingPush(**values)


@pytest.fixture
def lines() -> Iterator[io.StringIO]:
    """What geopush.delivery.log writes, through the real JSON formatter."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(make_formatter(LoggingSettings(pseudonym_key=KEY)))
    logger = logging.getLogger("geopush.delivery.log")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield stream
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


async def test_a_push_is_one_json_line_and_sent(lines: io.StringIO) -> None:
    sender = LogSender()
    result = await sender.send(push())
    await sender.close()
    assert result == SendResult("sent")
    [text] = lines.getvalue().splitlines()
    line = json.loads(text)
    assert line["event"] == "push_sent" and line["logger"] == "geopush.delivery.log"
    assert {k: line[k] for k in ("push_id", "rule_id", "store_id", "category", "ttl_left_s", "test")} \
        == {"push_id": "p-7f3a", "rule_id": "bread", "store_id": "s-1", "category": "service",
            "ttl_left_s": 599.25, "test": True}
    assert line["device"] == pseudonym("phone-of-anna", KEY)


async def test_the_line_has_no_device_id_token_or_message_text(lines: io.StringIO) -> None:
    await LogSender().send(push())
    text = lines.getvalue()
    for private in ("phone-of-anna", "fcm-token-secret", "Anna", "bread is ready", "Pick it up",
                    "anna@example.com"):
        assert private not in text
    assert "device_id" not in json.loads(text)


def test_log_is_the_default_sender() -> None:
    assert isinstance(build_sender(DeliverySettings()), LogSender)
