"""The `memory` backend: one process, plain dicts, kept on disk as a snapshot plus a journal.

Atomicity is free here: `track` reads, computes and writes with no `await` in between, so no
other task can touch a device meanwhile. Durability (contract §10) comes from the journal
(geopush.state.journal): every change is applied to the dicts, then handed to the journal as
a record of the device's new values, never a delta, so replaying a record twice, or over a
snapshot taken after it, ends in the same state. Profile writes and erasures wait for their
record's fsync before they return (their answer is a promise); tracking records do not (they
are on disk at most `fsync_every` later). A clean shutdown, a journal grown past the snapshot's
size, and every erasure (a few seconds later) compact: a new snapshot, the old files deleted.

A device token's nonce (issued or revoked) waits for its fsync too: a revocation answered
must not come undone in a crash. Records, one JSON array per journal line:
  ["P", device_id, profile, consent trail]        the profile and the whole trail now
  ["E", device_id, erasure record]                the device is erased
  ["K", device_id, {nonce, issued_at} | null]     the device's token now (null: none)
  ["T", [[device_id, track, visits | null, pushes | null, decisions | null], …]]
                                                  one track batch: tracks (and visits, pushes
                                                  and decisions when they changed) now
  ["O", device_id, pushes]                        an open was recorded: the pushes now
  ["Q", device_id, outbox entries]                the device's outbox now (an attempt began
                                                  or ended, pushes were cancelled)
  ["H", device_id, visits, pushes, decisions, outbox]  the retention purge took old records
A track row carries the device's whole outbox as a sixth element when its commit queued or
forgot a push.
Timers are not recorded: a device's timer is its track's next due time. A batch that reserved
a push (or holdout) waits for its fsync before `track` returns: a cap once reserved must not
come undone in a crash after its push went out (contract §10). So does its outbox entry, in the
same row. The state of an attempt is not waited for: after a crash an entry is found queued or
sending, and sent again with the same push_id (at least once, contract §7).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import time
from collections.abc import Awaitable, Callable, Collection, Iterator, Mapping
from pathlib import Path
from typing import Any

import orjson
from pydantic import ValidationError

from geopush.delivery.outbox import (
    OutboxEntry,
    entry_from_json,
)
from geopush.devices import ConsentChange, DeviceProfile, ErasureRecord
from geopush.engine import DeviceOutcome, DeviceSnapshot
from geopush.errors import InvalidInput
from geopush.geo.model import DeviceState, Stay, Visit
from geopush.logs import fields
from geopush.rules.decide import DeviceHistory, PushRecord
from geopush.state.base import (
    Compute,
    ProfileEdit,
    ProfileWrite,
    StateStore,
    StoredToken,
    StoredTrack,
)
from geopush.state.codec import (
    push_from_json,
    push_to_json,
    track_from_json,
    track_to_json,
    visit_from_json,
    visit_to_json,
)
from geopush.state.due import DueTimes
from geopush.state.journal import (
    JournalFailed,
    JournalWriter,
    SnapshotError,
    StateFiles,
    frame,
    read_frames,
)
from geopush.state.keys import DECISIONS_KEPT, VISITS_KEPT, due_member
from geopush.state.memory_outbox import MemoryOutbox, outbox_json

__all__ = ["MemoryStore", "SnapshotError"]

log = logging.getLogger("geopush.state.memory")

SNAPSHOT_FORMAT = 2  # format 1 (no journal) is still read
COMPACT_MIN_BYTES = 64 << 20  # a journal compacts once past this and past the snapshot's size
ERASURE_COMPACT_DELAY_S = 2.0  # erasures of a burst share one compaction
COMPACT_RETRY_S = 30.0
SNAPSHOT_CHUNK = 2000  # records encoded between two writes, so the event loop keeps serving

_READ_ERRORS = (OSError, ValueError, ValidationError, KeyError, TypeError, IndexError,
                AttributeError)


class MemoryStore(MemoryOutbox, StateStore):
    def __init__(self, snapshot_path: Path | None = None, *, fsync_every: float = 1.0,
                 compact_min_bytes: int = COMPACT_MIN_BYTES,
                 erasure_compact_delay_s: float = ERASURE_COMPACT_DELAY_S) -> None:
        self.snapshot_path = snapshot_path
        self.fsync_every = fsync_every
        self._profiles: dict[str, DeviceProfile] = {}
        self._consent: dict[str, list[ConsentChange]] = {}
        self._tracks: dict[str, tuple[DeviceState, float | None]] = {}
        self._visits: dict[str, list[Visit]] = {}
        # device tokens' nonces, apart from the profiles: a PUT or PATCH never revokes one
        self._tokens: dict[str, StoredToken] = {}
        self._erasures: dict[str, ErasureRecord] = {}
        self._pushes: dict[str, dict[str, PushRecord]] = {}  # device → push_id → record
        self._decisions: dict[str, list[dict[str, Any]]] = {}  # the last DECISIONS_KEPT
        self._timers = DueTimes()
        self._outbox: dict[str, dict[str, OutboxEntry]] = {}  # device → push_id → entry
        self._due_pushes = DueTimes()  # due_member → when due (not final entries only)
        self._counts: dict[str, dict[str, int]] = {}  # oldest bucket first
        self._flags: dict[str, str] = {}
        self._leases: dict[str, tuple[str, float]] = {}  # name → (holder, until: time.monotonic())
        self._weather: dict[str, bytes] = {}
        self._config: tuple[int, bytes] | None = None  # one process: nobody else to tell
        # the files, once open() found a snapshot path
        self._files: StateFiles | None = None
        self._writer: JournalWriter | None = None
        self._journal_bytes = 0
        self._compact_min_bytes = compact_min_bytes
        self._compact_at = compact_min_bytes
        self._erasure_delay_s = erasure_compact_delay_s
        self._compact_wanted = asyncio.Event()
        self._compactor: asyncio.Task[None] | None = None
        self._erasure_timer: asyncio.TimerHandle | None = None
        self._closing = False
        self._snapshots_written = 0

    # -- lifecycle -------------------------------------------------------------------------

    async def open(self) -> None:
        if self.snapshot_path is None:
            return
        files = StateFiles(self.snapshot_path)
        files.lock()
        started = time.monotonic()
        try:
            files.remove_temporaries()
            gen, erased = self._restore(files)
            log.info("state_restored", extra=fields(
                devices=len(self._profiles), journal_bytes=self._journal_bytes,
                seconds=round(time.monotonic() - started, 3)))
            self._writer = JournalWriter(files, gen, self.fsync_every,
                                         asyncio.get_running_loop())
        except BaseException:
            files.unlock()
            raise
        self._files = files
        self._compactor = asyncio.create_task(self._compact_when_wanted(),
                                              name="geopush-compaction")
        if erased or self._journal_bytes > self._compact_at:
            # erased devices may still be in the old snapshot: rewrite it soon
            self._compact_wanted.set()

    async def close(self) -> None:
        writer, files = self._writer, self._files
        if writer is None or files is None:
            return
        self._closing = True
        self._compact_wanted.set()
        if self._erasure_timer is not None:
            self._erasure_timer.cancel()
        if self._compactor is not None:
            await self._compactor
        try:
            if writer.error is None:
                await self.compact()
        except (OSError, JournalFailed) as exc:
            log.error("final_compaction_failed", extra=fields(
                reason=str(exc), message="the journal still holds the state; it is replayed "
                "at the next start"))
        finally:
            await writer.close()
            self._writer = None
            empty = files.journal(writer.gen)
            with contextlib.suppress(OSError):
                if empty.stat().st_size == 0 and self.snapshot_path is not None \
                        and self.snapshot_path.exists():
                    empty.unlink()
            files.unlock()

    async def healthy(self) -> bool:
        return self._writer is None or self._writer.error is None

    async def sync(self) -> None:
        """Returns once everything changed so far is on disk (before sending a push)."""
        if self._writer is not None:
            await self._writer.append_durable(b"")

    # -- devices ---------------------------------------------------------------------------

    async def get_profile(self, device_id: str) -> DeviceProfile | None:
        return self._profiles.get(device_id)

    async def update_profile(self, device_id: str, edit: ProfileEdit) -> ProfileWrite | None:
        self._check_writable()
        # read, edit and write with no await in between: no other task can write meanwhile
        write = edit(self._profiles.get(device_id))
        if write is None:
            return None
        profile = write.profile
        if profile.device_id != device_id:
            raise ValueError(f"edit of {device_id!r} returned the profile of {profile.device_id!r}")
        trail = self._consent.get(device_id, [])
        if write.change is not None:
            trail = [*trail, write.change]
        # encoded before anything changes: a profile that cannot be stored fails its own
        # write (400), and never a snapshot or the journal
        line = _profile_line(device_id, profile, trail)
        self._apply_profile(device_id, profile, trail)
        if self._writer is not None:
            done = self._writer.append_durable(line)
            self._journal_bytes += len(line)
            await done
        return write

    def _apply_profile(self, device_id: str, profile: DeviceProfile,
                       trail: list[ConsentChange]) -> None:
        self._profiles[device_id] = profile
        if trail:
            self._consent[device_id] = trail
        if not profile.consent.location:
            # revoked (or never given): stays and timers end silently, no exit events
            self._tracks.pop(device_id, None)
            self._timers.discard(device_id)

    async def consent_history(self, device_id: str) -> list[ConsentChange]:
        return list(self._consent.get(device_id, ()))

    async def visits(self, device_id: str) -> list[Visit]:
        return list(self._visits.get(device_id, ()))

    async def erase(self, device_id: str, record: ErasureRecord) -> bool:
        self._check_writable()
        known = self._apply_erasure(device_id)
        if not known:
            return False
        self._erasures[record.device_hash] = record
        if self._writer is not None:
            line = frame(orjson.dumps(["E", device_id, record.model_dump(mode="json")]))
            done = self._writer.append_durable(line)
            self._journal_bytes += len(line)
            self._compact_soon(self._erasure_delay_s)
            await done
        return True

    def _apply_erasure(self, device_id: str) -> bool:
        known = False
        outbox = self._outbox.get(device_id, {})
        for push_id in outbox:
            self._due_pushes.discard(due_member(push_id, device_id))
        for table in (self._profiles, self._consent, self._tracks, self._visits, self._tokens,
                      self._pushes, self._decisions, self._outbox):
            known = table.pop(device_id, None) is not None or known
        return self._timers.discard(device_id) or known

    async def erasure_record(self, device_hash: str) -> ErasureRecord | None:
        return self._erasures.get(device_hash)

    def _history(self, device_id: str) -> DeviceHistory:
        """Copies: `decide` appends to the history it is given."""
        pushes = self._pushes.get(device_id)
        return DeviceHistory(
            [dataclasses.replace(p) for p in pushes.values()] if pushes else [],
            list(self._visits.get(device_id, ())))

    async def history(self, device_id: str) -> DeviceHistory:
        return self._history(device_id)

    async def decisions(self, device_id: str) -> list[dict[str, Any]]:
        return list(self._decisions.get(device_id, ()))

    async def record_open(self, device_id: str, push_id: str, at: float) -> float | None:
        self._check_writable()
        push = self._pushes.get(device_id, {}).get(push_id)
        if push is None or push.outcome != "push":  # a holdout was never sent
            return None
        if push.opened_at is None:
            push.opened_at = at
            if self._writer is not None:
                self._journal(frame(orjson.dumps(
                    ["O", device_id, [push_to_json(p) for p in self._pushes[device_id].values()]])))
        return push.opened_at

    async def set_token(self, device_id: str, token: StoredToken | None) -> bool:
        self._check_writable()
        # checked and written with no await in between: a track call sees the old nonce or
        # the new one, never a mix (what the version does on Redis)
        if device_id not in self._profiles:
            return False
        self._apply_token(device_id, token)
        if self._writer is not None:
            line = frame(orjson.dumps(["K", device_id, _token_to_json(token)]))
            done = self._writer.append_durable(line)
            self._journal_bytes += len(line)
            await done
        return True

    def _apply_token(self, device_id: str, token: StoredToken | None) -> None:
        if token is None:
            self._tokens.pop(device_id, None)
        else:
            self._tokens[device_id] = token

    async def stored_token(self, device_id: str) -> StoredToken | None:
        return self._tokens.get(device_id)

    # -- tracking --------------------------------------------------------------------------

    async def track(self, device_ids: Collection[str], compute: Compute) -> dict[str, DeviceOutcome]:
        self._check_writable()
        snapshots = {}
        saved: list[_Saved] = []
        tracks = self._tracks
        profiles = self._profiles
        tokens = self._tokens
        for device_id in device_ids:
            stored = tracks.get(device_id)
            token = tokens.get(device_id) if tokens else None
            nonce = token.nonce if token is not None else None
            if stored is None:
                snapshots[device_id] = DeviceSnapshot(profiles.get(device_id), None, nonce)
                continue
            # compute gets the stored state itself and may mutate it: what it can change is
            # saved first, and put back if it fails or writes no new state for the device
            state = stored[0]
            saved.append(_Saved(device_id, state))
            snapshots[device_id] = DeviceSnapshot(profiles.get(device_id), state, nonce)
        try:
            outcomes = dict(compute(snapshots))
            for device_id, computed in outcomes.items():
                if computed.decide is not None:  # no await: the history is the current one
                    computed.decide(self._history(device_id))
                    # the continuation closes over its outcome: a reference cycle per decided
                    # device, which the young collections would have to find
                    computed.decide = None
        except BaseException:
            for undo in saved:
                undo.restore()
            raise
        for undo in saved:
            outcome = outcomes.get(undo.device_id)
            if outcome is None or outcome.state is not undo.state:
                undo.restore()
        journaled = self._writer is not None
        rows: list[_Row] = []
        reserved = False
        for device_id, outcome in outcomes.items():
            if outcome.state is None:
                stored = tracks.get(device_id)
                self._timers.set(device_id, stored[1] if stored is not None else None)
                continue
            tracks[device_id] = (outcome.state, outcome.next_due)
            visits = None
            if outcome.visits or outcome.visits_forgotten:
                kept = self._visits.setdefault(device_id, [])
                del kept[:outcome.visits_forgotten]  # past retention.history
                kept.extend(outcome.visits)
                del kept[:-VISITS_KEPT]
                if not kept:
                    del self._visits[device_id]
                if journaled:
                    visits = [visit_to_json(v) for v in kept]
            self._timers.set(device_id, outcome.next_due)
            pushes = decisions = outbox = None
            if outcome.reserved or outcome.forgotten or outcome.decisions:
                reserved = reserved or bool(outcome.reserved)
                pushes, decisions = self._apply_decisions(device_id, outcome, journaled)
                if outcome.queued or outcome.forgotten:
                    outbox = self._apply_outbox(device_id, outcome, journaled)
            if journaled:
                track = track_to_json(outcome.state, outcome.next_due)
                # a row without decisions keeps the three elements earlier releases read
                if pushes is None and decisions is None:
                    rows.append((device_id, track, visits))
                elif outbox is None:
                    rows.append((device_id, track, visits, pushes, decisions))
                else:
                    rows.append((device_id, track, visits, pushes, decisions, outbox))
        if rows:
            done = self._journal_tracks(rows, durable=reserved)
            if done is not None:
                await done
        return outcomes

    def _apply_decisions(self, device_id: str, outcome: DeviceOutcome, journaled: bool
                         ) -> tuple[list[list[Any]] | None, list[dict[str, Any]] | None]:
        """The outcome's decisions and reservations into the tables; their journal values."""
        pushes = self._pushes.setdefault(device_id, {})
        for push_id in outcome.forgotten:
            pushes.pop(push_id, None)
        for push in outcome.reserved:
            pushes.setdefault(push.push_id, push)
        if not pushes:
            del self._pushes[device_id]
        kept = self._decisions.setdefault(device_id, [])
        kept.extend(d.as_record() for d in outcome.decisions)
        del kept[:-DECISIONS_KEPT]
        if not journaled:
            return None, None
        return [push_to_json(p) for p in pushes.values()], kept

    async def stored_track(self, device_id: str) -> StoredTrack:
        state, next_due = self._tracks.get(device_id, (None, None))
        return StoredTrack(state, next_due, self._timers.due(device_id), None)

    def _journal_tracks(self, rows: list[_Row], *, durable: bool = False
                        ) -> Awaitable[None] | None:
        """One encode and one hand-over per batch; the writer thread does the rest. `durable`:
        returns what to await for the batch to be on disk."""
        try:
            payload = orjson.dumps(("T", rows))
        except TypeError:  # orjson.JSONEncodeError: find the rows at fault, keep the others
            payload = orjson.dumps(("T", _encodable(rows)))
        return self._journal(frame(payload), durable=durable)

    def _journal(self, line: bytes, *, durable: bool = False) -> Awaitable[None] | None:
        assert self._writer is not None
        done = self._writer.append_durable(line) if durable else None
        if done is None:
            self._writer.append(line)
        self._journal_bytes += len(line)
        if self._journal_bytes > self._compact_at:
            self._compact_wanted.set()
        return done

    async def claim_due(self, now: float, limit: int, lease_s: float) -> list[str]:
        # leases are not journaled: after a crash a leased timer is simply due again
        return self._timers.claim(now, limit, lease_s)

    def _check_writable(self) -> None:
        if self._writer is not None and self._writer.error is not None:
            raise JournalFailed(f"the state journal cannot be written ({self._writer.error}); "
                                "restart geopush once the disk is writable")

    # -- weather -----------------------------------------------------------------------------

    async def weather_cells(self, cells: Collection[str]) -> dict[str, bytes]:
        return {c: self._weather[c] for c in cells if c in self._weather}

    async def put_weather_cells(self, values: Mapping[str, bytes]) -> None:
        self._weather.update(values)  # one process: a cache, not kept on disk

    # -- the published configuration -------------------------------------------------------

    async def publish_config(self, payload: bytes) -> int:
        serial = (self._config[0] if self._config is not None else 0) + 1
        self._config = (serial, payload)
        return serial

    async def config_serial(self) -> int:
        return self._config[0] if self._config is not None else 0

    async def published_config(self) -> tuple[int, bytes] | None:
        return self._config

    # -- compaction ------------------------------------------------------------------------

    def _compact_soon(self, delay_s: float) -> None:
        if self._erasure_timer is None:
            def fire() -> None:
                self._erasure_timer = None
                self._compact_wanted.set()

            self._erasure_timer = asyncio.get_running_loop().call_later(delay_s, fire)

    async def _compact_when_wanted(self) -> None:
        while True:
            await self._compact_wanted.wait()
            self._compact_wanted.clear()
            if self._closing:
                return
            try:
                await self.compact()
            except JournalFailed:
                return
            except (OSError, SnapshotError) as exc:
                log.error("compaction_failed", extra=fields(reason=str(exc)))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._compact_wanted.wait(), COMPACT_RETRY_S)
                self._compact_wanted.set()

    async def compact(self) -> None:
        """A new snapshot, then the journals it covers are deleted.

        The journal moves to a new generation first; the snapshot is then encoded a chunk at a
        time while requests go on, so a device may be written as it was at any moment after
        the switch. The new generation holds every change since, as whole values, so
        replaying it over the snapshot ends in the current state."""
        writer, files = self._writer, self._files
        assert writer is not None and files is not None and self.snapshot_path is not None
        gen = await writer.rotate()
        self._journal_bytes = 0
        self._snapshots_written += 1
        tmp = files.temporary().with_suffix(f".{self._snapshots_written}.tmp")
        size = 0
        try:
            # owner-only, as the journal: it holds push tokens, profiles and consent
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with open(fd, "wb") as out:  # writes in a thread; encoding on the event loop
                for chunk in self._snapshot_chunks(gen):
                    size += len(chunk)
                    await asyncio.to_thread(out.write, chunk)
                await asyncio.to_thread(_flush_and_sync, out)
            await asyncio.to_thread(_install, files, tmp, gen)
        finally:
            tmp.unlink(missing_ok=True)
        self._compact_at = max(self._compact_min_bytes, size)

    def _snapshot_chunks(self, gen: int) -> Iterator[bytes]:
        """The snapshot, each record encoded on its own: one that fails is left out (and
        logged), never the file. Profiles were encoded once already when they were written."""
        yield b'{"format":%d,"journal":%d' % (SNAPSHOT_FORMAT, gen)
        sections: list[tuple[str, Mapping[str, Any], Callable[[Any], bytes]]] = [
            ("profiles", self._profiles, lambda p: orjson.dumps(p.model_dump(mode="json"))),
            ("consent", self._consent,
             lambda trail: orjson.dumps([c.model_dump(mode="json") for c in trail])),
            ("tracks", self._tracks, lambda t: orjson.dumps(track_to_json(*t))),
            ("visits", self._visits, lambda vs: orjson.dumps([visit_to_json(v) for v in vs])),
            ("tokens", self._tokens, lambda t: orjson.dumps(_token_to_json(t))),
            ("pushes", self._pushes,
             lambda ps: orjson.dumps([push_to_json(p) for p in ps.values()])),
            ("decisions", self._decisions, orjson.dumps),
            ("outbox", self._outbox, lambda entries: orjson.dumps(outbox_json(entries))),
            ("erasures", self._erasures, lambda r: orjson.dumps(r.model_dump(mode="json"))),
        ]
        for name, table, encode in sections:
            yield b',"%s":{' % name.encode()
            keys = list(table)
            first = True
            for start in range(0, len(keys), SNAPSHOT_CHUNK):
                parts = []
                for key in keys[start:start + SNAPSHOT_CHUNK]:
                    value = table.get(key)
                    if value is None:
                        continue  # erased meanwhile
                    try:
                        parts.append(orjson.dumps(key) + b":" + encode(value))
                    except TypeError as exc:
                        log.error("snapshot_record_left_out",
                                  extra=fields(section=name, reason=str(exc)))
                if parts:
                    yield (b"" if first else b",") + b",".join(parts)
                    first = False
            yield b"}"
        yield b"}"

    # -- restoring -------------------------------------------------------------------------

    @classmethod
    def verify_files(cls, snapshot_path: Path) -> None:
        """Read the snapshot and journals as `open` would, changing nothing on disk and taking
        no lock (`geopush check`, even while a service runs on them); SnapshotError if not."""
        cls(snapshot_path)._restore(StateFiles(snapshot_path), read_only=True)

    def _restore(self, files: StateFiles, *, read_only: bool = False) -> tuple[int, bool]:
        """Snapshot + journals → the dicts. Returns the journal generation to append to and
        whether an erasure was replayed. `read_only` leaves stale journals and torn tails be."""
        first_gen = 1
        if files.snapshot.exists():
            first_gen = self._load(files.snapshot)
        gens = files.journal_gens()
        for old in (g for g in gens if g < first_gen and not read_only):
            files.journal(old).unlink()  # covered by the snapshot; a crash left it behind
        gens = [g for g in gens if g >= first_gen]
        erased = False
        for gen in gens:
            path = files.journal(gen)
            frames = read_frames(path, tail_may_tear=gen == gens[-1])
            for number, payload in enumerate(frames.payloads, 1):
                erased = self._replay(payload, f"{path}:{number}") or erased
            if frames.good_end < frames.size and not read_only:
                with open(path, "r+b") as f:
                    f.truncate(frames.good_end)
                    os.fsync(f.fileno())
                log.warning("journal_tail_cut", extra=fields(
                    file=str(path), bytes=frames.size - frames.good_end,
                    message="the last record was cut short by a crash; it was never "
                    "acknowledged as durable"))
            self._journal_bytes += frames.good_end
        self._timers = DueTimes()
        for device_id, (_, due) in self._tracks.items():
            self._timers.set(device_id, due)
        self._due_pushes = DueTimes()
        for device_id, entries in self._outbox.items():
            for entry in entries.values():
                if not entry.final:
                    # one process: an attempt found `sending` died with the last one; it is
                    # due again from when it began, with the same push_id (contract §7)
                    if entry.state == "sending":
                        entry.next_attempt_at = entry.updated_at
                    self._due_pushes.set(due_member(entry.push_id, device_id),
                                         entry.next_attempt_at)
        return (gens[-1] if gens else first_gen), erased

    def _replay(self, payload: bytes, where: str) -> bool:
        try:
            record = orjson.loads(payload)
            kind = record[0]
            if kind == "T":
                for device_id, track, visits, *decided in record[1]:
                    self._tracks[device_id] = track_from_json(track)
                    if visits is not None:
                        self._visits[device_id] = [visit_from_json(device_id, v)
                                                   for v in visits]
                    # rows written before decisions have three elements
                    if decided and decided[0] is not None:
                        self._replay_pushes(device_id, decided[0])
                    if len(decided) > 1 and decided[1] is not None:
                        self._decisions[device_id] = list(decided[1])
                    if len(decided) > 2 and decided[2] is not None:
                        self._replay_outbox(device_id, decided[2])
                return False
            if kind == "Q":
                _, device_id, entries = record
                self._replay_outbox(device_id, entries)
                return False
            if kind == "H":
                _, device_id, visits, pushes, decisions, entries = record
                if visits:
                    self._visits[device_id] = [visit_from_json(device_id, v) for v in visits]
                else:
                    self._visits.pop(device_id, None)
                self._replay_pushes(device_id, pushes)
                if decisions:
                    self._decisions[device_id] = list(decisions)
                else:
                    self._decisions.pop(device_id, None)
                self._replay_outbox(device_id, entries)
                return False
            if kind == "O":
                _, device_id, pushes = record
                self._replay_pushes(device_id, pushes)
                return False
            if kind == "P":
                _, device_id, profile, trail = record
                self._apply_profile(device_id, DeviceProfile.model_validate(profile),
                                    [ConsentChange.model_validate(c) for c in trail])
                return False
            if kind == "K":
                _, device_id, token = record
                self._apply_token(device_id, _token_from_json(token))
                return False
            if kind == "E":
                _, device_id, erasure = record
                self._apply_erasure(device_id)
                kept = ErasureRecord.model_validate(erasure)
                self._erasures[kept.device_hash] = kept
                return True
            raise ValueError(f"unknown record kind {kind!r}")
        except _READ_ERRORS as exc:
            raise SnapshotError(
                f"{where}: cannot read the journal record ({type(exc).__name__}: {exc}); "
                "move the journal files away to start from the snapshot alone"
            ) from None

    def _replay_outbox(self, device_id: str, entries: list[Any]) -> None:
        if entries:
            self._outbox[device_id] = {e.push_id: e for e in map(entry_from_json, entries)}
        else:
            self._outbox.pop(device_id, None)

    def _replay_pushes(self, device_id: str, pushes: list[Any]) -> None:
        if pushes:
            self._pushes[device_id] = {p.push_id: p for p in map(push_from_json, pushes)}
        else:
            self._pushes.pop(device_id, None)

    def _load(self, path: Path) -> int:
        """Reads a snapshot into the dicts; returns the first journal generation it does not
        cover."""
        try:
            data = orjson.loads(path.read_bytes())
            if not isinstance(data, dict) or data.get("format") not in (1, SNAPSHOT_FORMAT):
                raise ValueError(f"expected a geopush state snapshot (format {SNAPSHOT_FORMAT})")
            gen = int(data.get("journal", 1))
            profiles = {d: DeviceProfile.model_validate(p) for d, p in data["profiles"].items()}
            consent = {d: [ConsentChange.model_validate(c) for c in trail]
                       for d, trail in data["consent"].items()}
            tracks = {d: track_from_json(t) for d, t in data["tracks"].items()}
            visits = {d: [visit_from_json(d, v) for v in vs] for d, vs in data["visits"].items()}
            erasures = {h: ErasureRecord.model_validate(r) for h, r in data["erasures"].items()}
            # snapshots written before device tokens (or decisions) have no such section
            device_tokens = {d: _token_from_json(t) for d, t in data.get("tokens", {}).items()}
            pushes = {d: {p.push_id: p for p in map(push_from_json, ps)}
                      for d, ps in data.get("pushes", {}).items()}
            decisions = {d: list(ds) for d, ds in data.get("decisions", {}).items()}
            outbox = {d: {e.push_id: e for e in map(entry_from_json, es)}
                      for d, es in data.get("outbox", {}).items()}
        except _READ_ERRORS as exc:
            raise SnapshotError(
                f"{path}: cannot read the state snapshot ({type(exc).__name__}: {exc}); "
                "move the file away to start with empty state"
            ) from None
        self._profiles, self._consent, self._tracks = profiles, consent, tracks
        self._visits, self._erasures = visits, erasures
        self._tokens = {d: t for d, t in device_tokens.items() if t is not None}
        self._pushes, self._decisions, self._outbox = pushes, decisions, outbox
        return gen


def _profile_line(device_id: str, profile: DeviceProfile, trail: list[ConsentChange]) -> bytes:
    """The profile's journal line, or InvalidInput when it would not read back as itself
    (an integer beyond 64 bits, NaN, nesting deeper than JSON encoders go)."""
    try:
        encoded = orjson.dumps(profile.model_dump(mode="json"))
        same = DeviceProfile.model_validate(orjson.loads(encoded)) == profile
        reason = "it does not read back as it was written (NaN or infinite numbers?)"
    except (TypeError, ValueError, ValidationError) as exc:
        same, reason = False, str(exc)
    if not same:
        raise InvalidInput(f"the profile of device {device_id!r} cannot be stored: {reason}")
    trail_json = orjson.dumps([c.model_dump(mode="json") for c in trail])
    return frame(b'["P",%s,%s,%s]' % (orjson.dumps(device_id), encoded, trail_json))


def _token_to_json(token: StoredToken | None) -> dict[str, Any] | None:
    return {"nonce": token.nonce, "issued_at": token.issued_at} if token is not None else None


def _token_from_json(value: Any) -> StoredToken | None:
    if value is None:
        return None
    return StoredToken(str(value["nonce"]), float(value["issued_at"]))


_Row = (tuple[str, list[Any], list[list[Any]] | None]
        | tuple[str, list[Any], list[list[Any]] | None, list[list[Any]] | None,
                list[dict[str, Any]] | None]
        | tuple[str, list[Any], list[list[Any]] | None, list[list[Any]] | None,
                list[dict[str, Any]] | None, list[dict[str, Any]]])


def _encodable(rows: list[_Row]) -> list[_Row]:
    kept = []
    for row in rows:
        try:
            orjson.dumps(row)
        except TypeError as exc:
            log.error("track_record_left_out", extra=fields(reason=str(exc)))
            continue
        kept.append(row)
    return kept


def _flush_and_sync(out: Any) -> None:
    out.flush()
    os.fsync(out.fileno())


def _install(files: StateFiles, tmp: Path, gen: int) -> None:
    # rename over the old snapshot: a crash leaves either the old one or the new one whole
    os.replace(tmp, files.snapshot)
    files.sync_dir()
    for old in files.journal_gens():
        if old < gen:
            files.journal(old).unlink(missing_ok=True)


class _Saved:
    """A stored state's fields and its stays' fields, copied shallowly (lists copied) before
    compute may change them in place: much cheaper than copying the state for every device
    of every batch, and restored only in the rare case compute fails or writes nothing."""

    __slots__ = ("bucket_empty_ts", "device_id", "last_ts", "recent", "state", "stays")

    def __init__(self, device_id: str, state: DeviceState) -> None:
        self.device_id = device_id
        self.state = state
        self.last_ts = state.last_ts
        self.recent = state.recent[:]
        self.bucket_empty_ts = state.bucket_empty_ts
        self.stays = (
            [(s, s.geofence_id, s.store_id, s.enter_ts, s.confirmed_ts, s.lat, s.lon,
              s.distance_m, s.speed_mps, s.dwells_fired[:]) for s in state.stays.values()]
            if state.stays else None)

    def restore(self) -> None:
        state = self.state
        state.last_ts = self.last_ts
        state.recent = self.recent
        state.bucket_empty_ts = self.bucket_empty_ts
        state.due = None  # the tracker's cache, worked out again from the restored stays
        stays: dict[str, Stay] = {}
        for (stay, geofence_id, store_id, enter_ts, confirmed_ts, lat, lon, distance_m,
             speed_mps, dwells_fired) in self.stays or ():
            stay.geofence_id, stay.store_id, stay.enter_ts = geofence_id, store_id, enter_ts
            stay.confirmed_ts, stay.lat, stay.lon = confirmed_ts, lat, lon
            stay.distance_m, stay.speed_mps, stay.dwells_fired = distance_m, speed_mps, dwells_fired
            stays[geofence_id] = stay
        state.stays = stays
