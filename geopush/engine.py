"""The pure engine: pings (or a timer) + what the store knows of each device → new state,
events and decisions.

The service and `geopush replay` both run pings through here. No I/O: the state store loads
snapshots before and writes outcomes after.

DECISIONS IN TWO STEPS. Most pings cause no event, and most events match no rule's trigger, so
the device's history (visits, pushes, opens) is not read with the snapshot: that would cost
every ping a bigger read. When an event of a moment does trigger a rule, the outcome carries
`decide`, a pure continuation; the store then reads that device's history (a second round trip
on Redis, for those devices only) and calls it before the commit, in the same attempt. The
decisions and the caps they reserve are written in the device's compare-and-set with its
tracker state, so two instances racing for one device cannot both push past a cap: the loser's
commit fails, and it decides again on the history the winner wrote.
"""

from __future__ import annotations

import itertools
import operator
from collections.abc import Callable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

from geopush.delivery.outbox import OutboxEntry, entry_of
from geopush.devices import DeviceProfile, has_location_consent
from geopush.geo.model import DeviceState, Event, Ping, Visit
from geopush.geo.transitions import Tracker, process_batch
from geopush.rules.conditions import Weather
from geopush.rules.decide import Decider, Decision, DeviceHistory, Explanation, PushRecord

WeatherAt = Callable[[float, float], Weather | None]
"""(lat, lon) → the weather there now, from an in-process copy (never the network)."""

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
    # DECISIONS IN TWO STEPS: set when a rule's trigger matches an event; the store calls it
    # with the device's history before committing, which fills the fields below. Tuples, not
    # lists: an outcome is built for every device of every batch, and few ever decide.
    decide: Callable[[DeviceHistory], None] | None = None
    decisions: Sequence[Decision] = ()
    reserved: Sequence[PushRecord] = ()  # pushes and holdouts decided
    # the outbox entries of the pushes decided: written in the same commit as their
    # reservations, so a push is queued if and only if its cap reservation stands
    queued: Sequence[OutboxEntry] = ()
    forgotten: Sequence[str] = ()  # push ids past retention.history
    # how many of the oldest stored visits are past retention.history (visits are stored in
    # the order they ended)
    visits_forgotten: int = 0
    explanations: Sequence[Explanation] = ()  # Engine.explain only


_ts = operator.attrgetter("ts")


class Engine:
    def __init__(self, tracker: Tracker, decider: Decider | None = None, *,
                 explain: bool = False) -> None:
        self.tracker = tracker
        self.decider = decider  # the rules under the policy; None: events only
        # `geopush replay --explain`: every moment is decided, and the rules that are not
        # candidates say why (the service never asks: it would read histories for nothing)
        self.explain = explain
        # `geopush replay`: the clock is virtual and stands at each moment when it is decided,
        # also for timers fired when the input ends (contract §9: nothing is late in replay)
        self.virtual_clock = False

    @property
    def decides(self) -> bool:
        return self.decider is not None and bool(self.decider.rules)

    def ingest(
        self,
        pings: Sequence[Ping],
        snapshots: Mapping[str, DeviceSnapshot],
        *,
        positions: Sequence[int] | None = None,
        assume_consent: bool = False,
        nonces: Mapping[str, str] | None = None,
        now: float | None = None,
        weather: WeatherAt | None = None,
    ) -> dict[str, DeviceOutcome]:
        """Apply a batch of valid pings. Devices without location consent (or unknown ones)
        get every ping rejected `no_consent` and nothing stored. `positions` maps each ping to
        its index in the request (default: its index in `pings`). `nonces`: the devices whose
        pings came with a device token, and the token's nonce: unless it is the device's
        current one (the token was revoked, replaced or the device erased), every ping of the
        device is rejected `forbidden` and nothing is stored.

        `now`: the clock at receipt, for `late` (None: each moment is decided at its own time,
        as replay's virtual clock does); `weather`: where to read the weather from."""
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
        decides = self.decides
        activities = _activities(admitted) if decides else {}
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
            if outcome.events and decides:
                snap = snapshots.get(device_id)
                self._plan(device_id, outcome, snap.profile if snap else None,
                           activities.get(device_id, {}), now, weather)
        return outcomes

    def replay(
        self,
        pings: Sequence[Ping],
        states: MutableMapping[str, DeviceState | None],
        profiles: Mapping[str, DeviceProfile],
        positions: Sequence[int],
        *,
        weather: WeatherAt | None = None,
    ) -> dict[str, DeviceOutcome]:
        """`ingest` for `geopush replay`, whose caller keeps every device's state and has
        checked consent: `states` (device → its state) is updated in place, a new device
        given one there, and an outcome comes back only for the devices with events, visits
        or rejections (most devices of a chunk have none, and a replay of 100,000 devices
        would otherwise build an outcome for each of them at every chunk). Decisions are
        planned as `ingest` plans them, on a virtual clock (now=None)."""
        steps = process_batch(self.tracker, pings, states)  # fills in `states`
        decides = self.decides
        activities = _activities(pings) if decides else {}
        outcomes: dict[str, DeviceOutcome] = {}
        for device_id, step in steps.items():
            outcome = outcomes[device_id] = DeviceOutcome(states[device_id], None, step.events,
                                                          step.visits)
            if step.rejected:
                outcome.rejected = [Rejected(positions[r.position], r.code, r.message)
                                    for r in step.rejected]
            if outcome.events and decides:
                self._plan(device_id, outcome, profiles.get(device_id),
                           activities.get(device_id, {}), None, weather)
        return outcomes

    def fire(self, device_id: str, snapshot: DeviceSnapshot, now: float, *,
             weather: WeatherAt | None = None) -> DeviceOutcome:
        """Fire the device's due timers (dwell, stale exit) at `now`."""
        if snapshot.state is None:
            return DeviceOutcome(None)
        step = self.tracker.fire_due(device_id, snapshot.state, now)
        outcome = DeviceOutcome(step.state, self.tracker.next_due(step.state), step.events,
                                step.visits)
        if outcome.events and self.decides:
            self._plan(device_id, outcome, snapshot.profile, {}, now, weather)
        return outcome

    def _plan(self, device_id: str, outcome: DeviceOutcome, profile: DeviceProfile | None,
              activity: Mapping[float, str | None], now: float | None,
              weather: WeatherAt | None) -> None:
        """Give the outcome its `decide` when some moment of it has a candidate."""
        decider = self.decider
        assert decider is not None
        if profile is None:
            return
        if self.virtual_clock:
            now = None
        # one moment per ping or timer firing: its events share its time (the tracker gives
        # a device's events in time order)
        events = outcome.events
        if len(events) == 1 or events[0].ts == events[-1].ts:
            moments = [events]  # the common case: one ping's events
        else:
            moments = [list(group) for _, group in itertools.groupby(events, key=_ts)]
        if not self.explain:
            moments = [m for m in moments if decider.triggers(m)]
            if not moments:
                return
        explain = self.explain

        def decide(history: DeviceHistory) -> None:
            cutoff = (now if now is not None else moments[-1][0].ts) - decider.history_s
            old = 0
            while old < len(history.visits) and history.visits[old].end < cutoff:
                old += 1
            outcome.visits_forgotten = old
            # this outcome's visits are not stored yet; visit_stats counts only those that
            # ended before each event
            history.visits.extend(outcome.visits)
            decisions: list[Decision] = []
            explanations: list[Explanation] = []
            before = len(history.pushes)
            for events in moments:
                first = events[0]
                # the weather at the store (its cell was preloaded), not where the phone is
                fence = decider.geofences.get(first.geofence_id)
                where = (fence.lat, fence.lon) if fence is not None else (first.lat, first.lon)
                here = weather(*where) if weather is not None else None
                # a dwell or stale exit has no ping of its own: its activity is unknown
                doing = activity.get(first.ts)
                if explain:
                    explanations += decider.not_candidates(
                        device_id, events, profile, history, weather=here, activity=doing)
                decisions += decider.decide(
                    device_id, events, profile, history, weather=here,
                    now=now if now is not None else first.ts, activity=doing)
            outcome.decisions = decisions
            outcome.explanations = explanations
            outcome.reserved = reserved = history.pushes[before:]  # decide appends them
            if reserved:
                categories = {p.push_id: p.category for p in reserved}
                outcome.queued = [
                    entry_of(d, categories[d.push_id], _timezone(decider, d.geofence_id),
                             now if now is not None else d.ts)
                    for d in decisions if d.outcome == "push" and d.push_id in categories]
            outcome.forgotten = decider.forgotten(
                history, now if now is not None else moments[-1][0].ts)

        outcome.decide = decide


def _activities(pings: Sequence[Ping]) -> dict[str, dict[float, str | None]]:
    """device → ping time → the motion activity its ping reported (`when.activity`)."""
    activities: dict[str, dict[float, str | None]] = {}
    for p in pings:
        if p.activity is not None:
            activities.setdefault(p.device_id, {})[p.ts] = p.activity
    return activities


def _timezone(decider: Decider, geofence_id: str) -> str:
    fence = decider.geofences.get(geofence_id)
    return fence.timezone if fence is not None else "UTC"
