"""The Redis connection of the `redis` backend (geopush.state.redis), and its calls that change
state: each runs at most once.

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
"""


from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager, suppress
from typing import Any, TypeVar

import hiredis
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import AbstractConnection
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.crc import key_slot
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import (
    MaxConnectionsError,
    NoScriptError,
    RedisClusterException,
    RedisError,
    ResponseError,
)
from redis.exceptions import TimeoutError as RedisTimeoutError

from geopush.state.base import (
    StateUnavailable,
)
from geopush.state.keys import (
    SINGLE_TAG,
    Keys,
    slot_tag,
)
from geopush.state.redis_scripts import (
    RESOLVE,
    SCRIPTS,
    Script,
)

MAX_ATTEMPTS = 10  # of a call that did not run (or a read → compute → commit) before a 503
SOCKET_TIMEOUT_S = 2.0
MAX_CONNECTIONS = 2000  # per process (on a cluster, per node: redis-py's own default is higher)
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
_REPLY_LOST = (RedisConnectionError, RedisTimeoutError, OSError)
_T = TypeVar("_T")


class RedisCalls:
    """The connection, reads sent again after a lost answer, and writes that run once."""

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
            # redis-py's default of 100 is refused (MaxConnectionsError), not waited for:
            # pings, timers and the delivery worker's attempts share the pool
            max_connections=MAX_CONNECTIONS,
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
                f"Redis at {safe_url(self.url)} is unreachable: {exc}"
            ) from exc

    def _unavailable(self, exc: BaseException) -> StateUnavailable:
        return StateUnavailable(
            f"Redis at {safe_url(self.url)} is unavailable: {type(exc).__name__}: {exc}")

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
                raise_first_error(await pipe.execute(raise_on_error=False))
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
                f"Redis at {safe_url(self.url)} did not answer for {RESOLVE_PATIENCE_S:g} s "
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


def raise_first_error(results: Sequence[Any]) -> None:
    for result in results:
        if isinstance(result, Exception):
            raise result


def _never_sent(exc: BaseException) -> bool:
    """The call failed while connecting, or found no connection free in the pool: nothing of
    it reached Redis (redis-py's words)."""
    if isinstance(exc, MaxConnectionsError):
        return True
    text = str(exc)
    return isinstance(exc, RedisConnectionError | RedisTimeoutError) and (
        "connecting to" in text or "Timeout connecting" in text)


def safe_url(url: str) -> str:
    """The URL without its password, for messages."""
    if "@" not in url:
        return url
    scheme, _, rest = url.partition("://")
    return f"{scheme}://***@{rest.rpartition('@')[2]}"
