"""The one interface both state backends implement; the service talks only to this.

Per-device updates are atomic: `track` loads what it needs, lets the pure engine compute, and
commits only if nothing changed the device meanwhile (else it computes again on fresh state),
so any number of instances can share one Redis and produce the events one instance would.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from geopush.delivery.outbox import SEND_LEASE_S, OutboxEntry, entry_to_json
from geopush.devices import ConsentChange, DeviceProfile, ErasureRecord
from geopush.engine import DeviceOutcome, DeviceSnapshot
from geopush.errors import GeopushError
from geopush.geo.model import DeviceState, Visit
from geopush.rules.decide import DeviceHistory

Compute = Callable[[Mapping[str, DeviceSnapshot]], Mapping[str, DeviceOutcome]]
"""Pure: snapshots of some devices → what to write for each. May be called more than once:
after a conflict it is called again with fresh snapshots of only the devices that conflicted
(so it must take the devices to work on from its argument); outcomes of devices not in the
argument are ignored. It may mutate the states it is given."""


@dataclass(frozen=True, slots=True)
class ProfileWrite:
    """A profile to store, with the consent change to append to the trail (None: unchanged)."""

    profile: DeviceProfile
    change: ConsentChange | None


ProfileEdit = Callable[[DeviceProfile | None], ProfileWrite | None]
"""Pure: the stored profile (None: unknown device) → what to write (None: nothing). Called again
with the fresh profile when another write moved the device meanwhile, so a PATCH never reverts a
concurrent one and each consent change is recorded once. May raise to refuse (e.g. NotFound)."""


class StateUnavailable(GeopushError):
    """The state store cannot be reached; the request may be retried (503 + Retry-After)."""

    code = "unavailable"
    http_status = 503


@dataclass(frozen=True, slots=True)
class DeviceRecords:
    """What `GET /v1/stats` reads of a device: its history (pushes with their opens, visits
    that ended), its recent decisions, its outbox and the stays under way now (store id,
    entered at): a visit in progress converts too."""

    device_id: str
    history: DeviceHistory
    decisions: list[dict[str, Any]]
    outbox: list[OutboxEntry]
    stays: list[tuple[str, float]]


@dataclass(frozen=True, slots=True)
class StoredTrack:
    """A device's tracking record as the store holds it, for the export (contract §12)."""

    state: DeviceState | None
    next_due: float | None  # kept with the state
    timer: float | None  # the device's entry in the timers (a claim's lease while one runs)
    writes: int | None  # the record's version: writes of the device so far (None: not kept)


@dataclass(frozen=True, slots=True)
class StoredToken:
    """A device's current device token as the store holds it (geopush.tokens): its nonce, which
    the token carries, and when it was issued. The nonce is kept apart from the profile, so a
    PUT or PATCH never revokes the token."""

    nonce: str
    issued_at: float  # epoch seconds

    def fingerprint(self) -> str:
        """What the export shows of the nonce (a credential): the first 16 hex digits of its
        SHA-256. Anyone holding the token can compute it from the token's third part."""
        return hashlib.sha256(self.nonce.encode()).hexdigest()[:16]


class PartlyUnavailable(StateUnavailable):
    """Some devices of a `track` call committed, the others could not (on a Redis Cluster, their
    node failed): nothing of the latter was written, so their pings may be sent again."""

    def __init__(self, committed: Mapping[str, DeviceOutcome], unavailable: Collection[str],
                 reason: str) -> None:
        super().__init__(reason)
        self.committed = dict(committed)
        self.unavailable = frozenset(unavailable)


class StateStore(ABC):
    @abstractmethod
    async def open(self) -> None:
        """Connect / load the snapshot. Called once at start."""

    @abstractmethod
    async def close(self) -> None:
        """Disconnect / write the snapshot. Called once at clean shutdown."""

    @abstractmethod
    async def healthy(self) -> bool:
        """Reachable right now (for /readyz); never raises."""

    # -- devices ---------------------------------------------------------------------------

    @abstractmethod
    async def get_profile(self, device_id: str) -> DeviceProfile | None: ...

    @abstractmethod
    async def update_profile(self, device_id: str, edit: ProfileEdit) -> ProfileWrite | None:
        """Atomically per device: stored profile → `edit` → write the profile, append the
        consent change; compare-and-set on the device's version, like `track`. Returns what was
        written (None: `edit` wrote nothing).

        Revoking location consent also ends the device's stays and timers without events."""

    async def put_profile(self, profile: DeviceProfile, change: ConsentChange | None) -> None:
        """Store `profile` whatever is stored (tests, tools); the API edits with update_profile."""
        await self.update_profile(profile.device_id, lambda _stored: ProfileWrite(profile, change))

    @abstractmethod
    async def consent_history(self, device_id: str) -> list[ConsentChange]: ...

    @abstractmethod
    async def visits(self, device_id: str) -> list[Visit]: ...

    @abstractmethod
    async def erase(self, device_id: str, record: ErasureRecord) -> bool:
        """Delete everything about the device, keep `record`; False if it was unknown."""

    @abstractmethod
    async def erasure_record(self, device_hash: str) -> ErasureRecord | None: ...

    @abstractmethod
    async def history(self, device_id: str) -> DeviceHistory:
        """The device's visits and the pushes decided for it (with their opens), as the
        policy reads them."""

    @abstractmethod
    async def decisions(self, device_id: str) -> list[dict[str, Any]]:
        """The device's recent decisions, oldest first (the last DECISIONS_KEPT)."""

    @abstractmethod
    async def record_open(self, device_id: str, push_id: str, at: float) -> float | None:
        """Record that the device opened the push at `at` (fatigue reads it). Returns the time
        of the open as stored (the first one reported: an app may report it again), None when
        the device has no such push (a holdout is not one: it was never sent)."""

    @abstractmethod
    async def set_token(self, device_id: str, token: StoredToken | None) -> bool:
        """Make `token` the device's current device token (None: it has none), durably and
        atomically per device, which revokes the one before. Counts as a write of the device
        (its version moves), so a batch computed with the old nonce meanwhile is computed
        again. False, writing nothing, when the device is not registered (no profile)."""

    @abstractmethod
    async def stored_token(self, device_id: str) -> StoredToken | None:
        """The device's current device token, for the export."""

    # -- tracking --------------------------------------------------------------------------

    @abstractmethod
    async def track(self, device_ids: Collection[str], compute: Compute) -> dict[str, DeviceOutcome]:
        """Atomically per device: snapshot → compute → write state, visits and due time.

        An outcome with `decide` (geopush.engine, DECISIONS IN TWO STEPS) gets the device's
        history, read after the snapshot and before the commit; its decisions, reservations
        and forgotten pushes are written in the same compare-and-set as its state.

        Returns the committed outcome of every device compute returned one for. StateUnavailable
        when nothing could be committed; PartlyUnavailable when some devices could not (their
        outcomes are not written) while the others were. A device
        compute returns no outcome for is not written (a read-only peek is fine); an outcome
        with `state` None writes no state or visits."""

    @abstractmethod
    async def stored_track(self, device_id: str) -> StoredTrack:
        """The device's tracking record, read-only: state, due times, version."""

    @abstractmethod
    async def claim_due(self, now: float, limit: int, lease_s: float) -> list[str]:
        """Devices with a timer due by `now`, each handed to one caller only (until the lease
        runs out, so a crashed instance's timers are taken over)."""

    # -- the outbox (contract §7, geopush.delivery) ----------------------------------------
    # Entries are written by `track`, in the commit of their decision (DeviceOutcome.queued).

    @abstractmethod
    async def claim_pushes(self, now: float, limit: int, *, grace_s: float,
                           lease_s: float = SEND_LEASE_S
                           ) -> list[tuple[OutboxEntry, DeviceProfile | None]]:
        """Up to `limit` due entries, each handed to one caller only: marked `sending` under a
        lease of `lease_s` (geopush.delivery.outbox.began), with the device's profile as it
        is now. An
        entry in `sending` whose lease ran out is claimed again (its sender died mid-send).
        `grace_s`: how long after its event a push may still be committed (policy.max_event_lag
        and a commit's deadline); a due hint whose entry is missing past it is dropped."""

    @abstractmethod
    async def finish_pushes(self, ends: Sequence[tuple[OutboxEntry, int]]
                            ) -> list[bool | None]:
        """For each (entry, attempt): write `entry` (after an attempt: final, or queued for
        another) if the push is still the caller's: `sending`, its attempts still `attempt`
        (the claim's). True when written; False, writing nothing, when another caller took it
        over (the lease ran out) or it was cancelled or erased meanwhile; None when it could
        not be told (Redis did not answer): the entry stays `sending` until its lease."""

    async def finish_push(self, entry: OutboxEntry, attempt: int) -> bool:
        """One of `finish_pushes`; StateUnavailable when it could not be told."""
        [written] = await self.finish_pushes([(entry, attempt)])
        if written is None:
            raise StateUnavailable("the push's state could not be written; it is sent again "
                                   "when its lease runs out")
        return written

    @abstractmethod
    async def put_push(self, entry: OutboxEntry) -> bool:
        """Queue an entry outside a decision's commit: an ops test push (outside caps). False,
        queuing nothing, when the device is not registered (never, or erased meanwhile)."""

    @abstractmethod
    async def cancel_pushes(self, device_id: str, *, category: str | None = None,
                            rule_id: str | None = None, reason: str, now: float) -> list[str]:
        """Cancel the device's queued pushes (of `category`, of `rule_id`; None: any); the ids
        cancelled. A push being sent right now is not recalled: its next attempt, if any, is
        cancelled by the consent check before it."""

    @abstractmethod
    async def pending_pushes(self, limit: int) -> list[tuple[str, str]]:
        """(push_id, device_id) of up to `limit` pushes not final yet, soonest due first (the
        kill switch walks them; entries decide, this may name some that just ended)."""

    @abstractmethod
    async def outbox(self, device_id: str) -> list[OutboxEntry]:
        """The device's entries, oldest first (the export, stats)."""

    @abstractmethod
    async def outbox_overview(self, now: float) -> tuple[int, float | None]:
        """How many pushes are not final yet, and the age in seconds of the oldest of them
        (by its event time; None when there is none)."""

    # -- retention (contract §8: a periodic job, once per cluster) --------------------------

    @abstractmethod
    async def purge(self, cutoff: float) -> int:
        """Forget, of every device, the visits that ended, the pushes and holdouts (with their
        opens and outbox entries) decided, and the decisions made before `cutoff`
        (retention.history ago); how many records went. A device's version moves when
        anything of it went, so a decision computed on the old history is computed again."""

    async def records(self, device_ids: Sequence[str]) -> list[DeviceRecords]:
        """The records of these devices (unknown ones left out); Redis reads them in one
        pipelined round trip."""
        found = []
        for device_id in device_ids:
            history = await self.history(device_id)
            track = await self.stored_track(device_id)
            stays = [(s.store_id, s.enter_ts) for s in track.state.stays.values()] \
                if track.state is not None else []
            found.append(DeviceRecords(device_id, history, await self.decisions(device_id),
                                       await self.outbox(device_id), stays))
        return found

    @abstractmethod
    def device_ids(self, batch: int = 500) -> AsyncIterator[list[str]]:
        """Every device the store knows, in batches (no order; on Redis a SCAN, so a device
        written meanwhile may be missed or given twice)."""

    # -- counters the instances share (the delivery report, geopush.delivery.report) -------

    @abstractmethod
    async def add_counts(self, bucket: str, counts: Mapping[str, int], ttl_s: float) -> None:
        """Add to the bucket's counters (kept `ttl_s` after the last add). Counts, not
        records: an add whose answer was lost is not resolved (it may count twice)."""

    @abstractmethod
    async def read_counts(self, bucket: str) -> dict[str, int]:
        """The bucket's counters ({} when none)."""

    # -- flags every instance reads (ops controls) ----------------------------------------

    @abstractmethod
    async def set_flag(self, name: str, value: str | None) -> None:
        """Set (None: clear) a flag every instance reads within a second or two."""

    @abstractmethod
    async def get_flag(self, name: str) -> str | None: ...

    # -- leases: periodic jobs that run once per cluster (geopush.service.jobs) -------------

    @abstractmethod
    async def take_lease(self, name: str, holder: str, ttl_s: float) -> bool:
        """Take or renew the lease `name` for `holder` for `ttl_s`; False when another holder
        has it."""

    @abstractmethod
    async def release_lease(self, name: str, holder: str) -> None:
        """Give the lease up, if `holder` still has it."""

    # -- the published configuration (reload, contract §6) --------------------------------

    @abstractmethod
    async def publish_config(self, payload: bytes) -> int:
        """Make `payload` the configuration every instance should run; returns its serial,
        one more than the last publish's."""

    @abstractmethod
    async def config_serial(self) -> int:
        """The latest publish's serial (0: none yet); cheap enough to poll every second."""

    @abstractmethod
    async def published_config(self) -> tuple[int, bytes] | None:
        """The latest publish with its serial, read together (None: none yet)."""

    # -- the weather copies instances share (geopush.weather.source) ----------------------

    @abstractmethod
    async def weather_cells(self, cells: Collection[str]) -> dict[str, bytes]:
        """The stored value of each cell that has one."""

    @abstractmethod
    async def put_weather_cells(self, values: Mapping[str, bytes]) -> None:
        """Store these cells' values (the latest fetch wins: safe to send again)."""

    # -- export ----------------------------------------------------------------------------

    async def export(self, device_id: str) -> dict[str, Any] | None:
        """Everything this store holds about the device (JSON-ready), None if it is unknown.

        `profile` as stored, `consent_history` oldest first, `visits`, `pushes` (and holdouts:
        what caps count) and `decisions` (with their reasons) oldest first, times in epoch
        seconds. The service adds what other stores hold."""
        profile = await self.get_profile(device_id)
        consent = await self.consent_history(device_id)
        history = await self.history(device_id)
        visits = history.visits
        decisions = await self.decisions(device_id)
        outbox = await self.outbox(device_id)
        if profile is None and not consent and not visits and not history.pushes \
                and not decisions and not outbox:
            return None
        return {
            "profile": profile.model_dump(mode="json") if profile is not None else None,
            "consent_history": [c.model_dump(mode="json") for c in consent],
            "visits": [
                {"store_id": v.store_id, "geofence_id": v.geofence_id, "start": v.start,
                 "end": v.end}
                for v in visits
            ],
            "pushes": [
                {"push_id": p.push_id, "ts": p.ts, "rule_id": p.rule_id, "store_id": p.store_id,
                 "category": p.category, "outcome": p.outcome, "opened_at": p.opened_at}
                for p in sorted(history.pushes, key=lambda p: p.ts)
            ],
            # the pushes' messages and delivery: every attempt's outcome (test pushes too)
            "outbox": [entry_to_json(e) for e in outbox],
            "decisions": decisions,
        }

