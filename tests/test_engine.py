"""Engine: consent gate, request positions, accepted counts, timers (contract §5, §6)."""

from __future__ import annotations

import math

import pytest

from geopush.devices import Consent, DeviceProfile
from geopush.engine import DeviceOutcome, DeviceSnapshot, Engine, Rejected
from geopush.geo.index import EARTH_RADIUS_M, GeofenceIndex
from geopush.geo.model import DeviceState, Ping
from geopush.geo.transitions import Tracker

LAT, LON = 48.85, 2.35
M_PER_DEG = EARTH_RADIUS_M * math.pi / 180
INDEX = GeofenceIndex([LAT], [LON], [100.0], hysteresis_m=25.0, ids=["shop"],
                      store_ids=["store-1"])
ENGINE = Engine(Tracker(INDEX, stale_after_s=7200.0, dwell_plan=lambda fid: (300.0,)))


def inside(device: str, ts: float) -> Ping:
    return Ping(device, ts, LAT, LON, 10.0)


def outside(device: str, ts: float) -> Ping:
    return Ping(device, ts, LAT + 1000 / M_PER_DEG, LON, 10.0)


def profile(device: str, *, location: bool = True, marketing: bool = False) -> DeviceProfile:
    return DeviceProfile(device_id=device,
                         consent=Consent(location=location, marketing=marketing))


def snap(device: str, state: DeviceState | None = None, **consent: bool) -> DeviceSnapshot:
    return DeviceSnapshot(profile(device, **consent), state)


@pytest.mark.parametrize("snapshots", [
    pytest.param({}, id="unknown-device"),
    pytest.param({"d": DeviceSnapshot(None, None)}, id="no-profile"),
    pytest.param({"d": snap("d", location=False, marketing=True)}, id="no-location-consent"),
    pytest.param({"d": snap("d", DeviceState(last_ts=5.0), location=False)},
                 id="consent-revoked-with-state"),
])
def test_pings_without_location_consent_are_rejected_and_leave_no_state(
    snapshots: dict[str, DeviceSnapshot]
) -> None:
    outcomes = ENGINE.ingest([inside("d", 10), inside("d", 20)], snapshots)
    outcome = outcomes["d"]
    assert outcome.state is None  # nothing to store
    assert outcome.events == [] and outcome.visits == []
    assert outcome.accepted == 0
    assert outcome.next_due is None
    assert [(r.index, r.code) for r in outcome.rejected] == [(0, "no_consent"), (1, "no_consent")]
    assert "'d'" in outcome.rejected[0].message and "consent" in outcome.rejected[0].message


@pytest.mark.parametrize(("stored", "presented", "codes"), [
    pytest.param("n1", "n1", [], id="current-token"),
    pytest.param("n2", "n1", ["forbidden", "forbidden"], id="replaced"),
    pytest.param(None, "n1", ["forbidden", "forbidden"], id="revoked-or-erased"),
    pytest.param("n1", None, [], id="a-server-key"),
])
def test_a_device_token_s_pings_need_the_device_s_current_nonce(
        stored: str | None, presented: str | None, codes: list[str]) -> None:
    snapshot = DeviceSnapshot(profile("d"), None, stored)
    outcome = ENGINE.ingest([inside("d", 10), inside("d", 20)], {"d": snapshot},
                            nonces={"d": presented} if presented is not None else None)["d"]
    assert [r.code for r in outcome.rejected] == codes
    assert outcome.accepted == 2 - len(codes)
    assert (outcome.state is None) == bool(codes)  # a refused token stores nothing


def test_a_revoked_token_is_refused_before_consent_is_looked_at() -> None:
    """Refused `forbidden` whether or not the device exists or consents: the answer to a
    revoked token says nothing of the device."""
    for snapshots in ({}, {"d": DeviceSnapshot(None, None)},
                      {"d": snap("d", location=False)}):
        outcome = ENGINE.ingest([inside("d", 10)], snapshots, nonces={"d": "n1"})["d"]
        assert [r.code for r in outcome.rejected] == ["forbidden"]


def test_consenting_device_is_tracked() -> None:
    outcome = ENGINE.ingest([inside("d", 10)], {"d": snap("d")})["d"]
    assert outcome.accepted == 1 and outcome.rejected == []
    assert [(e.type, e.geofence_id, e.store_id, e.ts) for e in outcome.events] == [
        ("enter", "shop", "store-1", 10)]
    assert outcome.state is not None and set(outcome.state.stays) == {"shop"}
    assert outcome.next_due == 310.0  # the 5-minute dwell


def test_assume_consent_admits_unknown_devices() -> None:
    outcome = ENGINE.ingest([inside("stranger", 0)], {}, assume_consent=True)["stranger"]
    assert outcome.accepted == 1
    assert [e.type for e in outcome.events] == ["enter"]


def test_positions_map_rejections_to_request_indexes_and_count_accepted() -> None:
    prior = ENGINE.ingest([outside("a", 100)], {"a": snap("a")})["a"].state
    pings = [inside("a", 150), inside("b", 10), outside("a", 50), outside("a", 200),
             inside("c", 1)]
    snapshots = {"a": snap("a", prior), "c": snap("c", location=False)}
    outcomes = ENGINE.ingest(pings, snapshots, positions=[3, 4, 5, 6, 7])
    assert set(outcomes) == {"a", "b", "c"}
    a, b, c = outcomes["a"], outcomes["b"], outcomes["c"]
    assert [(r.index, r.code) for r in a.rejected] == [(5, "out_of_order")]
    assert a.accepted == 2
    assert [(e.type, e.ts) for e in a.events] == [("enter", 150), ("exit", 200)]
    assert b.rejected == [Rejected(4, "no_consent", b.rejected[0].message)]
    assert b.state is None and b.accepted == 0
    assert [(r.index, r.code) for r in c.rejected] == [(7, "no_consent")]


def test_default_positions_are_indexes_in_the_batch() -> None:
    outcomes = ENGINE.ingest([inside("x", 0), inside("y", 0)], {"y": snap("y")})
    assert [r.index for r in outcomes["x"].rejected] == [0]
    assert outcomes["y"].accepted == 1


def test_positions_must_match_the_pings() -> None:
    with pytest.raises(ValueError, match="positions"):
        ENGINE.ingest([inside("x", 0)], {}, positions=[0, 1])


def test_every_ping_out_of_order_keeps_the_state_and_counts_nothing() -> None:
    prior = ENGINE.ingest([inside("a", 100)], {"a": snap("a")})["a"].state
    outcome = ENGINE.ingest([outside("a", 10)], {"a": snap("a", prior)})["a"]
    assert outcome.accepted == 0
    assert [r.code for r in outcome.rejected] == ["out_of_order"]
    assert outcome.events == []
    assert outcome.state is not None and set(outcome.state.stays) == {"shop"}


def test_empty_batch() -> None:
    assert ENGINE.ingest([], {}) == {}


def test_fire_runs_due_timers() -> None:
    state = ENGINE.ingest([inside("a", 0)], {"a": snap("a")})["a"].state
    early = ENGINE.fire("a", snap("a", state), 299.0)
    assert early.events == [] and early.next_due == 300.0
    dwell = ENGINE.fire("a", snap("a", state), 300.0)
    assert [(e.type, e.ts, e.dwell_s) for e in dwell.events] == [("dwell", 300.0, 300.0)]
    assert dwell.next_due == 7200.0
    stale = ENGINE.fire("a", snap("a", dwell.state), 7200.0)
    assert [(e.type, e.ts, e.stale) for e in stale.events] == [("exit", 0.0, True)]
    assert stale.next_due is None
    assert stale.state is not None and stale.state.stays == {}


def test_fire_without_state_changes_nothing() -> None:
    assert ENGINE.fire("a", snap("a"), 1e9) == DeviceOutcome(None)
