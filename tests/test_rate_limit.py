"""The per-device ping rate limit (contract §13, `limits.device_pings_per_minute`): a token bucket
of ping time kept in the device's state (geopush.geo.transitions, PING RATE LIMIT).

Tables for the bucket, the checks that run before it, and what a limited ping leaves alone; a
property that splitting pings into batches (with the state written and read back between them,
as the stores do) accepts the same pings as a straightforward level-and-refill bucket."""

from __future__ import annotations

import math
from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from geopush.devices import Consent, DeviceProfile
from geopush.engine import DeviceSnapshot, Engine
from geopush.geo.index import EARTH_RADIUS_M, GeofenceIndex
from geopush.geo.model import DeviceState, Ping
from geopush.geo.transitions import Tracker, process_batch
from geopush.state.codec import decode_track, encode_track

LAT, LON = 48.85, 2.35
M_PER_DEG = EARTH_RADIUS_M * math.pi / 180
INDEX = GeofenceIndex([LAT], [LON], [100.0], hysteresis_m=25.0, ids=["shop"],
                      store_ids=["store-1"])
T0 = 1_780_000_000.0


def tracker(per_minute: int | None) -> Tracker:
    return Tracker(INDEX, pings_per_minute=per_minute)


def far(device: str, ts: float) -> Ping:
    return Ping(device, ts, LAT + 2000 / M_PER_DEG, LON, 10.0)


def at_shop(device: str, ts: float) -> Ping:
    return Ping(device, ts, LAT, LON, 10.0)


def codes(per_minute: int | None, offsets: Sequence[float],
          state: DeviceState | None = None) -> str:
    """One batch of one device's pings at T0 + offsets: '.' accepted, 'R' rate_limited,
    'O' out_of_order, in input order."""
    pings = [far("d", T0 + o) for o in offsets]
    step = tracker(per_minute).process("d", state, pings)
    marks = ["."] * len(pings)
    for r in step.rejected:
        marks[r.position] = {"rate_limited": "R", "out_of_order": "O"}[r.code]
    return "".join(marks)


@pytest.mark.parametrize(("per_minute", "offsets", "expected"), [
    # a full bucket takes C pings at once, then one every 60/C s of ping time
    pytest.param(3, [0, 0, 0, 0], "...R", id="burst-of-capacity"),
    pytest.param(3, [0, 0, 0, 19.9, 20], "...R.", id="refill-one-per-interval"),
    pytest.param(3, [0, 0, 0, 20, 20, 40], "....R.", id="refill-is-by-ping-time"),
    pytest.param(3, [0, 0, 0, 60, 60, 60, 60], "......R", id="refills-to-capacity-not-beyond"),
    pytest.param(3, [0, 0, 0, 3600, 3600, 3600, 3600], "......R", id="an-hour-refills-capacity-only"),
    pytest.param(120, [0] * 121, "." * 120 + "R", id="default-120-at-one-instant"),
    # 60 / C not a binary fraction: the sums drift by rounding, the count must not
    pytest.param(100, [0] * 101, "." * 100 + "R", id="100-at-one-instant"),
    pytest.param(9, [0] * 10, "." * 9 + "R", id="9-at-one-instant"),
    pytest.param(11, [0] * 12, "." * 11 + "R", id="11-at-one-instant"),
    pytest.param(1000, [0] * 1001, "." * 1000 + "R", id="1000-at-one-instant"),
    pytest.param(120, [i * 0.5 for i in range(400)], "." * 400, id="120-per-minute-steady"),
    pytest.param(120, [i * 0.25 for i in range(300)],
                 "." * 239 + "R" + ".R" * 30, id="twice-the-rate"),
    # a phone offline for hours uploads its backlog at once: ts spread at 1 Hz, all pass
    pytest.param(120, [float(i) for i in range(5000)], "." * 5000, id="offline-backlog-1hz"),
    # limited pings take nothing: the next interval's ping passes
    pytest.param(1, [0, 1, 2, 59, 60, 61, 120], ".RRR.R.", id="rejections-do-not-consume"),
    pytest.param(None, [0] * 500, "." * 500, id="off-none"),
    pytest.param(0, [0] * 500, "." * 500, id="off-zero"),
])
def test_the_bucket_accepts(per_minute: int | None, offsets: list[float], expected: str) -> None:
    assert codes(per_minute, offsets) == expected


def test_out_of_order_pings_are_turned_away_first_and_do_not_consume() -> None:
    # in one batch pings are sorted; across batches the older ones are out_of_order
    first = tracker(2).process("d", None, [far("d", T0 + 10)])
    state = first.state
    assert codes(2, [5, 5, 5, 10, 11], state) == "OOO.R"


def test_a_limited_ping_changes_nothing_else_in_the_state() -> None:
    t = tracker(1)
    state = t.process("d", None, [far("d", T0)]).state
    before = (state.last_ts, list(state.recent), dict(state.stays), state.bucket_empty_ts)
    step = t.process("d", state, [at_shop("d", T0 + 30)])  # inside a fence, but limited
    assert [r.code for r in step.rejected] == ["rate_limited"]
    assert step.events == []
    assert (state.last_ts, state.recent, state.stays, state.bucket_empty_ts) == before
    assert "limits.device_pings_per_minute" in step.rejected[0].message
    assert "2026-05-28T20:27:40Z" in step.rejected[0].message  # from when it is taken again


def test_the_bucket_travels_in_the_stored_track() -> None:
    t = tracker(3)
    state = t.process("d", None, [far("d", T0)] * 2).state
    assert state.bucket_empty_ts is not None
    raw = encode_track(state, None)
    assert raw.startswith(b"[3,")
    state, _ = decode_track(raw)
    assert codes(3, [0, 0], state) == ".R"


def test_devices_have_buckets_of_their_own() -> None:
    t = tracker(2)
    pings = [far(d, T0) for d in ("a", "b") for _ in range(3)]
    steps = process_batch(t, pings, {})
    assert {d: [r.position for r in s.rejected] for d, s in steps.items()} == {"a": [2], "b": [5]}


def test_pings_without_consent_do_not_consume() -> None:
    engine = Engine(tracker(2))
    consenting = DeviceSnapshot(DeviceProfile(device_id="d", consent=Consent(location=True)),
                                None)
    refused = engine.ingest([far("d", T0)] * 5, {"d": DeviceSnapshot(None, None)})["d"]
    assert {r.code for r in refused.rejected} == {"no_consent"} and refused.state is None
    outcome = engine.ingest([far("d", T0)] * 3, {"d": consenting})["d"]
    assert outcome.accepted == 2
    assert [(r.index, r.code) for r in outcome.rejected] == [(2, "rate_limited")]


# -- property: batches and the stores change nothing ------------------------------------------

def _reference(per_minute: int, pings: Sequence[Ping]) -> set[int]:
    """A level-and-refill token bucket per device, written the obvious way; pings in ts order."""
    interval = 60.0 / per_minute
    level: dict[str, float] = {}
    seen: dict[str, float] = {}
    accepted = set()
    for i, p in enumerate(pings):
        if p.device_id in seen:
            refill = (p.ts - seen[p.device_id]) / interval
            level[p.device_id] = min(per_minute, level[p.device_id] + refill)
        else:
            level[p.device_id] = per_minute
        seen[p.device_id] = p.ts
        if level[p.device_id] >= 1:
            level[p.device_id] -= 1
            accepted.add(i)
    return accepted


# times in quarter seconds and power-of-two intervals (0.25 s .. 4 s): the float arithmetic
# of both buckets is exact, so they must agree ping for ping
gaps = st.one_of(st.just(0.0), st.sampled_from([0.25, 0.5, 1.0, 4.0, 30.0, 60.0, 600.0]),
                 st.integers(0, 40).map(lambda q: q / 4))


@st.composite
def time_ordered(draw: st.DrawFn) -> list[Ping]:
    n = draw(st.integers(1, 120))
    ts = T0
    pings = []
    for _ in range(n):
        ts += draw(gaps)
        pings.append(draw(st.sampled_from([far, at_shop]))(draw(st.sampled_from("abc")), ts))
    return pings


@settings(max_examples=200, deadline=None)
@given(st.sampled_from([15, 30, 60, 120, 240]), time_ordered(), st.data())
def test_any_split_into_batches_accepts_the_same_pings(
        per_minute: int, pings: list[Ping], data: st.DataObject) -> None:
    cuts = sorted(data.draw(st.sets(st.integers(1, len(pings)), max_size=8)))
    t = tracker(per_minute)
    states: dict[str, DeviceState | None] = {}
    accepted = set()
    start = 0
    for end in [*cuts, len(pings)]:
        if end == start:
            continue
        batch = pings[start:end]
        steps = process_batch(t, batch, states)
        rejected = {r.position for s in steps.values() for r in s.rejected}
        accepted |= {start + k for k in range(len(batch)) if k not in rejected}
        # between batches the stores keep the track as JSON
        states = {d: decode_track(encode_track(s, None))[0] if s else None
                  for d, s in states.items()}
        start = end
    assert accepted == _reference(per_minute, pings)


@pytest.mark.parametrize("per_minute", [1, 9, 11, 14, 17, 100, 121, 999, 2999, 3600])
@pytest.mark.parametrize("t0", [946_684_800.5, T0 + 0.123, 4_294_967_000.777])
def test_a_burst_at_one_instant_is_exactly_the_limit(per_minute: int, t0: float) -> None:
    # from 2000 to 2106, at every limit the settings allow, float rounding included
    step = tracker(per_minute).process("d", None, [far("d", t0)] * (per_minute + 1))
    assert [r.position for r in step.rejected] == [per_minute]
