"""One suite, both backends: what the service relies on from any StateStore."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import pytest

from geopush.devices import Consent, ConsentChange, DeviceProfile, ErasureRecord, device_hash
from geopush.engine import DeviceOutcome, DeviceSnapshot, Engine
from geopush.geo.index import GeofenceIndex
from geopush.geo.model import Ping
from geopush.geo.transitions import Tracker
from geopush.state.base import StateStore, StoredToken

T0 = 1_780_000_000.0  # 2026-05-28
SHOP = (48.1374, 11.5755)  # Munich, Marienplatz
FAR = (48.1500, 11.6000)  # ~2.3 km away
DWELL_S = 600.0
STALE_S = 7200.0
LEASE_S = 30.0


def _engine() -> Engine:
    index = GeofenceIndex([SHOP[0]], [SHOP[1]], [100.0], ids=["node/1"], store_ids=["store-1"])
    return Engine(Tracker(index, stale_after_s=STALE_S, min_visit_s=300.0,
                          dwell_plan=lambda _fid: (DWELL_S,)))


ENGINE = _engine()


def _profile(device_id: str = "dev-1", *, location: bool = True, marketing: bool = True,
             **fields: object) -> DeviceProfile:
    return DeviceProfile.model_validate({
        "device_id": device_id, "consent": {"location": location, "marketing": marketing},
        "platform": "android", "push_token": "tok", **fields,
    })


async def _join(state: StateStore, profile: DeviceProfile, at: float = T0 - 60) -> None:
    change = ConsentChange(at=at, location=profile.consent.location,
                           marketing=profile.consent.marketing, source="PUT")
    await state.put_profile(profile, change)


async def _ping(state: StateStore, *pings: tuple[float, tuple[float, float]],
                device_id: str = "dev-1") -> DeviceOutcome:
    batch = [Ping(device_id, ts, lat, lon, accuracy_m=10.0) for ts, (lat, lon) in pings]
    outcomes = await state.track([device_id], lambda snaps: ENGINE.ingest(batch, snaps))
    return outcomes[device_id]


async def _fire(state: StateStore, device_ids: Sequence[str], now: float
                ) -> dict[str, DeviceOutcome]:
    def compute(snaps: Mapping[str, DeviceSnapshot]) -> dict[str, DeviceOutcome]:
        return {d: ENGINE.fire(d, s, now) for d, s in snaps.items()}

    return await state.track(device_ids, compute)


def _types(outcome: DeviceOutcome) -> list[str]:
    return [e.type for e in outcome.events]


# -- profiles and consent ------------------------------------------------------------------


async def test_profile_put_get_replace(store: StateStore) -> None:
    assert await store.get_profile("dev-1") is None
    first = _profile(locale="de-DE", attributes={"loyalty_tier": "gold"}, segments=["regular"])
    await store.put_profile(first, None)
    assert await store.get_profile("dev-1") == first
    second = _profile(locale="fr", segments=[])
    await store.put_profile(second, None)
    assert await store.get_profile("dev-1") == second
    assert await store.get_profile("dev-2") is None


async def test_consent_trail_keeps_every_change_with_its_time(store: StateStore) -> None:
    await _join(store, _profile(), at=T0)
    revoked = _profile(marketing=False)
    await store.put_profile(revoked, ConsentChange(at=T0 + 10, location=True, marketing=False,
                                                   source="PATCH"))
    await store.put_profile(revoked, None)  # no consent change: no trail entry
    trail = await store.consent_history("dev-1")
    assert [(c.at, c.location, c.marketing, c.source) for c in trail] == [
        (T0, True, True, "PUT"), (T0 + 10, True, False, "PATCH"),
    ]
    assert await store.consent_history("dev-2") == []


# -- tracking ------------------------------------------------------------------------------


async def test_track_commits_state_visits_and_timer(store: StateStore) -> None:
    await _join(store, _profile())
    assert _types(await _ping(store, (T0, SHOP))) == ["enter"]
    # the dwell timer is due at enter + dwell, not before
    assert await store.claim_due(T0 + DWELL_S - 1, 10, LEASE_S) == []
    assert await store.claim_due(T0 + DWELL_S, 10, LEASE_S) == ["dev-1"]
    fired = await _fire(store, ["dev-1"], T0 + DWELL_S)
    assert _types(fired["dev-1"]) == ["dwell"]
    assert fired["dev-1"].next_due == T0 + STALE_S
    # the fire's commit moved the timer to the stale exit, past the lease
    assert await store.claim_due(T0 + DWELL_S + LEASE_S + 1, 10, LEASE_S) == []
    # a ping inside, then outside: the stay becomes a visit
    assert _types(await _ping(store, (T0 + 700, SHOP), (T0 + 900, FAR))) == ["exit"]
    assert [(v.store_id, v.geofence_id, v.start, v.end) for v in await store.visits("dev-1")] == [
        ("store-1", "node/1", T0, T0 + 900)]
    assert await store.claim_due(T0 + 10 * STALE_S, 10, LEASE_S) == []  # no stay, no timer


async def test_state_carries_across_batches_and_old_pings_are_out_of_order(
    store: StateStore,
) -> None:
    await _join(store, _profile())
    assert _types(await _ping(store, (T0, SHOP))) == ["enter"]
    assert _types(await _ping(store, (T0 + 60, SHOP))) == []  # the stay was remembered
    late = await _ping(store, (T0 + 30, FAR))
    assert [r.code for r in late.rejected] == ["out_of_order"]
    assert late.events == []
    assert _types(await _ping(store, (T0 + 90, FAR))) == ["exit"]


async def test_unknown_or_unconsenting_devices_store_nothing(store: StateStore) -> None:
    outcome = await _ping(store, (T0, SHOP), device_id="stranger")
    assert [r.code for r in outcome.rejected] == ["no_consent"]
    assert outcome.state is None
    assert await store.claim_due(T0 + 10 * STALE_S, 10, LEASE_S) == []
    assert await store.export("stranger") is None


async def test_revoking_location_consent_ends_stays_and_timers_silently(
    store: StateStore,
) -> None:
    await _join(store, _profile())
    assert _types(await _ping(store, (T0, SHOP))) == ["enter"]
    await store.put_profile(_profile(location=False),
                            ConsentChange(at=T0 + 5, location=False, marketing=True))
    assert await store.claim_due(T0 + 10 * STALE_S, 10, LEASE_S) == []
    assert (await _fire(store, ["dev-1"], T0 + 10 * STALE_S))["dev-1"].events == []
    # consent given again: the old stay is gone, so being there again is a fresh enter
    await _join(store, _profile(), at=T0 + 100)
    assert _types(await _ping(store, (T0 + 120, SHOP))) == ["enter"]
    assert await store.visits("dev-1") == []


async def test_claim_due_hands_a_device_out_once_until_the_lease_runs_out(
    store: StateStore,
) -> None:
    for device_id in ("dev-1", "dev-2"):
        await _join(store, _profile(device_id))
        await _ping(store, (T0, SHOP), device_id=device_id)
    due = T0 + DWELL_S
    assert sorted(await store.claim_due(due, 10, LEASE_S)) == ["dev-1", "dev-2"]
    assert await store.claim_due(due, 10, LEASE_S) == []  # taken
    # the claimer crashed: after the lease both come back; `limit` bounds one claim
    first = await store.claim_due(due + LEASE_S, 1, LEASE_S)
    second = await store.claim_due(due + LEASE_S, 1, LEASE_S)
    assert len(first) == len(second) == 1
    assert sorted(first + second) == ["dev-1", "dev-2"]
    assert await store.claim_due(due + LEASE_S, 10, LEASE_S) == []


async def test_firing_a_device_without_state_drops_its_timer(store: StateStore) -> None:
    await _join(store, _profile())
    await _ping(store, (T0, SHOP))
    await store.put_profile(_profile(location=False), None)
    await _join(store, _profile())  # consent back, no ping yet: no state, no timer
    outcome = (await _fire(store, ["dev-1"], T0 + DWELL_S))["dev-1"]
    assert outcome.state is None
    assert await store.claim_due(T0 + 10 * STALE_S, 10, LEASE_S) == []


# -- device tokens -------------------------------------------------------------------------


async def _nonce_seen(store: StateStore, device_id: str = "dev-1") -> str | None:
    """The nonce `track` hands the compute (a read-only peek)."""
    seen: list[str | None] = []

    def peek(snapshots: Mapping[str, DeviceSnapshot]) -> dict[str, DeviceOutcome]:
        seen.append(snapshots[device_id].token_nonce)
        return {}

    await store.track([device_id], peek)
    return seen[-1]


async def test_a_device_token_is_kept_apart_from_the_profile_and_goes_with_an_erasure(
        store: StateStore) -> None:
    token = StoredToken("nonce-1", T0)
    assert await store.set_token("dev-1", token) is False  # not registered: nothing written
    assert await store.stored_token("dev-1") is None
    await _join(store, _profile())
    assert await store.set_token("dev-1", token) is True
    assert await store.stored_token("dev-1") == token
    assert await _nonce_seen(store) == "nonce-1"  # in the read the ping path makes
    # a PUT (consent revoked and given back included) keeps it
    await store.put_profile(_profile(location=False, segments=["x"]), None)
    await _join(store, _profile())
    assert await store.stored_token("dev-1") == token
    replaced = StoredToken("nonce-2", T0 + 1)
    assert await store.set_token("dev-1", replaced) is True
    assert await _nonce_seen(store) == "nonce-2"
    assert await store.set_token("dev-1", None) is True
    assert await store.stored_token("dev-1") is None and await _nonce_seen(store) is None
    await store.set_token("dev-1", replaced)
    record = ErasureRecord(device_hash=device_hash("dev-1", "k"), erased_at=T0 + 2,
                           last_consent=None)
    assert await store.erase("dev-1", record) is True
    assert await store.stored_token("dev-1") is None
    await _join(store, _profile())  # the id comes back: without a token
    assert await store.stored_token("dev-1") is None and await _nonce_seen(store) is None


async def test_a_revoked_token_s_pings_are_refused_and_nothing_is_stored(
        store: StateStore) -> None:
    await _join(store, _profile())
    await store.set_token("dev-1", StoredToken("current", T0))
    pings = [Ping("dev-1", T0, *SHOP, accuracy_m=10.0)]
    outcome = (await store.track(["dev-1"], lambda snaps: ENGINE.ingest(
        pings, snaps, nonces={"dev-1": "superseded"})))["dev-1"]
    assert [r.code for r in outcome.rejected] == ["forbidden"] and outcome.accepted == 0
    assert (await store.stored_track("dev-1")).state is None
    outcome = (await store.track(["dev-1"], lambda snaps: ENGINE.ingest(
        pings, snaps, nonces={"dev-1": "current"})))["dev-1"]
    assert outcome.accepted == 1 and [e.type for e in outcome.events] == ["enter"]


# -- export and erasure --------------------------------------------------------------------


async def test_export_holds_profile_consent_and_visits(store: StateStore) -> None:
    await _join(store, _profile(), at=T0 - 60)
    await _ping(store, (T0, SHOP), (T0 + 400, SHOP), (T0 + 500, FAR))
    export = await store.export("dev-1")
    assert export is not None
    assert export["profile"]["device_id"] == "dev-1"
    assert export["consent_history"] == [
        {"at": T0 - 60, "location": True, "marketing": True, "source": "PUT"}]
    assert export["visits"] == [
        {"store_id": "store-1", "geofence_id": "node/1", "start": T0, "end": T0 + 500}]


async def test_erase_removes_everything_and_keeps_the_erasure_record(store: StateStore) -> None:
    await _join(store, _profile())
    await _join(store, _profile("dev-2"))
    await _ping(store, (T0, SHOP), (T0 + 400, SHOP), (T0 + 500, FAR), (T0 + 600, SHOP))
    await _ping(store, (T0, SHOP), device_id="dev-2")
    key = "pseudonym-key"
    record = ErasureRecord(device_hash=device_hash("dev-1", key), erased_at=T0 + 700,
                           last_consent=Consent(location=True, marketing=True))
    assert await store.erase("dev-1", record) is True
    assert await store.get_profile("dev-1") is None
    assert await store.consent_history("dev-1") == []
    assert await store.visits("dev-1") == []
    assert await store.export("dev-1") is None
    assert await store.claim_due(T0 + 10 * STALE_S, 10, LEASE_S) == ["dev-2"]
    assert await store.erasure_record(device_hash("dev-1", key)) == record
    # a ping after the erasure is from an unknown device
    assert [r.code for r in (await _ping(store, (T0 + 800, SHOP))).rejected] == ["no_consent"]
    # the other device is untouched
    assert await store.get_profile("dev-2") is not None
    # erasing an unknown device says so and records nothing
    other = ErasureRecord(device_hash=device_hash("nobody", key), erased_at=T0, last_consent=None)
    assert await store.erase("nobody", other) is False
    assert await store.erasure_record(other.device_hash) is None


async def test_healthy(store: StateStore) -> None:
    assert await store.healthy() is True


# -- batches and limits --------------------------------------------------------------------


async def test_visits_keep_the_latest_up_to_the_limit(
    store: StateStore, monkeypatch: pytest.MonkeyPatch,
) -> None:
    for module in ("geopush.state.memory", "geopush.state.redis"):
        monkeypatch.setattr(f"{module}.VISITS_KEPT", 3)
    await _join(store, _profile())

    def visit_at(start: float) -> list[tuple[float, tuple[float, float]]]:
        return [(start, SHOP), (start + 400, SHOP), (start + 500, FAR)]

    # four visits in one batch (one commit appends several), then two more one by one
    await _ping(store, *[p for k in range(4) for p in visit_at(T0 + 1000 * k)])
    for k in (4, 5):
        await _ping(store, *visit_at(T0 + 1000 * k))
    assert [(v.start, v.end) for v in await store.visits("dev-1")] == [
        (T0 + 1000 * k, T0 + 1000 * k + 500) for k in (3, 4, 5)]


async def test_a_batch_of_thousands_of_devices_commits_each_of_them(store: StateStore) -> None:
    """More devices than the Redis commit script handles in one chunk, consenting or not."""
    ids = [f"dev-{d}" for d in range(2500)]
    for d, device_id in enumerate(ids):
        if d % 10 != 9:  # every tenth is unknown
            await store.put_profile(_profile(device_id, location=d % 10 != 8), None)
    first = [Ping(d, T0, *SHOP, accuracy_m=10.0) for d in ids]
    outcomes = await store.track(ids, lambda snaps: ENGINE.ingest(first, snaps))
    entered = sorted(d for d, o in outcomes.items() if _types(o) == ["enter"])
    assert entered == sorted(d for k, d in enumerate(ids) if k % 10 < 8)
    assert all([r.code for r in outcomes[d].rejected] == ["no_consent"]
               for k, d in enumerate(ids) if k % 10 >= 8)
    second = [Ping(d, T0 + 500, *FAR, accuracy_m=10.0) for d in ids]
    outcomes = await store.track(ids, lambda snaps: ENGINE.ingest(second, snaps))
    assert sorted(d for d, o in outcomes.items() if _types(o) == ["exit"]) == entered
    assert await store.claim_due(T0 + 10 * STALE_S, 5000, LEASE_S) == []  # no stay left
    assert [v.end for v in await store.visits(entered[-1])] == [T0 + 500]


async def test_a_published_configuration_is_read_back_whole_with_a_growing_serial(
        store: StateStore) -> None:
    assert await store.config_serial() == 0
    assert await store.published_config() is None
    first = await store.publish_config(b'{"v": 1}')
    second = await store.publish_config(b'{"v": 2}' + bytes(range(256)))  # any bytes
    assert second == first + 1 == 2
    assert await store.config_serial() == 2
    assert await store.published_config() == (2, b'{"v": 2}' + bytes(range(256)))
