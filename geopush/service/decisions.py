"""What the service does once a commit wrote decisions: a Prometheus count by outcome and
reason, a log line per push (device pseudonymised by the log formatter, no message text: titles
may carry personal data), and `on_decided` (the app's: the delivery report counts them, and the
delivery worker is woken, since the commit queued their outbox entries).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence

from geopush.engine import DeviceOutcome
from geopush.logs import fields
from geopush.metrics import Metrics
from geopush.rules.decide import Decision
from geopush.timeutil import format_ts

log = logging.getLogger("geopush.service.decisions")


OnDecided = Callable[[Sequence[Decision]], None]


def report(outcomes: Iterable[DeviceOutcome], metrics: Metrics, source: str,
           on_decided: OnDecided | None = None) -> None:
    for outcome in outcomes:
        if not outcome.decisions:
            continue
        metrics.count_decisions(outcome.decisions)
        if on_decided is not None:
            on_decided(outcome.decisions)
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
