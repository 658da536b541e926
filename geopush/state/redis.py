"""The `redis` backend: any number of instances share one Redis (or Redis Cluster).

Atomicity of `track` is optimistic. Every write of a device adds one to its `:ver` key. One
pipelined round trip reads profile, track, version and device token of every device in a
batch (one MGET) and their timers (one ZMSCORE); the pure compute runs; one pipelined round
trip commits the batch with one Lua script that compare-and-sets each device on its version.
Devices whose version moved meanwhile are read and computed again. A batch of more than
TRACK_SLICE devices goes a slice at a time, so that no step of it holds the event loop long;
when Redis stops answering, the slices not yet tried are not (the answer says which committed).

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

On a Redis Cluster a node that fails takes only its devices: `track` raises PartlyUnavailable
with the committed outcomes and the devices to send again, and the ingest rejects their pings
`unavailable`. claim_due is a lease, not resolved: what a lost claim took comes back with it.

The connection and the calls that run at most once are in geopush.state.redis_calls; the
outbox, the retention purge, flags, counters and leases in geopush.state.redis_outbox.
"""


from __future__ import annotations

import asyncio
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from geopush.delivery.outbox import entry_to_json
from geopush.devices import ConsentChange, DeviceProfile, ErasureRecord
from geopush.engine import DeviceOutcome, DeviceSnapshot
from geopush.geo.model import DeviceState, Visit
from geopush.rules.decide import DeviceHistory
from geopush.state.base import (
    Compute,
    PartlyUnavailable,
    ProfileEdit,
    ProfileWrite,
    StateStore,
    StateUnavailable,
    StoredToken,
    StoredTrack,
)
from geopush.state.codec import (
    decode_push,
    decode_track,
    decode_visit,
    encode_push,
    encode_track,
    encode_visit,
)
from geopush.state.keys import (
    CONFIG_TAG,
    DECISIONS_KEPT,
    SINGLE_TAG,
    VISITS_KEPT,
    DeviceKeys,
    due_member,
    group_by_slot,
)
from geopush.state.redis_calls import (
    MAX_ATTEMPTS,
    raise_first_error,
    safe_url,
)
from geopush.state.redis_outbox import RedisOutbox
from geopush.state.redis_scripts import (
    CLAIM_DUE,
    COMMIT,
    COMMIT_DECIDED,
    ERASE,
    ERASE_DEVICE,
    OPENED,
    PUBLISH_CONFIG,
    PUT_PROFILE,
    SET_TOKEN,
)

DEVICES_PER_CALL = 1000  # in one MGET or commit script: Redis serves no one else meanwhile
DECIDE_SLICE = 8  # devices decided in one turn of the event loop
# Devices a read → compute → commit carries. A group of a 1000-ping share went as one: each of
# its steps (the replies of a pipeline of 3,000 commands, the compute, the commit's arguments)
# took the event loop for 20-60 ms at once, and a phone's ping queued behind every one of them.
# In slices, one after the other, each step is a few ms and the loop serves others between.
TRACK_SLICE = 100


@dataclass(slots=True)
class _Read:
    """One device as read before computing."""

    snapshot: DeviceSnapshot
    keys: DeviceKeys
    version: bytes  # b'' when the device has no version key
    stored_due: float | None  # next_due kept with the track
    timer: float | None  # its score in the timers sorted set


class RedisStore(RedisOutbox, StateStore):
    # -- devices ---------------------------------------------------------------------------

    async def get_profile(self, device_id: str) -> DeviceProfile | None:
        raw = await self._reading(lambda: self._redis.get(self.keys.device(device_id).profile))
        return DeviceProfile.model_validate_json(raw) if raw is not None else None

    async def update_profile(self, device_id: str, edit: ProfileEdit) -> ProfileWrite | None:
        keys = self.keys.device(device_id)
        for _ in range(MAX_ATTEMPTS):
            raw, version = await self._reading(
                lambda: self._redis.execute_command("MGET", keys.profile, keys.version))
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
        """The compare-and-set of one profile write; False when it was not written (the
        version moved, or the call did not run)."""
        profile, change = write.profile, write.change
        if profile.device_id != device_id:
            raise ValueError(f"edit of {device_id!r} returned the profile of {profile.device_id!r}")
        revoke = not profile.consent.location
        args = (version, profile.model_dump_json(), change.model_dump_json() if change else "",
                "1" if revoke else "0")
        # before the profile script: a commit that read the new version writes its timer
        # after this removal
        before = [("ZREM", self.keys.timers, device_id)] if revoke else []
        answer = await self._once(PUT_PROFILE, self._tag_of(device_id),
                                  (keys.profile, keys.consent, keys.track, keys.version), args,
                                  before)
        return answer is not None and answer != b"-1"

    async def consent_history(self, device_id: str) -> list[ConsentChange]:
        rows = await self._reading(
            lambda: self._redis.lrange(self.keys.device(device_id).consent, 0, -1))
        return [ConsentChange.model_validate_json(r) for r in rows]

    async def visits(self, device_id: str) -> list[Visit]:
        rows = await self._reading(
            lambda: self._redis.lrange(self.keys.device(device_id).visits, 0, -1))
        return [decode_visit(device_id, r) for r in rows]

    async def erase(self, device_id: str, record: ErasureRecord) -> bool:
        keys = self.keys.device(device_id)
        for _ in range(MAX_ATTEMPTS):
            if self.cluster:
                erased = await self._erase_across_slots(device_id, keys, record)
            else:
                # a commit racing with this either wrote its timer before (removed here) or
                # fails its version check (the version key is gone) and repairs the timer
                # when it retries
                erased = await self._once(
                    ERASE, SINGLE_TAG,
                    [self.keys.erasures, self.keys.timers, self.keys.outbox_due, *keys.all()],
                    [device_id, record.device_hash, record.model_dump_json()])
            if erased is not None:
                return erased == b"1"
        raise StateUnavailable(f"the erasure did not run in {MAX_ATTEMPTS} attempts; retry later")

    async def _erase_across_slots(self, device_id: str, keys: DeviceKeys,
                                  record: ErasureRecord) -> bytes | None:
        """Record first, then the data (see the module's docstring)."""

        async def present() -> tuple[int, Any, list[Any]]:
            pipe = self._redis.pipeline(transaction=False)
            pipe.exists(*keys.all())
            pipe.zscore(self.keys.timers, device_id)
            pipe.hkeys(keys.outbox)
            found, timer, pushes = await pipe.execute()
            return int(found), timer, pushes

        found, timer, pushes = await self._reading(present)
        if not found and timer is None:
            return b"0"
        async with self._guard():  # the same field and value each time: safe to send again
            await self._redis.hset(self.keys.erasures, record.device_hash,
                                   record.model_dump_json())
        # the due set's members name the device (a push queued meanwhile leaves one, dropped
        # once its entry is found missing past the grace: geopush.state.redis_outbox)
        members = [due_member(p.decode() if isinstance(p, bytes) else str(p), device_id)
                   for p in pushes]
        before: list[tuple[Any, ...]] = [("ZREM", self.keys.timers, device_id)]
        if members:
            before.append(("ZREM", self.keys.outbox_due, *members))
        answer = await self._once(ERASE_DEVICE, self._tag_of(device_id), keys.all(), [],
                                  before)
        return answer if answer is None else b"1"  # found before: erased, by this or a twin

    async def set_token(self, device_id: str, token: StoredToken | None) -> bool:
        keys = self.keys.device(device_id)
        value = orjson.dumps({"nonce": token.nonce, "issued_at": token.issued_at}) \
            if token is not None else b""
        for _ in range(MAX_ATTEMPTS):
            answer = await self._once(SET_TOKEN, self._tag_of(device_id),
                                      (keys.profile, keys.token, keys.version), [value])
            if answer is not None:
                return answer == b"1"
        raise StateUnavailable(
            f"the device token write did not run in {MAX_ATTEMPTS} attempts; retry later")

    async def stored_token(self, device_id: str) -> StoredToken | None:
        raw = await self._reading(lambda: self._redis.get(self.keys.device(device_id).token))
        return _token(raw) if raw is not None else None

    async def erasure_record(self, device_hash: str) -> ErasureRecord | None:
        raw = await self._reading(lambda: self._redis.hget(self.keys.erasures, device_hash))
        return ErasureRecord.model_validate_json(raw) if raw is not None else None

    async def history(self, device_id: str) -> DeviceHistory:
        histories, lost = await self._histories([device_id])
        if lost:
            raise self._last_error or StateUnavailable("the device's history cannot be read")
        return histories[device_id]

    async def _histories(self, device_ids: Sequence[str]
                         ) -> tuple[dict[str, DeviceHistory], set[str]]:
        """The history of each device (DECISIONS IN TWO STEPS): one pipelined round trip,
        three reads a device; and the devices that could not be read (a cluster node)."""
        device_keys = [self.keys.device(d) for d in device_ids]

        async def read() -> list[Any]:
            pipe = self._redis.pipeline(transaction=False)
            for keys in device_keys:
                pipe.lrange(keys.visits, 0, -1)
                pipe.hgetall(keys.pushes)
                pipe.hgetall(keys.opens)
            results: list[Any] = await pipe.execute(raise_on_error=False)
            if not self.cluster:
                raise_first_error(results)
            return results

        results = await self._reading(read)
        histories: dict[str, DeviceHistory] = {}
        lost: set[str] = set()
        for n, device_id in enumerate(device_ids):
            visits, pushes, opens = results[3 * n:3 * n + 3]
            if any(isinstance(r, Exception) for r in (visits, pushes, opens)):
                lost.add(device_id)
                self._last_error = self._unavailable(
                    next(r for r in (visits, pushes, opens) if isinstance(r, Exception)))
                continue
            records = [decode_push(raw) for raw in pushes.values()]
            for record in records:
                opened = opens.get(record.push_id.encode())
                if opened is not None:
                    record.opened_at = float(opened)
            histories[device_id] = DeviceHistory(records,
                                                 [decode_visit(device_id, v) for v in visits])
        return histories, lost

    async def decisions(self, device_id: str) -> list[dict[str, Any]]:
        rows = await self._reading(
            lambda: self._redis.lrange(self.keys.device(device_id).decisions, 0, -1))
        return [orjson.loads(r) for r in rows]

    async def record_open(self, device_id: str, push_id: str, at: float) -> float | None:
        keys = self.keys.device(device_id)
        for _ in range(MAX_ATTEMPTS):
            answer = await self._once(OPENED, self._tag_of(device_id),
                                      (keys.pushes, keys.opens, keys.version),
                                      [push_id, repr(float(at))])
            if answer is not None:
                return float(answer) if answer else None
        raise StateUnavailable(
            f"the open did not run in {MAX_ATTEMPTS} attempts; retry later")

    # -- tracking --------------------------------------------------------------------------

    async def track(self, device_ids: Collection[str], compute: Compute) -> dict[str, DeviceOutcome]:
        devices = list(dict.fromkeys(device_ids))
        if len(devices) <= TRACK_SLICE:
            return await self._track(devices, compute)
        # Compute takes the devices to work on from its argument: a slice is a smaller call
        slices = [devices[i:i + TRACK_SLICE] for i in range(0, len(devices), TRACK_SLICE)]
        committed: dict[str, DeviceOutcome] = {}
        unavailable: set[str] = set()
        reason: StateUnavailable | None = None
        # one after the other: side by side, their steps would be ready at once, and one turn
        # of the loop would run them all
        for n, part in enumerate(slices):
            try:
                committed.update(await self._track(part, compute))
            except PartlyUnavailable as partly:  # a cluster node failed: the others go on
                committed.update(partly.committed)
                unavailable |= partly.unavailable
                reason = reason or partly
            except StateUnavailable as exc:
                # Redis is not answering: the slices left are not tried (each would wait out
                # the timeout), and nothing of them is written
                unavailable.update(d for rest in slices[n:] for d in rest)
                reason = reason or exc
                break
        if reason is None:
            return committed
        if committed:  # what committed stands; the rest is answered `unavailable` (retry)
            raise PartlyUnavailable(committed, unavailable, str(reason))
        raise reason

    async def _track(self, pending: list[str], compute: Compute) -> dict[str, DeviceOutcome]:
        committed: dict[str, DeviceOutcome] = {}
        unavailable: set[str] = set()
        written = 0  # devices whose commit applied
        reason: StateUnavailable | None = None
        for _ in range(MAX_ATTEMPTS):
            if not pending:
                break
            try:
                reads, lost = await self._read(pending)
                unavailable |= lost
                snapshots = {d: r.snapshot for d, r in reads.items()}
                outcomes = {d: o for d, o in compute(snapshots).items() if d in reads}
                deciding = [d for d, o in outcomes.items() if o.decide is not None]
                if deciding:
                    # read after the snapshot: a write meanwhile moved the version, so the
                    # commit's compare-and-set fails and the device is computed again
                    histories, lost = await self._histories(deciding)
                    unavailable |= lost
                    for device_id in lost:
                        del outcomes[device_id]
                    for n, (device_id, history) in enumerate(histories.items(), 1):
                        decide = outcomes[device_id].decide
                        assert decide is not None
                        decide(history)
                        outcomes[device_id].decide = None  # a cycle less (memory.py says why)
                        if n % DECIDE_SLICE == 0:
                            # ~90 µs a decision: a batch of deciding devices takes the loop
                            # back in between (its compare-and-set covers the pause)
                            await asyncio.sleep(0)
                conflicts, lost, applied = await self._commit(reads, outcomes)
            except StateUnavailable as exc:  # nothing of this attempt was written
                unavailable.update(pending)
                reason = exc
                break
            unavailable |= lost
            written += applied
            retry = set(conflicts) | lost
            committed.update((d, o) for d, o in outcomes.items() if d not in retry)
            pending = conflicts
        else:
            if pending:
                unavailable.update(pending)
                reason = StateUnavailable(
                    f"{len(pending)} device(s) changed under every one of {MAX_ATTEMPTS} "
                    "attempts; retry later")
        if not unavailable:
            return committed
        if reason is None:
            reason = self._last_error or StateUnavailable(
                f"Redis at {safe_url(self.url)} is unavailable for {len(unavailable)} "
                "device(s): their cluster node failed")
        message = str(reason)
        if written:
            raise PartlyUnavailable(committed, unavailable, message)
        raise reason

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

    async def _read(self, device_ids: Sequence[str]) -> tuple[dict[str, _Read], set[str]]:
        """The devices as stored, and those that could not be read (on a cluster, their node
        failed)."""
        groups = self._per_slot(device_ids)
        ordered = [d for group in groups for d in group]
        device_keys = [self.keys.device(d) for d in ordered]

        async def read() -> list[Any]:
            pipe = self._redis.pipeline(transaction=False)
            start = 0
            for group in groups:
                pipe.execute_command("MGET", *[
                    name for k in device_keys[start:start + len(group)]
                    for name in (k.profile, k.track, k.version, k.token)])
                start += len(group)
            pipe.zmscore(self.keys.timers, ordered)
            results: list[Any] = await pipe.execute(raise_on_error=False)
            raise_first_error(results[-1:])  # without the timers, nothing to go on
            if not self.cluster:
                raise_first_error(results)
            return results

        results = await self._reading(read)
        timers = results.pop()
        lost: set[str] = set()
        if any(isinstance(r, Exception) for r in results):  # a cluster node failed
            values_list: list[Any] = []
            for group, result in zip(groups, results, strict=True):
                if isinstance(result, Exception):
                    lost.update(group)
                    values_list += [None] * (4 * len(group))
                else:
                    values_list += result
            values = iter(values_list)
        else:
            values = iter(results[0] if len(results) == 1 else [v for vs in results for v in vs])
        # the validator itself: model_validate_json's wrapper costs a fifth of the call
        profile_from_json = DeviceProfile.__pydantic_validator__.validate_json
        reads = {}
        for device_id, keys, profile_raw, track_raw, version, token_raw, timer in zip(
                ordered, device_keys, values, values, values, values, timers, strict=True):
            if lost and device_id in lost:
                continue
            state: DeviceState | None = None
            due: float | None = None
            if track_raw is not None:
                state, due = decode_track(track_raw)
            profile = profile_from_json(profile_raw) if profile_raw is not None else None
            nonce = _token(token_raw).nonce if token_raw is not None else None
            reads[device_id] = _Read(DeviceSnapshot(profile, state, nonce), keys, version or b"",
                                     due, timer)
        return reads, lost

    async def _commit(self, reads: dict[str, _Read], outcomes: dict[str, DeviceOutcome]
                      ) -> tuple[list[str], set[str], int]:
        """Write every outcome in one round trip: the devices to read and compute again (their
        version moved, or their script did not run), those whose slot could not commit
        (nothing of theirs was written), and how many were written."""
        schedule: dict[str, float] = {}
        unschedule: list[str] = []
        writes: dict[str, tuple[Any, ...]] = {}  # device → its ARGV of the commit script
        decided: dict[str, tuple[Any, ...]] = {}  # … of the COMMIT_DECIDED script
        hints: dict[str, float] = {}  # the outbox due set's members of the pushes queued
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
            if outcome.state is not None and (outcome.decisions or outcome.reserved
                                              or outcome.forgotten or outcome.visits_forgotten):
                pushes = [x for p in outcome.reserved for x in (p.push_id, encode_push(p))]
                records = [orjson.dumps(d.as_record()) for d in outcome.decisions]
                entries = [x for e in outcome.queued
                           for x in (e.push_id, orjson.dumps(entry_to_json(e)))]
                for entry in outcome.queued:
                    hints[due_member(entry.push_id, device_id)] = entry.next_attempt_at
                decided[device_id] = (
                    version, bumped, track, outcome.visits_forgotten, len(visits), *visits,
                    len(outcome.reserved),
                    *pushes, len(outcome.forgotten), *outcome.forgotten, len(records),
                    *records, len(outcome.queued), *entries)
                continue
            writes[device_id] = (version, bumped, track, len(visits), *visits)
        if not writes and not decided:
            return [], set(), 0
        groups = self._per_slot(list(writes)) if writes else []
        decided_groups = self._per_slot(list(decided)) if decided else []
        # timers first: each device's timer write precedes its compare-and-set
        before: list[tuple[Any, ...]] = []
        if schedule:
            before.append(("ZADD", self.keys.timers,
                           *[x for d, due in schedule.items() for x in (due, d)]))
        if unschedule:
            before.append(("ZREM", self.keys.timers, *unschedule))
        if hints:  # before the compare-and-set, as timers (see the module's docstring)
            before.append(("ZADD", self.keys.outbox_due, "NX",
                           *[x for m, due in hints.items() for x in (due, m)]))
        calls = []
        for group in groups:
            keys: list[str] = []
            args: list[Any] = [VISITS_KEPT]
            for device_id in group:
                device_keys = reads[device_id].keys
                keys += (device_keys.track, device_keys.version, device_keys.visits)
                args += writes[device_id]
            calls.append((COMMIT, self._tag_of(group[0]), keys, args))
        for group in decided_groups:
            keys = []
            args = [VISITS_KEPT, DECISIONS_KEPT]
            for device_id in group:
                k = reads[device_id].keys
                keys += (k.track, k.version, k.visits, k.pushes, k.opens, k.decisions,
                         k.outbox)
                args += decided[device_id]
            calls.append((COMMIT_DECIDED, self._tag_of(group[0]), keys, args))
        answers = await self._run_once(calls, before)
        conflicts: list[str] = []
        lost: set[str] = set()
        applied = 0
        for group, answer in zip(groups + decided_groups, answers, strict=True):
            if answer is None:
                conflicts += group  # nothing of the group was written
            elif isinstance(answer, Exception):
                lost.update(group)
            else:
                moved = [group[int(p) - 1] for p in answer.split(b",")] if answer else []
                conflicts += moved
                applied += len(group) - len(moved)
        if lost:
            error = next(a for a in answers if isinstance(a, Exception))
            self._last_error = error if isinstance(error, StateUnavailable) else (
                self._unavailable(error))
        return conflicts, lost, applied

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
        # not resolved when its answer is lost: the devices it claimed come back with the lease
        members = await self._run_script(
            CLAIM_DUE, [self.keys.timers],
            [repr(float(now)), int(limit), repr(float(now + lease_s))])
        return [m.decode() if isinstance(m, bytes) else str(m) for m in members]

    # -- weather -----------------------------------------------------------------------------

    async def weather_cells(self, cells: Collection[str]) -> dict[str, bytes]:
        names = list(cells)
        if not names:
            return {}
        values: list[Any] = await self._reading(
            lambda: self._redis.hmget(self.keys.weather, names))
        return {c: bytes(v) for c, v in zip(names, values, strict=True) if v is not None}

    async def put_weather_cells(self, values: Mapping[str, bytes]) -> None:
        if values:
            async with self._guard():  # the same fields and values: safe to send again
                mapping: dict[Any, Any] = dict(values)
                await self._redis.hset(self.keys.weather, mapping=mapping)

    # -- the published configuration -------------------------------------------------------

    async def publish_config(self, payload: bytes) -> int:
        for _ in range(MAX_ATTEMPTS):
            serial = await self._once(PUBLISH_CONFIG, CONFIG_TAG,
                                      [self.keys.config_serial, self.keys.config_payload],
                                      [payload])
            if serial is not None:
                return int(serial)
        raise StateUnavailable(f"the publish did not run in {MAX_ATTEMPTS} attempts; retry later")

    async def config_serial(self) -> int:
        raw = await self._reading(lambda: self._redis.get(self.keys.config_serial))
        return int(raw) if raw is not None else 0

    async def published_config(self) -> tuple[int, bytes] | None:
        serial, payload = await self._reading(lambda: self._redis.execute_command(
            "MGET", self.keys.config_serial, self.keys.config_payload))
        if serial is None or payload is None:
            return None
        return int(serial), bytes(payload)


def _token(raw: bytes | str) -> StoredToken:
    value = orjson.loads(raw)
    return StoredToken(value["nonce"], value["issued_at"])
