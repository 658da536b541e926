"""What only the Redis backend promises: shared by many instances, erasure leaves no trace,
one round trip per batch, and it comes back by itself after Redis does."""

from __future__ import annotations

import asyncio
import random
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import pytest
import redis
import redis.asyncio.client
from redis.crc import key_slot

from geopush.devices import Consent, ConsentChange, DeviceProfile, ErasureRecord, device_hash
from geopush.engine import DeviceOutcome, DeviceSnapshot, Engine
from geopush.geo.index import GeofenceIndex
from geopush.geo.model import Event, Ping
from geopush.geo.transitions import Tracker
from geopush.state.base import PartlyUnavailable, StateUnavailable, StoredToken
from geopush.state.keys import Keys, group_by_slot
from geopush.state.memory import MemoryStore
from geopush.state.redis import TRACK_SLICE, RedisStore
from tests.conftest import PrivateRedis, PrivateRedisCluster

T0 = 1_780_000_000.0
# three shops 300 m apart on a line, so a walk along it enters, dwells and leaves them
SHOPS = [(48.1374, 11.5755 + i * 0.004) for i in range(3)]


def _engine() -> Engine:
    index = GeofenceIndex([s[0] for s in SHOPS], [s[1] for s in SHOPS], [80.0] * 3,
                          ids=[f"node/{i}" for i in range(3)],
                          store_ids=[f"store-{i}" for i in range(3)])
    return Engine(Tracker(index, stale_after_s=900.0, min_visit_s=120.0,
                          dwell_plan=lambda _fid: (180.0,)))


ENGINE = _engine()


def _profile(device_id: str, *, location: bool = True) -> DeviceProfile:
    return DeviceProfile(device_id=device_id, consent=Consent(location=location, marketing=True),
                         push_token="token-" + device_id)


@dataclass(frozen=True)
class Backend:
    """Where the stores of a test keep their state: one Redis, or a three-node cluster."""

    url: str
    cluster: bool

    def store(self) -> RedisStore:
        return RedisStore(self.url, cluster=self.cluster)


@pytest.fixture(params=["redis", "redis-cluster"])
def backend(request: pytest.FixtureRequest) -> Backend:
    if request.param == "redis":
        return Backend(request.getfixturevalue("redis_url"), cluster=False)
    return Backend(request.getfixturevalue("redis_cluster_url"), cluster=True)


@pytest.fixture
async def stores(backend: Backend) -> AsyncIterator[tuple[RedisStore, RedisStore]]:
    """Two instances with separate clients, as two `geopush serve` processes would be."""
    async for pair in _two_stores(backend):
        yield pair


@pytest.fixture
async def single_redis_stores(redis_url: str) -> AsyncIterator[tuple[RedisStore, RedisStore]]:
    """`stores` on one Redis, for the tests of its round trips and commands."""
    async for pair in _two_stores(Backend(redis_url, cluster=False)):
        yield pair


async def _two_stores(backend: Backend) -> AsyncIterator[tuple[RedisStore, RedisStore]]:
    a, b = backend.store(), backend.store()
    await a.open()
    await b.open()
    try:
        yield a, b
    finally:
        await a.close()
        await b.close()


def _ingest(pings: list[Ping]) -> Callable[[Mapping[str, DeviceSnapshot]], dict[str, DeviceOutcome]]:
    return lambda snaps: ENGINE.ingest(pings, snaps)


async def _all_keys_and_values(where: str | Backend) -> dict[str, str]:
    """Every key of the database (of every node of a cluster) with a text dump of its value."""
    client: Any = (redis.asyncio.RedisCluster.from_url(where.url)
                   if isinstance(where, Backend) and where.cluster
                   else redis.asyncio.Redis.from_url(where.url if isinstance(where, Backend)
                                                     else where))
    dump: dict[str, str] = {}
    try:
        async for key in client.scan_iter(count=500):
            raw_kind = await client.type(key)
            kind = raw_kind.decode() if isinstance(raw_kind, bytes) else raw_kind
            value: Any
            if kind == "string":
                value = await client.get(key)
            elif kind == "list":
                value = await client.lrange(key, 0, -1)
            elif kind == "zset":
                value = await client.zrange(key, 0, -1, withscores=True)
            elif kind == "hash":
                value = await client.hgetall(key)
            else:
                raise AssertionError(f"unexpected key type {kind} of {key!r}")
            dump[key.decode()] = repr(value)
    finally:
        await client.aclose()
    return dump


# -- key layout ----------------------------------------------------------------------------


@pytest.mark.parametrize("device_id", ["abc", "way/281804082", "odd}{id", "ünï"])
def test_a_devices_keys_share_one_cluster_slot(device_id: str) -> None:
    keys = Keys("geopush").device(device_id).all()
    assert len({key_slot(k.encode()) for k in keys}) == 1
    assert all(k.startswith("geopush:{d:") for k in keys)


async def test_key_prefix_separates_deployments_sharing_a_database(redis_url: str) -> None:
    a, b = RedisStore(redis_url, key_prefix="tenant-a"), RedisStore(redis_url)
    await a.open()
    await b.open()
    try:
        await a.put_profile(_profile("dev-1"), None)
        await a.track(["dev-1"], _ingest([Ping("dev-1", T0, *SHOPS[0])]))
        assert await b.get_profile("dev-1") is None
        assert await b.claim_due(T0 + 10_000, 10, 30) == []
        assert {k for k in await _all_keys_and_values(redis_url) if ":once:" not in k} == {
            "tenant-a:{d:dev-1}:profile", "tenant-a:{d:dev-1}:track", "tenant-a:{d:dev-1}:ver",
            "tenant-a:timers"}
    finally:
        await a.close()
        await b.close()


# -- erasure -------------------------------------------------------------------------------


async def _walk_in(store: RedisStore, device_id: str) -> None:
    await store.put_profile(_profile(device_id), ConsentChange(at=T0 - 5, location=True,
                                                               marketing=True))
    lat, lon = SHOPS[0]
    pings = [Ping(device_id, T0 + t, lat, lon) for t in (0, 200, 400)]
    pings.append(Ping(device_id, T0 + 500, *SHOPS[1]))
    await store.track([device_id], _ingest(pings))


async def test_erasure_leaves_no_key_or_value_mentioning_the_device(
    stores: tuple[RedisStore, RedisStore], backend: Backend,
) -> None:
    store, _ = stores
    victim, bystander = "erase-me-7f3a9c", "keep-me-1b2c"
    await _walk_in(store, victim)
    await _walk_in(store, bystander)
    assert await store.set_token(victim, StoredToken("victim-nonce", T0))
    before = await _all_keys_and_values(backend)
    assert any(victim in k or victim in v for k, v in before.items())  # the check can see it
    record = ErasureRecord(device_hash=device_hash(victim, "k"), erased_at=T0 + 600,
                           last_consent=Consent(location=True, marketing=True))
    assert await store.erase(victim, record)
    after = await _all_keys_and_values(backend)
    leaks = {k: v for k, v in after.items()
             if victim in k or victim in v or "victim-nonce" in v}
    assert leaks == {}
    assert any(bystander in k for k in after)
    assert await store.erasure_record(record.device_hash) == record


def _lose_connection_at_round_trip(store: RedisStore, fail_at: int) -> None:
    """Make the store's `fail_at`-th round trip to Redis from now on fail as a lost
    connection would (commands and pipelines alike)."""
    client = store._client
    assert client is not None
    trips = 0

    def trip() -> None:
        nonlocal trips
        trips += 1
        if trips == fail_at:
            raise redis.exceptions.ConnectionError("connection lost (test)")

    execute_command, pipeline = client.execute_command, client.pipeline

    async def lossy_command(*args: Any, **kwargs: Any) -> Any:
        trip()
        return await execute_command(*args, **kwargs)

    def lossy_pipeline(*args: Any, **kwargs: Any) -> Any:
        pipe = pipeline(*args, **kwargs)
        execute = pipe.execute

        async def lossy_execute(*eargs: Any, **ekwargs: Any) -> Any:
            trip()
            return await execute(*eargs, **ekwargs)

        setattr(pipe, "execute", lossy_execute)  # noqa: B010 - replacing a method on purpose
        return pipe

    setattr(client, "execute_command", lossy_command)  # noqa: B010
    setattr(client, "pipeline", lossy_pipeline)  # noqa: B010


@pytest.mark.parametrize("fail_at", [1, 2, 3])
async def test_an_erasure_cut_short_never_leaves_the_data_gone_without_its_record(
    stores: tuple[RedisStore, RedisStore], backend: Backend, fail_at: int,
) -> None:
    store, other = stores
    device_id = f"half-erased-{fail_at}"
    await _walk_in(store, device_id)
    record = ErasureRecord(device_hash=device_hash(device_id, "k"), erased_at=T0 + 700,
                           last_consent=Consent(location=True, marketing=False))
    _lose_connection_at_round_trip(store, fail_at)
    try:
        erased = await store.erase(device_id, record)
    except StateUnavailable:
        erased = False
    data_left = {k for k in await _all_keys_and_values(backend) if device_id in k}
    kept = await other.erasure_record(record.device_hash)
    if erased:
        assert data_left == set() and kept == record
    else:  # the data is still there (with or without the record), and a retry finishes
        assert data_left
        assert await other.erase(device_id, record) is True
        assert {k for k in await _all_keys_and_values(backend) if device_id in k} == set()
        assert await other.erasure_record(record.device_hash) == record


async def _between_read_and_commit(store: RedisStore, action: Callable[[], Awaitable[Any]]
                                   ) -> None:
    """Make `action` happen after the store's next read and before its commit: a race."""
    commit = store._commit
    done = False

    async def racing_commit(*args: Any) -> list[str]:
        nonlocal done
        if not done:
            done = True
            await action()
        return await commit(*args)

    setattr(store, "_commit", racing_commit)  # noqa: B010 - replacing a method on purpose


async def test_a_commit_racing_an_erasure_does_not_bring_the_device_back(
    stores: tuple[RedisStore, RedisStore], backend: Backend,
) -> None:
    tracker_store, eraser = stores
    device_id = "racer-42"
    await _walk_in(tracker_store, device_id)
    record = ErasureRecord(device_hash=device_hash(device_id, "k"), erased_at=T0 + 700,
                           last_consent=None)
    await _between_read_and_commit(tracker_store, lambda: eraser.erase(device_id, record))
    # this batch was computed on the state before the erasure; its commit must not land
    ping = Ping(device_id, T0 + 800, *SHOPS[0])
    outcome = (await tracker_store.track([device_id], _ingest([ping])))[device_id]
    assert [r.code for r in outcome.rejected] == ["no_consent"]
    dump = await _all_keys_and_values(backend)
    assert {k: v for k, v in dump.items() if device_id in k or device_id in v} == {}


async def test_a_commit_racing_a_revocation_leaves_no_stay_or_timer(
    stores: tuple[RedisStore, RedisStore],
) -> None:
    tracker_store, api = stores
    device_id = "revoker-7"
    await api.put_profile(_profile(device_id), None)
    await _between_read_and_commit(
        tracker_store, lambda: api.put_profile(_profile(device_id, location=False), None))
    ping = Ping(device_id, T0, *SHOPS[0])
    outcome = (await tracker_store.track([device_id], _ingest([ping])))[device_id]
    assert outcome.events == []
    assert [r.code for r in outcome.rejected] == ["no_consent"]
    assert await api.claim_due(T0 + 10_000, 10, 30) == []


async def test_a_commit_racing_a_new_device_token_is_computed_again_and_refused(
    stores: tuple[RedisStore, RedisStore],
) -> None:
    """Another instance issues a new token between this batch's read and its commit: the token
    write moved the version, so the batch computed with the old nonce is computed again on the
    new one, and the old token's pings are refused; nothing of them is stored."""
    tracker_store, api = stores
    device_id = "phone-7"
    await api.put_profile(_profile(device_id), None)
    assert await api.set_token(device_id, StoredToken("old-nonce", T0))
    seen: list[str | None] = []

    def compute(snapshots: Mapping[str, DeviceSnapshot]) -> dict[str, DeviceOutcome]:
        seen.append(snapshots[device_id].token_nonce)
        return ENGINE.ingest([Ping(device_id, T0, *SHOPS[0])], snapshots,
                             nonces={device_id: "old-nonce"})

    await _between_read_and_commit(
        tracker_store, lambda: api.set_token(device_id, StoredToken("new-nonce", T0 + 1)))
    outcome = (await tracker_store.track([device_id], compute))[device_id]
    assert seen == ["old-nonce", "new-nonce"]
    assert [r.code for r in outcome.rejected] == ["forbidden"] and outcome.events == []
    assert (await tracker_store.stored_track(device_id)).state is None
    assert await api.stored_token(device_id) == StoredToken("new-nonce", T0 + 1)


# -- many instances ------------------------------------------------------------------------


def _trace(devices: int, rounds: int, seed: int = 7) -> list[list[Ping]]:
    """Each round, one ping per device: walking among the shops, lingering, leaving."""
    rng = random.Random(seed)
    batches = []
    for r in range(rounds):
        batch = []
        for d in range(devices):
            lat, lon = SHOPS[rng.randrange(3)] if rng.random() < 0.7 else (48.14, 11.60)
            batch.append(Ping(f"dev-{d}", T0 + 60.0 * r + d * 0.01, lat, lon,
                              accuracy_m=rng.choice([None, 15.0, 30.0])))
        batches.append(batch)
    return batches


def _key(e: Event) -> tuple[Any, ...]:
    return (e.device_id, e.ts, e.type, e.geofence_id, e.dwell_s, e.stale)


async def test_two_instances_racing_on_the_same_devices_emit_each_event_once(
    stores: tuple[RedisStore, RedisStore],
) -> None:
    """Every batch is delivered to both instances at once (a client retrying elsewhere); the
    events together are exactly those one store emits, and the stored visits are the same."""
    a, b = stores
    devices, rounds = 12, 25
    reference = MemoryStore()
    for d in range(devices):
        for store in (a, reference):
            await store.put_profile(_profile(f"dev-{d}"), None)
    calls = {"a": 0, "b": 0}

    def counted(name: str, pings: list[Ping]
                ) -> Callable[[Mapping[str, DeviceSnapshot]], dict[str, DeviceOutcome]]:
        def compute(snaps: Mapping[str, DeviceSnapshot]) -> dict[str, DeviceOutcome]:
            calls[name] += 1
            return ENGINE.ingest(pings, snaps)
        return compute

    expected: list[tuple[Any, ...]] = []
    got: list[tuple[Any, ...]] = []
    ids = [f"dev-{d}" for d in range(devices)]
    for batch in _trace(devices, rounds):
        ref = await reference.track(ids, _ingest(batch))
        expected += [_key(e) for o in ref.values() for e in o.events]
        out_a, out_b = await asyncio.gather(a.track(ids, counted("a", batch)),
                                            b.track(ids, counted("b", batch)))
        got += [_key(e) for out in (out_a, out_b) for o in out.values() for e in o.events]
    assert calls["a"] + calls["b"] > 2 * rounds  # they did collide and recompute
    assert {"enter", "dwell", "exit"} <= {k[2] for k in expected}
    assert sorted(got) == sorted(expected)
    for device_id in ids:
        assert await a.visits(device_id) == await reference.visits(device_id)


async def test_concurrent_claims_hand_each_device_to_one_instance(
    stores: tuple[RedisStore, RedisStore],
) -> None:
    a, b = stores
    ids = [f"dev-{d}" for d in range(40)]
    for device_id in ids:
        await a.put_profile(_profile(device_id), None)
    await a.track(ids, _ingest([Ping(d, T0, *SHOPS[0]) for d in ids]))
    claims = await asyncio.gather(*(s.claim_due(T0 + 180, 7, 30) for s in (a, b) * 5))
    flat = [d for claim in claims for d in claim]
    assert sorted(flat) == sorted(ids)  # each once, none lost


# -- round trips ---------------------------------------------------------------------------


@pytest.fixture
def round_trips(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    counts = {"pipelines": 0, "commands": 0}
    execute: Any = redis.asyncio.client.Pipeline.execute
    command: Any = redis.asyncio.client.Redis.execute_command

    async def counting_execute(self: Any, *args: Any, **kwargs: Any) -> Any:
        counts["pipelines"] += 1
        return await execute(self, *args, **kwargs)

    async def counting_command(self: Any, *args: Any, **kwargs: Any) -> Any:
        if not isinstance(self, redis.asyncio.client.Pipeline):
            counts["commands"] += 1
        return await command(self, *args, **kwargs)

    monkeypatch.setattr(redis.asyncio.client.Pipeline, "execute", counting_execute)
    monkeypatch.setattr(redis.asyncio.client.Redis, "execute_command", counting_command)
    return counts


async def test_a_batch_costs_one_read_and_one_commit_round_trip_a_slice(
    single_redis_stores: tuple[RedisStore, RedisStore], round_trips: dict[str, int],
) -> None:
    """Whatever the slice's size (TRACK_SLICE devices: the loop is served between slices)."""
    store, _ = single_redis_stores
    ids = [f"dev-{d}" for d in range(200)]
    for device_id in ids:
        await store.put_profile(_profile(device_id), None)
    # half of them send with their device token: its nonce comes in the same read
    nonces = {d: f"nonce-{d}" for d in ids[::2]}
    for device_id, nonce in nonces.items():
        await store.set_token(device_id, StoredToken(nonce, T0))
    await store.track(ids[:1], _ingest([Ping(ids[0], T0 - 10, 48.14, 11.60)]))  # scripts loaded
    round_trips.update(pipelines=0, commands=0)
    batch = [Ping(d, T0 + i * 0.1, *SHOPS[i % 3]) for i, d in enumerate(ids)]
    outcomes = await store.track(
        ids, lambda snaps: ENGINE.ingest(batch, snaps, nonces=nonces))
    assert sum(len(o.events) for o in outcomes.values()) == len(ids)
    slices = -(-len(ids) // TRACK_SLICE)
    assert slices > 1 and round_trips == {"pipelines": 2 * slices, "commands": 0}


# -- Redis going away and coming back ------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def private_redis(private_redis: PrivateRedis) -> PrivateRedis:
    """The shared private redis-server, already started."""
    private_redis.start()
    return private_redis


async def test_redis_down_is_unavailable_and_recovers_by_itself(
    private_redis: PrivateRedis,
) -> None:
    store = RedisStore(f"redis://127.0.0.1:{private_redis.port}/0")
    await store.open()
    try:
        await store.put_profile(_profile("dev-1"), None)
        assert await store.healthy()
        private_redis.stop()
        assert not await store.healthy()
        ping = Ping("dev-1", T0, *SHOPS[0])
        for call in (store.get_profile("dev-1"), store.track(["dev-1"], _ingest([ping])),
                     store.claim_due(T0, 10, 30), store.put_profile(_profile("dev-1"), None)):
            with pytest.raises(StateUnavailable, match="unavailable"):
                await call
        private_redis.start()  # empty, and without geopush's scripts
        deadline = time.monotonic() + 15
        while not await store.healthy():
            assert time.monotonic() < deadline, "not recovered within 15 s"
            await asyncio.sleep(0.1)
        await store.put_profile(_profile("dev-1"), None)
        outcome = (await store.track(["dev-1"], _ingest([ping])))["dev-1"]
        assert [e.type for e in outcome.events] == ["enter"]
        assert await store.claim_due(T0 + 180, 10, 30) == ["dev-1"]
    finally:
        await store.close()


async def test_a_cluster_node_down_is_unavailable_and_recovers_by_itself(
    private_redis_cluster: PrivateRedisCluster,
) -> None:
    private_redis_cluster.start()
    store = RedisStore(private_redis_cluster.url, cluster=True)
    await store.open()
    try:
        ids = [f"dev-{d}" for d in range(30)]  # on every node
        for device_id in ids:
            await store.put_profile(_profile(device_id), None)
        down = private_redis_cluster.nodes[1]
        down.stop()
        batch = [Ping(d, T0, *SHOPS[0]) for d in ids]
        started = time.monotonic()
        # the devices of the other nodes commit; those of the node down are unavailable
        with pytest.raises(PartlyUnavailable, match="unavailable") as partly:
            await store.track(ids, _ingest(batch))
        assert time.monotonic() - started < 15, "a node down must fail fast, not hang"
        entered = {d: [e.type for e in o.events] for d, o in partly.value.committed.items()}
        retry = sorted(partly.value.unavailable)
        assert retry and set(retry) | set(entered) == set(ids)
        down.start()  # keeps its nodes.conf: rejoins with its slots (and data: none persisted)
        private_redis_cluster.wait_until_formed()
        deadline = time.monotonic() + 15
        while retry:
            try:
                for device_id in retry:
                    await store.put_profile(_profile(device_id), None)
                outcomes = await store.track(retry, _ingest(batch))
            except PartlyUnavailable as again:
                outcomes = again.committed
            except StateUnavailable:
                outcomes = {}
            entered.update((d, [e.type for e in o.events]) for d, o in outcomes.items())
            retry = [d for d in retry if d not in outcomes]
            assert time.monotonic() < deadline, "not recovered within 15 s"
            await asyncio.sleep(0.2 if retry else 0)
        assert entered == {d: ["enter"] for d in ids}
        assert await store.healthy()
    finally:
        await store.close()


async def test_unavailable_errors_do_not_show_the_password() -> None:
    store = RedisStore(f"redis://:s3cret-pw@127.0.0.1:{_free_port()}/0")
    await store.open()
    try:
        with pytest.raises(StateUnavailable) as raised:
            await store.get_profile("dev-1")
        assert "s3cret-pw" not in str(raised.value)
        assert "127.0.0.1" in str(raised.value)
        assert not await store.healthy()
    finally:
        await store.close()


# -- one script per batch ------------------------------------------------------------------


async def test_a_conflict_on_one_device_does_not_hold_back_the_others_of_its_batch(
    stores: tuple[RedisStore, RedisStore],
) -> None:
    tracker_store, api = stores
    ids = ["calm-1", "busy-2", "calm-3"]
    for device_id in ids:
        await api.put_profile(_profile(device_id), None)
    # the profile write bumps busy-2's version after the read: only its commit must fail
    await _between_read_and_commit(
        tracker_store, lambda: api.put_profile(_profile("busy-2"), None))
    computed: list[list[str]] = []
    batch = [Ping(d, T0, *SHOPS[0]) for d in ids]

    def compute(snaps: Mapping[str, DeviceSnapshot]) -> dict[str, DeviceOutcome]:
        computed.append(sorted(snaps))
        return ENGINE.ingest([p for p in batch if p.device_id in snaps], snaps)

    outcomes = await tracker_store.track(ids, compute)
    assert computed == [sorted(ids), ["busy-2"]]
    assert {d: [e.type for e in o.events] for d, o in outcomes.items()} == {
        d: ["enter"] for d in ids}
    assert sorted(await api.claim_due(T0 + 180, 10, 30)) == sorted(ids)


@pytest.fixture
def pipelined(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """The command names of every pipeline executed, in order."""
    seen: list[list[str]] = []
    execute: Any = redis.asyncio.client.Pipeline.execute

    async def recording_execute(self: Any, *args: Any, **kwargs: Any) -> Any:
        seen.append([str(c[0][0]) for c in self.command_stack])
        return await execute(self, *args, **kwargs)

    monkeypatch.setattr(redis.asyncio.client.Pipeline, "execute", recording_execute)
    return seen


async def test_a_batch_costs_a_few_commands_a_slice(
    single_redis_stores: tuple[RedisStore, RedisStore], pipelined: list[list[str]],
) -> None:
    store, _ = single_redis_stores
    ids = [f"dev-{d}" for d in range(1500)]
    for i, device_id in enumerate(ids):
        if i % 5:  # every fifth is unknown: 1200 devices to write, in two scripts
            await store.put_profile(_profile(device_id), None)
    await store.track(ids[:1], _ingest([Ping(ids[0], T0 - 10, 48.14, 11.60)]))  # scripts loaded
    for step, (lat, lon) in enumerate((SHOPS[0], (48.14, 11.60))):  # enter (timers), exit
        pipelined.clear()
        batch = [Ping(d, T0 + 600 * step + i * 0.1, lat, lon) for i, d in enumerate(ids)]
        await store.track(ids, _ingest(batch))
        # per slice of TRACK_SLICE devices, a read and a commit of a few commands each
        assert len(pipelined) == 2 * -(-len(ids) // TRACK_SLICE)
        for read, commit in zip(pipelined[::2], pipelined[1::2], strict=True):
            assert read == ["MGET", "ZMSCORE"]
            assert commit == ["ZADD" if step == 0 else "ZREM", "EVALSHA"]


async def test_on_a_cluster_one_batch_of_devices_on_every_node_gets_its_events_and_timers(
    redis_cluster_nodes: list[PrivateRedis], redis_cluster_url: str,
) -> None:
    store = RedisStore(redis_cluster_url, cluster=True)
    await store.open()
    try:
        ids = [f"dev-{d}" for d in range(300)]
        for device_id in ids:
            await store.put_profile(_profile(device_id), None)
        batch = [Ping(d, T0 + i * 0.1, *SHOPS[i % 3]) for i, d in enumerate(ids)]
        outcomes = await store.track(ids, _ingest(batch))
        assert [e.type for d in ids for e in outcomes[d].events] == ["enter"] * len(ids)
        # the devices' tracks really are spread over the three nodes
        for node in redis_cluster_nodes:
            client = redis.asyncio.Redis(port=node.port)
            assert await client.keys("geopush:{d:*}:track"), f"no device on node {node.port}"
            await client.aclose()
        # and each dwell timer is claimed once, however the claims are cut
        claimed = [*await store.claim_due(T0 + 1000, 120, 30),
                   *await store.claim_due(T0 + 1000, 1000, 30)]
        assert sorted(claimed) == sorted(ids)
    finally:
        await store.close()


def test_devices_are_grouped_by_cluster_slot_in_the_order_given() -> None:
    keys = Keys("geopush")
    ids = [f"dev-{d}" for d in range(200)] + ["odd}{id", "ünï"]
    groups = group_by_slot(keys, ids)
    assert sorted(d for group in groups.values() for d in group) == sorted(ids)
    for slot, group in groups.items():
        assert group == [d for d in ids if d in group]  # order kept
        for device_id in group:
            assert {key_slot(k.encode()) for k in keys.device(device_id).all()} == {slot}
    assert len(groups) > 100  # spread over slots, not lumped together


async def test_connections_pack_commands_as_redis_py_does(redis_url: str) -> None:
    store = RedisStore(redis_url)
    await store.open()
    try:
        fast = store._redis.connection_pool.connection_class()
        plain = redis.asyncio.Connection()
        for args in [("SET", "k", "v"), ("EVALSHA", "ab" * 20, 2, "k1", b"k2", 1.5, -3, 10**20,
                                          "ünï", b"", "", b"\x00\xff", 0.1 + 0.2),
                     ("SCRIPT LOAD", "return 1"), ("GET", bytearray(b"k")),
                     ("GET", memoryview(b"k"))]:
            assert b"".join(fast.pack_command(*args)) == b"".join(plain.pack_command(*args))
        bad: Any
        for bad in (True, None):
            with pytest.raises(redis.DataError):
                fast.pack_command("SET", "k", bad)
    finally:
        await store.close()


async def test_scripts_lost_between_read_and_commit_are_loaded_and_the_batch_retried(
    private_redis: PrivateRedis,
) -> None:
    store = RedisStore(f"redis://127.0.0.1:{private_redis.port}/0")
    admin = redis.asyncio.Redis(port=private_redis.port)
    await store.open()
    try:
        ids = ["dev-1", "dev-2"]
        for device_id in ids:
            await store.put_profile(_profile(device_id), None)
        await store.track(ids, _ingest([Ping(d, T0, 48.14, 11.60) for d in ids]))
        await _between_read_and_commit(store, admin.script_flush)  # as a Redis restart would
        outcomes = await store.track(ids, _ingest([Ping(d, T0 + 60, *SHOPS[1]) for d in ids]))
        assert {d: [e.type for e in o.events] for d, o in outcomes.items()} == {
            d: ["enter"] for d in ids}
        assert sorted(await store.claim_due(T0 + 300, 10, 30)) == ids
        # the state was written: the stay is remembered, no second enter
        again = await store.track(ids, _ingest([Ping(d, T0 + 120, *SHOPS[1]) for d in ids]))
        assert [e for o in again.values() for e in o.events] == []
    finally:
        await store.close()
        await admin.aclose()


async def test_on_a_cluster_each_call_touches_one_slot_and_at_most_a_thousand_devices(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    store = RedisStore("redis://127.0.0.1:1/0", cluster=True)  # never opened: grouping only
    monkeypatch.setattr("geopush.state.redis.DEVICES_PER_CALL", 3)
    ids = [f"dev-{d}" for d in range(300)]
    # seven more devices in dev-0's slot (the hash tag ends at the first '}'), so that one
    # slot holds more devices than one call may take
    crowd = [f"dev-0}}{n}" for n in range(7)]
    groups = store._per_slot(ids + crowd)
    assert sorted(d for g in groups for d in g) == sorted(ids + crowd)
    for group in groups:
        assert 1 <= len(group) <= 3
        assert len({key_slot(store.keys.device(d).version.encode()) for d in group}) == 1
    assert sum(1 for g in groups if set(g) & ({"dev-0", *crowd})) == 3  # 8 devices, by 3


async def test_a_track_the_previous_release_wrote_is_read_and_carried_on(
        stores: tuple[RedisStore, RedisStore], backend: Backend) -> None:
    """A rolling upgrade: the new release meets tracks in the previous release's format."""
    from tests.test_state_codec import _PREVIOUS_RELEASE, _state

    store, _ = stores
    keys = store.keys.device("phone-1")
    await store.put_profile(_profile("phone-1"), None)
    client: Any = (redis.asyncio.RedisCluster.from_url(backend.url) if backend.cluster
                   else redis.asyncio.Redis.from_url(backend.url))
    try:
        await client.set(keys.track, _PREVIOUS_RELEASE)
        seen: dict[str, DeviceSnapshot] = {}

        def peek(snapshots: Mapping[str, DeviceSnapshot]) -> dict[str, DeviceOutcome]:
            seen.update(snapshots)
            return {}

        await store.track(["phone-1"], peek)
        assert seen["phone-1"].state == _state()
        # the next ping goes on from that state and writes the current format
        later = Ping("phone-1", _state().last_ts + 1.0, 10.0, 10.0)  # far from every shop
        outcomes = await store.track(["phone-1"], _ingest([later]))
        assert outcomes["phone-1"].accepted == 1
        # its stays were read: the ping far away ends them
        assert sorted((e.geofence_id, e.type) for e in outcomes["phone-1"].events) == [
            ("g1", "exit"), ("g2", "exit")]
        raw = await client.get(keys.track)
        assert raw.startswith(b"[2,")
    finally:
        await client.aclose()


async def test_a_big_group_is_tracked_in_slices_the_loop_served_between(
        stores: tuple[RedisStore, RedisStore]) -> None:
    """A 1000-ping share took the event loop for 20-60 ms at a time (the replies of its
    pipelines, the compute, the commit's arguments): it goes TRACK_SLICE devices at a time,
    each device once, every one committed, and another task runs between the slices."""
    from geopush.state import redis as redis_module

    store, _ = stores
    devices = [f"slice-{i}" for i in range(2 * redis_module.TRACK_SLICE + 7)]
    for d in devices:
        await store.put_profile(_profile(d), None)
    pings = [Ping(d, T0, SHOPS[0][0], SHOPS[0][1], 10.0) for d in devices]
    seen: list[list[str]] = []
    turns: list[int] = []

    def compute(snapshots: Mapping[str, DeviceSnapshot]) -> dict[str, DeviceOutcome]:
        seen.append(list(snapshots))
        turns.append(ticks[0])
        return ENGINE.ingest([p for p in pings if p.device_id in snapshots], snapshots)

    ticks = [0]

    async def ticker() -> None:
        while True:
            ticks[0] += 1
            await asyncio.sleep(0)

    ticking = asyncio.create_task(ticker())
    try:
        outcomes = await store.track(devices, compute)
    finally:
        ticking.cancel()
    assert sorted(outcomes) == sorted(devices)
    assert all(o.events and o.events[0].type == "enter" for o in outcomes.values())
    assert [len(s) for s in seen] == [redis_module.TRACK_SLICE] * 2 + [7]
    assert sorted(d for s in seen for d in s) == sorted(devices)
    assert turns[0] < turns[1] < turns[2]  # the loop ran others between the slices
    for d in devices:  # each stored once, with its stay
        state = (await store.stored_track(d)).state
        assert state is not None and list(state.stays) == ["node/0"]
