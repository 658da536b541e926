"""The `redis` backend: any number of instances share one Redis (or Redis Cluster).

Atomicity of `track` is optimistic. Every write of a device adds one to its `:ver` key. One
pipelined round trip reads profile, track, version and device token of every device in a
batch (one MGET) and their timers (one ZMSCORE); the pure compute runs; one pipelined round
trip commits the batch with one Lua script that compare-and-sets each device on its version.
Devices whose version moved meanwhile are read and computed again.

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

Commits are safe to retry (contract §12). A call whose answer is lost (timeout, dropped
connection) may have run or not, and may still run later: redis-py's Retry re-sent it (a
batch committed twice reads as a conflict, is recomputed on state that already holds its pings
and answers with no events). So redis-py never re-sends anything here (reads are sent again by
`_reading`), and each state-changing script runs at most once (`_run_once`): it carries a
random call id naming a record key in its own slot (a tag per slot, `keys.slot_tag`, so no
record names a device), and a deadline on Redis's clock. It writes nothing if it comes after
the deadline or finds the record; else it keeps its result in the record (60 s). After a lost
answer RESOLVE reads the record, the exact result of that one run (the events computed for it
stand), or fences the call so that it never runs; it is asked until Redis answers it (for
RESOLVE_PATIENCE_S at least, and past the call's deadline), so a stall of a few seconds ends in
the exact answer. One record per script call (per slot group), not per device: a SET with a TTL
and a TIME, whatever the batch's size. Left open: Redis unreachable for longer than
RESOLVE_PATIENCE_S after a lost answer: a 503 that cannot say whether the call ran.
On a Redis Cluster a node that fails takes only its devices: `track` raises PartlyUnavailable
with the committed outcomes and the devices to send again, and the ingest rejects their pings
`unavailable`. claim_due is a lease, not resolved: what a lost claim took comes back with it.
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

import asyncio
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Mapping, Sequence
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from typing import Any, TypeVar

import hiredis
import orjson
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import AbstractConnection
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.crc import key_slot
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, RedisClusterException, RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from geopush.delivery.outbox import SEND_LEASE_S, OutboxEntry, entry_from_json, entry_to_json
from geopush.devices import ConsentChange, DeviceProfile, ErasureRecord
from geopush.engine import DeviceOutcome, DeviceSnapshot
from geopush.geo.model import DeviceState, Visit
from geopush.rules.decide import DeviceHistory, push_time
from geopush.state.base import (
    Compute,
    DeviceRecords,
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
    Keys,
    due_member,
    group_by_slot,
    parse_due_member,
    slot_tag,
)
from geopush.state.redis_scripts import (
    BEGIN_PUSH,
    CANCEL_PUSHES,
    CLAIM_DUE,
    COMMIT,
    COMMIT_DECIDED,
    ERASE,
    ERASE_DEVICE,
    FINISH_PUSH,
    OPENED,
    PUBLISH_CONFIG,
    PURGE,
    PUT_PROFILE,
    PUT_PUSH,
    RELEASE_LEASE,
    RESOLVE,
    SCRIPTS,
    SET_TOKEN,
    TAKE_LEASE,
    Script,
)

MAX_ATTEMPTS = 10  # of read → compute → commit for one device before giving up (503)
DEVICES_PER_CALL = 1000  # in one MGET or commit script: Redis serves no one else meanwhile
SOCKET_TIMEOUT_S = 2.0
CONNECT_TIMEOUT_S = 1.0
# A state-changing call must run within this many socket timeouts of being sent, or it writes
# nothing: after that (and CLOCK_MARGIN_S) a call whose answer was lost can no longer land.
CALL_WINDOW_TIMEOUTS = 2.0
CLOCK_MARGIN_S = 0.25  # for the clocks of Redis and of this host drifting apart, cluster nodes'
CLOCK_REFRESH_S = 30.0  # how long a measure of Redis's clock against ours is used
RECORD_TTL_S = 60.0  # a call's record outlives by far any moment the call could still land
RESOLVE_PAUSE_S = 0.05  # between attempts to learn what became of a call (doubling up to 0.5 s)
# How long a call whose answer was lost is asked after. Its window only says when it can no
# longer run; whether it ran before Redis stalled is known only once Redis answers RESOLVE, so
# an answer waits for that (well within the record's RECORD_TTL_S) rather than guess.
RESOLVE_PATIENCE_S = 10.0
# members read to find the oldest pending push: those due soonest, which are the oldest unless
# some wait long for a retry (an approximation past a few thousand pending pushes)
OVERVIEW_MEMBERS = 2000
_REPLY_LOST = (RedisConnectionError, RedisTimeoutError, OSError)
_T = TypeVar("_T")

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
        self._window_s = CALL_WINDOW_TIMEOUTS * socket_timeout_s
        self._client: aioredis.Redis | RedisCluster | None = None
        self._clock_offset_s: float | None = None  # Redis's clock minus ours, at most
        self._clock_measured = 0.0  # time.monotonic() of that measure
        self._last_error: StateUnavailable | None = None  # why the last commit lost devices

    # -- lifecycle -------------------------------------------------------------------------

    async def open(self) -> None:
        # No round trip here: the service starts (and /readyz says why it is not ready)
        # while Redis is down; the pool connects on first use and again after a failure.
        # No command is ever sent again by redis-py (its default Retry re-sends commands and
        # pipelines, and the cluster client re-sends pipelined commands whose replies were
        # empty): a state-changing call whose answer is lost is resolved (`_run_once`), a read
        # is sent again by `_reading`.
        if self.cluster:
            # the client learns the other nodes and the slot map from this one on first use
            self._client = RedisCluster.from_url(
                self.url,
                socket_timeout=self._socket_timeout_s,
                socket_connect_timeout=self._connect_timeout_s,
                retry=Retry(NoBackoff(), 0),
                decode_responses=False,
            )
            await asyncio.to_thread(slot_tag, 0)  # builds the table of records' hash tags
            return
        self._client = aioredis.Redis.from_url(
            self.url,
            socket_timeout=self._socket_timeout_s,
            socket_connect_timeout=self._connect_timeout_s,
            retry=Retry(NoBackoff(), 0),
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
            raise self._unavailable(exc) from exc
        except OSError as exc:
            raise StateUnavailable(
                f"Redis at {_safe_url(self.url)} is unreachable: {exc}"
            ) from exc

    def _unavailable(self, exc: BaseException) -> StateUnavailable:
        return StateUnavailable(
            f"Redis at {_safe_url(self.url)} is unavailable: {type(exc).__name__}: {exc}")

    async def _reading(self, read: Callable[[], Awaitable[_T]]) -> _T:
        """`read()`, once more if its connection failed: a read changes nothing."""
        async with self._guard():
            try:
                return await read()
            except _REPLY_LOST:
                return await read()

    async def _load_scripts(self) -> None:
        for script in SCRIPTS:
            await self._redis.script_load(script.source)

    # -- calls that run once ---------------------------------------------------------------

    async def _deadline(self) -> tuple[int, float]:
        """For a call sent now: its deadline on Redis's clock (ms), and the time.monotonic()
        after which it cannot land any more. The offset between the clocks is measured by
        TIME and errs low (the reply's travel is counted in), so the call's deadline comes
        on Redis no later than here."""
        if (self._clock_offset_s is None
                or time.monotonic() - self._clock_measured > CLOCK_REFRESH_S):
            reply: Any = await self._reading(lambda: self._redis.execute_command("TIME"))
            if isinstance(reply, dict):  # a cluster: {node: reply} when it asked several
                reply = next(iter(reply.values()))
            seconds, micros = reply
            self._clock_offset_s = int(seconds) + int(micros) / 1e6 - time.time()
            self._clock_measured = time.monotonic()
        deadline_ms = int((time.time() + self._clock_offset_s + self._window_s) * 1000)
        return deadline_ms, time.monotonic() + self._window_s + CLOCK_MARGIN_S

    async def _run_once(self, calls: Sequence[tuple[Script, str, Sequence[Any], Sequence[Any]]],
                        before: Sequence[tuple[Any, ...]] = ()) -> list[bytes | Exception | None]:
        """Run each (script, hash tag, keys, args) at most once, in one round trip after the
        idempotent commands `before`. Per call: the script's answer; None when it did not
        run and never will (the caller may try again on fresh state); or the StateUnavailable
        to raise when Redis did not say within the call's window (nothing lands later)."""
        deadline_ms, give_up = await self._deadline()
        ttl_ms = int(RECORD_TTL_S * 1000)
        call_id = secrets.token_hex(8)
        records = [self.keys.record(tag, f"{call_id}.{n}") for n, (_, tag, _, _) in
                   enumerate(calls)]
        pipe = self._redis.pipeline(transaction=False)
        for command in before:
            pipe.execute_command(*command)
        if self.cluster and before:
            # a cluster pipeline runs on every node at once: wait for the timers' node
            async with self._guard():
                _raise_first_error(await pipe.execute(raise_on_error=False))
            pipe = self._redis.pipeline(transaction=False)
        skip = len(pipe)
        for (script, _, keys, args), record in zip(calls, records, strict=True):
            pipe.execute_command("EVALSHA", script.sha, 1 + len(keys), record, *keys,
                                 deadline_ms, ttl_ms, *args)
        replies: list[Any]
        try:
            replies = (await pipe.execute(raise_on_error=False))[skip:]
        except (RedisError, RedisClusterException, OSError) as exc:
            if _never_sent(exc):
                raise self._unavailable(exc) from exc
            replies = [exc] * len(calls)
        answers: list[bytes | Exception | None] = []
        lost: dict[int, str] = {}
        for n, reply in enumerate(replies):
            if isinstance(reply, NoScriptError) or (
                    isinstance(reply, ResponseError) and str(reply).startswith(
                        ("GEOPUSH_LATE", "GEOPUSH_FENCED"))):
                answers.append(None)
            elif isinstance(reply, Exception):
                answers.append(reply)
                lost[n] = records[n]
            else:
                answers.append(bytes(reply))
        if any(isinstance(r, NoScriptError) for r in replies):
            with suppress(RedisError, RedisClusterException, OSError):
                await self._load_scripts()  # Redis restarted; the caller's next try runs them
        if lost:
            resolved = await self._resolve(lost, give_up)
            for n, answer in resolved.items():
                answers[n] = answer
        return answers

    async def _resolve(self, records: dict[int, str], give_up: float
                       ) -> dict[int, bytes | Exception | None]:
        """What became of calls whose answers were lost: asked until Redis answers (RESOLVE
        fences a call that has not run, so it never will). Giving up before the window is over
        would let the call land after a 503; giving up at its end could miss that it ran just
        before the stall: so ask for RESOLVE_PATIENCE_S at least."""
        give_up = max(give_up, time.monotonic() + RESOLVE_PATIENCE_S)
        pause = RESOLVE_PAUSE_S
        answers: dict[int, bytes | Exception | None] = {}
        pending = dict(records)
        last: BaseException | None = None
        ttl_ms = int(RECORD_TTL_S * 1000)
        while pending:
            pipe = self._redis.pipeline(transaction=False)
            for record in pending.values():
                pipe.execute_command("EVALSHA", RESOLVE.sha, 1, record, ttl_ms)
            try:
                replies = await pipe.execute(raise_on_error=False)
            except (RedisError, RedisClusterException, OSError) as exc:
                replies = [exc] * len(pending)
            for n, reply in zip(list(pending), replies, strict=True):
                if isinstance(reply, bytes):
                    answers[n] = reply[1:] if reply.startswith(b"=") else None
                    del pending[n]
                elif isinstance(reply, NoScriptError):
                    with suppress(RedisError, RedisClusterException, OSError):
                        await self._load_scripts()
                else:
                    last = reply
            if pending:
                if time.monotonic() >= give_up:
                    break
                await asyncio.sleep(pause)
                pause = min(pause * 2, 0.5)
        for n in pending:
            # the one answer that is not exact (contract §12 cannot be kept without Redis):
            # the call may have run before Redis stopped answering; it cannot run any more
            answers[n] = StateUnavailable(
                f"Redis at {_safe_url(self.url)} did not answer for {RESOLVE_PATIENCE_S:g} s "
                f"after a write whose answer was lost; it may have been applied, and can no "
                f"longer be ({type(last).__name__}: {last})")
        return answers

    async def _once(self, script: Script, tag: str, keys: Sequence[Any], args: Sequence[Any],
                    before: Sequence[tuple[Any, ...]] = ()) -> bytes | None:
        """One call of `_run_once`; None: it did not run (try again)."""
        answer = (await self._run_once([(script, tag, keys, args)], before))[0]
        if isinstance(answer, StateUnavailable):
            raise answer
        if isinstance(answer, Exception):
            raise self._unavailable(answer) from answer
        return answer

    def _tag_of(self, device_id: str) -> str:
        """The hash tag of the records of calls writing `device_id`'s keys."""
        if not self.cluster:
            return SINGLE_TAG
        return slot_tag(key_slot(self.keys.device(device_id).version.encode()))

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
                    ERASE, SINGLE_TAG, [self.keys.erasures, self.keys.timers, *keys.all()],
                    [device_id, record.device_hash, record.model_dump_json()])
            if erased is not None:
                return erased == b"1"
        raise StateUnavailable(f"the erasure did not run in {MAX_ATTEMPTS} attempts; retry later")

    async def _erase_across_slots(self, device_id: str, keys: DeviceKeys,
                                  record: ErasureRecord) -> bytes | None:
        """Record first, then the data (see the module's docstring)."""

        async def present() -> tuple[int, Any]:
            pipe = self._redis.pipeline(transaction=False)
            pipe.exists(*keys.all())
            pipe.zscore(self.keys.timers, device_id)
            found, timer = await pipe.execute()
            return int(found), timer

        found, timer = await self._reading(present)
        if not found and timer is None:
            return b"0"
        async with self._guard():  # the same field and value each time: safe to send again
            await self._redis.hset(self.keys.erasures, record.device_hash,
                                   record.model_dump_json())
        answer = await self._once(ERASE_DEVICE, self._tag_of(device_id), keys.all(), [],
                                  [("ZREM", self.keys.timers, device_id)])
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
                _raise_first_error(results)
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
        pending = list(dict.fromkeys(device_ids))
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
                    for device_id, history in histories.items():
                        decide = outcomes[device_id].decide
                        assert decide is not None
                        decide(history)
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
                f"Redis at {_safe_url(self.url)} is unavailable for {len(unavailable)} "
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
            _raise_first_error(results[-1:])  # without the timers, nothing to go on
            if not self.cluster:
                _raise_first_error(results)
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
            if answer == b"F":
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

    async def finish_push(self, entry: OutboxEntry, attempt: int) -> bool:
        keys = self.keys.device(entry.device_id)
        for _ in range(MAX_ATTEMPTS):  # None: it did not run and never will (scripts reloaded)
            answer = await self._once(
                FINISH_PUSH, self._tag_of(entry.device_id), (keys.outbox,),
                [entry.push_id, attempt, orjson.dumps(entry_to_json(entry))])
            if answer is not None:
                break
        else:
            raise StateUnavailable("the push's state could not be written; it is sent again "
                                   "when its lease runs out")
        member = due_member(entry.push_id, entry.device_id)
        if entry.final:
            await self._rehint([member], {})
        else:
            await self._rehint([], {member: entry.next_attempt_at})
        return answer == b"1"

    async def put_push(self, entry: OutboxEntry) -> None:
        keys = self.keys.device(entry.device_id)
        member = due_member(entry.push_id, entry.device_id)
        for _ in range(MAX_ATTEMPTS):
            answer = await self._once(
                PUT_PUSH, self._tag_of(entry.device_id), (keys.outbox, keys.profile),
                [entry.push_id, orjson.dumps(entry_to_json(entry))],
                [("ZADD", self.keys.outbox_due, "NX", entry.next_attempt_at, member)])
            if answer is not None:
                return
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
            _raise_first_error(results)
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
            _raise_first_error(await pipe.execute(raise_on_error=False))

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


def _token(raw: bytes | str) -> StoredToken:
    value = orjson.loads(raw)
    return StoredToken(value["nonce"], value["issued_at"])


def _raise_first_error(results: Sequence[Any]) -> None:
    for result in results:
        if isinstance(result, Exception):
            raise result


def _never_sent(exc: BaseException) -> bool:
    """The call failed while connecting: nothing of it reached Redis (redis-py's words)."""
    text = str(exc)
    return isinstance(exc, RedisConnectionError | RedisTimeoutError) and (
        "connecting to" in text or "Timeout connecting" in text)


def _safe_url(url: str) -> str:
    """The URL without its password, for messages."""
    if "@" not in url:
        return url
    scheme, _, rest = url.partition("://")
    return f"{scheme}://***@{rest.rpartition('@')[2]}"
