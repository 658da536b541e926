"""The memory backend's journal (geopush.state.journal): what a crash leaves is replayed, a torn
last record is cut off, records replay twice harmlessly, compaction leaves no erased data on
disk, one process per state files. A crash is simulated by stopping the writer and dropping
the lock without the compaction a clean close does; tests/test_faults_memory.py kills a real
process."""

from __future__ import annotations

import asyncio
import math
from pathlib import Path
from typing import Any

import orjson
import pytest

from geopush.devices import Consent, ConsentChange, DeviceProfile, ErasureRecord
from geopush.errors import InvalidInput
from geopush.geo.model import Ping
from geopush.state import memory
from geopush.state.base import ProfileWrite, StateUnavailable, StoredToken
from geopush.state.codec import track_to_json, visit_to_json
from geopush.state.journal import SnapshotError, frame, read_frames
from geopush.state.memory import MemoryStore
from tests.test_state_memory import ENGINE, FAR, SHOP, T0

SECRET = "pistachio-7f3a9c"


def _profile(device_id: str, *, location: bool = True, **attributes: Any) -> DeviceProfile:
    return DeviceProfile(device_id=device_id, consent=Consent(location=location),
                         attributes=attributes or {"tier": "gold"}, push_token="tok")


def _change(location: bool, at: float = T0) -> ConsentChange:
    return ConsentChange(at=at, location=location, marketing=False, source="PUT")


async def _ping(store: MemoryStore, device_id: str, ts: float,
                where: tuple[float, float] = SHOP) -> None:
    pings = [Ping(device_id, ts, *where)]
    await store.track([device_id], lambda s: ENGINE.ingest(pings, s))


async def _crash(store: MemoryStore) -> None:
    """What SIGKILL leaves: whatever the writer had written; no final compaction."""
    await store.sync()
    writer, files = store._writer, store._files
    assert writer is not None and files is not None
    store._closing = True  # a compaction under way finishes; none starts
    store._compact_wanted.set()
    if store._compactor is not None:
        await store._compactor
    await writer.close()
    files.unlock()
    store._writer = None


def _state(store: MemoryStore) -> dict[str, Any]:
    return {
        "profiles": {d: p.model_dump() for d, p in store._profiles.items()},
        "consent": {d: [c.model_dump() for c in t] for d, t in store._consent.items()},
        "tracks": {d: orjson.loads(orjson.dumps(track_to_json(*t)))
                   for d, t in store._tracks.items()},
        "visits": {d: [visit_to_json(v) for v in vs] for d, vs in store._visits.items()},
        "erasures": {h: r.model_dump() for h, r in store._erasures.items()},
        "timers": store._timers.as_dict(),
    }


async def _reopen(path: Path, **kw: Any) -> MemoryStore:
    store = MemoryStore(path, **kw)
    await store.open()
    return store


async def _some_history(store: MemoryStore) -> None:
    await store.put_profile(_profile("walker"), _change(True))
    await store.put_profile(_profile("visitor"), _change(True))
    await store.put_profile(_profile("gone", flavour=SECRET), _change(True))
    await _ping(store, "walker", T0)
    for ts, where in ((T0, SHOP), (T0 + 400, SHOP), (T0 + 500, FAR)):
        await _ping(store, "visitor", ts, where)
    await _ping(store, "gone", T0)
    await store.erase("gone", ErasureRecord(device_hash="ab" * 32, erased_at=T0 + 1,
                                            last_consent=Consent(location=True)))
    await store.update_profile("visitor", lambda p: ProfileWrite(
        _profile("visitor", location=False), _change(False, T0 + 600)))


async def test_a_crash_loses_nothing_that_was_synced(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    before = await _reopen(path)
    await _some_history(before)
    expected = _state(before)
    await _crash(before)
    assert not path.exists()  # never compacted: everything is in the journal

    after = await _reopen(path)
    assert _state(after) == expected
    assert await after.get_profile("gone") is None
    assert await after.erasure_record("ab" * 32) is not None
    assert [c.location for c in await after.consent_history("visitor")] == [True, False]
    assert len(await after.visits("visitor")) == 1
    assert await after.claim_due(T0 + 600, 10, 30) == ["walker"]  # the timer came back
    await after.close()


async def test_a_profile_write_is_on_disk_when_it_returns_and_pings_within_fsync_every(
        tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    store = await _reopen(path, fsync_every=0.2)
    journal = tmp_path / "state.json.journal.1"
    await store.put_profile(_profile("d1"), _change(True))
    # on disk already, without waiting for anything else
    assert [orjson.loads(p)[0] for p in read_frames(journal, tail_may_tear=True).payloads
            ] == ["P"]
    await _ping(store, "d1", T0)
    await asyncio.sleep(0.35)
    kinds = [orjson.loads(p)[0] for p in read_frames(journal, tail_may_tear=True).payloads]
    assert kinds == ["P", "T"]
    await store.close()


async def test_a_device_token_and_its_revocation_survive_a_crash_and_a_compaction(
        tmp_path: Path) -> None:
    """An answered token write is on disk (a revocation must not come undone), replayed from
    the journal after a crash, kept in the snapshot by a compaction, gone with an erasure."""
    path = tmp_path / "state.json"
    store = await _reopen(path, fsync_every=60.0)  # only durable writes reach the disk soon
    await store.put_profile(_profile("phone-a"), _change(True))
    await store.put_profile(_profile("phone-b"), _change(True))
    await store.set_token("phone-a", StoredToken("first", T0))
    await store.set_token("phone-a", StoredToken("second", T0 + 1))
    await store.set_token("phone-b", StoredToken("b-nonce", T0))
    await store.set_token("phone-b", None)
    # on disk already, without waiting for anything else
    journal = tmp_path / "state.json.journal.1"
    assert [orjson.loads(p)[0] for p in read_frames(journal, tail_may_tear=True).payloads
            ] == ["P", "P", "K", "K", "K", "K"]
    await _crash(store)
    store = await _reopen(path)
    assert await store.stored_token("phone-a") == StoredToken("second", T0 + 1)
    assert await store.stored_token("phone-b") is None
    await store.compact()
    await _crash(store)
    store = await _reopen(path)
    assert await store.stored_token("phone-a") == StoredToken("second", T0 + 1)
    record = ErasureRecord(device_hash="h", erased_at=T0 + 2, last_consent=None)
    assert await store.erase("phone-a", record)
    await store.close()
    store = await _reopen(path)
    assert await store.stored_token("phone-a") is None
    assert b"second" not in path.read_bytes()
    await store.close()


@pytest.mark.parametrize("tail", [
    b"3a2b", b"deadbeef [\"T\",[[\"walker\",", b"00000000 [\"E\",\"walker\",{}]\n", b"\x00" * 512,
])
async def test_a_torn_last_record_is_cut_off_at_start(tmp_path: Path, tail: bytes) -> None:
    path = tmp_path / "state.json"
    before = await _reopen(path)
    await _some_history(before)
    expected = _state(before)
    await _crash(before)
    journal = tmp_path / "state.json.journal.1"
    intact = journal.read_bytes()
    with journal.open("ab") as f:
        f.write(tail)

    after = await _reopen(path)
    assert _state(after) == expected
    assert journal.read_bytes() == intact  # cut back to the last whole record
    await after.put_profile(_profile("new"), None)  # and appended to from there
    await _crash(after)
    again = await _reopen(path)
    assert await again.get_profile("new") is not None
    await again.close()


async def test_a_damaged_record_with_good_ones_after_it_refuses_to_start(
        tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    before = await _reopen(path)
    await _some_history(before)
    await _crash(before)
    journal = tmp_path / "state.json.journal.1"
    lines = journal.read_bytes().split(b"\n")
    lines[1] = lines[1].replace(b"visitor", b"visitoR")  # the checksum no longer matches
    journal.write_bytes(b"\n".join(lines))
    with pytest.raises(SnapshotError, match=r"state\.json\.journal\.1: damaged record at byte "
                                            r"\d+ \(line 2\) with intact records after it"):
        await MemoryStore(path).open()


async def test_replaying_the_journal_twice_ends_in_the_same_state(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    before = await _reopen(path)
    await _some_history(before)
    expected = _state(before)
    await _crash(before)
    journal = tmp_path / "state.json.journal.1"
    journal.write_bytes(journal.read_bytes() * 2)
    twice = await _reopen(path)
    assert _state(twice) == expected
    await twice.close()


async def test_a_snapshot_taken_while_writes_go_on_plus_the_new_journal_is_the_state(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Compaction encodes a chunk at a time; writes between chunks land in the new journal,
    whose whole values, replayed over the snapshot, give the state as it is."""
    monkeypatch.setattr(memory, "SNAPSHOT_CHUNK", 2)
    path = tmp_path / "state.json"
    store = await _reopen(path)
    for i in range(40):
        await store.put_profile(_profile(f"d{i}"), _change(True))
        await _ping(store, f"d{i}", T0)
    stop = asyncio.Event()

    async def churn() -> None:
        n = 0
        while not stop.is_set():
            i = n % 40
            await _ping(store, f"d{i}", T0 + 1 + n, SHOP if n % 2 else FAR)
            if n % 7 == 0:
                await store.erase(f"d{i}", ErasureRecord(device_hash=f"{n:064x}",
                                                         erased_at=T0, last_consent=None))
                await store.put_profile(_profile(f"d{i}"), _change(True, T0 + n))
            n += 1
            await asyncio.sleep(0)

    task = asyncio.create_task(churn())
    await store.compact()
    await asyncio.sleep(0.05)
    stop.set()
    await task
    expected = _state(store)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "state.json", "state.json.journal.2", "state.json.lock"]
    await _crash(store)
    after = await _reopen(path)
    assert _state(after) == expected
    await after.close()


async def test_compaction_after_an_erasure_leaves_nothing_of_the_device_on_disk(
        tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    store = await _reopen(path, erasure_compact_delay_s=0.1)
    await store.put_profile(_profile("gone-7", flavour=SECRET), _change(True))
    await store.put_profile(_profile("kept"), _change(True))
    await _ping(store, "gone-7", T0)
    await store.compact()  # the device is now in the snapshot too

    def on_disk() -> bytes:
        return b"".join(p.read_bytes() for p in tmp_path.iterdir())

    assert SECRET.encode() in on_disk() and b"gone-7" in on_disk()
    await store.erase("gone-7", ErasureRecord(device_hash="cd" * 32, erased_at=T0,
                                              last_consent=Consent(location=True)))
    for _ in range(100):
        if b"gone-7" not in on_disk():
            break
        await asyncio.sleep(0.05)
    data = on_disk()
    assert b"gone-7" not in data and SECRET.encode() not in data
    assert b"cd" * 32 in data and b"kept" in data  # the erasure record and the rest stay
    await _crash(store)
    after = await _reopen(path)
    assert await after.get_profile("gone-7") is None
    assert await after.get_profile("kept") is not None
    await after.close()


async def test_a_crash_after_an_erasure_then_a_restart_compacts_it_away(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    store = await _reopen(path)
    await store.put_profile(_profile("gone-7", flavour=SECRET), _change(True))
    await store.compact()
    await store.erase("gone-7", ErasureRecord(device_hash="cd" * 32, erased_at=T0,
                                              last_consent=None))
    await _crash(store)  # before the compaction the erasure asked for
    after = await _reopen(path)
    for _ in range(100):
        if not any(SECRET.encode() in p.read_bytes() for p in tmp_path.iterdir()):
            break
        await asyncio.sleep(0.05)
    assert not any(b"gone-7" in p.read_bytes() for p in tmp_path.iterdir())
    await after.close()


async def test_the_journal_compacts_once_it_outgrows_the_snapshot(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    store = await _reopen(path, compact_min_bytes=4096)
    await store.put_profile(_profile("d"), _change(True))
    for n in range(200):
        await _ping(store, "d", T0 + n, SHOP if n % 20 < 10 else FAR)
        await asyncio.sleep(0)
    for _ in range(100):
        if path.exists():
            break
        await asyncio.sleep(0.02)
    assert path.exists()
    expected = _state(store)
    await _crash(store)
    assert all(p.stat().st_size < 64 * 1024 for p in tmp_path.iterdir())
    after = await _reopen(path)
    assert _state(after) == expected
    await after.close()


async def test_a_second_store_on_the_same_files_is_refused_until_the_first_closes(
        tmp_path: Path) -> None:
    import os

    path = tmp_path / "state.json"
    first = await _reopen(path)
    with pytest.raises(SnapshotError, match=rf"state\.json: in use by another geopush process "
                                            rf"\(pid {os.getpid()}\)"):
        await MemoryStore(path).open()
    await first.close()
    second = await _reopen(path)
    await second.close()


async def test_the_files_are_verified_without_the_lock_and_left_as_they_are(
        tmp_path: Path) -> None:
    """`geopush check` and serve's start-up check read the files; serve's own open then takes
    the lock (a check that kept it made every serve refuse to start on its own files)."""
    path = tmp_path / "state.json"
    store = await _reopen(path)
    await store.put_profile(_profile("kept"), _change(True))
    journals = {p: p.read_bytes() for p in tmp_path.glob("state.json.journal.*")}
    with (tmp_path / next(iter(journals)).name).open("ab") as f:
        f.write(b"0000")  # a torn tail: open() would cut it, a check must not
    MemoryStore.verify_files(path)  # while the store holds the lock
    assert {p: p.read_bytes() for p in journals} == {p: b + b"0000" for p, b in journals.items()}
    await store.close()
    MemoryStore.verify_files(path)
    again = await _reopen(path)
    assert await again.get_profile("kept") is not None
    await again.close()


@pytest.mark.parametrize("attributes", [{"big": 2 ** 70}, {"nan": math.nan},
                                        {"inf": math.inf}])
async def test_a_profile_that_cannot_be_stored_fails_only_its_own_write(
        tmp_path: Path, attributes: dict[str, Any]) -> None:
    path = tmp_path / "state.json"
    store = await _reopen(path)
    await store.put_profile(_profile("good"), _change(True))
    with pytest.raises(InvalidInput, match="the profile of device 'bad' cannot be stored"):
        await store.put_profile(_profile("bad", **attributes), _change(True))
    assert await store.get_profile("bad") is None
    assert await store.consent_history("bad") == []
    await store.close()
    after = await _reopen(path)
    assert await after.get_profile("good") is not None
    await after.close()


async def test_a_journal_that_cannot_be_written_refuses_every_write(tmp_path: Path) -> None:
    store = await _reopen(tmp_path / "state.json")
    writer = store._writer
    assert writer is not None

    def disk_full(data: bytes) -> None:
        raise OSError(28, "No space left on device")

    writer._write_all = disk_full  # type: ignore[method-assign]
    with pytest.raises(StateUnavailable, match="No space left on device"):
        await store.put_profile(_profile("d"), _change(True))
    assert not await store.healthy()
    with pytest.raises(StateUnavailable, match="cannot be written"):
        await _ping(store, "d", T0)
    with pytest.raises(StateUnavailable):
        await store.erase("d", ErasureRecord(device_hash="ef" * 32, erased_at=T0,
                                             last_consent=None))
    await store.close()  # no compaction of a state the disk did not take; no hang


async def test_a_format_1_snapshot_is_still_read(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    profile = _profile("old").model_dump(mode="json")
    path.write_bytes(orjson.dumps({
        "format": 1, "profiles": {"old": profile}, "consent": {}, "tracks": {}, "visits": {},
        "timers": {}, "erasures": {}}))
    store = await _reopen(path)
    assert await store.get_profile("old") is not None
    await store.close()
    assert orjson.loads(path.read_bytes())["format"] == memory.SNAPSHOT_FORMAT


def test_a_frame_is_a_checksummed_line() -> None:
    line = frame(b'["E","d",{}]')
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert line[8:9] == b" " and int(line[:8], 16) >= 0


async def test_over_http_an_unstorable_profile_is_a_400_and_nothing_is_stored(
        tmp_path: Path, aiohttp_client: Any) -> None:
    from geopush.app import create_app
    from tests.api_support import DEVICES, settings_for

    api = await aiohttp_client(create_app(settings_for(tmp_path)))
    # deeper than orjson writes (254); input bounds (contract §6) may refuse it sooner
    body = (b'{"consent": {"location": true}, "attributes": {"n": ' + b"[" * 300 + b"]" * 300
            + b"}}")
    resp = await api.put("/v1/devices/bad-1", data=body,
                         headers={**DEVICES, "Content-Type": "application/json"})
    assert resp.status == 400, await resp.text()
    assert (await resp.json())["error"]["code"] == "invalid"
    assert (await api.get("/v1/devices/bad-1", headers=DEVICES)).status == 404
    resp = await api.put("/v1/devices/good-1", json={"consent": {"location": True}},
                         headers=DEVICES)
    assert resp.status == 200
