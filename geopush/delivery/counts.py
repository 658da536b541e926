"""What the delivery report counts, gathered in-process and added to the state store's shared
counters about once a second, so that the report (written once per cluster) covers the pushes
every instance decided and sent. A crash loses at most the last second's counts: the report is
a rate for ops, not a record (the outbox and the decisions are the records).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable

from geopush.delivery.report import EVENT, CounterKind, alert, counter_field, report_from_counters
from geopush.logs import fields
from geopush.rules.decide import Decision
from geopush.state.base import StateStore, StateUnavailable

log = logging.getLogger("geopush.delivery.counts")

KEPT_WINDOWS = 10  # a bucket outlives its window by this many windows: the report reads it


class ReportCounts:
    def __init__(self, window_s: float, clock: Callable[[], float] = time.time) -> None:
        self.window_s = window_s
        self._clock = clock
        self._pending: dict[int, dict[str, int]] = {}  # window index → counter → n

    def window_of(self, at: float) -> int:
        return int(at // self.window_s)

    def bucket(self, window: int) -> str:
        return f"report:{self.window_s:g}:{window}"

    def add(self, kind: CounterKind, key: str, n: int = 1) -> None:
        counters = self._pending.setdefault(self.window_of(self._clock()), {})
        name = counter_field(kind, key)
        counters[name] = counters.get(name, 0) + n

    def decisions(self, decisions: Iterable[Decision]) -> None:
        for decision in decisions:
            if decision.outcome == "push":
                self.add("decided", decision.rule_id)
            elif decision.outcome == "suppressed" and decision.reason is not None:
                self.add("suppressed", decision.reason)

    async def flush(self, store: StateStore) -> None:
        pending, self._pending = self._pending, {}
        for window, counters in pending.items():
            try:
                await store.add_counts(self.bucket(window), counters,
                                       self.window_s * KEPT_WINDOWS)
            except StateUnavailable as exc:
                log.warning("report_counts_lost", extra=fields(reason=str(exc),
                                                               counters=sum(counters.values())))


async def write_report(store: StateStore, counts: ReportCounts, period_start: float,
                       alert_under: float) -> dict[str, object]:
    """The delivery report of the window before the one starting at `period_start` (whose
    counts every instance has flushed by now), as one log line, and the alert line under
    `logging.delivery_rate_alert`. Run once per cluster (geopush.service.jobs)."""
    window = counts.window_of(period_start) - 1
    report = report_from_counters(await store.read_counts(counts.bucket(window)),
                                  counts.window_s)
    log.info(EVENT, extra=fields(**report))
    if alert(report, alert_under):
        log.warning("delivery_rate_alert", extra=fields(
            delivery_rate=report["delivery_rate"], threshold=alert_under,
            window_s=counts.window_s, sent=report["sent"], failed=report["failed"],
            expired=report["expired"],
            message=f"the delivery rate {report['delivery_rate']:.1%} fell under "
                    f"logging.delivery_rate_alert ({alert_under:.0%})"))
    return report
