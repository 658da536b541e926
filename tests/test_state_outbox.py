"""The outbox in the state store (contract §7, §10), on every backend: a push decided is queued
in the commit of its decision; each due push is handed to one claimer at a time; an attempt
whose claimer died is taken over with the same push_id when its lease runs out; an attempt's end
is written only by the claimer that still holds it; cancels, erasures and commits that lost
their compare-and-set leave nothing to send; the memory backend keeps queued pushes across a
crash and sends again at start what was being sent."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

from geopush.delivery.outbox import SEND_LEASE_S, OutboxEntry, after_attempt
from geopush.delivery.senders.base import SendResult
from geopush.state.base import StateStore
from geopush.state.journal import StateFiles
from geopush.state.memory import MemoryStore
from geopush.state.redis import RedisStore
from tests.test_state_decisions import DEVICE, FAR, T0, A, B, _join, _ping, two_instances

__all__ = ["two_instances"]  # the fixture, shared

GRACE = 660.0  # policy.max_event_lag (10 min) + a minute


async def _decide_push(store: StateStore, at: float = T0, where: tuple[float, float] = A,
                       device_id: str = DEVICE) -> str:
    await _ping(store, at - 600, FAR, device_id=device_id)
    outcome = await _ping(store, at, where, device_id=device_id)
    assert outcome is not None
    pushes = [d for d in outcome.decisions if d.outcome == "push"]
    assert len(pushes) == 1 and pushes[0].push_id is not None
    return pushes[0].push_id


async def test_a_push_decided_is_queued_with_its_message_and_claimed_once(
        store: StateStore) -> None:
    await _join(store)
    push_id = await _decide_push(store)
    [entry] = await store.outbox(DEVICE)
    assert (entry.push_id, entry.state, entry.title, entry.body) == (
        push_id, "queued", "Hello", "at node/a")
    assert entry.category == "marketing" and entry.expires_at == T0 + 1800
    assert entry.timezone == "Europe/Ljubljana"
    claimed = await store.claim_pushes(T0 + 1, 10, grace_s=GRACE)
    assert [(e.push_id, e.state, e.attempts) for e, _ in claimed] == [(push_id, "sending", 1)]
    assert claimed[0][1] is not None and claimed[0][1].push_token == "fcm-1"
    # under its lease nobody else gets it
    assert await store.claim_pushes(T0 + 2, 10, grace_s=GRACE) == []
    assert await store.outbox_overview(T0 + 5) == (1, 5.0)
    sent = after_attempt(claimed[0][0], SendResult("sent"), T0 + 3)
    assert await store.finish_push(sent, 1)
    [stored] = await store.outbox(DEVICE)
    assert (stored.state, stored.sent_at, stored.attempts) == ("sent", T0 + 3, 1)
    assert await store.claim_pushes(T0 + 10 + SEND_LEASE_S, 10, grace_s=GRACE) == []
    assert await store.outbox_overview(T0 + 100) == (0, None)
    exported = await store.export(DEVICE)
    assert exported is not None
    [push] = exported["pushes"]
    assert push["push_id"] == push_id and exported["outbox"][0]["state"] == "sent"


async def test_an_attempt_whose_claimer_died_is_taken_over_after_its_lease(
        store: StateStore) -> None:
    await _join(store)
    push_id = await _decide_push(store)
    [(first, _)] = await store.claim_pushes(T0 + 1, 10, grace_s=GRACE)
    # the first claimer dies mid-send; its lease runs out
    assert await store.claim_pushes(T0 + SEND_LEASE_S, 10, grace_s=GRACE) == []
    [(second, _)] = await store.claim_pushes(T0 + 2 + SEND_LEASE_S, 10, grace_s=GRACE)
    assert (second.push_id, second.attempts) == (push_id, 2)
    # the dead claimer's late answer is not written over the one that holds it now
    assert not await store.finish_push(after_attempt(first, SendResult("sent"), T0 + 70), 1)
    assert await store.finish_push(after_attempt(second, SendResult("sent"), T0 + 71), 2)
    [stored] = await store.outbox(DEVICE)
    assert (stored.state, stored.attempts, stored.sent_at) == ("sent", 2, T0 + 71)


async def test_a_retry_comes_back_when_due_and_expires_within_its_ttl(store: StateStore) -> None:
    await _join(store)
    await _decide_push(store)
    [(entry, _)] = await store.claim_pushes(T0 + 1, 10, grace_s=GRACE)
    retry = after_attempt(entry, SendResult("retry", "http_503", retry_after_s=100.0), T0 + 2)
    assert retry.state == "queued" and retry.next_attempt_at >= T0 + 102
    assert await store.finish_push(retry, 1)
    assert await store.claim_pushes(T0 + 101, 10, grace_s=GRACE) == []
    [(again, _)] = await store.claim_pushes(retry.next_attempt_at, 10, grace_s=GRACE)
    assert again.attempts == 2
    # the server asks for longer than the ttl left (1800 s from the event): expired
    late = after_attempt(again, SendResult("retry", "QUOTA_EXCEEDED", retry_after_s=3600.0),
                         T0 + 200)
    assert late.state == "expired"
    assert await store.finish_push(late, 2)
    assert [e.state for e in await store.outbox(DEVICE)] == ["expired"]


async def test_revoking_marketing_consent_cancels_queued_marketing_pushes(
        store: StateStore) -> None:
    await _join(store)
    push_id = await _decide_push(store)
    assert await store.cancel_pushes(DEVICE, category="service", reason="x", now=T0) == []
    assert await store.cancel_pushes(DEVICE, category="marketing",
                                     reason="marketing consent was revoked",
                                     now=T0 + 1) == [push_id]
    [entry] = await store.outbox(DEVICE)
    assert (entry.state, entry.reason) == ("cancelled", "marketing consent was revoked")
    assert await store.claim_pushes(T0 + 2, 10, grace_s=GRACE) == []
    assert (await store.outbox_overview(T0 + 3))[0] == 0


async def test_erasure_takes_the_outbox_and_its_due_push_is_dropped(store: StateStore) -> None:
    from geopush.devices import ErasureRecord, device_hash

    await _join(store)
    await _decide_push(store)
    assert await store.erase(DEVICE, ErasureRecord(device_hash=device_hash(DEVICE, "k" * 32),
                                                   erased_at=T0 + 1, last_consent=None))
    assert await store.outbox(DEVICE) == []
    # nothing names the device any more: not even the due set's member of its queued push
    assert await store.outbox_overview(T0 + 2) == (0, None)
    assert await store.claim_pushes(T0 + 2, 10, grace_s=GRACE) == []
    assert await store.claim_pushes(T0 + 2 * SEND_LEASE_S + GRACE, 10, grace_s=GRACE) == []
    assert (await store.outbox_overview(T0 + 3 * SEND_LEASE_S + GRACE))[0] == 0


async def test_a_hint_without_its_entry_is_dropped_only_once_its_commit_cannot_land(
        two_instances: tuple[RedisStore, RedisStore]) -> None:
    """On Redis the due set's member is written before the compare-and-set: one that lost
    leaves a member whose entry never comes; it must not be dropped while the commit might
    still land, and must not linger after. (The memory backend writes no hint apart from its
    entry.)"""
    store = two_instances[0]
    await _join(store)
    push_id = await _decide_push(store)
    entries = store.keys.device(DEVICE).outbox
    raw = await store._redis.hget(entries, push_id)
    await store._redis.hdel(entries, push_id)  # as if the compare-and-set had failed
    assert await store.claim_pushes(T0 + 1, 10, grace_s=GRACE) == []
    assert await store._redis.zcard(store.keys.outbox_due) == 1  # kept: within the grace
    await store._redis.hset(entries, push_id, raw)  # the commit lands after all
    [(entry, _)] = await store.claim_pushes(T0 + 2 + SEND_LEASE_S, 10, grace_s=GRACE)
    assert entry.push_id == push_id
    await store._redis.hdel(entries, push_id)
    assert await store.claim_pushes(T0 + GRACE + 3 * SEND_LEASE_S, 10, grace_s=GRACE) == []
    assert await store._redis.zcard(store.keys.outbox_due) == 0  # past the grace: dropped


async def test_a_test_push_is_queued_for_a_registered_device_only(store: StateStore) -> None:
    await _join(store)
    entry = OutboxEntry("01KTESTTESTTESTTESTTESTTES", DEVICE, "ops-test", "", "", "test",
                        "service", "UTC", "Test", "from ops", {}, T0, T0 + 600,
                        next_attempt_at=T0, updated_at=T0, test=True)
    await store.put_push(entry)
    [(claimed, profile)] = await store.claim_pushes(T0 + 1, 10, grace_s=GRACE)
    assert claimed.test and claimed.push_id == entry.push_id and profile is not None


async def test_two_instances_claiming_at_once_send_each_push_once(
        two_instances: tuple[RedisStore, RedisStore]) -> None:
    one, two = two_instances
    devices = [f"claim-{n}" for n in range(12)]
    for device_id in devices:
        await _join(one, device_id)
        await _decide_push(one, device_id=device_id, where=A if len(device_id) % 2 else B)
    got = await asyncio.gather(*(
        instance.claim_pushes(T0 + 1, 3, grace_s=GRACE)
        for _ in range(4) for instance in (one, two)))
    claimed = [entry.push_id for batch in got for entry, _ in batch]
    assert len(claimed) == len(set(claimed)) == len(devices)


async def test_memory_queued_pushes_survive_a_crash_and_sending_ones_are_sent_again(
        tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    state = MemoryStore(path, fsync_every=3600.0)  # only durable rows reach the disk at once
    await state.open()
    try:
        await _join(state)
        first = await _decide_push(state)
        await _ping(state, T0 + 7 * 86_400 - 600, FAR)
        second = await _decide_push(state, at=T0 + 7 * 86_400, where=B)
        await state.claim_pushes(T0 + 7 * 86_400 + 1, 10, grace_s=GRACE)  # both: sending
        await state.sync()
        crashed = MemoryStore(path)
        crashed._restore(StateFiles(path), read_only=True)
        # queued at the decision's commit, sending after it: both found, both due at once
        assert {e.push_id: e.state for e in await crashed.outbox(DEVICE)} == {
            first: "sending", second: "sending"}
        claimed = await crashed.claim_pushes(T0 + 7 * 86_400 + 2, 10, grace_s=GRACE)
        assert sorted(e.push_id for e, _ in claimed) == sorted([first, second])
        assert all(e.attempts == 2 for e, _ in claimed)
    finally:
        await state.close()
    again = MemoryStore(path)  # and from the snapshot of a clean shutdown
    await again.open()
    try:
        entries = await again.outbox(DEVICE)
        assert [dataclasses.replace(e, updated_at=0) for e in entries] == [
            dataclasses.replace(e, updated_at=0) for e in entries]
        assert {e.push_id for e in entries} == {first, second}
    finally:
        await again.close()


async def test_a_test_push_for_an_erased_device_is_refused_and_names_it_nowhere(
        store: StateStore) -> None:
    entry = OutboxEntry("01KTESTTESTTESTTESTTESTTES", "gone", "ops-test", "", "", "test",
                        "service", "UTC", "Test", "from ops", {}, T0, T0 + 600,
                        next_attempt_at=T0, updated_at=T0, test=True)
    assert not await store.put_push(entry)
    assert await store.outbox("gone") == []
    assert await store.outbox_overview(T0 + 1) == (0, None)


async def test_a_hint_whose_device_was_erased_is_dropped_at_once(
        two_instances: tuple[RedisStore, RedisStore]) -> None:
    """A decision's commit racing an erasure may leave its due member (written before the
    compare-and-set) naming a device that no longer exists: the first claim drops it, rather
    than after the commit's grace."""
    store = two_instances[0]
    await _join(store)
    await _decide_push(store)
    keys = store.keys.device(DEVICE)
    await store._redis.delete(keys.outbox, keys.profile)  # what the erasure left of it
    assert await store.claim_pushes(T0 + 1, 10, grace_s=GRACE) == []
    assert await store._redis.zcard(store.keys.outbox_due) == 0
