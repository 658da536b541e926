"""The timer claimer: fires dwell and stale-exit timers when no ping comes (contract §5, §8).

Due times live in the state store; every instance runs this short periodic job, and the
store's `claim_due` hands each due device to one instance only, so each timer fires once however
many instances run. Running every second keeps firing well within 10 s of the due time.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from contextlib import suppress

from geopush.engine import DeviceOutcome, DeviceSnapshot, Engine, WeatherAt
from geopush.geo.model import Event
from geopush.logs import fields
from geopush.metrics import Metrics
from geopush.service.decisions import OnDecided, report
from geopush.state.base import StateStore, StateUnavailable
from geopush.timeutil import format_ts

log = logging.getLogger("geopush.service.timers")

INTERVAL_S = 1.0
BATCH = 500  # devices per claim; a backlog is drained batch after batch in one run
# A claim is held this long: if the instance dies before committing, another takes over.
LEASE_S = 20.0


class TimerClaimer:
    def __init__(
        self,
        store: StateStore,
        engine: Callable[[], Engine],
        metrics: Metrics,
        *,
        stale_after_s: float,
        interval_s: float = INTERVAL_S,
        batch: int = BATCH,
        lease_s: float = LEASE_S,
        clock: Callable[[], float] = time.time,
        weather: WeatherAt | None = None,
        on_decided: OnDecided | None = None,
    ) -> None:
        self._store = store
        self._weather = weather
        self._on_decided = on_decided
        self._engine = engine
        self._metrics = metrics
        self._stale_after_s = stale_after_s
        self._interval_s = interval_s
        self._batch = batch
        self._lease_s = lease_s
        self._clock = clock
        self._stopping = asyncio.Event()

    async def run_once(self) -> list[Event]:
        """Claim and fire everything due now; the events, in time order."""
        now = self._clock()
        fired: list[Event] = []
        while True:
            devices = await self._store.claim_due(now, self._batch, self._lease_s)
            if not devices:
                break
            engine = self._engine()

            def fire(snapshots: Mapping[str, DeviceSnapshot],
                     engine: Engine = engine) -> Mapping[str, DeviceOutcome]:
                return {d: engine.fire(d, snap, now, weather=self._weather)
                        for d, snap in snapshots.items()}

            outcomes = await self._store.track(devices, fire)
            self._metrics.timer_devices.inc(len(devices))
            report(outcomes.values(), self._metrics, "timer", self._on_decided)
            for outcome in outcomes.values():
                fired.extend(outcome.events)
            if len(devices) < self._batch:
                break
        fired.sort(key=lambda e: e.ts)
        self._report(fired, now)
        return fired

    def _report(self, events: list[Event], now: float) -> None:
        self._metrics.count_events(events, "timer")
        for e in events:
            due = e.ts if e.type == "dwell" else e.ts + self._stale_after_s
            self._metrics.timer_lag_seconds.observe(max(0.0, now - due))
            log.info("timer_event", extra=fields(
                device_id=e.device_id, type=e.type, geofence_id=e.geofence_id,
                store_id=e.store_id, event_ts=format_ts(e.ts), stale=e.stale, dwell_s=e.dwell_s))

    def stop(self) -> None:
        """End `run` after the current round (a flag, not only a cancel: a client library
        that swallows a CancelledError must not keep the loop alive)."""
        self._stopping.set()

    async def run(self) -> None:
        """Every interval until stopped; an outage is logged once, never ends the loop."""
        outage = False
        while not self._stopping.is_set():
            try:
                await self.run_once()
                if outage:
                    log.info("timers_resumed")
                    outage = False
            except StateUnavailable as exc:
                self._metrics.state_unavailable.labels("timers").inc()
                if not outage:
                    log.warning("timers_paused", extra=fields(reason=str(exc)))
                    outage = True
            except Exception:
                log.exception("timers_failed")
            with suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), self._interval_s)
