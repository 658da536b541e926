"""The memory backend's own promise: state survives a clean restart through the snapshot,
and a crash through the journal (tests/test_faults_memory.py kills a real process)."""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Mapping
from pathlib import Path

import pytest

from geopush.devices import Consent, ConsentChange, DeviceProfile, ErasureRecord
from geopush.engine import DeviceOutcome, DeviceSnapshot, Engine
from geopush.geo.index import GeofenceIndex
from geopush.geo.model import DeviceState, Ping, Stay
from geopush.geo.transitions import Tracker
from geopush.state.memory import MemoryStore, SnapshotError

T0 = 1_780_000_000.0
SHOP = (48.1374, 11.5755)
FAR = (48.1500, 11.6000)
ENGINE = Engine(Tracker(
    GeofenceIndex([SHOP[0]], [SHOP[1]], [100.0], ids=["node/1"], store_ids=["store-1"]),
    stale_after_s=7200.0, min_visit_s=300.0, dwell_plan=lambda _fid: (600.0,),
    pings_per_minute=120,
))


def _profile(device_id: str) -> DeviceProfile:
    return DeviceProfile(device_id=device_id, consent=Consent(location=True, marketing=True),
                         push_token="tok", locale="de-DE", attributes={"tier": "gold"},
                         segments=["regular"], created_at=T0 - 100, updated_at=T0 - 50)


async def _ping(store: MemoryStore, device_id: str, ts: float, where: tuple[float, float]
                ) -> list[str]:
    pings = [Ping(device_id, ts, *where)]
    outcome = (await store.track([device_id], lambda s: ENGINE.ingest(pings, s)))[device_id]
    return [e.type for e in outcome.events]


async def test_snapshot_round_trip_through_close_and_open(tmp_path: Path) -> None:
    path = tmp_path / "state" / "snapshot.json"
    before = MemoryStore(path)
    await before.open()  # no snapshot yet: starts empty
    change = ConsentChange(at=T0 - 100, location=True, marketing=True, source="PUT")
    for device_id in ("walker", "visitor"):
        await before.put_profile(_profile(device_id), change)
    assert await _ping(before, "walker", T0, SHOP) == ["enter"]
    for ts, where in ((T0, SHOP), (T0 + 400, SHOP), (T0 + 500, FAR)):
        await _ping(before, "visitor", ts, where)
    record = ErasureRecord(device_hash="ab" * 32, erased_at=T0, last_consent=Consent())
    await before.put_profile(_profile("gone"), None)
    await before.erase("gone", record)
    await before.close()
    # compacted: no journal and no temporary file left, the lock file stays (see StateFiles)
    assert sorted(p.name for p in path.parent.iterdir()) == ["snapshot.json",
                                                              "snapshot.json.lock"]

    after = MemoryStore(path)
    await after.open()
    for device_id in ("walker", "visitor"):
        assert await after.get_profile(device_id) == _profile(device_id)
        assert await after.consent_history(device_id) == [change]
        assert await after.visits(device_id) == await before.visits(device_id)
    assert len(await after.visits("visitor")) == 1
    assert await after.erasure_record(record.device_hash) == record
    assert await after.get_profile("gone") is None
    # the open stay and its timer came back: no second enter, the dwell is still due
    assert await after.claim_due(T0 + 599, 10, 30) == []
    assert await after.claim_due(T0 + 600, 10, 30) == ["walker"]
    assert await _ping(after, "walker", T0 + 700, SHOP) == ["dwell"]


async def test_no_snapshot_path_writes_nothing(tmp_path: Path) -> None:
    store = MemoryStore(None)
    await store.open()
    await store.put_profile(_profile("d"), None)
    await store.close()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("content", [
    b"{not json",
    b"[1, 2, 3]",
    b'{"format": 1, "profiles": {}}',
    b'{"format": 1, "profiles": {"d": {"device_id": "d", "platform": "nokia"}}, "consent": {},'
    b' "tracks": {}, "visits": {}, "timers": {}, "erasures": {}}',
    b'{"format": 1, "profiles": {}, "consent": {}, "tracks": {"d": {"state": 3}},'
    b' "visits": {}, "timers": {}, "erasures": {}}',
])
async def test_a_corrupt_snapshot_is_a_clear_error_naming_the_file(
    tmp_path: Path, content: bytes,
) -> None:
    path = tmp_path / "snapshot.json"
    path.write_bytes(content)
    with pytest.raises(SnapshotError, match=r"snapshot\.json: cannot read the state snapshot"):
        await MemoryStore(path).open()


async def test_compute_failing_halfway_leaves_the_state_as_it_was() -> None:
    store = MemoryStore()
    await store.put_profile(_profile("d"), None)
    assert await _ping(store, "d", T0, SHOP) == ["enter"]

    def half_then_boom(snaps: Mapping[str, DeviceSnapshot]) -> dict[str, DeviceOutcome]:
        ENGINE.ingest([Ping("d", T0 + 60, *FAR)], snaps)  # mutates the state it was given
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        await store.track(["d"], half_then_boom)
    assert await _ping(store, "d", T0 + 120, FAR) == ["exit"]  # the stay was still open


async def _stored_state(store: MemoryStore, device_id: str) -> DeviceState:
    def peek(snaps: Mapping[str, DeviceSnapshot]) -> dict[str, DeviceOutcome]:
        state = snaps[device_id].state
        assert state is not None
        seen.append(copy.deepcopy(state))
        return {}

    seen: list[DeviceState] = []
    await store.track([device_id], peek)
    return seen[0]


def _scribble(state: DeviceState) -> None:
    """Change every field of the state and of its stays in place."""
    state.last_ts = -1.0
    state.bucket_empty_ts = -1.0
    state.recent.append((1.0, 2.0, 3.0))
    state.recent = []
    for stay in state.stays.values():
        for f in dataclasses.fields(Stay):
            value = getattr(stay, f.name)
            if isinstance(value, list):
                value.append(1.0)
            else:
                setattr(stay, f.name, "scribbled")
    state.stays["extra"] = Stay("extra", "s", 1.0, 1.0, 0.0, 0.0, 0.0, None)
    state.stays.pop("node/1", None)
    state.due = math.inf  # the tracker's timer cache: "nothing ever due"


@pytest.mark.parametrize("fail", [True, False])
async def test_a_state_compute_changed_in_place_is_put_back_unless_it_is_written(
        fail: bool) -> None:
    store = MemoryStore()
    await store.put_profile(_profile("d"), None)
    assert await _ping(store, "d", T0, SHOP) == ["enter"]
    assert await _ping(store, "d", T0 + 700, SHOP) == ["dwell"]
    before = await _stored_state(store, "d")
    assert before.stays and before.stays["node/1"].dwells_fired == [600.0]
    assert before.bucket_empty_ts is not None

    def scribble(snaps: Mapping[str, DeviceSnapshot]) -> dict[str, DeviceOutcome]:
        state = snaps["d"].state
        assert state is not None
        _scribble(state)
        if fail:
            raise RuntimeError("boom")
        return {"d": DeviceOutcome(None)}  # nothing to write: the changes are not kept

    if fail:
        with pytest.raises(RuntimeError):
            await store.track(["d"], scribble)
    else:
        await store.track(["d"], scribble)
    assert await _stored_state(store, "d") == before
    # the timer cache went back too: the stay still goes stale 2 h after its last ping
    assert await _ping(store, "d", T0 + 700 + 7200, SHOP) == ["exit", "enter"]
    assert await _ping(store, "d", T0 + 7960, FAR) == ["exit"]


def test_the_saved_fields_are_every_field_of_a_state() -> None:
    # MemoryStore.track saves these before compute may change them: a new field needs saving
    assert [f.name for f in dataclasses.fields(DeviceState) if f.compare] == [
        "last_ts", "stays", "recent", "bucket_empty_ts"]
    # the rest is the tracker's timer cache, which a restore clears rather than saves
    assert [f.name for f in dataclasses.fields(DeviceState) if not f.compare] == [
        "due", "due_plan"]
    assert [f.name for f in dataclasses.fields(Stay)] == [
        "geofence_id", "store_id", "enter_ts", "confirmed_ts", "lat", "lon", "distance_m",
        "speed_mps", "dwells_fired"]


async def test_the_snapshot_is_readable_by_its_owner_only(tmp_path: Path) -> None:
    """It holds push tokens, profiles and consent, as the journal does (0600 both)."""
    import stat

    from geopush.state.memory import MemoryStore as Store

    path = tmp_path / "state.json"
    state = Store(path)
    await state.open()
    await state.close()  # a clean stop writes the snapshot
    assert stat.S_IMODE(path.stat().st_mode) & 0o077 == 0
