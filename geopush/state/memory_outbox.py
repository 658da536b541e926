"""The outbox, the retention purge, flags, shared counters and leases of the `memory` backend
(geopush.state.memory): what delivery and the periodic jobs keep, in one process.

Outbox entries change by whole values in the journal (`["Q", device_id, entries]`, or the
sixth element of a track row when a commit queued a push): after a crash an entry is found
queued or sending, and the restarted process sends it again with the same push_id (at least
once, contract §7). Flags, counters and leases are not kept on disk: one process has nobody
else to tell, and a restart starts a new report window.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import orjson

from geopush.delivery.outbox import SEND_LEASE_S, OutboxEntry, began, entry_to_json
from geopush.devices import DeviceProfile
from geopush.engine import DeviceOutcome
from geopush.geo.model import Visit
from geopush.rules.decide import PushRecord
from geopush.state.codec import push_to_json, visit_to_json
from geopush.state.due import DueTimes
from geopush.state.journal import JournalWriter, frame
from geopush.state.keys import due_member, parse_due_member

MAX_COUNT_BUCKETS = 64  # the report reads the last one; older ones go


class MemoryOutbox:
    """Mixed into MemoryStore, whose tables and journal it uses."""

    if TYPE_CHECKING:
        _profiles: dict[str, DeviceProfile]
        _tracks: dict[str, Any]
        _visits: dict[str, list[Visit]]
        _pushes: dict[str, dict[str, PushRecord]]
        _decisions: dict[str, list[dict[str, Any]]]
        _outbox: dict[str, dict[str, OutboxEntry]]
        _due_pushes: DueTimes
        _counts: dict[str, dict[str, int]]
        _flags: dict[str, str]
        _leases: dict[str, tuple[str, float]]
        _writer: JournalWriter | None
        _journal_bytes: int

        def _check_writable(self) -> None: ...

        def _journal(self, line: bytes, *, durable: bool = False) -> Awaitable[None] | None: ...

    def _apply_outbox(self, device_id: str, outcome: DeviceOutcome, journaled: bool
                      ) -> list[dict[str, Any]] | None:
        """The outcome's queued pushes into the outbox; forgotten ones out. Its journal value."""
        outbox = self._outbox.setdefault(device_id, {})
        for push_id in outcome.forgotten:
            if outbox.pop(push_id, None) is not None:
                self._due_pushes.discard(due_member(push_id, device_id))
        for entry in outcome.queued:
            if entry.push_id not in outbox:
                outbox[entry.push_id] = entry
                self._due_pushes.set(due_member(entry.push_id, device_id), entry.next_attempt_at)
        if not outbox:
            del self._outbox[device_id]
        return outbox_json(outbox) if journaled else None

    def _journal_outbox(self, device_id: str) -> None:
        if self._writer is not None:
            self._journal(frame(orjson.dumps(
                ["Q", device_id, outbox_json(self._outbox.get(device_id, {}))])))

    # -- the outbox --------------------------------------------------------------------------

    async def claim_pushes(self, now: float, limit: int, *, grace_s: float,
                           lease_s: float = SEND_LEASE_S
                           ) -> list[tuple[OutboxEntry, DeviceProfile | None]]:
        self._check_writable()
        claimed: list[tuple[OutboxEntry, DeviceProfile | None]] = []
        touched: set[str] = set()
        for member in self._due_pushes.claim(now, limit, 0.0):
            push_id, device_id = parse_due_member(member)
            entry = self._outbox.get(device_id, {}).get(push_id)
            if entry is None or entry.final:
                self._due_pushes.discard(member)
                continue
            if entry.next_attempt_at > now:  # not due: the hint was early
                self._due_pushes.set(member, entry.next_attempt_at)
                continue
            entry = began(entry, now, lease_s)
            self._outbox[device_id][push_id] = entry
            self._due_pushes.set(member, entry.next_attempt_at)
            touched.add(device_id)
            claimed.append((entry, self._profiles.get(device_id)))
        for device_id in touched:
            self._journal_outbox(device_id)
        return claimed

    async def finish_pushes(self, ends: Sequence[tuple[OutboxEntry, int]]) -> list[bool | None]:
        self._check_writable()
        results: list[bool | None] = []
        touched: set[str] = set()
        for entry, attempt in ends:
            entries = self._outbox.get(entry.device_id)
            stored = entries.get(entry.push_id) if entries else None
            if entries is None or stored is None or stored.state != "sending" \
                    or stored.attempts != attempt:
                results.append(False)
                continue
            entries[entry.push_id] = entry
            member = due_member(entry.push_id, entry.device_id)
            if entry.final:
                self._due_pushes.discard(member)
            else:
                self._due_pushes.set(member, entry.next_attempt_at)
            touched.add(entry.device_id)
            results.append(True)
        for device_id in touched:
            self._journal_outbox(device_id)
        return results

    async def put_push(self, entry: OutboxEntry) -> bool:
        self._check_writable()
        if entry.device_id not in self._profiles:
            return False
        self._outbox.setdefault(entry.device_id, {})[entry.push_id] = entry
        self._due_pushes.set(due_member(entry.push_id, entry.device_id), entry.next_attempt_at)
        if self._writer is not None:
            line = frame(orjson.dumps(
                ["Q", entry.device_id, outbox_json(self._outbox[entry.device_id])]))
            done = self._writer.append_durable(line)
            self._journal_bytes += len(line)
            await done
        return True

    async def cancel_pushes(self, device_id: str, *, category: str | None = None,
                            rule_id: str | None = None, reason: str, now: float) -> list[str]:
        self._check_writable()
        cancelled = []
        entries = self._outbox.get(device_id, {})
        for push_id, entry in entries.items():
            if entry.state != "queued" or (category is not None and entry.category != category) \
                    or (rule_id is not None and entry.rule_id != rule_id):
                continue
            entries[push_id] = dataclasses.replace(entry, state="cancelled", reason=reason,
                                                   updated_at=now)
            self._due_pushes.discard(due_member(push_id, device_id))
            cancelled.append(push_id)
        if cancelled:
            self._journal_outbox(device_id)
        return cancelled

    async def pending_pushes(self, limit: int) -> list[tuple[str, str]]:
        members = sorted(self._due_pushes.as_dict().items(), key=lambda m: m[1])[:limit]
        return [parse_due_member(m) for m, _ in members]

    async def outbox(self, device_id: str) -> list[OutboxEntry]:
        return sorted(self._outbox.get(device_id, {}).values(), key=lambda e: e.created_at)

    async def outbox_overview(self, now: float) -> tuple[int, float | None]:
        pending = self._due_pushes.as_dict()
        oldest = None
        for member in pending:
            push_id, device_id = parse_due_member(member)
            entry = self._outbox.get(device_id, {}).get(push_id)
            if entry is not None and (oldest is None or entry.created_at < oldest):
                oldest = entry.created_at
        return len(pending), (max(0.0, now - oldest) if oldest is not None else None)

    async def purge(self, cutoff: float) -> int:
        self._check_writable()
        gone = 0
        for device_id in list(set(self._visits) | set(self._pushes) | set(self._decisions)
                              | set(self._outbox)):
            visits = self._visits.get(device_id, [])
            old_visits = _older_prefix(visits, lambda v: v.end < cutoff)
            decisions = self._decisions.get(device_id, [])
            old_decisions = _older_prefix(decisions, lambda d: float(d["ts"]) < cutoff)
            pushes = self._pushes.get(device_id, {})
            entries = self._outbox.get(device_id, {})
            ids = [p.push_id for p in pushes.values() if p.ts < cutoff] + [
                e.push_id for e in entries.values() if e.test and e.created_at < cutoff]
            if not (old_visits or old_decisions or ids):
                continue
            gone += old_visits + old_decisions + len(ids)
            del visits[:old_visits]
            del decisions[:old_decisions]
            for push_id in ids:
                pushes.pop(push_id, None)
                if entries.pop(push_id, None) is not None:
                    self._due_pushes.discard(due_member(push_id, device_id))
            for table in (self._visits, self._decisions, self._pushes, self._outbox):
                if device_id in table and not table[device_id]:
                    del table[device_id]
            if self._writer is not None:
                self._journal(frame(orjson.dumps(["H", device_id,
                                                  [visit_to_json(v) for v in visits],
                                                  [push_to_json(p) for p in pushes.values()],
                                                  decisions, outbox_json(entries)])))
        return gone

    async def device_ids(self, batch: int = 500) -> AsyncIterator[list[str]]:
        known = list(set(self._profiles) | set(self._tracks) | set(self._visits)
                     | set(self._pushes) | set(self._outbox))
        for start in range(0, len(known), batch):
            yield known[start:start + batch]

    async def set_flag(self, name: str, value: str | None) -> None:
        # one process, not kept on disk: a restart forgets an operator's pause (logged)
        if value is None:
            self._flags.pop(name, None)
        else:
            self._flags[name] = value

    async def get_flag(self, name: str) -> str | None:
        return self._flags.get(name)

    async def add_counts(self, bucket: str, counts: Mapping[str, int], ttl_s: float) -> None:
        # one process: not kept on disk (a report after a restart counts from there)
        kept = self._counts.setdefault(bucket, {})
        for name, n in counts.items():
            kept[name] = kept.get(name, 0) + n
        if len(self._counts) > MAX_COUNT_BUCKETS:
            del self._counts[next(iter(self._counts))]

    async def read_counts(self, bucket: str) -> dict[str, int]:
        return dict(self._counts.get(bucket, {}))

    # -- leases (one process: the lease is for the API's sake) -------------------------------

    async def take_lease(self, name: str, holder: str, ttl_s: float) -> bool:
        now = time.monotonic()
        current = self._leases.get(name)
        if current is not None and current[0] != holder and current[1] > now:
            return False
        self._leases[name] = (holder, now + ttl_s)
        return True

    async def release_lease(self, name: str, holder: str) -> None:
        current = self._leases.get(name)
        if current is not None and current[0] == holder:
            del self._leases[name]


def _older_prefix(rows: list[Any], older: Callable[[Any], bool]) -> int:
    """How many rows at the start (stored oldest first) are older than the cutoff."""
    n = 0
    while n < len(rows) and older(rows[n]):
        n += 1
    return n


def outbox_json(entries: Mapping[str, OutboxEntry]) -> list[dict[str, Any]]:
    return [entry_to_json(e) for e in entries.values()]
