"""The pure engine: pings (or a timer) + what the store knows of each device → new state, events.

The service and `geopush replay` both run pings through here; the rules and the anti-pushy
policy will decide on the events here too. No I/O: the state store loads snapshots before and
writes outcomes after.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

from geopush.devices import DeviceProfile, has_location_consent
from geopush.geo.model import DeviceState, Event, Ping, Visit
from geopush.geo.transitions import Tracker, process_batch
from geopush.rules.decide import Decider

RejectCode = Literal["invalid", "no_consent", "out_of_order", "forbidden", "rate_limited",
                     "unavailable"]

REVOKED = ("the device token was revoked or replaced by a newer one: ask your backend for a "
           "new token")


@dataclass(frozen=True, slots=True)
class Rejected:
    index: int  # position of the ping in the request / input
    code: RejectCode
    message: str


@dataclass(slots=True)
class DeviceSnapshot:
    """What the state store holds for a device when a batch comes in."""

    profile: DeviceProfile | None
    state: DeviceState | None
    token_nonce: str | None = None  # the nonce of the device's current token (None: no token)


@dataclass(slots=True)
class DeviceOutcome:
    """What to write back for a device; `state` None means nothing changed."""

    state: DeviceState | None
    next_due: float | None = None
    events: list[Event] = field(default_factory=list)
    visits: list[Visit] = field(default_factory=list)
    rejected: list[Rejected] = field(default_factory=list)
    accepted: int = 0


class Engine:
    def __init__(self, tracker: Tracker, decider: Decider | None = None) -> None:
        self.tracker = tracker
        self.decider = decider  # the rules under the policy; None: events only

    def ingest(
        self,
        pings: Sequence[Ping],
        snapshots: Mapping[str, DeviceSnapshot],
        *,
        positions: Sequence[int] | None = None,
        assume_consent: bool = False,
        nonces: Mapping[str, str] | None = None,
    ) -> dict[str, DeviceOutcome]:
        """Apply a batch of valid pings. Devices without location consent (or unknown ones)
        get every ping rejected `no_consent` and nothing stored. `positions` maps each ping to
        its index in the request (default: its index in `pings`). `nonces`: the devices whose
        pings came with a device token, and the token's nonce: unless it is the device's
        current one (the token was revoked, replaced or the device erased), every ping of the
        device is rejected `forbidden` and nothing is stored."""
        if positions is not None and len(positions) != len(pings):
            raise ValueError(f"positions: {len(positions)} given for {len(pings)} pings; "
                             "expected one request index per ping")
        where = list(positions) if positions is not None else list(range(len(pings)))
        outcomes: dict[str, DeviceOutcome] = {}
        admitted: list[Ping] = []
        admitted_at: list[int] = []
        per_device: dict[str, int] = {}
        for ping, at in zip(pings, where, strict=True):
            snap = snapshots.get(ping.device_id)
            if nonces and ping.device_id in nonces and (
                    snap is None or snap.token_nonce != nonces[ping.device_id]):
                outcome = outcomes.setdefault(ping.device_id, DeviceOutcome(None))
                outcome.rejected.append(Rejected(at, "forbidden", REVOKED))
            elif assume_consent or (snap is not None and has_location_consent(snap.profile)):
                admitted.append(ping)
                admitted_at.append(at)
                per_device[ping.device_id] = per_device.get(ping.device_id, 0) + 1
            else:
                outcome = outcomes.setdefault(ping.device_id, DeviceOutcome(None))
                outcome.rejected.append(Rejected(
                    at, "no_consent",
                    f"device {ping.device_id!r} is unknown or has not given location consent",
                ))
        if not admitted:
            return outcomes
        states = {d: s.state for d, s in snapshots.items()}
        steps = process_batch(self.tracker, admitted, states)  # fills in `states`
        next_due = self.tracker.next_due
        for device_id, count in per_device.items():
            state = states[device_id]
            assert state is not None  # process_batch gave every device of the batch one
            # most devices of a batch have no stay: no timer to look up
            outcome = DeviceOutcome(state, next_due(state) if state.stays else None)
            step = steps.get(device_id)
            if step is not None:
                outcome.events = step.events
                outcome.visits = step.visits
                if step.rejected:
                    outcome.rejected = [Rejected(admitted_at[r.position], r.code, r.message)
                                        for r in step.rejected]
            outcome.accepted = count - len(outcome.rejected)
            outcomes[device_id] = outcome
        return outcomes

    def fire(self, device_id: str, snapshot: DeviceSnapshot, now: float) -> DeviceOutcome:
        """Fire the device's due timers (dwell, stale exit) at `now`."""
        if snapshot.state is None:
            return DeviceOutcome(None)
        step = self.tracker.fire_due(device_id, snapshot.state, now)
        return DeviceOutcome(step.state, self.tracker.next_due(step.state), step.events,
                             step.visits)
