"""Pings → state store → engine, for both POST /v1/pings and the /v1/stream WebSocket.

Each ping is validated on its own (a bad one is rejected `invalid`, the rest goes on). The valid
pings of requests that arrive together are then run as one group: one `track` call (one Redis
round trip, one index query) for many small requests, the way databases group commits. A group
never holds two requests with a device in common, so every device's outcome belongs to exactly
one request and each request's answer is what it would be alone. One group at a time is in the
store; the next gathers the requests that arrive meanwhile, so groups grow with the load.

A request sent with a device token (geopush.tokens) speaks for that device alone. Its pings for
any other device are rejected `forbidden` here, before anything is read, so nothing of another
device is read or revealed; a request of only such pings is refused whole (403). Whether the
token is still the device's current one is decided in the group's compute, on the device's
snapshot (its nonce is read with the profile and track, in the same round trip): as a group
never holds two requests with a device in common, one map device → the nonce its request
carries does for the whole group. A request whose token was revoked and that had nothing
accepted is refused whole (401).

FAIRNESS. A group's compute runs on the event loop in one go, and groups went in arrival order,
so a phone's single ping waited behind every batch queued before it: one client posting
1000-ping batches on 8 connections took other clients' p99 from a few ms to ~440 ms
(benchmarks/bench_fairness.py). Now:
- a request of more than a share (BULK_SHARE_PINGS) is cut, by device (a device's pings stay
  together, so its order holds), into parts that go into groups like separate requests;
- a group takes at most a share of one credential's parts larger than SMALL_PART_PINGS, so a
  flood's part of every group, hence of every compute on the loop, is bounded. The share is the
  memory backend's; with Redis a group spends most of its time waiting for Redis, with the loop
  free, and each group costs round trips, so there it is a whole batch (REDIS_SHARE_PINGS);
- a group of small parts only may go to the store while a group of bulk is there, when the two
  share no device (the express lane, EXPRESS_FLUSHING): a phone's ping waits for the store's
  round trips, not for a flood's;
- a part joins the OLDEST queued group with room that follows every group holding one of its
  devices (not the newest), so it never overtakes an earlier ping of its own devices; a small
  part that would land in a group carrying bulk goes instead into a group of small parts at
  the head of the queue, the next to start;
- a credential's big requests are validated one at a time, in chunks, the loop taken back
  between them (eight at once would each parse in the same loop turns).
A request cut into parts is one commit per part: if some fail (the store unreachable) and others
commit, the failed parts' pings are rejected `unavailable` (send them again), as on a Redis
Cluster node failure; a 503 only when none committed.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import AsyncIterator, Callable, Collection, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from operator import attrgetter
from typing import Any

from geopush.engine import REVOKED, DeviceOutcome, DeviceSnapshot, Engine, Rejected, WeatherAt
from geopush.errors import Forbidden, Unauthorized
from geopush.geo.model import Event, Ping
from geopush.logs import fields
from geopush.metrics import Metrics
from geopush.pings import PingError, parse
from geopush.service.decisions import OnDecided, report
from geopush.state.base import PartlyUnavailable, StateStore, StateUnavailable
from geopush.timeutil import format_ts
from geopush.tokens import DeviceToken

log = logging.getLogger("geopush.service.ingest")

MAX_GROUP_PINGS = 2000  # a group's latency grows with its size; requests beyond wait for the next
MAX_FLUSHING = 1  # groups in the state store at once; the next one gathers requests meanwhile
# ... and a group of small parts beside them (FAIRNESS): with Redis a group of bulk that decides
# makes several round trips and a commit per deciding device, a second or more in which a
# phone's single ping queued behind it would wait (benchmarks/bench_delivery.py: p99 1.8-2.7 s)
EXPRESS_FLUSHING = 1
# FAIRNESS (above): the biggest piece of one flood's work on the loop bounds what a phone's
# single ping waits behind. bench_fairness.py: shares of 150 pings left the victims' p99 at 2.4×
# their unloaded figure, 75 at 1.7-1.9×, 50 at 1.5×; memory batches went from 170,000 to
# 147,000 pings/s (bench_http.py), far above their target of 100,000.
CHUNK_PINGS = 50  # a big request's pings validated between two turns of the loop
BULK_SHARE_PINGS = 50
REDIS_SHARE_PINGS = 1000  # bench_http: shares of 150 took Redis batches from 69,000 to 47,000/s
SMALL_PART_PINGS = 10  # parts up to this size never count against a share
REPORT_SLICE = 25  # outcomes whose decisions are told of (logged, counted) in one loop turn
# names no other device and says nothing of it: the same for an id that exists and one that does not
_NOT_YOURS = "a device token may send pings for its own device only"


@dataclass(slots=True)
class IngestResult:
    accepted: int = 0
    rejected: list[Rejected] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        return {
            "accepted": self.accepted,
            "rejected": [{"index": r.index, "code": r.code, "message": r.message}
                         for r in self.rejected],
            "events": [event_json(e) for e in self.events],
        }


def event_json(event: Event) -> dict[str, Any]:
    return {"device_id": event.device_id, "geofence_id": event.geofence_id,
            "store_id": event.store_id, "type": event.type, "ts": format_ts(event.ts)}


_by_index = attrgetter("index")
_by_ts = attrgetter("ts")


class _Part:
    """One request's valid pings inside a group (or a share of them, FAIRNESS)."""

    __slots__ = ("devices", "done", "pings", "positions", "received", "source", "token")

    def __init__(self, pings: list[Ping], positions: list[int], devices: set[str],
                 source: str = "") -> None:
        self.received = 0.0  # the clock at receipt, for `late` (contract §5)
        self.pings = pings
        self.positions = positions
        self.devices = devices
        self.source = source  # the credential: a group holds a bounded share of each
        self.token: DeviceToken | None = None  # the request's device token, if any
        self.done: asyncio.Future[dict[str, DeviceOutcome]] = (
            asyncio.get_running_loop().create_future())


class _Group:
    __slots__ = ("bulk", "devices", "nonces", "parts", "size")

    def __init__(self) -> None:
        self.parts: list[_Part] = []
        self.devices: set[str] = set()
        self.size = 0
        self.bulk: dict[str, int] = {}  # credential → pings of its parts beyond SMALL_PART_PINGS
        self.nonces: dict[str, str] = {}  # device → the nonce its request's token carries

    def takes(self, part: _Part, size: int, share: int) -> bool:
        if not self.parts:
            return True
        if self.size + size > MAX_GROUP_PINGS:
            return False
        if size <= SMALL_PART_PINGS:
            return True
        # a group of small parts stays one: it may go by the express lane, and its phones'
        # pings would otherwise wait for a share of bulk to be read, decided and written
        return bool(self.bulk) and self.bulk.get(part.source, 0) + size <= share


class _Turns:
    """One lock per credential, kept only while someone holds or waits for it (credentials
    are per device with device tokens: the table must not grow with every device seen)."""

    def __init__(self) -> None:
        self._locks: dict[str, tuple[asyncio.Lock, list[int]]] = {}

    @asynccontextmanager
    async def turn(self, source: str) -> AsyncIterator[None]:
        entry = self._locks.get(source)
        if entry is None:
            entry = self._locks[source] = (asyncio.Lock(), [0])
        lock, users = entry
        users[0] += 1
        try:
            async with lock:
                yield
        finally:
            users[0] -= 1
            if not users[0]:
                del self._locks[source]

    def __len__(self) -> int:
        return len(self._locks)


class Ingestor:
    def __init__(self, store: StateStore, engine: Callable[[], Engine], metrics: Metrics, *,
                 share_pings: int | None = None, weather: WeatherAt | None = None,
                 on_decided: OnDecided | None = None) -> None:
        """`share_pings`: a credential's pings per group (FAIRNESS; default BULK_SHARE_PINGS).
        `weather`: where decisions read the weather (an in-process copy: never the network)."""
        self._store = store
        self._weather = weather
        self._on_decided = on_decided
        self._share = share_pings if share_pings is not None else BULK_SHARE_PINGS
        self._engine = engine  # the engine of the active stores (a reload swaps it)
        self._metrics = metrics
        self._queued: deque[_Group] = deque()  # groups waiting for their turn, oldest first
        self._flushing: dict[asyncio.Task[None], _Group] = {}  # groups in the store
        self._reporting: set[asyncio.Task[None]] = set()  # decisions told of a slice at a time
        self._failing = False  # the last group's commit failed: the store may be down
        self._turns = _Turns()

    async def ingest(self, items: Sequence[Any], now: float, source: str = "", *,
                     token: DeviceToken | None = None) -> IngestResult:
        """StateUnavailable propagates (503 for HTTP, an error answer on the stream) when
        nothing was committed. `source` names the credential (FAIRNESS). With a device `token`
        (its MAC verified): Forbidden when every ping is for another device, Unauthorized when
        the token was revoked and nothing was accepted."""
        result = IngestResult()
        if len(items) > SMALL_PART_PINGS:
            # a credential's big requests are read and queued one at a time (FAIRNESS)
            async with self._turns.turn(source):
                parts = await self._validate(items, now, source, result, token)
                for part in parts:
                    self._join(part)
        else:
            parts = await self._validate(items, now, source, result, token)
            for part in parts:
                self._join(part)
        revoked = False
        if parts:
            outcomes = await self._outcomes(parts)
            for outcome in outcomes.values():
                result.accepted += outcome.accepted
                result.rejected.extend(outcome.rejected)
                result.events.extend(outcome.events)
                # the store saw this request's own device alone: `forbidden` there is revoked
                revoked = revoked or (token is not None and any(
                    r.code == "forbidden" for r in outcome.rejected))
            if len(result.rejected) > 1:
                result.rejected.sort(key=_by_index)
            if len(result.events) > 1:
                result.events.sort(key=_by_ts)
            self._metrics.count_events(result.events, "ping")
            if result.events and log.isEnabledFor(logging.DEBUG):
                for e in result.events:
                    log.debug("event", extra=fields(
                        device_id=e.device_id, type=e.type, geofence_id=e.geofence_id,
                        ts=format_ts(e.ts), source="ping"))
        self._metrics.count_pings(result.accepted, result.rejected)
        if revoked and not result.accepted:
            raise Unauthorized(REVOKED)
        return result

    async def _validate(self, items: Sequence[Any], now: float, source: str,
                        result: IngestResult, token: DeviceToken | None) -> list[_Part]:
        """The valid pings as parts (invalid ones, and under a device token those of other
        devices, rejected into `result`)."""
        valid: list[Ping] = []
        positions: list[int] = []
        others = 0
        for i, obj in enumerate(items):
            if token is not None and isinstance(obj, dict):
                claimed = obj.get("device_id")
                if isinstance(claimed, str) and claimed != token.device_id:
                    others += 1
                    result.rejected.append(Rejected(i, "forbidden", _NOT_YOURS))
                    continue
            try:
                valid.append(parse(obj, now))
                positions.append(i)
            except PingError as exc:
                result.rejected.append(Rejected(i, "invalid", exc.message))
            if i % CHUNK_PINGS == CHUNK_PINGS - 1 and i + 1 < len(items):
                await asyncio.sleep(0)  # a big request lets the loop serve others meanwhile
        if token is not None and others and others == len(items):
            self._metrics.count_pings(0, result.rejected)
            raise Forbidden(f"a device token speaks for its own device only: all {others} "
                            "ping(s) of this request are for another device")
        parts = _cut(valid, positions, source, self._share) if valid else []
        for part in parts:
            part.token = token
            part.received = now
        return parts

    async def _outcomes(self, parts: list[_Part]) -> dict[str, DeviceOutcome]:
        """The parts' outcomes, once their groups are through the store."""
        if len(parts) == 1:
            try:
                return await parts[0].done
            except StateUnavailable:
                self._metrics.state_unavailable.labels("track").inc()
                raise
        results = await asyncio.gather(*(part.done for part in parts), return_exceptions=True)
        outcomes: dict[str, DeviceOutcome] = {}
        failed: list[_Part] = []
        unavailable: StateUnavailable | None = None
        for part, got in zip(parts, results, strict=True):
            if isinstance(got, StateUnavailable):
                failed.append(part)
                unavailable = got
            elif isinstance(got, BaseException):
                raise got
            else:
                outcomes.update(got)
        if unavailable is not None:
            self._metrics.state_unavailable.labels("track").inc()
            if len(failed) == len(parts):
                raise unavailable
            for part in failed:
                outcomes.update(_unavailable(part, "the state of this device could not be "
                                                   "written (the state store failed)"))
        return outcomes

    def _join(self, part: _Part) -> asyncio.Future[dict[str, DeviceOutcome]]:
        size = len(part.pings)
        group: _Group | None = None
        behind = False  # a queued group holds one of its devices
        for queued in reversed(self._queued):  # newest first
            if not queued.devices.isdisjoint(part.devices):
                behind = True
                break  # an earlier ping of one of its devices: go after it
            if queued.takes(part, size, self._share):
                group = queued  # the oldest with room so far
        if size <= SMALL_PART_PINGS and not behind and (group is None or group.bulk):
            # a small part goes first: into a group of small parts at the head of the
            # queue, the next to start, rather than one that carries a share of bulk
            head = self._queued[0] if self._queued else None
            if head is not None and not head.bulk and head.takes(part, size, self._share):
                group = head
            else:
                group = _Group()
                self._queued.appendleft(group)
                asyncio.get_running_loop().call_soon(self._launch)
        elif group is None:
            group = _Group()
            self._queued.append(group)
            # run once every request already received in this loop iteration has joined
            asyncio.get_running_loop().call_soon(self._launch)
        group.parts.append(part)
        group.devices |= part.devices
        group.size += size
        if part.token is not None:
            group.nonces[part.token.device_id] = part.token.nonce
        if size > SMALL_PART_PINGS:
            group.bulk[part.source] = group.bulk.get(part.source, 0) + size
        return part.done

    def _launch(self) -> None:
        """Start the oldest queued groups while fewer than MAX_FLUSHING run. A group left
        waiting keeps taking requests (up to MAX_GROUP_PINGS), so under load groups grow
        while the store is busy: fewer, bigger commits, and never two of this instance's
        groups competing for one device. While the store fails, groups start at once: one
        after the other, each would wait out the store's timeout behind the previous one."""
        while self._queued and (self._failing or len(self._flushing) < MAX_FLUSHING
                                or self._express(self._queued[0])):
            group = self._queued.popleft()
            task = asyncio.ensure_future(self._flush(group))
            self._flushing[task] = group
            task.add_done_callback(self._flushed)

    def _express(self, group: _Group) -> bool:
        """Whether a group of small parts alone may go to the store beside a group of bulk
        there (FAIRNESS, the express lane). Beside a group of small parts it waits, gathering
        requests, as groups do. It shares no device with the groups there, so they never
        compete for one (and no ping overtakes an earlier one of its device)."""
        return (not group.bulk and len(self._flushing) < MAX_FLUSHING + EXPRESS_FLUSHING
                and all(other.bulk and group.devices.isdisjoint(other.devices)
                        for other in self._flushing.values()))

    def _flushed(self, task: asyncio.Task[None]) -> None:
        self._flushing.pop(task, None)
        self._launch()

    async def _flush(self, group: _Group) -> None:
        pings = [p for part in group.parts for p in part.pings]
        # each device is in one part only, so a part's own indexes identify its rejections
        positions = [i for part in group.parts for i in part.positions]
        engine = self._engine()
        nonces = group.nonces or None
        # `late` is judged from the earliest receipt in the group: no ping is late for having
        # waited in the queue
        received = min(part.received for part in group.parts)
        weather = self._weather

        def compute(snapshots: Mapping[str, DeviceSnapshot]) -> Mapping[str, DeviceOutcome]:
            # the store may call again for only the devices that changed meanwhile
            if len(snapshots) >= len(group.devices):
                return engine.ingest(pings, snapshots, positions=positions, nonces=nonces,
                                     now=received, weather=weather)
            keep = [k for k, p in enumerate(pings) if p.device_id in snapshots]
            return engine.ingest([pings[k] for k in keep], snapshots,
                                 positions=[positions[k] for k in keep], nonces=nonces,
                                 now=received, weather=weather)

        try:
            outcomes = await self._store.track(group.devices, compute)
        except PartlyUnavailable as partly:
            # a Redis Cluster node failed: its devices' pings are rejected `unavailable` (retry
            # them), the rest of each request stands; a request none of whose devices
            # committed gets the error (503: nothing of it was written)
            self._failing = True
            report(partly.committed.values(), self._metrics, "ping", self._on_decided)
            for part in group.parts:
                if part.done.done():
                    continue
                if part.devices <= partly.unavailable:
                    part.done.set_exception(StateUnavailable(partly.message))
                else:
                    part.done.set_result(_partly(part, partly))
            return
        except BaseException as exc:
            self._failing = True
            for part in group.parts:
                if not part.done.done():
                    part.done.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
            return
        self._failing = False
        for part in group.parts:
            if not part.done.done():
                part.done.set_result({d: outcomes[d] for d in part.devices if d in outcomes})
        # after the answers, per group (not per request), a slice at a time: a bulk request's
        # decisions cost a log line each, and others' pings are served in between (FAIRNESS)
        told = [o for o in outcomes.values() if o.decisions]
        if len(told) <= REPORT_SLICE:
            report(told, self._metrics, "ping", self._on_decided)
        else:  # meanwhile the next group goes to the store
            task = asyncio.create_task(self._report_slices(told))
            self._reporting.add(task)
            task.add_done_callback(self._reporting.discard)

    async def _report_slices(self, told: list[DeviceOutcome]) -> None:
        for start in range(0, len(told), REPORT_SLICE):
            if start:
                await asyncio.sleep(0)
            report(told[start:start + REPORT_SLICE], self._metrics, "ping", self._on_decided)

    @property
    def backlog(self) -> int:
        """Groups waiting for their turn: pings the service is behind on (the delivery worker
        starts fewer attempts meanwhile, so that sends never hold pings back)."""
        return len(self._queued)


def _partly(part: _Part, partly: PartlyUnavailable) -> dict[str, DeviceOutcome]:
    """The outcomes of a request part of which some devices could not commit: theirs hold
    only their pings, rejected `unavailable`."""
    outcomes = {d: partly.committed[d] for d in part.devices if d in partly.committed}
    outcomes.update(_unavailable(part, "the state of this device could not be written (a "
                                       "Redis node failed)", partly.unavailable))
    return outcomes


def _unavailable(part: _Part, why: str, devices: Collection[str] | None = None
                 ) -> dict[str, DeviceOutcome]:
    """Outcomes rejecting the part's pings (of `devices`, default all) `unavailable`."""
    outcomes: dict[str, DeviceOutcome] = {}
    for ping, at in zip(part.pings, part.positions, strict=True):
        if devices is None or ping.device_id in devices:
            outcome = outcomes.setdefault(ping.device_id, DeviceOutcome(None))
            outcome.rejected.append(Rejected(
                at, "unavailable", f"{why}; nothing of it was stored: send the ping again"))
    return outcomes


def _cut(pings: list[Ping], positions: list[int], source: str, share: int) -> list[_Part]:
    """A request's valid pings as parts of at most `share` pings (FAIRNESS), each device's
    pings in one part (a device with more makes a bigger part of its own), in input order."""
    if len(pings) <= share:
        return [_Part(pings, positions, {p.device_id for p in pings}, source)]
    counts: dict[str, int] = {}
    for p in pings:
        counts[p.device_id] = counts.get(p.device_id, 0) + 1
    home: dict[str, int] = {}  # device → its part
    sizes: list[int] = [0]
    for device, count in counts.items():
        if sizes[-1] and sizes[-1] + count > share:
            sizes.append(0)
        home[device] = len(sizes) - 1
        sizes[-1] += count
    cut: list[tuple[list[Ping], list[int], set[str]]] = [([], [], set()) for _ in sizes]
    for p, at in zip(pings, positions, strict=True):
        chunk, where, devices = cut[home[p.device_id]]
        chunk.append(p)
        where.append(at)
        devices.add(p.device_id)
    return [_Part(chunk, where, devices, source) for chunk, where, devices in cut]
