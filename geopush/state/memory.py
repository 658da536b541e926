"""The `memory` backend: one process, plain dicts, a JSON snapshot across clean restarts.

Atomicity is free here: `track` reads, computes and writes with no `await` in between, so no
other task can touch a device meanwhile.
"""

from __future__ import annotations

import heapq
import os
from collections.abc import Collection
from pathlib import Path

import orjson
from pydantic import ValidationError

from geopush.devices import ConsentChange, DeviceProfile, ErasureRecord
from geopush.engine import DeviceOutcome, DeviceSnapshot
from geopush.errors import GeopushError
from geopush.geo.model import DeviceState, Stay, Visit
from geopush.state.base import Compute, ProfileEdit, ProfileWrite, StateStore, StoredTrack
from geopush.state.codec import track_from_json, track_to_json, visit_from_json, visit_to_json
from geopush.state.keys import VISITS_KEPT

SNAPSHOT_FORMAT = 1


class SnapshotError(GeopushError):
    """The memory backend's snapshot file cannot be read; the service refuses to start."""

    code = "snapshot_error"


class MemoryStore(StateStore):
    def __init__(self, snapshot_path: Path | None = None) -> None:
        self.snapshot_path = snapshot_path
        self._profiles: dict[str, DeviceProfile] = {}
        self._consent: dict[str, list[ConsentChange]] = {}
        self._tracks: dict[str, tuple[DeviceState, float | None]] = {}
        self._visits: dict[str, list[Visit]] = {}
        self._erasures: dict[str, ErasureRecord] = {}
        self._timers = _Timers()
        self._config: tuple[int, bytes] | None = None  # one process: nobody else to tell

    # -- lifecycle -------------------------------------------------------------------------

    async def open(self) -> None:
        if self.snapshot_path is not None and self.snapshot_path.exists():
            self._load(self.snapshot_path)

    async def close(self) -> None:
        if self.snapshot_path is not None:
            self._save(self.snapshot_path)

    async def healthy(self) -> bool:
        return True

    # -- devices ---------------------------------------------------------------------------

    async def get_profile(self, device_id: str) -> DeviceProfile | None:
        return self._profiles.get(device_id)

    async def update_profile(self, device_id: str, edit: ProfileEdit) -> ProfileWrite | None:
        # read, edit and write with no await in between: no other task can write meanwhile
        write = edit(self._profiles.get(device_id))
        if write is None:
            return None
        profile = write.profile
        if profile.device_id != device_id:
            raise ValueError(f"edit of {device_id!r} returned the profile of {profile.device_id!r}")
        self._profiles[device_id] = profile
        if write.change is not None:
            self._consent.setdefault(device_id, []).append(write.change)
        if not profile.consent.location:
            # revoked (or never given): stays and timers end silently, no exit events
            self._tracks.pop(device_id, None)
            self._timers.discard(device_id)
        return write

    async def consent_history(self, device_id: str) -> list[ConsentChange]:
        return list(self._consent.get(device_id, ()))

    async def visits(self, device_id: str) -> list[Visit]:
        return list(self._visits.get(device_id, ()))

    async def erase(self, device_id: str, record: ErasureRecord) -> bool:
        known = False
        for table in (self._profiles, self._consent, self._tracks, self._visits):
            known = table.pop(device_id, None) is not None or known
        known = self._timers.discard(device_id) or known
        if known:
            self._erasures[record.device_hash] = record
        return known

    async def erasure_record(self, device_hash: str) -> ErasureRecord | None:
        return self._erasures.get(device_hash)

    # -- tracking --------------------------------------------------------------------------

    async def track(self, device_ids: Collection[str], compute: Compute) -> dict[str, DeviceOutcome]:
        snapshots = {}
        saved: list[_Saved] = []
        tracks = self._tracks
        profiles = self._profiles
        for device_id in device_ids:
            stored = tracks.get(device_id)
            if stored is None:
                snapshots[device_id] = DeviceSnapshot(profiles.get(device_id), None)
                continue
            # compute gets the stored state itself and may mutate it: what it can change is
            # saved first, and put back if it fails or writes no new state for the device
            state = stored[0]
            saved.append(_Saved(device_id, state))
            snapshots[device_id] = DeviceSnapshot(profiles.get(device_id), state)
        try:
            outcomes = dict(compute(snapshots))
        except BaseException:
            for undo in saved:
                undo.restore()
            raise
        for undo in saved:
            outcome = outcomes.get(undo.device_id)
            if outcome is None or outcome.state is not undo.state:
                undo.restore()
        for device_id, outcome in outcomes.items():
            if outcome.state is None:
                stored = tracks.get(device_id)
                self._timers.set(device_id, stored[1] if stored is not None else None)
                continue
            tracks[device_id] = (outcome.state, outcome.next_due)
            if outcome.visits:
                kept = self._visits.setdefault(device_id, [])
                kept.extend(outcome.visits)
                del kept[:-VISITS_KEPT]
            self._timers.set(device_id, outcome.next_due)
        return outcomes

    async def stored_track(self, device_id: str) -> StoredTrack:
        state, next_due = self._tracks.get(device_id, (None, None))
        return StoredTrack(state, next_due, self._timers.due(device_id), None)

    async def claim_due(self, now: float, limit: int, lease_s: float) -> list[str]:
        return self._timers.claim(now, limit, lease_s)

    # -- the published configuration -------------------------------------------------------

    async def publish_config(self, payload: bytes) -> int:
        serial = (self._config[0] if self._config is not None else 0) + 1
        self._config = (serial, payload)
        return serial

    async def config_serial(self) -> int:
        return self._config[0] if self._config is not None else 0

    async def published_config(self) -> tuple[int, bytes] | None:
        return self._config

    # -- snapshot --------------------------------------------------------------------------

    def _save(self, path: Path) -> None:
        data = {
            "format": SNAPSHOT_FORMAT,
            "profiles": {d: p.model_dump(mode="json") for d, p in self._profiles.items()},
            "consent": {d: [c.model_dump(mode="json") for c in trail]
                        for d, trail in self._consent.items()},
            "tracks": {d: track_to_json(s, due) for d, (s, due) in self._tracks.items()},
            "visits": {d: [visit_to_json(v) for v in vs] for d, vs in self._visits.items()},
            "timers": self._timers.as_dict(),
            "erasures": {h: r.model_dump(mode="json") for h, r in self._erasures.items()},
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        # write aside and rename: a crash mid-write leaves the previous snapshot intact
        with open(tmp, "wb") as f:
            f.write(orjson.dumps(data))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    def _load(self, path: Path) -> None:
        try:
            data = orjson.loads(path.read_bytes())
            if not isinstance(data, dict) or data.get("format") != SNAPSHOT_FORMAT:
                raise ValueError(f"expected a geopush state snapshot (format {SNAPSHOT_FORMAT})")
            profiles = {d: DeviceProfile.model_validate(p) for d, p in data["profiles"].items()}
            consent = {d: [ConsentChange.model_validate(c) for c in trail]
                       for d, trail in data["consent"].items()}
            tracks = {d: track_from_json(t) for d, t in data["tracks"].items()}
            visits = {d: [visit_from_json(d, v) for v in vs] for d, vs in data["visits"].items()}
            timers = {str(d): float(t) for d, t in data["timers"].items()}
            erasures = {h: ErasureRecord.model_validate(r) for h, r in data["erasures"].items()}
        except (OSError, ValueError, ValidationError, KeyError, TypeError, IndexError,
                AttributeError) as exc:
            raise SnapshotError(
                f"{path}: cannot read the state snapshot ({type(exc).__name__}: {exc}); "
                "move the file away to start with empty state"
            ) from None
        self._profiles, self._consent, self._tracks = profiles, consent, tracks
        self._visits, self._erasures = visits, erasures
        self._timers = _Timers()
        for device_id, due in timers.items():
            self._timers.set(device_id, due)


class _Timers:
    """device id → due time, with a heap to find the due ones without scanning every device."""

    def __init__(self) -> None:
        self._due: dict[str, float] = {}
        self._heap: list[tuple[float, str]] = []  # may hold outdated entries; checked on pop

    def set(self, device_id: str, due: float | None) -> None:
        if due is None:
            self.discard(device_id)
            return
        if self._due.get(device_id) == due:
            return
        self._due[device_id] = due
        heapq.heappush(self._heap, (due, device_id))
        if len(self._heap) > 2 * len(self._due) + 64:
            self._heap = [(t, d) for d, t in self._due.items()]
            heapq.heapify(self._heap)

    def discard(self, device_id: str) -> bool:
        return self._due.pop(device_id, None) is not None

    def due(self, device_id: str) -> float | None:
        return self._due.get(device_id)

    def claim(self, now: float, limit: int, lease_s: float) -> list[str]:
        claimed: list[str] = []
        heap = self._heap
        while heap and heap[0][0] <= now and len(claimed) < limit:
            due, device_id = heapq.heappop(heap)
            if self._due.get(device_id) != due:
                continue  # outdated heap entry
            del self._due[device_id]
            claimed.append(device_id)
        for device_id in claimed:
            # leased, not removed: if the caller never commits, the timer comes back
            self.set(device_id, now + lease_s)
        return claimed

    def as_dict(self) -> dict[str, float]:
        return dict(self._due)


class _Saved:
    """A stored state's fields and its stays' fields, copied shallowly (lists copied) before
    compute may change them in place: much cheaper than copying the state for every device
    of every batch, and restored only in the rare case compute fails or writes nothing."""

    __slots__ = ("device_id", "last_ts", "recent", "state", "stays")

    def __init__(self, device_id: str, state: DeviceState) -> None:
        self.device_id = device_id
        self.state = state
        self.last_ts = state.last_ts
        self.recent = state.recent[:]
        self.stays = (
            [(s, s.geofence_id, s.store_id, s.enter_ts, s.confirmed_ts, s.lat, s.lon,
              s.distance_m, s.speed_mps, s.dwells_fired[:]) for s in state.stays.values()]
            if state.stays else None)

    def restore(self) -> None:
        state = self.state
        state.last_ts = self.last_ts
        state.recent = self.recent
        state.due = None  # the tracker's cache, worked out again from the restored stays
        stays: dict[str, Stay] = {}
        for (stay, geofence_id, store_id, enter_ts, confirmed_ts, lat, lon, distance_m,
             speed_mps, dwells_fired) in self.stays or ():
            stay.geofence_id, stay.store_id, stay.enter_ts = geofence_id, store_id, enter_ts
            stay.confirmed_ts, stay.lat, stay.lon = confirmed_ts, lat, lon
            stay.distance_m, stay.speed_mps, stay.dwells_fired = distance_m, speed_mps, dwells_fired
            stays[geofence_id] = stay
        state.stays = stays
