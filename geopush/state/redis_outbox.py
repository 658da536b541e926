"""The outbox, the retention purge, flags, shared counters and leases of the `redis` backend
(geopush.state.redis): what delivery and the periodic jobs keep in Redis.

The outbox. A push's entry lives in its device's `outbox` hash, written by COMMIT_DECIDED in the
commit of its decision. The due set every instance claims from is in a slot of its own, so it
is a hint, as timers are: the commit adds the push's member (ZADD NX) before its
compare-and-set, in the same way; claiming re-scores members to the end of a lease (a claimer
that dies gives them back), and BEGIN_PUSH, in the device's slot, decides: it turns a due entry
into `sending` under a lease, once, and says when the others are due. A member whose entry is
final is dropped; one whose entry is missing is dropped once its commit can no longer land
(grace_s after the push's event: its decision was not late, and a commit lands within its
deadline), so a commit that lost its compare-and-set leaves nothing behind for long.
"""


from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import suppress
from typing import Any

import orjson
from redis.exceptions import RedisClusterException, RedisError

from geopush.delivery.outbox import SEND_LEASE_S, OutboxEntry, entry_from_json, entry_to_json
from geopush.devices import DeviceProfile
from geopush.rules.decide import DeviceHistory, push_time
from geopush.state.base import (
    DeviceRecords,
    StateUnavailable,
)
from geopush.state.codec import (
    decode_push,
    decode_track,
    decode_visit,
)
from geopush.state.keys import (
    due_member,
    parse_due_member,
)
from geopush.state.redis_calls import MAX_ATTEMPTS, RedisCalls, raise_first_error
from geopush.state.redis_scripts import (
    BEGIN_PUSH,
    CANCEL_PUSHES,
    CLAIM_DUE,
    FINISH_PUSH,
    PURGE,
    PUT_PUSH,
    RELEASE_LEASE,
    TAKE_LEASE,
)

# members read to find the oldest pending push: those due soonest, which are the oldest unless
# some wait long for a retry (an approximation past a few thousand pending pushes)
OVERVIEW_MEMBERS = 2000


class RedisOutbox(RedisCalls):
    # -- the outbox ----------------------------------------------------------------------------

    async def claim_pushes(self, now: float, limit: int, *, grace_s: float,
                           lease_s: float = SEND_LEASE_S
                           ) -> list[tuple[OutboxEntry, DeviceProfile | None]]:
        if limit <= 0:
            return []
        members = await self._run_script(
            CLAIM_DUE, [self.keys.outbox_due],
            [repr(float(now)), int(limit), repr(float(now + lease_s))])
        pairs = [parse_due_member(m.decode() if isinstance(m, bytes) else str(m))
                 for m in members]
        if not pairs:
            return []
        calls = []
        for push_id, device_id in pairs:
            keys = self.keys.device(device_id)
            calls.append((BEGIN_PUSH, self._tag_of(device_id), (keys.outbox, keys.profile),
                          [push_id, repr(float(now)), repr(float(now + lease_s))]))
        answers = await self._run_once(calls)
        claimed: list[tuple[OutboxEntry, DeviceProfile | None]] = []
        drop: list[str] = []
        later: dict[str, float] = {}
        for (push_id, device_id), answer in zip(pairs, answers, strict=True):
            member = due_member(push_id, device_id)
            if answer is None:  # did not run (Redis had lost the scripts): due again now
                later[member] = now
                continue
            if not isinstance(answer, bytes):
                continue  # unknown: the member comes back with its lease
            if answer == b"F" or answer == b"E":  # final, or the device was erased
                drop.append(member)
            elif answer == b"":
                if push_time(push_id) < now - grace_s:
                    drop.append(member)  # its commit failed and can no longer land
            elif answer.startswith(b"N"):
                later[member] = float(answer[1:])
            else:
                raw_entry, _, raw_profile = answer.partition(b"\n")
                entry = entry_from_json(orjson.loads(raw_entry))
                profile = DeviceProfile.model_validate_json(raw_profile) if raw_profile \
                    else None
                claimed.append((entry, profile))
        await self._rehint(drop, later)
        return claimed

    async def _rehint(self, drop: Sequence[str], later: Mapping[str, float]) -> None:
        """Due-set members to drop or re-score: hints, safe to send again (a failure here
        leaves the claim's lease, and the member comes back)."""
        if not drop and not later:
            return
        pipe = self._redis.pipeline(transaction=False)
        if drop:
            pipe.zrem(self.keys.outbox_due, *drop)
        if later:
            pipe.zadd(self.keys.outbox_due, dict(later))
        with suppress(RedisError, RedisClusterException, OSError):
            await pipe.execute()

    async def finish_pushes(self, ends: Sequence[tuple[OutboxEntry, int]]) -> list[bool | None]:
        # one round trip for the scripts of every attempt that ended meanwhile, one for the
        # hints: a burst of sends costs two calls a batch, not two a push
        results: list[bool | None] = [None] * len(ends)
        pending = list(range(len(ends)))
        for _ in range(MAX_ATTEMPTS):
            if not pending:
                break
            calls = []
            for n in pending:
                entry, attempt = ends[n]
                calls.append((FINISH_PUSH, self._tag_of(entry.device_id),
                              (self.keys.device(entry.device_id).outbox,),
                              [entry.push_id, attempt, orjson.dumps(entry_to_json(entry))]))
            answers = await self._run_once(calls)
            retry = []
            for n, answer in zip(pending, answers, strict=True):
                if answer is None:
                    retry.append(n)  # it did not run and never will (scripts reloaded)
                elif isinstance(answer, bytes):
                    results[n] = answer == b"1"
                # an exception: unknown (resolved as unavailable); the lease brings it back
            pending = retry
        drop = [due_member(e.push_id, e.device_id) for (e, _), r in zip(ends, results, strict=True)
                if r and e.final]
        later = {due_member(e.push_id, e.device_id): e.next_attempt_at
                 for (e, _), r in zip(ends, results, strict=True) if r and not e.final}
        await self._rehint(drop, later)
        return results

    async def put_push(self, entry: OutboxEntry) -> bool:
        keys = self.keys.device(entry.device_id)
        member = due_member(entry.push_id, entry.device_id)
        for _ in range(MAX_ATTEMPTS):
            answer = await self._once(
                PUT_PUSH, self._tag_of(entry.device_id), (keys.outbox, keys.profile),
                [entry.push_id, orjson.dumps(entry_to_json(entry))],
                [("ZADD", self.keys.outbox_due, "NX", entry.next_attempt_at, member)])
            if answer == b"0":  # erased meanwhile: its member must not name it any longer
                await self._rehint([member], {})
                return False
            if answer is not None:
                return True
        raise StateUnavailable(f"the push was not queued in {MAX_ATTEMPTS} attempts; retry later")

    async def cancel_pushes(self, device_id: str, *, category: str | None = None,
                            rule_id: str | None = None, reason: str, now: float) -> list[str]:
        keys = self.keys.device(device_id)
        for _ in range(MAX_ATTEMPTS):
            answer = await self._once(
                CANCEL_PUSHES, self._tag_of(device_id), (keys.outbox,),
                [repr(float(now)), category or "", rule_id or "", reason])
            if answer is not None:
                cancelled = answer.decode().split(",") if answer else []
                await self._rehint([due_member(p, device_id) for p in cancelled], {})
                return cancelled
        raise StateUnavailable(f"the cancel did not run in {MAX_ATTEMPTS} attempts; retry later")

    async def pending_pushes(self, limit: int) -> list[tuple[str, str]]:
        members = await self._reading(
            lambda: self._redis.zrange(self.keys.outbox_due, 0, max(0, limit - 1)))
        return [parse_due_member(m.decode() if isinstance(m, bytes) else str(m))
                for m in members]

    async def outbox(self, device_id: str) -> list[OutboxEntry]:
        rows = await self._reading(
            lambda: self._redis.hvals(self.keys.device(device_id).outbox))
        return sorted((entry_from_json(orjson.loads(r)) for r in rows),
                      key=lambda e: e.created_at)

    async def outbox_overview(self, now: float) -> tuple[int, float | None]:
        # the oldest by event time: push ids are ULIDs of it, so the members say it without
        # reading entries (a member may outlive its final entry for a moment: a hint)
        async def read() -> tuple[int, list[Any]]:
            pipe = self._redis.pipeline(transaction=False)
            pipe.zcard(self.keys.outbox_due)
            pipe.zrange(self.keys.outbox_due, 0, OVERVIEW_MEMBERS - 1)
            depth, members = await pipe.execute()
            return int(depth), members

        depth, members = await self._reading(read)
        times = [push_time(parse_due_member(m.decode())[0]) for m in members]
        return depth, (max(0.0, now - min(times)) if times else None)

    # -- retention -----------------------------------------------------------------------------

    async def purge(self, cutoff: float) -> int:
        gone = 0
        async for device_ids in self.device_ids():
            calls = []
            for device_id in device_ids:
                k = self.keys.device(device_id)
                calls.append((PURGE, self._tag_of(device_id),
                              (k.version, k.visits, k.pushes, k.opens, k.decisions, k.outbox),
                              [repr(float(cutoff))]))
            for answer in await self._run_once(calls):
                if isinstance(answer, Exception):
                    raise answer if isinstance(answer, StateUnavailable) \
                        else self._unavailable(answer)
                if answer:  # None: it did not run; the next purge takes it
                    gone += int(answer)
        return gone

    async def records(self, device_ids: Sequence[str]) -> list[DeviceRecords]:
        device_keys = [self.keys.device(d) for d in device_ids]

        async def read() -> list[Any]:
            pipe = self._redis.pipeline(transaction=False)
            for k in device_keys:
                pipe.lrange(k.visits, 0, -1)
                pipe.hgetall(k.pushes)
                pipe.hgetall(k.opens)
                pipe.lrange(k.decisions, 0, -1)
                pipe.hvals(k.outbox)
                pipe.get(k.track)
            results: list[Any] = await pipe.execute(raise_on_error=False)
            raise_first_error(results)
            return results

        results = await self._reading(read)
        found = []
        for n, device_id in enumerate(device_ids):
            visits, pushes, opens, decisions, outbox, track = results[6 * n:6 * n + 6]
            records = [decode_push(raw) for raw in pushes.values()]
            for record in records:
                opened = opens.get(record.push_id.encode())
                if opened is not None:
                    record.opened_at = float(opened)
            stays = []
            if track is not None:
                state, _ = decode_track(track)
                stays = [(s.store_id, s.enter_ts) for s in state.stays.values()]
            found.append(DeviceRecords(
                device_id, DeviceHistory(records, [decode_visit(device_id, v) for v in visits]),
                [orjson.loads(d) for d in decisions],
                [entry_from_json(orjson.loads(e)) for e in outbox], stays))
        return found

    async def device_ids(self, batch: int = 500) -> AsyncIterator[list[str]]:
        # every device with anything stored has a version (each write moves it)
        pattern = f"{self.keys.prefix}:{{d:*}}:ver"
        start = len(self.keys.prefix) + 4  # "<prefix>:{d:"
        found: list[str] = []
        async with self._guard():
            async for key in self._redis.scan_iter(match=pattern, count=batch):
                name = key.decode() if isinstance(key, bytes) else str(key)
                found.append(name[start:-len("}:ver")])
                if len(found) >= batch:
                    yield found
                    found = []
        if found:
            yield found

    # -- flags ---------------------------------------------------------------------------------

    async def set_flag(self, name: str, value: str | None) -> None:
        key = self.keys.flag_prefix + name
        async with self._guard():  # the same value each time: safe to send again
            if value is None:
                await self._redis.delete(key)
            else:
                await self._redis.set(key, value)

    async def get_flag(self, name: str) -> str | None:
        raw = await self._reading(lambda: self._redis.get(self.keys.flag_prefix + name))
        return raw.decode() if isinstance(raw, bytes) else raw

    # -- shared counters ---------------------------------------------------------------------

    async def add_counts(self, bucket: str, counts: Mapping[str, int], ttl_s: float) -> None:
        if not counts:
            return
        key = self.keys.counts_prefix + bucket
        pipe = self._redis.pipeline(transaction=False)
        for name, n in counts.items():
            pipe.hincrby(key, name, n)
        pipe.pexpire(key, max(1, int(ttl_s * 1000)))
        async with self._guard():  # never re-sent (the client's Retry is off): a count at most
            raise_first_error(await pipe.execute(raise_on_error=False))

    async def read_counts(self, bucket: str) -> dict[str, int]:
        raw = await self._reading(lambda: self._redis.hgetall(self.keys.counts_prefix + bucket))
        return {(k.decode() if isinstance(k, bytes) else str(k)): int(v) for k, v in raw.items()}

    # -- leases --------------------------------------------------------------------------------

    async def take_lease(self, name: str, holder: str, ttl_s: float) -> bool:
        taken = await self._run_script(TAKE_LEASE, [self.keys.lease_prefix + name],
                                       [holder, max(1, int(ttl_s * 1000))])
        return bool(int(taken))

    async def release_lease(self, name: str, holder: str) -> None:
        await self._run_script(RELEASE_LEASE, [self.keys.lease_prefix + name], [holder])
