"""What the delivery report counts, gathered in-process and added to the state store's shared
counters about once a second, so that the report (written once per cluster) covers the pushes
every instance decided and sent. A crash loses at most the last second's counts: the report is
a rate for ops, not a record (the outbox and the decisions are the records).

Counts go to the window their flush falls in, not the one they were counted in: a window's
report is read a little after the window ends (`report_offset_s`), and a flush that comes later
than that (a busy worker loop) would add to a bucket already reported, lost to every report.
Flushed into the window under way, a count is at most one flush late and never lost.
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
REPORT_OFFSET_S = 2.0  # into a window, the last one is reported: every instance has flushed


class ReportCounts:
    def __init__(self, window_s: float, clock: Callable[[], float] = time.time) -> None:
        self.window_s = window_s
        self._clock = clock
        self._pending: dict[str, int] = {}  # counter → n, since the last flush

    @property
    def report_offset_s(self) -> float:
        """How long after a window ends its report is read (geopush.service.jobs)."""
        return min(REPORT_OFFSET_S, self.window_s / 4)

    def window_of(self, at: float) -> int:
        return int(at // self.window_s)

    def bucket(self, window: int) -> str:
        return f"report:{self.window_s:g}:{window}"

    def add(self, kind: CounterKind, key: str, n: int = 1) -> None:
        name = counter_field(kind, key)
        self._pending[name] = self._pending.get(name, 0) + n

    def decisions(self, decisions: Iterable[Decision]) -> None:
        for decision in decisions:
            if decision.outcome == "push":
                self.add("decided", decision.rule_id)
            elif decision.outcome == "suppressed" and decision.reason is not None:
                self.add("suppressed", decision.reason)

    async def flush(self, store: StateStore) -> None:
        counters, self._pending = self._pending, {}
        if not counters:
            return
        # half the report's offset ahead: a flush just before a window ends, whose write lands
        # after the report read the window, counts in the next one instead
        window = self.window_of(self._clock() + self.report_offset_s / 2)
        try:
            await store.add_counts(self.bucket(window), counters, self.window_s * KEPT_WINDOWS)
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
