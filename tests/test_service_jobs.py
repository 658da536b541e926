"""Periodic jobs once per cluster (contract §8): two instances' schedulers share one Redis (or
Redis Cluster), and each job runs in each period on one of them only; a run that fails or is
cancelled gives its period back; a long run keeps its lease. The delivery report sums what
every instance counted, and warns under `logging.delivery_rate_alert`. The retention purge
forgets what is older than `retention.history` and nothing newer."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import pytest

from geopush.config import Settings
from geopush.delivery.counts import ReportCounts, write_report
from geopush.metrics import Metrics
from geopush.service.jobs import Job, Jobs, service_jobs
from geopush.state.base import StateStore
from geopush.state.redis import RedisStore
from tests.test_state_decisions import DEVICE, FAR, T0, A, _join, _ping

DAY = 86_400.0


@pytest.fixture(params=["redis", "redis-cluster"])
async def two_stores(request: pytest.FixtureRequest) -> AsyncIterator[tuple[RedisStore, RedisStore]]:
    url = request.getfixturevalue("redis_url" if request.param == "redis"
                                  else "redis_cluster_url")
    cluster = request.param == "redis-cluster"
    stores = RedisStore(url, cluster=cluster), RedisStore(url, cluster=cluster)
    for store in stores:
        await store.open()
    try:
        yield stores
    finally:
        for store in stores:
            await store.close()


async def test_each_period_runs_on_one_instance_only(
        two_stores: tuple[RedisStore, RedisStore]) -> None:
    ran: list[tuple[str, float]] = []
    instances = [Jobs(store, Metrics()) for store in two_stores]

    def job_of(name: str) -> Job:
        async def run(period_start: float) -> None:
            ran.append((name, period_start))
            await asyncio.sleep(0.05)

        return Job("tick", 10.0, run, lease_s=5.0)

    one, two = job_of("one"), job_of("two")
    for period in range(3):
        now = 1_000_000.0 + 10 * period + 0.5
        results = await asyncio.gather(instances[0].run_once(one, now),
                                       instances[1].run_once(two, now))
        assert sorted(results) == [False, True]
        # later in the same period (a late schedule): not again
        assert not await instances[0].run_once(one, now + 5)
        assert not await instances[1].run_once(two, now + 5)
    assert [p for _, p in ran] == [1_000_000.0, 1_000_010.0, 1_000_020.0]


async def test_a_failed_or_cancelled_run_gives_its_period_back(
        two_stores: tuple[RedisStore, RedisStore]) -> None:
    first, second = (Jobs(store, Metrics()) for store in two_stores)
    calls: list[str] = []

    async def fails(period_start: float) -> None:
        calls.append("fails")
        raise RuntimeError("boom")

    async def works(period_start: float) -> None:
        calls.append("works")

    now = 2_000_000.0
    assert not await first.run_once(Job("purge", 60.0, fails, lease_s=30.0), now)
    assert await second.run_once(Job("purge", 60.0, works, lease_s=30.0), now + 1)
    assert calls == ["fails", "works"]

    started = asyncio.Event()

    async def long(period_start: float) -> None:
        started.set()
        await asyncio.sleep(30)

    task = asyncio.create_task(first.run_once(Job("report", 60.0, long, lease_s=30.0), now))
    await started.wait()
    assert not await second.run_once(Job("report", 60.0, works, lease_s=30.0), now + 1)
    await first.shutdown()  # cancels the run; its finally gives the lease back
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await second.run_once(Job("report", 60.0, works, lease_s=30.0), now + 2)


async def test_a_long_run_renews_its_lease(two_stores: tuple[RedisStore, RedisStore]) -> None:
    first, second = (Jobs(store, Metrics()) for store in two_stores)
    release = asyncio.Event()

    async def long(period_start: float) -> None:
        await release.wait()

    async def other(period_start: float) -> None:
        raise AssertionError("ran twice in one period")

    now = 3_000_000.0
    task = asyncio.create_task(first.run_once(Job("purge", 600.0, long, lease_s=0.3), now))
    await asyncio.sleep(0.8)  # more than twice the lease: renewed meanwhile
    assert not await second.run_once(Job("purge", 600.0, other, lease_s=0.3), now + 1)
    release.set()
    assert await task


async def test_two_schedulers_run_each_period_once(
        two_stores: tuple[RedisStore, RedisStore]) -> None:
    """The real APScheduler on two instances: every 0.5 s period runs on one of them."""
    periods: list[float] = []
    instances = [Jobs(store, Metrics()) for store in two_stores]
    for jobs in instances:
        async def run(period_start: float) -> None:
            periods.append(period_start)

        jobs.add(Job("tick", 0.5, run, lease_s=5.0))
        jobs.start()
    await asyncio.sleep(2.6)
    for jobs in instances:
        await jobs.shutdown()
    assert len(periods) >= 4
    assert len(periods) == len(set(periods))  # never twice for one period
    steps = {round(b - a, 3) for a, b in zip(sorted(periods), sorted(periods)[1:], strict=False)}
    assert steps == {0.5}


async def test_a_run_that_starts_after_its_period_ended_runs_that_period_too() -> None:
    """A late start (a busy loop, a slow state store) was taken for the next period, and its
    own never ran anywhere: a delivery report's window gone (CI saw a 0.5 s period skipped)."""
    from geopush.service.jobs import CATCH_UP_PERIODS
    from geopush.state.memory import MemoryStore

    clock = [4_000_000.0 + 1]
    jobs = Jobs(MemoryStore(), Metrics(), clock=lambda: clock[0])
    ran: list[float] = []

    async def run(period_start: float) -> None:
        ran.append(period_start)

    job = Job("report", 10.0, run, lease_s=30.0)
    await jobs._fire(job)
    clock[0] += 20.5  # the run for the next period starts only in the one after it
    await jobs._fire(job)
    assert ran == [4_000_000.0, 4_000_010.0, 4_000_020.0]
    await jobs._fire(job)  # fired again in the same period: nothing more
    clock[0] += 200.0  # far behind: only the last few periods are run
    await jobs._fire(job)
    assert ran[3:] == [4_000_220.0 - 10.0 * k for k in range(CATCH_UP_PERIODS, -1, -1)]


async def test_the_delivery_report_sums_every_instance_and_warns_under_the_threshold(
        two_stores: tuple[RedisStore, RedisStore], caplog: pytest.LogCaptureFixture) -> None:
    clock = [4_000_000.0 + 5]  # 5 s into a 60 s window
    counts = [ReportCounts(60.0, clock=lambda: clock[0]) for _ in two_stores]
    for n in range(15):
        counts[n % 2].add("decided", "hello")
        counts[n % 2].add("sent" if n < 10 else "failed", "hello")
    for n in range(10):
        counts[n % 2].add("expired", "bye")
    counts[0].add("suppressed", "global_cap", 4)
    for store, count in zip(two_stores, counts, strict=True):
        await count.flush(store)
    with caplog.at_level(logging.INFO, logger="geopush.delivery.counts"):
        report = await write_report(two_stores[0], counts[0], 4_000_060.0, 0.9)
    assert report["decided"] == 15 and report["sent"] == 10
    assert report["failed"] == 5 and report["expired"] == 10
    assert report["suppressed"] == {"global_cap": 4}
    assert report["delivery_rate"] == pytest.approx(10 / 25)
    assert report["by_rule"]["bye"]["expired"] == 10
    messages = [r.getMessage() for r in caplog.records]
    assert messages == ["delivery_report", "delivery_rate_alert"]
    # the window after: nothing counted, no alert
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="geopush.delivery.counts"):
        quiet = await write_report(two_stores[0], counts[0], 4_000_120.0, 0.9)
    assert quiet["decided"] == 0 and quiet["delivery_rate"] is None
    assert [r.getMessage() for r in caplog.records] == ["delivery_report"]


async def test_a_count_flushed_after_its_window_was_reported_is_in_the_next_report() -> None:
    """A busy worker may flush after the report of the window a count was made in has been
    read: the count goes to the window under way, never to a bucket already reported (which
    no report would ever show)."""
    from geopush.state.memory import MemoryStore

    store = MemoryStore()
    clock = [4_000_000.0 - 0.1]  # the last tenth of a second of the 2 s window ending at 4e6
    counts = ReportCounts(2.0, clock=lambda: clock[0])
    counts.add("decided", "hello")
    clock[0] = 4_000_000.0 + counts.report_offset_s + 0.5  # the report of that window is out
    late = await write_report(store, counts, 4_000_000.0, 0.9)
    assert late["decided"] == 0  # not flushed yet
    await counts.flush(store)
    following = await write_report(store, counts, 4_000_002.0, 0.9)
    assert following["decided"] == 1


async def test_a_flush_just_before_a_window_ends_counts_in_the_next_one() -> None:
    """Its write could land after the report read the window it was made in."""
    from geopush.state.memory import MemoryStore

    store = MemoryStore()
    clock = [4_000_000.0 - 0.05]
    counts = ReportCounts(2.0, clock=lambda: clock[0])
    counts.add("sent", "hello")
    await counts.flush(store)
    assert (await write_report(store, counts, 4_000_000.0, 0.9))["sent"] == 0
    assert (await write_report(store, counts, 4_000_002.0, 0.9))["sent"] == 1


async def test_the_service_schedules_the_report_and_the_purge() -> None:
    from geopush.state.memory import MemoryStore

    store = MemoryStore()
    jobs = Jobs(store, Metrics())
    service_jobs(jobs, store, Settings(logging={"delivery_report_every": "30s"}),
                 ReportCounts(30.0))
    names = {job.id: job.trigger.interval.total_seconds()
             for job in jobs._scheduler.get_jobs()}
    assert names == {"delivery_report": 30.0, "retention_purge": 3600.0}


# -- the retention purge, on every backend ---------------------------------------------------


async def test_the_purge_forgets_what_is_past_retention_and_nothing_newer(
        store: StateStore) -> None:
    await _join(store)
    # a visit and a push long ago, then a visit and a push recently
    for at in (T0, T0 + 30 * DAY):
        await _ping(store, at - 600, FAR)
        await _ping(store, at, A)
        await _ping(store, at + 600, A)
        await _ping(store, at + 1200, FAR)
    history = await store.history(DEVICE)
    assert len(history.visits) == 2 and len(history.pushes) == 2
    assert len(await store.decisions(DEVICE)) == 2 and len(await store.outbox(DEVICE)) == 2
    before = (await store.stored_track(DEVICE)).writes
    gone = await store.purge(T0 + 10 * DAY)
    assert gone == 3  # a visit, a push (its outbox entry with it), a decision
    history = await store.history(DEVICE)
    assert [v.start > T0 + 10 * DAY for v in history.visits] == [True]
    assert [p.ts for p in history.pushes] == [T0 + 30 * DAY]
    assert [d["ts"] for d in await store.decisions(DEVICE)] == [T0 + 30 * DAY]
    assert [e.created_at for e in await store.outbox(DEVICE)] == [T0 + 30 * DAY]
    after = (await store.stored_track(DEVICE)).writes
    if before is not None:  # the version moves: a decision on the old history is redone
        assert after == before + 1
    assert await store.purge(T0 + 10 * DAY) == 0
