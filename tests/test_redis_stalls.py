"""Redis stalled past the socket timeout (contract §10, §12; issue #8 finding 1): a state-changing
call whose outcome is unknown is never re-sent blindly. Every answer is the exact result of one
commit (its events those of a reference run on a store that never stalled), or a 503 after which
nothing was committed, so that a retry of the same call gets the events.

Each test runs its own redis-server with DEBUG SLEEP enabled; the store's socket timeout is
0.3 s and a stall lasts 1 s, sent on a raw socket at the point under test."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import redis
from redis.crc import key_slot

from geopush.devices import Consent, ConsentChange, DeviceProfile, ErasureRecord, device_hash
from geopush.engine import DeviceOutcome, DeviceSnapshot
from geopush.geo.model import Ping
from geopush.state.base import PartlyUnavailable, ProfileWrite, StateUnavailable
from geopush.state.memory import MemoryStore
from geopush.state.redis import RedisStore
from geopush.state.redis_scripts import COMMIT, ERASE, PUT_PROFILE
from tests.conftest import PrivateRedis, PrivateRedisCluster, _need_redis_server
from tests.test_state_redis import ENGINE, SHOPS, T0, _key, _profile

TIMEOUT_S = 0.3
STALL_S = 1
DEVICES = 60
WHERE = ["before-read", "between-read-and-commit", "during-commit", "after-it-ran"]


class Staller:
    """Sends DEBUG SLEEP to a redis-server without waiting for its answer."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port))

    def stall(self, seconds: int = STALL_S) -> None:
        self.sock.sendall(f"*3\r\n$5\r\nDEBUG\r\n$5\r\nSLEEP\r\n${len(str(seconds))}\r\n"
                          f"{seconds}\r\n".encode())

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def stallable(tmp_path: Path) -> Iterator[PrivateRedis]:
    _need_redis_server()
    server = PrivateRedis(tmp_path, "--enable-debug-command", "local")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
async def store(stallable: PrivateRedis) -> AsyncIterator[RedisStore]:
    s = RedisStore(stallable.url, socket_timeout_s=TIMEOUT_S)
    await s.open()
    try:
        yield s
    finally:
        await s.close()


def _stall_when_sent(connection_class: Any, staller: Staller, sha: str,
                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Stall Redis right after the next command carrying script `sha` is handed to the socket:
    Redis runs the script, or not yet, and its answer waits past the timeout."""
    pack = connection_class.pack_command
    armed = [True]

    def packing_then_stalling(self: Any, *args: Any) -> Any:
        packed = pack(self, *args)
        if armed[0] and sha in {a for a in args if isinstance(a, str)}:
            armed[0] = False
            asyncio.get_running_loop().call_soon(staller.stall)
        return packed

    monkeypatch.setattr(connection_class, "pack_command", packing_then_stalling)


def _stall_after_it_ran(connection_class: Any, staller: Staller, sha: str,
                        monkeypatch: pytest.MonkeyPatch) -> None:
    """The script with `sha` runs, then Redis stalls (longer than the call's window) and its
    answer is lost: the outcome is known only once Redis answers again."""
    pack = connection_class.pack_command
    read = connection_class.read_response
    armed = [False, True]  # [the script is on its way, not fired yet]

    def packing(self: Any, *args: Any) -> Any:
        if armed[1] and sha in {a for a in args if isinstance(a, str)}:
            armed[0] = True
        return pack(self, *args)

    async def reading_then_losing(self: Any, *args: Any, **kwargs: Any) -> Any:
        response = await read(self, *args, **kwargs)
        # the timers' ZADD/ZREM answer numbers; the script answers its record text
        if armed[0] and armed[1] and not isinstance(response, int):
            armed[1] = False
            # longer than the call's window and the client's connect timeout together
            staller.stall(3)
            await asyncio.sleep(0.05)
            raise redis.exceptions.TimeoutError("Timeout reading from socket (test: answer lost)")
        return response

    monkeypatch.setattr(connection_class, "pack_command", packing)
    monkeypatch.setattr(connection_class, "read_response", reading_then_losing)


def _stall_before_commit(store: RedisStore, staller: Staller) -> None:
    commit = store._commit

    async def stalling_commit(*args: Any) -> Any:
        setattr(store, "_commit", commit)  # noqa: B010 - once
        staller.stall()
        await asyncio.sleep(0.05)
        return await commit(*args)

    setattr(store, "_commit", stalling_commit)  # noqa: B010 - replacing a method on purpose


async def _stall(where: str, store: RedisStore, staller: Staller, sha: str,
                 monkeypatch: pytest.MonkeyPatch) -> None:
    if where == "before-read":
        staller.stall()
        await asyncio.sleep(0.05)
    elif where == "between-read-and-commit":
        _stall_before_commit(store, staller)
    elif where == "after-it-ran":
        _stall_after_it_ran(_connection_class(store), staller, sha, monkeypatch)
    else:
        _stall_when_sent(_connection_class(store), staller, sha, monkeypatch)


def _connection_class(store: RedisStore, port: int | None = None) -> Any:
    client: Any = store._redis
    if port is None:
        return client.connection_pool.connection_class
    return client.get_node(host="127.0.0.1", port=port).connection_class


async def _settle(stallable: PrivateRedis) -> None:
    """Wait until the stall is over (and what was queued behind it has run)."""
    client = redis.asyncio.Redis(port=stallable.port, socket_timeout=5)
    await client.ping()
    await client.aclose()


def _ids(n: int = DEVICES, prefix: str = "dev") -> list[str]:
    return [f"{prefix}-{d}" for d in range(n)]


async def _inside(stores: list[Any], ids: list[str]) -> list[Ping]:
    """Every device registered and inside shop 0; the exit pings that follow."""
    for store in stores:
        for device_id in ids:
            await store.put_profile(_profile(device_id), None)
        await store.track(ids, lambda s: ENGINE.ingest([Ping(d, T0, *SHOPS[0]) for d in ids], s))
        await store.track(ids, lambda s: ENGINE.ingest(
            [Ping(d, T0 + 30, *SHOPS[0]) for d in ids], s))
    return [Ping(d, T0 + 60 + i * 0.01, 48.14, 11.60) for i, d in enumerate(ids)]


def _compute(pings: list[Ping]) -> Callable[[Mapping[str, DeviceSnapshot]], dict[str, DeviceOutcome]]:
    return lambda snaps: ENGINE.ingest([p for p in pings if p.device_id in snaps], snaps)


def _events(outcomes: Mapping[str, DeviceOutcome]) -> list[tuple[Any, ...]]:
    return sorted(_key(e) for o in outcomes.values() for e in o.events)


async def _tracks(stallable: PrivateRedis) -> dict[bytes, bytes | None]:
    client = redis.asyncio.Redis.from_url(stallable.url)
    try:
        names = sorted(await client.keys("*:track"))
        return dict(zip(names, await client.mget(names), strict=True)) if names else {}
    finally:
        await client.aclose()


@pytest.mark.parametrize("where", WHERE)
async def test_a_stalled_batch_answers_its_exact_events_or_503_with_nothing_committed(
    stallable: PrivateRedis, store: RedisStore, where: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ids = _ids()
    reference = MemoryStore()
    exits = await _inside([store, reference], ids)
    expected = _events(await reference.track(ids, _compute(exits)))
    assert len(expected) == len(ids)  # one exit each
    before = await _tracks(stallable)
    staller = Staller(stallable.port)
    try:
        await _stall(where, store, staller, COMMIT.sha, monkeypatch)
        try:
            got = _events(await store.track(ids, _compute(exits)))
        except StateUnavailable:
            await _settle(stallable)
            assert await _tracks(stallable) == before, "a 503 after which something committed"
            got = _events(await store.track(ids, _compute(exits)))  # the client's retry
        assert got == expected, f"{len(expected) - len(got)} events lost"
    finally:
        staller.close()
    await _settle(stallable)
    # the stays are closed, once: the same pings again are no news
    assert _events(await store.track(ids, _compute(exits))) == []


@pytest.mark.parametrize("where", WHERE)
async def test_a_stalled_consent_change_is_recorded_once(
    stallable: PrivateRedis, store: RedisStore, where: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    device_id = "consent-1"
    await store.put_profile(_profile(device_id), ConsentChange(at=T0, location=True,
                                                               marketing=True))
    change = ConsentChange(at=T0 + 1, location=False, marketing=True)
    revoked = _profile(device_id, location=False)

    def edit(_stored: DeviceProfile | None) -> ProfileWrite:
        return ProfileWrite(revoked, change)

    staller = Staller(stallable.port)
    try:
        if where == "between-read-and-commit":
            put = store._put_profile

            async def stalling_put(*args: Any) -> Any:
                setattr(store, "_put_profile", put)  # noqa: B010 - once
                staller.stall()
                await asyncio.sleep(0.05)
                return await put(*args)

            setattr(store, "_put_profile", stalling_put)  # noqa: B010
        else:
            await _stall(where, store, staller, PUT_PROFILE.sha, monkeypatch)
        try:
            assert await store.update_profile(device_id, edit) == ProfileWrite(revoked, change)
        except StateUnavailable:
            await _settle(stallable)
            assert len(await store.consent_history(device_id)) == 1, "503, but committed"
            await store.update_profile(device_id, edit)
    finally:
        staller.close()
    await _settle(stallable)
    assert [c.location for c in await store.consent_history(device_id)] == [True, False]
    assert await store.get_profile(device_id) == revoked


@pytest.mark.parametrize("where", ["before-read", "during-commit"])
async def test_a_stalled_erasure_answers_erased_not_unknown(
    stallable: PrivateRedis, store: RedisStore, where: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    device_id = "erase-1"
    await _inside([store], [device_id])
    record = ErasureRecord(device_hash=device_hash(device_id, "k"), erased_at=T0 + 600,
                           last_consent=Consent(location=True, marketing=True))
    staller = Staller(stallable.port)
    try:
        await _stall(where, store, staller, ERASE.sha, monkeypatch)
        try:
            erased = await store.erase(device_id, record)
        except StateUnavailable:
            await _settle(stallable)
            assert await store.get_profile(device_id) is not None, "503, but erased"
            erased = await store.erase(device_id, record)
        assert erased is True, "DELETE would answer 404 for a device it erased"
    finally:
        staller.close()
    await _settle(stallable)
    assert await store.get_profile(device_id) is None
    assert await store.erasure_record(record.device_hash) == record


async def test_a_stalled_publish_gets_one_serial(
    stallable: PrivateRedis, store: RedisStore, monkeypatch: pytest.MonkeyPatch,
) -> None:
    from geopush.state.redis_scripts import PUBLISH_CONFIG

    assert await store.publish_config(b"one") == 1
    staller = Staller(stallable.port)
    try:
        _stall_when_sent(_connection_class(store), staller, PUBLISH_CONFIG.sha, monkeypatch)
        try:
            serial = await store.publish_config(b"two")
        except StateUnavailable:
            await _settle(stallable)
            assert await store.config_serial() == 1, "503, but published"
            serial = await store.publish_config(b"two")
    finally:
        staller.close()
    await _settle(stallable)
    assert serial == 2 and await store.published_config() == (2, b"two")


async def test_a_claim_whose_answer_is_lost_comes_back_after_its_lease(
    stallable: PrivateRedis, store: RedisStore,
) -> None:
    ids = _ids(5)
    await _inside([store], ids)
    staller = Staller(stallable.port)
    try:
        staller.stall()
        await asyncio.sleep(0.05)
        with pytest.raises(StateUnavailable):
            await store.claim_due(T0 + 1000, 10, 2)
    finally:
        staller.close()
    await _settle(stallable)
    claimed = await store.claim_due(T0 + 1000, 10, 2) or await store.claim_due(T0 + 1003, 10, 2)
    assert sorted(claimed) == sorted(ids)


# -- Redis Cluster: one node stalled ---------------------------------------------------------


@pytest.fixture
def stallable_cluster(tmp_path: Path) -> Iterator[PrivateRedisCluster]:
    _need_redis_server()
    cluster = PrivateRedisCluster([tmp_path / f"node-{n}" for n in range(3)])
    for node in cluster.nodes:
        node.workdir.mkdir()
        node.extra_args = (*node.extra_args, "--enable-debug-command", "local")
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


def _node_of(cluster: PrivateRedisCluster, key: str) -> PrivateRedis:
    slot = key_slot(key.encode())
    share = 16384 // len(cluster.nodes)
    return cluster.nodes[min(slot // share, len(cluster.nodes) - 1)]


async def test_on_a_cluster_devices_of_a_stalled_node_are_unavailable_and_the_rest_commit(
    stallable_cluster: PrivateRedisCluster, monkeypatch: pytest.MonkeyPatch,
) -> None:
    store = RedisStore(stallable_cluster.url, cluster=True, socket_timeout_s=TIMEOUT_S)
    await store.open()
    try:
        ids = _ids(90)
        reference = MemoryStore()
        exits = await _inside([store, reference], ids)
        expected = {d: _events({d: o}) for d, o in
                    (await reference.track(ids, _compute(exits))).items()}
        timers_node = _node_of(stallable_cluster, store.keys.timers)
        stalled = next(n for n in stallable_cluster.nodes if n is not timers_node)
        on_stalled = {d for d in ids if _node_of(stallable_cluster, store.keys.device(d).version)
                      is stalled}
        assert 0 < len(on_stalled) < len(ids)
        staller = Staller(stalled.port)
        try:
            _stall_when_sent(_connection_class(store, stalled.port), staller, COMMIT.sha,
                             monkeypatch)
            try:
                outcomes = await store.track(ids, _compute(exits))
                unavailable: set[str] = set()
            except PartlyUnavailable as partly:
                outcomes, unavailable = dict(partly.committed), set(partly.unavailable)
        finally:
            staller.close()
        assert unavailable <= on_stalled
        assert set(outcomes) == set(ids) - unavailable
        for device_id, outcome in outcomes.items():
            assert _events({device_id: outcome}) == expected[device_id]
        await asyncio.sleep(STALL_S + 0.2)
        if unavailable:  # their retry gets their events: nothing of them was committed
            again = await store.track(sorted(unavailable), _compute(exits))
            assert {d: _events({d: o}) for d, o in again.items()} == {
                d: expected[d] for d in unavailable}
    finally:
        await store.close()


# -- the answer of a request of which some devices could not commit -------------------------


class _NodeDown(MemoryStore):
    """Commits every device but those in `down`, as a cluster with a node failed would."""

    def __init__(self, down: set[str]) -> None:
        super().__init__()
        self.down = down

    async def track(self, device_ids: Any, compute: Any) -> dict[str, DeviceOutcome]:
        up = [d for d in device_ids if d not in self.down]
        committed = await super().track(up, compute) if up else {}
        if self.down & set(device_ids):
            if not committed:
                raise StateUnavailable("every node failed")
            raise PartlyUnavailable(committed, self.down & set(device_ids), "a node failed")
        return committed


async def test_pings_of_devices_that_could_not_commit_are_rejected_unavailable() -> None:
    from geopush.metrics import Metrics
    from geopush.service.ingest import Ingestor

    store = _NodeDown({"dev-1"})
    for device_id in ("dev-0", "dev-1"):
        await store.put_profile(_profile(device_id), None)
    ingestor = Ingestor(store, lambda: ENGINE, Metrics())

    def item(device_id: str) -> dict[str, Any]:
        return {"device_id": device_id, "ts": round(T0 * 1000), "lat": SHOPS[0][0],
                "lon": SHOPS[0][1]}

    both, alone = await asyncio.gather(
        ingestor.ingest([item("dev-0"), item("dev-1"), {"device_id": "x"}], T0 + 5),
        ingestor.ingest([item("dev-1")], T0 + 5), return_exceptions=True)
    assert not isinstance(both, BaseException)
    assert both.accepted == 1 and [e.type for e in both.events] == ["enter"]
    assert [(r.index, r.code) for r in both.rejected] == [(1, "unavailable"), (2, "invalid")]
    # a request none of whose devices committed: 503, nothing of it was written
    assert isinstance(alone, StateUnavailable)
