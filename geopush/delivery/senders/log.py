"""The `log` sender (contract §7, the embedded default): each push becomes one JSON log line and
counts as sent, so a trial install shows what it would push without any credentials.

The line carries ids and the TTL, never the title or body: rendered messages may quote a
customer's name or segment, and logs are kept and shipped far more widely than the state store.
The device id goes in the `device_id` field, which the log formatter replaces by its pseudonym
(geopush.logs).
"""

from __future__ import annotations

import logging

from geopush.delivery.senders.base import OutgoingPush, SendResult
from geopush.logs import fields

log = logging.getLogger("geopush.delivery.log")


class LogSender:
    name = "log"

    async def send(self, push: OutgoingPush) -> SendResult:
        log.info("push_sent", extra=fields(
            push_id=push.push_id,
            device_id=push.device_id,
            rule_id=push.rule_id,
            store_id=push.store_id,
            category=push.category,
            ttl_left_s=round(push.ttl_left_s, 3),
            test=push.test,
        ))
        return SendResult("sent")

    async def close(self) -> None:
        return None
