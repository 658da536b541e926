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
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from operator import attrgetter
from typing import Any

from geopush.engine import REVOKED, DeviceOutcome, DeviceSnapshot, Engine, Rejected
from geopush.errors import Forbidden, Unauthorized
from geopush.geo.model import Event, Ping
from geopush.logs import fields
from geopush.metrics import Metrics
from geopush.pings import PingError, parse
from geopush.state.base import PartlyUnavailable, StateStore, StateUnavailable
from geopush.timeutil import format_ts
from geopush.tokens import DeviceToken

log = logging.getLogger("geopush.service.ingest")

MAX_GROUP_PINGS = 2000  # a group's latency grows with its size; requests beyond wait for the next
MAX_FLUSHING = 1  # groups in the state store at once; the next one gathers requests meanwhile
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
    """One request's valid pings inside a group."""

    __slots__ = ("devices", "done", "pings", "positions", "token")

    def __init__(self, pings: list[Ping], positions: list[int], devices: set[str],
                 token: DeviceToken | None) -> None:
        self.pings = pings
        self.positions = positions
        self.devices = devices
        self.token = token
        self.done: asyncio.Future[dict[str, DeviceOutcome]] = (
            asyncio.get_running_loop().create_future())


class _Group:
    __slots__ = ("devices", "nonces", "parts", "size")

    def __init__(self) -> None:
        self.parts: list[_Part] = []
        self.devices: set[str] = set()
        self.nonces: dict[str, str] = {}  # device → the nonce its request's token carries
        self.size = 0


class Ingestor:
    def __init__(self, store: StateStore, engine: Callable[[], Engine], metrics: Metrics) -> None:
        self._store = store
        self._engine = engine  # the engine of the active stores (a reload swaps it)
        self._metrics = metrics
        self._pending: _Group | None = None  # the group requests join; queued already
        self._queued: deque[_Group] = deque()  # groups waiting for their turn, oldest first
        self._flushing: set[asyncio.Task[None]] = set()
        self._failing = False  # the last group's commit failed: the store may be down

    async def ingest(self, items: Sequence[Any], now: float, *,
                     token: DeviceToken | None = None) -> IngestResult:
        """StateUnavailable propagates (503 for HTTP, an error answer on the stream). With a
        device `token` (its MAC verified): Forbidden when every ping is for another device,
        Unauthorized when the token was revoked and nothing was accepted."""
        result = IngestResult()
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
        if token is not None and others and others == len(items):
            self._metrics.count_pings(0, result.rejected)
            raise Forbidden(f"a device token speaks for its own device only: all {others} "
                            "ping(s) of this request are for another device")
        revoked = False
        if valid:
            devices = {p.device_id for p in valid}
            try:
                outcomes = await self._join(_Part(valid, positions, devices, token))
            except StateUnavailable:
                self._metrics.state_unavailable.labels("track").inc()
                raise
            for outcome in outcomes.values():
                result.accepted += outcome.accepted
                result.rejected.extend(outcome.rejected)
                # the store saw this request's own device alone: `forbidden` there is revoked
                revoked = revoked or (token is not None and any(
                    r.code == "forbidden" for r in outcome.rejected))
                result.events.extend(outcome.events)
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

    def _join(self, part: _Part) -> asyncio.Future[dict[str, DeviceOutcome]]:
        group = self._pending
        if (group is None or not group.devices.isdisjoint(part.devices)
                or group.size + len(part.pings) > MAX_GROUP_PINGS):
            group = _Group()
            self._pending = group
            self._queued.append(group)
            # run once every request already received in this loop iteration has joined
            asyncio.get_running_loop().call_soon(self._launch)
        group.parts.append(part)
        group.devices |= part.devices
        if part.token is not None:
            group.nonces[part.token.device_id] = part.token.nonce
        group.size += len(part.pings)
        return part.done

    def _launch(self) -> None:
        """Start the oldest queued groups while fewer than MAX_FLUSHING run. A group left
        waiting keeps taking requests (up to MAX_GROUP_PINGS), so under load groups grow
        while the store is busy: fewer, bigger commits, and never two of this instance's
        groups competing for one device. While the store fails, groups start at once: one
        after the other, each would wait out the store's timeout behind the previous one."""
        while self._queued and (self._failing or len(self._flushing) < MAX_FLUSHING):
            group = self._queued.popleft()
            if self._pending is group:
                self._pending = None
            task = asyncio.ensure_future(self._flush(group))
            self._flushing.add(task)
            task.add_done_callback(self._flushed)

    def _flushed(self, task: asyncio.Task[None]) -> None:
        self._flushing.discard(task)
        self._launch()

    async def _flush(self, group: _Group) -> None:
        pings = [p for part in group.parts for p in part.pings]
        # each device is in one part only, so a part's own indexes identify its rejections
        positions = [i for part in group.parts for i in part.positions]
        engine = self._engine()
        nonces = group.nonces or None

        def compute(snapshots: Mapping[str, DeviceSnapshot]) -> Mapping[str, DeviceOutcome]:
            # the store may call again for only the devices that changed meanwhile
            if len(snapshots) >= len(group.devices):
                return engine.ingest(pings, snapshots, positions=positions, nonces=nonces)
            keep = [k for k, p in enumerate(pings) if p.device_id in snapshots]
            return engine.ingest([pings[k] for k in keep], snapshots,
                                 positions=[positions[k] for k in keep], nonces=nonces)

        try:
            outcomes = await self._store.track(group.devices, compute)
        except PartlyUnavailable as partly:
            # a Redis Cluster node failed: its devices' pings are rejected `unavailable` (retry
            # them), the rest of each request stands; a request none of whose devices
            # committed gets the error (503: nothing of it was written)
            self._failing = True
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


def _partly(part: _Part, partly: PartlyUnavailable) -> dict[str, DeviceOutcome]:
    """The outcomes of a request part of which some devices could not commit: theirs hold
    only their pings, rejected `unavailable`."""
    outcomes = {d: partly.committed[d] for d in part.devices if d in partly.committed}
    for ping, at in zip(part.pings, part.positions, strict=True):
        if ping.device_id in partly.unavailable:
            outcome = outcomes.setdefault(ping.device_id, DeviceOutcome(None))
            outcome.rejected.append(Rejected(
                at, "unavailable",
                "the state of this device could not be written (a Redis node failed); "
                "nothing of it was stored: send the ping again"))
    return outcomes
