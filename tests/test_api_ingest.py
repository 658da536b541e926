"""The Ingestor: concurrent requests grouped into one `track` call get exactly the answers they
would get alone."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Collection
from pathlib import Path
from typing import Any

import pytest

from geopush.devices import Consent, DeviceProfile
from geopush.engine import DeviceOutcome
from geopush.geo.stores import load_stores
from geopush.metrics import Metrics
from geopush.service import ingest
from geopush.service.active import build_geofencing
from geopush.service.ingest import Ingestor
from geopush.state.base import Compute, StateUnavailable
from geopush.state.memory import MemoryStore
from tests.api_support import load_trace, ping, settings_for

NOW = 1_800_000_000.0


class _CountingStore(MemoryStore):
    def __init__(self) -> None:
        super().__init__()
        self.calls: list[list[str]] = []
        self.fail = False

    async def track(self, device_ids: Collection[str], compute: Compute
                    ) -> dict[str, DeviceOutcome]:
        self.calls.append(list(device_ids))
        if self.fail:
            raise StateUnavailable("down")
        return await super().track(device_ids, compute)


async def _ingestor(tmp_path: Path, devices: list[str]) -> tuple[Ingestor, _CountingStore]:
    settings = settings_for(tmp_path)
    geo = build_geofencing(load_stores(settings.stores_file), settings)
    store = _CountingStore()
    for d in devices:
        await store.put_profile(DeviceProfile(device_id=d, consent=Consent(location=True)), None)
    return Ingestor(store, lambda: geo.engine, Metrics()), store


async def test_concurrent_requests_are_grouped_and_answered_as_if_alone(tmp_path: Path) -> None:
    devices = [f"d{i}" for i in range(20)]
    grouped, store = await _ingestor(tmp_path, devices)
    alone, _ = await _ingestor(tmp_path, devices)
    trace = load_trace()
    requests: list[list[dict[str, Any]]] = []
    for i, d in enumerate(devices):
        pings = [ping(d, p) for p in trace[290 + i:310 + i]]
        pings.insert(3, {"device_id": d, "lat": 95})  # a rejection at index 3 of each
        requests.append(pings)
    now = time.time()
    # each phone its own credential (device tokens): no share of a group is exceeded
    answers = await asyncio.gather(*(grouped.ingest(r, now, f"phone-{i}")
                                     for i, r in enumerate(requests)))
    assert len(store.calls) == 1 and sorted(store.calls[0]) == sorted(devices)
    for request, answer in zip(requests, answers, strict=True):
        expected = await alone.ingest(request, now)
        assert answer.as_json() == expected.as_json()
        assert [r.index for r in answer.rejected] == [3]


async def test_requests_sharing_a_device_go_in_separate_groups_in_order(tmp_path: Path
                                                                         ) -> None:
    ingestor, store = await _ingestor(tmp_path, ["a", "b"])
    trace = load_trace()
    first = [ping("a", p) for p in trace[290:300]]
    # within one share (BULK_SHARE_PINGS): one part, one group
    second = [ping("a", p) for p in trace[300:340]] + [ping("b", trace[0])]
    now = time.time()
    one, two = await asyncio.gather(ingestor.ingest(first, now), ingestor.ingest(second, now))
    assert len(store.calls) == 2
    assert one.accepted == 10 and two.accepted == 41
    assert [e.type for e in one.events + two.events] == ["enter", "exit"]


async def test_a_failed_group_fails_every_request_in_it(tmp_path: Path) -> None:
    ingestor, store = await _ingestor(tmp_path, ["a", "b"])
    store.fail = True
    p = load_trace()[0]
    results = await asyncio.gather(ingestor.ingest([ping("a", p)], time.time()),
                                   ingestor.ingest([ping("b", p)], time.time()),
                                   return_exceptions=True)
    assert len(store.calls) == 1
    assert all(isinstance(r, StateUnavailable) for r in results)
    # and the next group works again
    store.fail = False
    assert (await ingestor.ingest([ping("a", p)], time.time())).accepted == 1


@pytest.mark.parametrize("first_fails", [False, True])
async def test_requests_arriving_while_a_group_is_in_the_store_form_one_next_group(
        tmp_path: Path, first_fails: bool) -> None:
    devices = [f"d{i}" for i in range(6)]
    ingestor, store = await _ingestor(tmp_path, devices)
    release = asyncio.Event()
    inner_track = store.track

    async def slow_track(device_ids: Collection[str], compute: Compute
                         ) -> dict[str, DeviceOutcome]:
        if len(store.calls) == 0:  # the first group waits in the "store"
            store.fail = first_fails
            store.calls.append(list(device_ids))
            await release.wait()
            store.fail = False
            if first_fails:
                raise StateUnavailable("down")
            return await MemoryStore.track(store, device_ids, compute)
        return await inner_track(device_ids, compute)

    store.track = slow_track  # type: ignore[method-assign]
    p = load_trace()[0]
    first = asyncio.ensure_future(ingestor.ingest([ping("d0", p)], time.time()))
    await asyncio.sleep(0.01)
    later = []
    for d in devices[1:]:  # one a loop iteration: each would have been a group of its own
        later.append(asyncio.ensure_future(ingestor.ingest([ping(d, p)], time.time())))
        await asyncio.sleep(0)
    await asyncio.sleep(0.01)
    assert store.calls == [["d0"]]  # none started while the first is in the store
    release.set()
    answers = await asyncio.gather(*later)
    assert [a.accepted for a in answers] == [1] * 5
    assert len(store.calls) == 2 and sorted(store.calls[1]) == devices[1:]
    if first_fails:
        with pytest.raises(StateUnavailable):
            await first
    else:
        assert (await first).accepted == 1


async def test_while_the_store_fails_queued_groups_do_not_wait_for_each_other(
        tmp_path: Path) -> None:
    ingestor, store = await _ingestor(tmp_path, ["a", "b"])
    release = asyncio.Event()
    started: list[list[str]] = []

    async def hanging_track(device_ids: Collection[str], compute: Compute
                            ) -> dict[str, DeviceOutcome]:
        started.append(sorted(device_ids))
        await release.wait()  # a store that answers only after its timeout
        raise StateUnavailable("timed out")

    store.track = hanging_track  # type: ignore[method-assign]
    p = load_trace()[0]
    first = asyncio.ensure_future(ingestor.ingest([ping("b", p)], time.time()))
    await asyncio.sleep(0.01)
    # two groups queue behind it (they share device "a")
    queued = [asyncio.ensure_future(ingestor.ingest([ping("a", p)], time.time())),
              asyncio.ensure_future(ingestor.ingest([ping("a", p)], time.time()))]
    await asyncio.sleep(0.01)
    assert started == [["b"]]
    release.set()  # the first times out: the store is failing ...
    release = asyncio.Event()
    await asyncio.sleep(0.01)
    assert started == [["b"], ["a"], ["a"]]  # ... so both queued groups started at once
    release.set()
    for task in [first, *queued]:
        with pytest.raises(StateUnavailable):
            await task


# -- fairness (geopush.service.ingest, FAIRNESS) -------------------------------------------------

def _flood(devices: list[str], per_device: int, start: int = 0) -> list[dict[str, Any]]:
    """per_device pings of each device, 1 s apart, devices interleaved in time order."""
    trace = load_trace()
    return [ping(d, trace[start + k]) for k in range(per_device) for d in devices]


class _HeldStore(_CountingStore):
    """The first `track` waits until released: what queues behind it shows the order."""

    def __init__(self) -> None:
        super().__init__()
        self.release = asyncio.Event()
        self.sizes: list[int] = []

    async def track(self, device_ids: Collection[str], compute: Compute
                    ) -> dict[str, DeviceOutcome]:
        if not self.calls:
            self.calls.append(list(device_ids))
            await self.release.wait()
            return await MemoryStore.track(self, device_ids, compute)
        return await super().track(device_ids, compute)


async def _held(tmp_path: Path, devices: list[str]) -> tuple[Ingestor, _HeldStore]:
    settings = settings_for(tmp_path)
    geo = build_geofencing(load_stores(settings.stores_file), settings)
    store = _HeldStore()
    for d in devices:
        await store.put_profile(DeviceProfile(device_id=d, consent=Consent(location=True)), None)
    return Ingestor(store, lambda: geo.engine, Metrics()), store


async def test_a_single_ping_goes_in_the_next_group_not_behind_a_queued_flood(
        tmp_path: Path) -> None:
    flooders = [f"f{i}" for i in range(100)]
    ingestor, store = await _held(tmp_path, [*flooders, "first", "phone"])
    p = load_trace()[0]
    first = asyncio.ensure_future(ingestor.ingest([ping("first", p)], time.time(), "a"))
    await asyncio.sleep(0.01)  # "first" is in the store, held
    flood = asyncio.ensure_future(ingestor.ingest(_flood(flooders, 10), time.time(), "flood"))
    await asyncio.sleep(0.01)  # the flood is read and queued behind it
    single = asyncio.ensure_future(ingestor.ingest([ping("phone", p)], time.time(), "phone"))
    await asyncio.sleep(0.01)
    store.release.set()
    assert (await single).accepted == 1 and (await first).accepted == 1
    assert (await flood).accepted == 1000
    # the flood went in shares of at most BULK_SHARE_PINGS pings, one group each ...
    assert len(store.calls) == 2 + -(-1000 // ingest.BULK_SHARE_PINGS)
    # ... and the phone's ping in a group of small parts ahead of them, not after the last
    assert store.calls[1] == ["phone"]


async def test_a_single_ping_is_answered_while_a_flood_share_is_in_the_store(
        tmp_path: Path) -> None:
    """The express lane: with Redis a share that decides takes round trips and a commit per
    deciding device, seconds in which a phone's ping queued behind it would wait. A group of
    small parts goes beside it when the two share no device; bulk never does, and a ping of a
    device in the share waits for it."""
    flooders = [f"f{i}" for i in range(100)]
    ingestor, store = await _held(tmp_path, [*flooders, "phone"])
    trace = load_trace()
    flood = asyncio.ensure_future(ingestor.ingest(_flood(flooders, 10), time.time(), "flood"))
    await asyncio.sleep(0.01)  # its first share is in the store, held
    held = set(store.calls[0])
    assert len(store.calls) == 1 and len(held) * 10 <= ingest.BULK_SHARE_PINGS
    single = await asyncio.wait_for(
        ingestor.ingest([ping("phone", trace[0])], time.time(), "phone"), timeout=2.0)
    assert single.accepted == 1 and store.calls[1] == ["phone"]
    assert not flood.done() and len(store.calls) == 2  # the flood's next share waits
    # a ping of a device of the held share goes after it, never beside it
    mine = next(iter(held))
    later = asyncio.ensure_future(ingestor.ingest([ping(mine, trace[50])], time.time(), "x"))
    await asyncio.sleep(0.05)
    assert not later.done() and len(store.calls) == 2
    store.release.set()
    assert (await flood).accepted == 1000
    assert (await later).rejected == [] and (await later).accepted == 1


async def test_a_flood_share_never_joins_a_group_of_waiting_phones(tmp_path: Path) -> None:
    """Phones' pings waiting in a group of their own stay there: a share of bulk joining it
    would make them wait for the share to be read, decided and written (on Redis, for the
    length of a whole 1000-ping request)."""
    flooders = [f"f{i}" for i in range(100)]
    ingestor, store = await _held(tmp_path, [*flooders, "first", "phone"])
    p = load_trace()[0]
    first = asyncio.ensure_future(ingestor.ingest([ping("first", p)], time.time(), "a"))
    await asyncio.sleep(0.01)  # "first" is in the store, held
    single = asyncio.ensure_future(ingestor.ingest([ping("phone", p)], time.time(), "phone"))
    await asyncio.sleep(0.01)  # the phone's group waits for it
    flood = asyncio.ensure_future(ingestor.ingest(_flood(flooders, 10), time.time(), "flood"))
    await asyncio.sleep(0.01)
    store.release.set()
    await first
    assert (await single).accepted == 1 and (await flood).accepted == 1000
    assert store.calls[1] == ["phone"]
    assert all("phone" not in call for call in store.calls[2:])


async def test_a_ping_never_overtakes_an_earlier_one_of_its_device(tmp_path: Path) -> None:
    flooders = [f"f{i}" for i in range(100)]
    ingestor, store = await _held(tmp_path, [*flooders, "first"])
    trace = load_trace()
    first = asyncio.ensure_future(ingestor.ingest([ping("first", trace[0])], time.time(), "a"))
    await asyncio.sleep(0.01)
    flood = asyncio.ensure_future(ingestor.ingest(_flood(flooders, 10), time.time(), "flood"))
    await asyncio.sleep(0.01)
    # f99's pings are in the flood's last share: its next ping must go after them
    later = asyncio.ensure_future(ingestor.ingest([ping("f99", trace[50])], time.time(), "x"))
    await asyncio.sleep(0.01)
    store.release.set()
    await first
    assert (await flood).accepted == 1000
    assert (await later).rejected == []  # not out_of_order: it went after the flood's share
    assert "f99" in store.calls[-1] and len(store.calls[-1]) == 1


async def test_a_big_request_is_cut_by_device_and_answered_as_if_whole(tmp_path: Path) -> None:
    devices = [f"d{i:02d}" for i in range(60)]
    cut, store = await _ingestor(tmp_path, devices)
    pings: list[Any] = _flood(devices, 8, start=296)  # into the bakery: enter events
    pings.insert(7, {"device_id": "d00", "lat": 95})  # invalid, at index 7
    pings.append(ping("d03", load_trace()[0]))  # d03's earliest last: sorted within its part
    now = time.time()
    answer = await cut.ingest(pings, now)
    assert len(store.calls) > 1
    for call in store.calls:
        assert len(call) * 8 <= ingest.BULK_SHARE_PINGS  # whole devices, each with its 8 or 9 pings
    assert sorted(d for call in store.calls for d in call) == devices  # each device once
    with pytest.MonkeyPatch.context() as mp:  # the same request, not cut
        mp.setattr(ingest, "BULK_SHARE_PINGS", 10_000)
        whole, store = await _ingestor(tmp_path, devices)
        expected = await whole.ingest(pings, now)
        assert len(store.calls) == 1
    got, want = answer.as_json(), expected.as_json()
    # events are in time order; at one time, devices come in no particular order (a stable
    # sort by device keeps each device's own order, exits before enters)
    for body in (got, want):
        body["events"].sort(key=lambda e: (e["ts"], e["device_id"]))
    assert got == want
    assert [(r.index, r.code) for r in answer.rejected] == [(7, "invalid")]
    assert answer.accepted == len(pings) - 1 and answer.events


async def test_a_share_that_fails_is_rejected_unavailable_and_the_rest_stands(
        tmp_path: Path) -> None:
    devices = [f"d{i:02d}" for i in range(60)]
    ingestor, store = await _ingestor(tmp_path, devices)
    inner = store.track

    async def second_fails(device_ids: Collection[str], compute: Compute
                           ) -> dict[str, DeviceOutcome]:
        if len(store.calls) == 1:
            store.calls.append(list(device_ids))
            raise StateUnavailable("down")
        return await inner(device_ids, compute)

    store.track = second_fails  # type: ignore[method-assign]
    pings = _flood(devices, 8)
    answer = await ingestor.ingest(pings, time.time())
    failed = set(store.calls[1])
    assert failed and {r.code for r in answer.rejected} == {"unavailable"}
    assert {pings[r.index]["device_id"] for r in answer.rejected} == failed
    assert answer.accepted == len(pings) - 8 * len(failed)
    # and when every share fails, nothing was committed: the request fails as a whole
    store.fail = True
    store.track = inner  # type: ignore[method-assign]
    with pytest.raises(StateUnavailable):
        await ingestor.ingest(_flood(devices, 8, start=8), time.time())


async def test_each_credential_gets_its_own_share_of_a_group(tmp_path: Path) -> None:
    a = [f"a{i}" for i in range(40)]
    b = [f"b{i}" for i in range(40)]
    ingestor, store = await _held(tmp_path, [*a, *b, "first"])
    first = asyncio.ensure_future(ingestor.ingest([ping("first", load_trace()[0])],
                                                  time.time(), "x"))
    await asyncio.sleep(0.01)
    requests = [ingestor.ingest(_flood(a, 10), time.time(), "a"),
                ingestor.ingest(_flood(b, 10), time.time(), "b")]
    flooding = asyncio.ensure_future(asyncio.gather(*requests))
    await asyncio.sleep(0.01)
    store.release.set()
    await first
    assert [r.accepted for r in await flooding] == [400, 400]
    for call in store.calls[1:]:
        for prefix in "ab":
            assert 10 * sum(d.startswith(prefix) for d in call) <= ingest.BULK_SHARE_PINGS
    # both went side by side, not one after the other
    assert any({d[0] for d in call} == {"a", "b"} for call in store.calls[1:])
    assert len(ingestor._turns) == 0  # the table of credentials' turns empties
