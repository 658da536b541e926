"""The `redis` backend: any number of instances share one Redis (or Redis Cluster).

Atomicity of `track` is optimistic. Every write of a device adds one to its `:ver` key. One
pipelined round trip reads profile, track and version of every device in a batch (one MGET)
and their timers (one ZMSCORE); the pure compute runs; one pipelined round trip commits the
batch with one Lua script that compare-and-sets each device on its version. Devices whose
version moved meanwhile are read and computed again.

Commands are few and big because redis-py spends ~10-30 µs of Python per command, more than
Redis itself; the connections pack commands with hiredis, which is ~6x faster than redis-py's
own packer on commands of thousands of arguments. On a Redis Cluster a script may touch one
hash slot only, so the batch is split per slot (`_per_slot`): still one pipelined round trip
per node, one MGET and one script per slot (`storage.redis_cluster`). redis-py refuses MGET and
EVALSHA by name in a cluster pipeline, so they go through `execute_command`, which routes each
command by its keys' slot on a cluster and is the same command on a single Redis.

The timers sorted set lives in another cluster slot than the device, so it cannot be in the
device's script. It is a hint (firing re-checks the state), kept right by two rules:
- a commit writes the timer *before* its compare-and-set, earlier in the same pipeline (on a
  cluster, in a round trip of its own before the scripts'). A later commit read the version
  this one set, so its timer write comes later: timers follow versions.
- a compare-and-set that failed may have left its timer behind; the retry reads the timer
  again and, when it does not match the stored state, rewrites it under a version check.

On a single Redis an erasure is one script over the device's keys, its timer and the erasures
hash, so it is whole or not at all. On a cluster those are three slots: the erasure record is
written first, then the device's keys and its timer go; a failure between the two leaves the
record and the data, the DELETE answers 503, and its retry finishes the erasure.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Collection, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import hiredis
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import AbstractConnection
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import NoScriptError, RedisClusterException, RedisError

from geopush.devices import ConsentChange, DeviceProfile, ErasureRecord
from geopush.engine import DeviceOutcome, DeviceSnapshot
from geopush.geo.model import DeviceState, Visit
from geopush.state.base import (
    Compute,
    ProfileEdit,
    ProfileWrite,
    StateStore,
    StateUnavailable,
    StoredTrack,
)
from geopush.state.codec import decode_track, decode_visit, encode_track, encode_visit
from geopush.state.keys import VISITS_KEPT, DeviceKeys, Keys, group_by_slot
from geopush.state.redis_scripts import (
    CLAIM_DUE,
    COMMIT,
    ERASE,
    PUBLISH_CONFIG,
    PUT_PROFILE,
    SCRIPTS,
    Script,
)

MAX_ATTEMPTS = 10  # of read → compute → commit for one device before giving up (503)
DEVICES_PER_CALL = 1000  # in one MGET or commit script: Redis serves no one else meanwhile
SOCKET_TIMEOUT_S = 2.0
CONNECT_TIMEOUT_S = 1.0

@dataclass(slots=True)
class _Read:
    """One device as read before computing."""

    snapshot: DeviceSnapshot
    keys: DeviceKeys
    version: bytes  # b'' when the device has no version key
    stored_due: float | None  # next_due kept with the track
    timer: float | None  # its score in the timers sorted set


class RedisStore(StateStore):
    def __init__(self, url: str, *, key_prefix: str = "geopush", cluster: bool = False,
                 socket_timeout_s: float = SOCKET_TIMEOUT_S,
                 connect_timeout_s: float = CONNECT_TIMEOUT_S) -> None:
        self.url = url
        self.keys = Keys(key_prefix)
        self.cluster = cluster
        self._socket_timeout_s = socket_timeout_s
        self._connect_timeout_s = connect_timeout_s
        self._client: aioredis.Redis | RedisCluster | None = None

    # -- lifecycle -------------------------------------------------------------------------

    async def open(self) -> None:
        # No round trip here: the service starts (and /readyz says why it is not ready)
        # while Redis is down; the pool connects on first use and again after a failure.
        if self.cluster:
            # the client learns the other nodes and the slot map from this one on first use
            self._client = RedisCluster.from_url(
                self.url,
                socket_timeout=self._socket_timeout_s,
                socket_connect_timeout=self._connect_timeout_s,
                retry=Retry(ExponentialBackoff(cap=0.2, base=0.05), 1),
                decode_responses=False,
            )
            return
        self._client = aioredis.Redis.from_url(
            self.url,
            socket_timeout=self._socket_timeout_s,
            socket_connect_timeout=self._connect_timeout_s,
            # one quick retry replaces a pooled connection that died with a Redis restart
            retry=Retry(ExponentialBackoff(cap=0.2, base=0.05), 1),
            decode_responses=False,
        )
        pool = self._client.connection_pool
        pool.connection_class = _packing_with_hiredis(pool.connection_class)

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def healthy(self) -> bool:
        try:
            async with self._guard():
                return bool(await self._redis.ping())
        except Exception:  # /readyz must answer, whatever went wrong
            return False

    @property
    def _redis(self) -> aioredis.Redis | RedisCluster:
        if self._client is None:
            raise RuntimeError("RedisStore used before open()")
        return self._client

    @asynccontextmanager
    async def _guard(self) -> AsyncIterator[None]:
        try:
            yield
        except (RedisError, RedisClusterException) as exc:
            raise StateUnavailable(
                f"Redis at {_safe_url(self.url)} is unavailable: {type(exc).__name__}: {exc}"
            ) from exc
        except OSError as exc:
            raise StateUnavailable(
                f"Redis at {_safe_url(self.url)} is unreachable: {exc}"
            ) from exc

    async def _load_scripts(self) -> None:
        for script in SCRIPTS:
            await self._redis.script_load(script.source)

    # -- devices ---------------------------------------------------------------------------

    async def get_profile(self, device_id: str) -> DeviceProfile | None:
        async with self._guard():
            raw = await self._redis.get(self.keys.device(device_id).profile)
        return DeviceProfile.model_validate_json(raw) if raw is not None else None

    async def update_profile(self, device_id: str, edit: ProfileEdit) -> ProfileWrite | None:
        keys = self.keys.device(device_id)
        for _ in range(MAX_ATTEMPTS):
            async with self._guard():
                raw, version = await self._redis.execute_command("MGET", keys.profile,
                                                                 keys.version)
            stored = DeviceProfile.model_validate_json(raw) if raw is not None else None
            write = edit(stored)
            if write is None:
                return None
            if await self._put_profile(keys, device_id, write, version or b""):
                return write
        raise StateUnavailable(
            f"the device changed under every one of {MAX_ATTEMPTS} attempts; retry later")

    async def _put_profile(self, keys: DeviceKeys, device_id: str, write: ProfileWrite,
                           version: bytes) -> bool:
        """The compare-and-set of one profile write; False when the version moved."""
        profile, change = write.profile, write.change
        if profile.device_id != device_id:
            raise ValueError(f"edit of {device_id!r} returned the profile of {profile.device_id!r}")
        revoke = not profile.consent.location
        args = (version, profile.model_dump_json(), change.model_dump_json() if change else "",
                "1" if revoke else "0")
        for _ in range(2):  # the second time after loading the scripts (Redis restarted)
            async with self._guard():
                pipe = self._redis.pipeline(transaction=False)
                if revoke:
                    # before the profile script: a commit that read the new version writes
                    # its timer after this removal (a cluster pipeline runs on every node at
                    # once: wait for the timers' node)
                    pipe.zrem(self.keys.timers, device_id)
                    if self.cluster:
                        _raise_first_error(await pipe.execute(raise_on_error=False))
                        pipe = self._redis.pipeline(transaction=False)
                pipe.execute_command("EVALSHA", PUT_PROFILE.sha, 4, keys.profile, keys.consent,
                                     keys.track, keys.version, *args)
                results = await pipe.execute(raise_on_error=False)
                if not isinstance(results[-1], NoScriptError):
                    _raise_first_error(results)
                    return int(results[-1]) != -1
                await self._load_scripts()
        raise StateUnavailable("Redis keeps losing geopush's scripts")

    async def consent_history(self, device_id: str) -> list[ConsentChange]:
        async with self._guard():
            rows = await self._redis.lrange(self.keys.device(device_id).consent, 0, -1)
        return [ConsentChange.model_validate_json(r) for r in rows]

    async def visits(self, device_id: str) -> list[Visit]:
        async with self._guard():
            rows = await self._redis.lrange(self.keys.device(device_id).visits, 0, -1)
        return [decode_visit(device_id, r) for r in rows]

    async def erase(self, device_id: str, record: ErasureRecord) -> bool:
        keys = self.keys.device(device_id)
        if self.cluster:
            return await self._erase_across_slots(device_id, keys, record)
        # a commit racing with this either wrote its timer before (removed here) or fails its
        # version check (the version key is gone) and repairs the timer when it retries
        erased = await self._run_script(
            ERASE, [self.keys.erasures, self.keys.timers, *keys.all()],
            [device_id, record.device_hash, record.model_dump_json()])
        return bool(erased)

    async def _erase_across_slots(self, device_id: str, keys: DeviceKeys,
                                  record: ErasureRecord) -> bool:
        """Record first, then the data (see the module's docstring)."""
        async with self._guard():
            pipe = self._redis.pipeline(transaction=False)
            pipe.exists(*keys.all())
            pipe.zscore(self.keys.timers, device_id)
            present, timer = await pipe.execute()
            if not present and timer is None:
                return False
            await self._redis.hset(self.keys.erasures, record.device_hash,
                                   record.model_dump_json())
            pipe = self._redis.pipeline(transaction=False)
            pipe.delete(*keys.all())
            pipe.zrem(self.keys.timers, device_id)
            await pipe.execute()
        return True

    async def erasure_record(self, device_hash: str) -> ErasureRecord | None:
        async with self._guard():
            raw = await self._redis.hget(self.keys.erasures, device_hash)
        return ErasureRecord.model_validate_json(raw) if raw is not None else None

    # -- tracking --------------------------------------------------------------------------

    async def track(self, device_ids: Collection[str], compute: Compute) -> dict[str, DeviceOutcome]:
        pending = list(dict.fromkeys(device_ids))
        committed: dict[str, DeviceOutcome] = {}
        if not pending:
            return committed
        for _ in range(MAX_ATTEMPTS):
            reads = await self._read(pending)
            snapshots = {d: r.snapshot for d, r in reads.items()}
            outcomes = {d: o for d, o in compute(snapshots).items() if d in reads}
            conflicts = await self._commit(reads, outcomes)
            if not conflicts:
                committed.update(outcomes)
                return committed
            retry = set(conflicts)
            committed.update((d, o) for d, o in outcomes.items() if d not in retry)
            pending = conflicts
        raise StateUnavailable(
            f"{len(pending)} device(s) changed under every one of {MAX_ATTEMPTS} attempts; "
            "retry later"
        )

    def _per_slot(self, device_ids: Sequence[str]) -> list[list[str]]:
        """The devices in groups one command or script may touch together: those of one hash
        slot each on a Redis Cluster, all of them on a single Redis; and at most
        DEVICES_PER_CALL in a group, so that no script blocks Redis for long."""
        if self.cluster:
            slots: Collection[list[str]] = group_by_slot(self.keys, device_ids).values()
        else:
            slots = [list(device_ids)]
        return [group[i:i + DEVICES_PER_CALL] for group in slots
                for i in range(0, len(group), DEVICES_PER_CALL)]

    async def _read(self, device_ids: Sequence[str]) -> dict[str, _Read]:
        groups = self._per_slot(device_ids)
        ordered = [d for group in groups for d in group]
        device_keys = [self.keys.device(d) for d in ordered]
        async with self._guard():
            pipe = self._redis.pipeline(transaction=False)
            start = 0
            for group in groups:
                pipe.execute_command("MGET", *[name for k in device_keys[start:start + len(group)]
                                               for name in (k.profile, k.track, k.version)])
                start += len(group)
            pipe.zmscore(self.keys.timers, ordered)
            results = await pipe.execute()
        timers = results.pop()
        values = iter(results[0] if len(results) == 1 else [v for vs in results for v in vs])
        # the validator itself: model_validate_json's wrapper costs a fifth of the call
        profile_from_json = DeviceProfile.__pydantic_validator__.validate_json
        reads = {}
        for device_id, keys, profile_raw, track_raw, version, timer in zip(
                ordered, device_keys, values, values, values, timers, strict=True):
            state: DeviceState | None = None
            due: float | None = None
            if track_raw is not None:
                state, due = decode_track(track_raw)
            profile = profile_from_json(profile_raw) if profile_raw is not None else None
            reads[device_id] = _Read(DeviceSnapshot(profile, state), keys, version or b"", due,
                                     timer)
        return reads

    async def _commit(self, reads: dict[str, _Read], outcomes: dict[str, DeviceOutcome]
                      ) -> list[str]:
        """Write every outcome in one round trip; the devices whose version check failed."""
        schedule: dict[str, float] = {}
        unschedule: list[str] = []
        writes: dict[str, tuple[Any, ...]] = {}  # device → its ARGV of the commit script
        for device_id, outcome in outcomes.items():
            read = reads[device_id]
            visits: list[bytes] = []
            if outcome.state is not None:
                due = outcome.next_due
                track = encode_track(outcome.state, due)
                if outcome.visits:
                    visits = [encode_visit(v) for v in outcome.visits]
            else:
                # nothing to write, but a timer left behind (by a failed attempt, an erasure
                # race or a revoked consent) is put back in line with the stored state
                due = read.stored_due if read.snapshot.state is not None else None
                if read.timer == due:
                    continue
                track = b""
            if read.timer != due:
                if due is None:
                    unschedule.append(device_id)
                else:
                    schedule[device_id] = due
            version = read.version
            bumped = str(int(version) + 1) if version else ("1" if track else "")
            writes[device_id] = (version, bumped, track, len(visits), *visits)
        if not writes:
            return []
        groups = self._per_slot(list(writes))
        pipe = self._redis.pipeline(transaction=False)
        # timers first: each device's timer write precedes its compare-and-set
        if schedule:
            pipe.zadd(self.keys.timers, schedule)
        if unschedule:
            pipe.zrem(self.keys.timers, *unschedule)
        async with self._guard():
            if self.cluster and (schedule or unschedule):
                # a cluster pipeline runs on every node at once: wait for the timers' node
                _raise_first_error(await pipe.execute(raise_on_error=False))
                pipe = self._redis.pipeline(transaction=False)
            timer_writes = len(pipe)
            for group in groups:
                keys: list[str] = []
                args: list[Any] = [VISITS_KEPT]
                for device_id in group:
                    device_keys = reads[device_id].keys
                    keys += (device_keys.track, device_keys.version, device_keys.visits)
                    args += writes[device_id]
                pipe.execute_command("EVALSHA", COMMIT.sha, len(keys), *keys, *args)
            results = await pipe.execute(raise_on_error=False)
            if any(isinstance(r, NoScriptError) for r in results):
                await self._load_scripts()  # Redis restarted; the retry runs them
            _raise_first_error([r for r in results if not isinstance(r, NoScriptError)])
        conflicts: list[str] = []
        for group, result in zip(groups, results[timer_writes:], strict=True):
            if isinstance(result, NoScriptError):
                conflicts += group  # nothing of the group was written
            else:
                conflicts += (group[int(position) - 1] for position in result)
        return conflicts

    async def stored_track(self, device_id: str) -> StoredTrack:
        keys = self.keys.device(device_id)
        async with self._guard():
            # two slots on a cluster (the device's, the timers'): one pipelined round trip
            pipe = self._redis.pipeline(transaction=False)
            pipe.execute_command("MGET", keys.track, keys.version)
            pipe.zscore(self.keys.timers, device_id)
            (track_raw, version), timer = await pipe.execute()
        state, next_due = decode_track(track_raw) if track_raw is not None else (None, None)
        return StoredTrack(state, next_due, timer, int(version) if version is not None else None)

    async def claim_due(self, now: float, limit: int, lease_s: float) -> list[str]:
        if limit <= 0:
            return []  # Redis reads a LIMIT count of 0 or less as "no limit"
        members = await self._run_script(
            CLAIM_DUE, [self.keys.timers],
            [repr(float(now)), int(limit), repr(float(now + lease_s))])
        return [m.decode() if isinstance(m, bytes) else str(m) for m in members]

    # -- the published configuration -------------------------------------------------------

    async def publish_config(self, payload: bytes) -> int:
        serial = await self._run_script(
            PUBLISH_CONFIG, [self.keys.config_serial, self.keys.config_payload], [payload])
        return int(serial)

    async def config_serial(self) -> int:
        async with self._guard():
            raw = await self._redis.get(self.keys.config_serial)
        return int(raw) if raw is not None else 0

    async def published_config(self) -> tuple[int, bytes] | None:
        async with self._guard():
            serial, payload = await self._redis.execute_command(
                "MGET", self.keys.config_serial, self.keys.config_payload)
        if serial is None or payload is None:
            return None
        return int(serial), bytes(payload)

    async def _run_script(self, script: Script, keys: Sequence[str], args: Sequence[Any]
                          ) -> Any:
        """EVALSHA, loading the scripts once if Redis lost them (a restart)."""
        for _ in range(2):
            async with self._guard():
                try:
                    return await self._redis.evalsha(
                        script.sha, len(keys), *keys, *args)
                except NoScriptError:
                    await self._load_scripts()
        raise StateUnavailable("Redis keeps losing geopush's scripts")


def _packing_with_hiredis(connection_class: type[AbstractConnection]
                          ) -> type[AbstractConnection]:
    """`connection_class` packing commands with hiredis's C packer. redis-py's async
    connections pack in Python, re-joining a growing buffer per argument: ~3 ms for a
    3000-key MGET, against ~0.5 ms here."""
    if issubclass(connection_class, _HiredisPacking):
        return connection_class
    return type(f"HiredisPacking{connection_class.__name__}",
                (_HiredisPacking, connection_class), {})


class _HiredisPacking(AbstractConnection):
    def pack_command(self, *args: Any) -> list[bytes]:
        name = args[0]
        if isinstance(name, str) and " " not in name:  # not "SCRIPT LOAD": redis-py splits it
            try:
                return [hiredis.pack_command(args)]
            except TypeError:
                pass  # bool, None, bytearray...: redis-py's packer converts or names the error
        packed: list[bytes] = super().pack_command(*args)
        return packed


def _raise_first_error(results: Sequence[Any]) -> None:
    for result in results:
        if isinstance(result, Exception):
            raise result


def _safe_url(url: str) -> str:
    """The URL without its password, for messages."""
    if "@" not in url:
        return url
    scheme, _, rest = url.partition("://")
    return f"{scheme}://***@{rest.rpartition('@')[2]}"
