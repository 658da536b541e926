"""What the service tells ops about the decisions a commit wrote: a Prometheus count by outcome
and reason, and a log line per push (device pseudonymised by the log formatter, no message
text: titles may carry personal data). Until delivery exists, a push decided is a push sent
(contract §4): the log line is where it goes.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from geopush.engine import DeviceOutcome
from geopush.logs import fields
from geopush.metrics import Metrics
from geopush.timeutil import format_ts

log = logging.getLogger("geopush.service.decisions")


def report(outcomes: Iterable[DeviceOutcome], metrics: Metrics, source: str) -> None:
    for outcome in outcomes:
        if not outcome.decisions:
            continue
        metrics.count_decisions(outcome.decisions)
        for decision in outcome.decisions:
            if decision.outcome == "push":
                log.info("push_decided", extra=fields(
                    device_id=decision.device_id, push_id=decision.push_id,
                    rule_id=decision.rule_id, store_id=decision.store_id,
                    geofence_id=decision.geofence_id, trigger=decision.event,
                    event_ts=format_ts(decision.ts), ttl_s=decision.ttl_s, source=source))
            elif log.isEnabledFor(logging.DEBUG):
                log.debug("decision", extra=fields(
                    device_id=decision.device_id, rule_id=decision.rule_id,
                    outcome=decision.outcome, reason=decision.reason, trigger=decision.event,
                    event_ts=format_ts(decision.ts), source=source))
