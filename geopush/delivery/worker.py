"""The delivery worker: every instance claims due pushes from the outbox and sends them.

The store hands each due entry to one caller (`claim_pushes`: sending, under a lease), so a
push is sent by one instance at a time; one that dies mid-send leaves the entry `sending`, and
when the lease runs out another instance (or itself, restarted) sends it again with the same
push_id, which the phone folds as a collapse id (contract §7). Before each attempt the entry is
checked again against the profile as it is now (consent, token) and quiet hours at the store
(geopush.delivery.outbox.plan_attempt); the sender's answer says what comes next
(`after_attempt`: sent, failed, or another attempt within the ttl left).

Sends run as tasks, at most `max_in_flight` at once: a slow FCM answer holds one slot, never
the event loop, and claiming takes only as many as there are free slots.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Protocol

from geopush.config import PolicySettings
from geopush.delivery.counts import ReportCounts
from geopush.delivery.outbox import (
    SEND_LEASE_S,
    OutboxEntry,
    Plan,
    after_attempt,
    ended,
    held,
    plan_attempt,
)
from geopush.delivery.senders.base import OutgoingPush, Sender, SendResult
from geopush.devices import DeviceProfile
from geopush.logs import fields
from geopush.metrics import Metrics
from geopush.state.base import ProfileWrite, StateStore, StateUnavailable

log = logging.getLogger("geopush.delivery.worker")

POLL_S = 0.25  # how often an idle worker looks for due pushes (a local decision wakes it)
OVERVIEW_EVERY_S = 5.0  # queue depth and oldest age, for the gauges
MARKETING_PAUSED = "marketing_paused"  # the flag: who paused marketing pushes (ops, contract §8)
PAUSE_RECHECK_S = 5.0  # a held push looks again this often while marketing is paused
START_SLICE = 16  # attempts started in one turn of the event loop
COMMIT_MARGIN_S = 60.0  # beyond policy.max_event_lag: by then a decision's commit landed or never will


class Delivery(Protocol):
    """What the service asks of whatever sends its pushes: the worker in its own event loop,
    or in a process of its own (geopush.delivery.process)."""

    def wake(self) -> None: ...

    def stop(self) -> None: ...

    async def run(self) -> None: ...


class DeliveryWorker:
    def __init__(self, store: StateStore, sender: Callable[[], Sender], metrics: Metrics,
                 counts: ReportCounts, policy: Callable[[], PolicySettings], *,
                 max_in_flight: int = 200, poll_s: float = POLL_S,
                 lease_s: float = SEND_LEASE_S, backlog: Callable[[], int] = lambda: 0,
                 clock: Callable[[], float] = time.time) -> None:
        self._store = store
        self._sender = sender
        self._metrics = metrics
        self._counts = counts
        self._policy = policy
        self._max_in_flight = max_in_flight
        self._lease_s = lease_s
        self._backlog = backlog  # pings waiting (geopush.service.ingest): they come first
        self._poll_s = poll_s
        self._clock = clock
        self._in_flight: set[asyncio.Task[None]] = set()
        self._wake = asyncio.Event()
        self._stopping = asyncio.Event()
        self._paused_until = 0.0  # a project-wide quota pauses the whole sender
        self._ends: list[tuple[OutboxEntry, int, asyncio.Future[bool | None]]] = []
        self._ending = asyncio.Event()
        # who paused marketing pushes (an operator, through any instance): they wait queued,
        # within their ttl, until resumed
        self.paused_by: str | None = None

    def wake(self) -> None:
        """A push was queued here: look now rather than at the next poll."""
        self._wake.set()

    def stop(self) -> None:
        self._stopping.set()
        self._wake.set()

    async def run(self) -> None:
        writer = asyncio.create_task(self._write_ends(), name="geopush-delivery-ends")
        try:
            await self._run()
            await self.drain()  # their ends are written by the writer, still running
            await self._counts.flush(self._store)
        finally:  # also when cancelled (a shutdown that would not wait): no task left behind
            writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await writer

    async def _run(self) -> None:
        last_flush = last_overview = 0.0
        while not self._stopping.is_set():
            now = self._clock()
            claimed = 0
            try:
                if now >= self._paused_until:
                    claimed = await self.run_once(now)
                if time.monotonic() - last_flush >= 1.0:
                    last_flush = time.monotonic()
                    await self._counts.flush(self._store)
                    self.paused_by = await self._store.get_flag(MARKETING_PAUSED)
                if time.monotonic() - last_overview >= OVERVIEW_EVERY_S:
                    last_overview = time.monotonic()
                    depth, oldest = await self._store.outbox_overview(now)
                    self._metrics.outbox_depth.set(depth)
                    self._metrics.outbox_oldest.set(oldest or 0.0)
            except StateUnavailable as exc:
                self._metrics.state_unavailable.labels("deliver").inc()
                log.warning("delivery_state_unavailable", extra=fields(reason=str(exc)))
            except Exception:  # never let the worker die: pushes would pile up unseen
                log.exception("delivery_worker_failed")
            if claimed and len(self._in_flight) < self._max_in_flight:
                continue  # a backlog: go on at once
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._poll_s)

    async def drain(self) -> None:
        """Let the attempts in flight end (their sender calls are bounded by its timeout)."""
        if self._in_flight:
            await asyncio.gather(*self._in_flight, return_exceptions=True)

    async def run_once(self, now: float) -> int:
        """Claim what is due and start its attempts; how many were claimed."""
        free = self._max_in_flight - len(self._in_flight)
        if self._backlog():
            # pings are waiting: start only a slice of attempts a round, so that a burst of
            # sends never holds them back (pushes wait a little; the phone's answer does not)
            free = min(free, START_SLICE)
        if free <= 0:
            return 0
        grace = self._policy().max_event_lag + COMMIT_MARGIN_S
        claimed = await self._store.claim_pushes(now, free, grace_s=grace,
                                                 lease_s=self._lease_s)
        for n, (entry, profile) in enumerate(claimed, 1):
            task = asyncio.create_task(self._attempt(entry, profile))
            self._in_flight.add(task)
            task.add_done_callback(self._attempt_ended)
            if n % START_SLICE == 0:
                # a claim's attempts start a slice at a time: pings are served in between
                await asyncio.sleep(0)
        return len(claimed)

    def _attempt_ended(self, task: asyncio.Task[None]) -> None:
        self._in_flight.discard(task)
        # a backlog waits for free slots: claim again once half are free, not at the next poll
        if len(self._in_flight) == self._max_in_flight // 2:
            self._wake.set()

    async def _attempt(self, entry: OutboxEntry, profile: DeviceProfile | None) -> None:
        now = self._clock()
        plan = plan_attempt(entry, profile, now, self._policy())
        if plan.step == "send" and self.paused_by is not None and entry.category == "marketing" \
                and not entry.test:
            plan = Plan("hold", f"marketing pushes are paused by {self.paused_by}",
                        min(now + PAUSE_RECHECK_S, entry.expires_at))
        if plan.step == "hold":
            await self._finish(held(entry, plan, now), entry.attempts)
            return
        if plan.step != "send":
            await self._finish(ended(entry, plan, now), entry.attempts)
            return
        assert profile is not None and profile.push_token
        push = OutgoingPush(
            entry.push_id, entry.device_id, profile.push_token, profile.platform, entry.title,
            entry.body, entry.data, entry.category, entry.rule_id, entry.store_id,
            entry.geofence_id, entry.event, entry.created_at, entry.expires_at - now,
            entry.test)
        started = time.perf_counter()
        try:
            result = await self._sender().send(push)
        except Exception as exc:  # a sender bug must not lose the push: try again later
            log.exception("sender_failed", extra=fields(push_id=entry.push_id))
            result = SendResult("retry", "sender_error", f"{type(exc).__name__}: {exc}")
        self._metrics.send_seconds.observe(time.perf_counter() - started)
        self._metrics.sends.labels(result.outcome, result.code or "").inc()
        now = self._clock()
        if result.pause_sender_s is not None:
            self._paused_until = max(self._paused_until, now + result.pause_sender_s)
            log.warning("sender_paused", extra=fields(seconds=result.pause_sender_s,
                                                      code=result.code, reason=result.message))
        if result.alert:
            self._metrics.sender_alerts.labels(result.code or "").inc()
            log.error("sender_alert", extra=fields(code=result.code, reason=result.message,
                                                   push_id=entry.push_id))
        if result.remove_token:
            await self._remove_token(entry.device_id, push.push_token, result.code)
        await self._finish(after_attempt(entry, result, now), entry.attempts)

    async def _finish(self, entry: OutboxEntry, attempt: int) -> None:
        """Hand the attempt's end to the writer, which writes the ends of all the attempts
        that ended meanwhile in one call (a burst costs a call a batch, not one a push)."""
        done: asyncio.Future[bool | None] = asyncio.get_running_loop().create_future()
        self._ends.append((entry, attempt, done))
        if len(self._ends) == 1:
            self._ending.set()
        mine = await done
        if mine is None:  # could not be written: the entry stays `sending` until its lease
            return
        if not mine:
            log.info("push_taken_over", extra=fields(push_id=entry.push_id))
            return
        if entry.final:
            self._metrics.push_final.labels(entry.state).inc()
            if not entry.test and (entry.state == "sent" or entry.state == "failed"
                                   or entry.state == "expired"):
                self._counts.add(entry.state, entry.rule_id)
            log.info("push_" + entry.state, extra=fields(
                push_id=entry.push_id, device_id=entry.device_id, rule_id=entry.rule_id,
                attempts=entry.attempts, code=entry.error, reason=entry.reason, test=entry.test))

    async def _write_ends(self) -> None:
        """The writer of attempts' ends: every batch that gathered while the last was written."""
        while True:
            await self._ending.wait()
            self._ending.clear()
            ends, self._ends = self._ends, []
            if not ends:
                continue
            try:
                written = await self._store.finish_pushes([(e, a) for e, a, _ in ends])
            except StateUnavailable as exc:
                self._metrics.state_unavailable.labels("deliver").inc()
                log.warning("push_state_unwritten", extra=fields(pushes=len(ends),
                                                                 reason=str(exc)))
                written = [None] * len(ends)
            except Exception:  # a bug must not leave the attempts waiting forever
                log.exception("push_state_unwritten")
                written = [None] * len(ends)
            for (_, _, done), mine in zip(ends, written, strict=True):
                if not done.done():
                    done.set_result(mine)

    async def _remove_token(self, device_id: str, token: str, code: str | None) -> None:
        def without_token(profile: DeviceProfile | None) -> ProfileWrite | None:
            if profile is None or profile.push_token != token:
                return None  # erased, or the app sent a new token meanwhile
            return ProfileWrite(profile.model_copy(update={"push_token": None}), None)

        try:
            written = await self._store.update_profile(device_id, without_token)
        except StateUnavailable as exc:
            log.warning("push_token_not_removed", extra=fields(device_id=device_id,
                                                               reason=str(exc)))
            return
        if written is not None:
            self._metrics.tokens_removed.inc()
            log.info("push_token_removed", extra=fields(device_id=device_id, code=code,
                                                        credential="sender"))
