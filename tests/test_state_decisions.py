"""Decisions in the per-device commit (contract §4 "caps are reserved atomically", §10), on every
backend: a push decided is reserved in the same compare-and-set as the tracker state, so two
instances racing for one device never push past a cap; the history read for a decision is the
one the commit checks; reservations survive a crash on the memory backend before the push goes
out; erasure takes pushes and decisions too."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from geopush.config import Settings
from geopush.devices import Consent, ConsentChange, DeviceProfile, ErasureRecord, device_hash
from geopush.engine import DeviceOutcome, Engine
from geopush.geo.model import Ping
from geopush.geo.stores import StoreSet, parse_stores
from geopush.rules import RuleFile, RulePolicy, parse_rules
from geopush.rules.decide import DeviceHistory
from geopush.service.active import build_engine
from geopush.state.base import StateStore
from geopush.state.journal import StateFiles
from geopush.state.memory import MemoryStore
from geopush.state.redis import RedisStore

DAY = 86_400.0
T0 = 1_780_000_000.0  # 2026-05-28, 20:26 UTC
A = (46.3683, 14.1146)  # Bled
B = (46.3773, 14.1146)  # 1 km north
FAR = (46.4200, 14.1146)
DEVICE = "racer-1"


def _stores() -> StoreSet:
    features = [
        {"type": "Feature", "id": fid, "properties": {"name": fid, "shop": "supermarket",
                                                      "radius_m": 100},
         "geometry": {"type": "Point", "coordinates": [lon, lat]}}
        for fid, (lat, lon) in (("node/a", A), ("node/b", B))]
    stores, report = parse_stores(json.dumps({"type": "FeatureCollection",
                                              "features": features}))
    assert stores is not None, report.problems
    return stores


STORES = _stores()
RULE = """
id: supermarket-hello
trigger: {on: enter, geofences: {tags: ["shop:supermarket"]}}
message: {title: "Hello", body: "at {{ store.name }}"}
"""


def _engine(history_days: float = 180, **policy: Any) -> Engine:
    settings = Settings(policy={"quiet_hours": None, **policy},
                        retention={"history": history_days * DAY})
    rules, report = parse_rules([RuleFile("rules/hello.yaml", RULE)],
                                RulePolicy(DAY, history_days * DAY), STORES)
    assert rules is not None, report.problems
    return build_engine(settings, STORES, rules)


ENGINE = _engine()


async def _join(state: StateStore, device_id: str = DEVICE, *, marketing: bool = True) -> None:
    profile = DeviceProfile(device_id=device_id, push_token="fcm-1",
                            consent=Consent(location=True, marketing=marketing))
    await state.put_profile(profile, ConsentChange(at=T0 - 60, location=True,
                                                   marketing=marketing, source="PUT"))


async def _ping(state: StateStore, ts: float, where: tuple[float, float], *,
                engine: Engine = ENGINE, device_id: str = DEVICE) -> DeviceOutcome | None:
    batch = [Ping(device_id, ts, where[0], where[1], accuracy_m=10.0)]
    outcomes = await state.track([device_id], lambda snaps: engine.ingest(batch, snaps, now=ts))
    return outcomes.get(device_id)


def _pushes(history: DeviceHistory) -> list[tuple[str, float]]:
    return sorted((p.store_id, p.ts) for p in history.pushes)


async def test_a_push_is_reserved_with_the_track_and_counted_by_the_next_decision(
        store: StateStore) -> None:
    await _join(store)
    first = await _ping(store, T0, A)
    assert first is not None
    assert [(d.rule_id, d.outcome, d.reason) for d in first.decisions] == [
        ("supermarket-hello", "push", None)]
    assert _pushes(await store.history(DEVICE)) == [("node/a", T0)]
    # an hour later at the other store: the daily cap (read from the store) stops it
    await _ping(store, T0 + 600, FAR)
    second = await _ping(store, T0 + 3600, B)
    assert second is not None
    assert [(d.outcome, d.reason) for d in second.decisions] == [("suppressed", "global_cap")]
    assert _pushes(await store.history(DEVICE)) == [("node/a", T0)]
    records = await store.decisions(DEVICE)
    assert [(r["store_id"], r["outcome"], r["reason"]) for r in records] == [
        ("node/a", "push", None), ("node/b", "suppressed", "global_cap")]
    assert records[0]["push_id"] == first.decisions[0].push_id
    assert records[0]["title"] == "Hello" and records[0]["body"] == "at node/a"


async def test_a_ping_without_a_candidate_reads_no_history(store: StateStore,
                                                           monkeypatch: pytest.MonkeyPatch
                                                           ) -> None:
    """DECISIONS IN TWO STEPS: the common ping costs what it cost before."""
    await _join(store)
    reads: list[Any] = []
    if isinstance(store, RedisStore):
        real = store._histories

        async def counting(device_ids: Any) -> Any:
            reads.append(list(device_ids))
            return await real(device_ids)

        monkeypatch.setattr(store, "_histories", counting)
    else:
        real_history = store._history  # type: ignore[attr-defined]

        def counting_sync(device_id: str) -> DeviceHistory:
            reads.append([device_id])
            history: DeviceHistory = real_history(device_id)
            return history

        monkeypatch.setattr(store, "_history", counting_sync)
    await _ping(store, T0 - 300, FAR)  # no event
    await _ping(store, T0 - 200, FAR)
    assert reads == []
    await _ping(store, T0, A)  # an enter a rule triggers on
    assert reads == [[DEVICE]]


async def test_pushes_and_visits_past_retention_are_forgotten_at_the_next_decision(
        store: StateStore) -> None:
    engine = _engine(history_days=7)
    await _join(store)
    await _ping(store, T0, A, engine=engine)
    await _ping(store, T0 + 600, FAR, engine=engine)  # a visit of 10 minutes
    assert _pushes(await store.history(DEVICE)) == [("node/a", T0)]
    assert [(v.store_id, v.end) for v in await store.visits(DEVICE)] == [("node/a", T0 + 600)]
    await _ping(store, T0 + 4 * DAY, A, engine=engine)
    await _ping(store, T0 + 4 * DAY + 600, FAR, engine=engine)  # a visit within retention
    later = T0 + 8 * DAY
    outcome = await _ping(store, later, B, engine=engine)
    assert outcome is not None and [d.outcome for d in outcome.decisions] == ["push"]
    assert _pushes(await store.history(DEVICE)) == [("node/a", T0 + 4 * DAY), ("node/b", later)]
    assert [v.end for v in await store.visits(DEVICE)] == [T0 + 4 * DAY + 600]


async def test_opens_are_recorded_once_for_the_devices_own_pushes(store: StateStore) -> None:
    await _join(store)
    outcome = await _ping(store, T0, A)
    assert outcome is not None
    push_id = outcome.decisions[0].push_id
    assert push_id is not None and len(push_id) == 26
    assert await store.record_open(DEVICE, push_id, T0 + 30) == T0 + 30
    assert await store.record_open(DEVICE, push_id, T0 + 90) == T0 + 30  # the first one stays
    [push] = (await store.history(DEVICE)).pushes
    assert push.opened_at == T0 + 30
    await _join(store, "other")
    assert await store.record_open("other", push_id, T0 + 30) is None  # not its push
    assert await store.record_open(DEVICE, "01KBZ0000000000000000000AB", T0) is None


async def test_erasure_takes_pushes_decisions_and_opens(store: StateStore) -> None:
    await _join(store)
    outcome = await _ping(store, T0, A)
    assert outcome is not None and outcome.decisions[0].push_id is not None
    await store.record_open(DEVICE, outcome.decisions[0].push_id, T0 + 5)
    record = ErasureRecord(device_hash=device_hash(DEVICE, "k" * 32), erased_at=T0 + 10,
                           last_consent=Consent(location=True, marketing=True))
    assert await store.erase(DEVICE, record)
    assert (await store.history(DEVICE)).pushes == []
    assert await store.decisions(DEVICE) == []
    assert await store.export(DEVICE) is None


# -- two instances racing for one device ----------------------------------------------------


@pytest.fixture(params=["redis", "redis-cluster"])
async def two_instances(request: pytest.FixtureRequest
                        ) -> AsyncIterator[tuple[RedisStore, RedisStore]]:
    url = request.getfixturevalue("redis_url" if request.param == "redis"
                                  else "redis_cluster_url")
    cluster = request.param == "redis-cluster"
    first, second = RedisStore(url, cluster=cluster), RedisStore(url, cluster=cluster)
    await first.open()
    await second.open()
    try:
        yield first, second
    finally:
        await first.close()
        await second.close()


async def test_an_instance_whose_history_went_stale_decides_again_on_the_winners_push(
        two_instances: tuple[RedisStore, RedisStore], monkeypatch: pytest.MonkeyPatch) -> None:
    """Deterministic race: instance 1 has read the device and computed an enter at A; while it
    reads the history, instance 2 commits a push at B. Instance 1's commit must fail its
    compare-and-set and decide again on the history holding instance 2's push (global_cap)."""
    one, two = two_instances
    await _join(one)
    await _ping(one, T0 - 600, FAR)
    real = one._histories
    raced: list[bool] = []

    async def stale_history(device_ids: Any) -> Any:
        got = await real(device_ids)
        if not raced:
            raced.append(True)
            winner = await _ping(two, T0 - 60, B)
            assert winner is not None and [d.outcome for d in winner.decisions] == ["push"]
        return got

    monkeypatch.setattr(one, "_histories", stale_history)
    loser = await _ping(one, T0, A)
    assert raced == [True]
    assert loser is not None
    assert [(d.outcome, d.reason) for d in loser.decisions] == [("suppressed", "global_cap")]
    assert _pushes(await two.history(DEVICE)) == [("node/b", T0 - 60)]


async def test_two_instances_storming_one_device_never_exceed_its_caps(
        two_instances: tuple[RedisStore, RedisStore]) -> None:
    """Eight rounds: the phone is outside, then instance 1 gets a ping at store A and instance 2
    one at store B a second later, at once: both compute an enter a rule wants to push on,
    from the same snapshot. The daily cap is 1: one push in all, however the commits fall."""
    one, two = two_instances
    await _join(one)
    results: list[DeviceOutcome | None] = []
    for round_no in range(8):
        t = T0 + 180 * round_no
        await _ping(one, t, FAR)
        results += await asyncio.gather(_ping(one, t + 60, A), _ping(two, t + 61, B))
    decisions = [d for r in results if r is not None for d in r.decisions]
    assert sum(d.outcome == "push" for d in decisions) == 1
    assert len(decisions) >= 8
    assert {d.reason for d in decisions if d.outcome != "push"} == {"global_cap"}
    assert len((await one.history(DEVICE)).pushes) == 1
    stored = await two.decisions(DEVICE)
    assert sum(r["outcome"] == "push" for r in stored) == 1
    assert len(stored) == len(decisions)


# -- the memory backend: a reservation is on disk before the push goes out -------------------


async def test_memory_a_reserved_push_is_on_disk_when_track_returns(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    state = MemoryStore(path, fsync_every=3600.0)  # plain track rows wait an hour
    await state.open()
    try:
        await _join(state)
        outcome = await _ping(state, T0, A)
        assert outcome is not None and [d.outcome for d in outcome.decisions] == ["push"]
        # read as a restart after a crash would, while the store still runs
        crashed = MemoryStore(path)
        crashed._restore(StateFiles(path), read_only=True)
        assert _pushes(await crashed.history(DEVICE)) == [("node/a", T0)]
        assert [r["outcome"] for r in await crashed.decisions(DEVICE)] == ["push"]
    finally:
        await state.close()
    # and after a clean shutdown, from the snapshot
    again = MemoryStore(path)
    await again.open()
    try:
        assert _pushes(await again.history(DEVICE)) == [("node/a", T0)]
        assert len(await again.decisions(DEVICE)) == 1
    finally:
        await again.close()
