"""Delivery's "done when" with real processes (contract §7, §10, §12): `geopush serve` with the
`fcm` sender pointed at a fake FCM process, a marketer's rule on a store of the real GPS trace
(the Munich drive), the phone streaming that trace over `/v1/stream` with its device token.

- On Redis, a visit sends exactly one FCM message (the rule's text, `data.push_id`, the channel
  of its category); a marketing consent revoked before the drive sends nothing; a device erased
  while its push waits for a retry gets no further attempt and its export is gone.
- SIGKILL right after the decision's answer, during the send (FCM hangs), and right after FCM
  answered, on memory and on Redis: after a restart every decided push ends `sent`, and every
  FCM request of a push carries that push's id (a duplicate is allowed, it replaces the first
  notification on the phone; a second id is not). On Redis a push left `sending` is taken over
  only once its lease (`delivery.send_lease`) ran out, by the restarted instance or another.
- A send that hangs never blocks the event loop: pings keep being answered at once.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import yaml

from tests.api_support import DEVICES, INGEST, TOKEN_SECRET, ping
from tests.fakefcm import FakeFcmProcess, Reply
from tests.test_api_decisions import BAKERY_ENTER, WELCOME, _fresh_trace
from tests.test_faults_memory import FSYNC_EVERY_S, MARGIN_S, Serve

PROJECT = "geopush-test"
CHANNELS = {"marketing": "offers", "service": "orders"}
RULE = "bakery-welcome"  # WELCOME: marketing, on enter at bakery-300, ttl 15m
DRIVE = (250, BAKERY_ENTER + 20)  # into the bakery's 40 m and out again
HANG_S = 8.0  # FCM's silence; the sender gives up after delivery.timeout (10 s by default)
# On Redis a push left `sending` by a dead process is another's only after its lease (60 s by
# default), which must be longer than one attempt's timeout; both shortened for the tests.
TIMEOUT_S, LEASE_S = 3.0, 4.0
SHORT_LEASE = {"timeout": f"{TIMEOUT_S:g}s", "send_lease": f"{LEASE_S:g}s"}


class FcmServe(Serve):
    """`Serve` of tests/test_faults_memory.py with the fcm sender on `fake`, the WELCOME rule,
    device tokens and no quiet hours (the test must not depend on the hour it runs at)."""

    def __init__(self, folder: Path, fake: FakeFcmProcess, storage: dict[str, Any] | None = None,
                 **delivery: Any) -> None:
        folder.mkdir(exist_ok=True)
        super().__init__(folder, storage)
        (folder / "rules").mkdir(exist_ok=True)
        (folder / "rules" / "welcome.yaml").write_text(WELCOME)
        config = yaml.safe_load(self.config.read_text())
        config["auth"]["device_token_secret"] = [TOKEN_SECRET]
        config["policy"] = {"quiet_hours": None}
        config["delivery"] = {"sender": "fcm", **delivery,
                              "fcm": {"project_id": PROJECT, "endpoint": fake.endpoint,
                                      "static_token": "test-access-token",
                                      "android_channels": CHANNELS}}
        self.config.write_text(yaml.safe_dump(config))


def _redis(url: str) -> dict[str, Any]:
    return {"backend": "redis", "redis_url": url}


def _memory(folder: Path) -> dict[str, Any]:
    return {"backend": "memory", "snapshot_path": str(folder / "var" / "state.json")}


# -- the phone, support, the fake ----------------------------------------------------------------


async def _register(session: aiohttp.ClientSession, url: str, device_id: str, *,
                    marketing: bool = True) -> str:
    """Registers the device (push token `fcm-<id>`) and returns its device token."""
    resp = await session.put(f"{url}/v1/devices/{device_id}", headers=DEVICES, json={
        "push_token": f"fcm-{device_id}", "platform": "android",
        "attributes": {"first_name": "Ana"},
        "consent": {"location": True, "marketing": marketing}})
    assert resp.status == 200, await resp.text()
    resp = await session.post(f"{url}/v1/devices/{device_id}/token", headers=DEVICES)
    assert resp.status == 200, await resp.text()
    token: str = (await resp.json())["token"]
    return token


async def _drive(session: aiohttp.ClientSession, url: str, device_id: str,
                 device_token: str) -> dict[str, Any]:
    """The drive past the bakery, as the phone streams it; the stream's answer."""
    trace = _fresh_trace()
    pings = [ping(device_id, p) for p in trace[DRIVE[0]:DRIVE[1]]]
    async with session.ws_connect(f"{url}/v1/stream",
                                  headers={"Authorization": f"Bearer {device_token}"}) as ws:
        await ws.send_str(orjson.dumps(pings).decode())
        answer: dict[str, Any] = await ws.receive_json(timeout=10)
    assert answer["accepted"] == len(pings), answer
    assert [(e["geofence_id"], e["type"]) for e in answer["events"]] == [
        ("bakery-300", "enter"), ("bakery-300", "exit")], answer
    return answer


async def _export(session: aiohttp.ClientSession, url: str, device_id: str
                  ) -> dict[str, Any] | None:
    resp = await session.get(f"{url}/v1/devices/{device_id}/export", headers=DEVICES)
    if resp.status == 404:
        return None
    assert resp.status == 200, await resp.text()
    export: dict[str, Any] = await resp.json()
    return export


def _sends(fake: FakeFcmProcess, device_id: str) -> list[dict[str, Any]]:
    """The FCM requests to the device's push token so far (answered or still in flight)."""
    return [r for r in fake.requests()
            if (r["json"] or {}).get("message", {}).get("token") == f"fcm-{device_id}"]


async def _until(check: Callable[[], Awaitable[bool]], what: str, timeout_s: float = 10.0
                 ) -> None:
    deadline = time.monotonic() + timeout_s
    while not await check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


async def _sent_once_under_one_id(session: aiohttp.ClientSession, url: str,
                                  fake: FakeFcmProcess, device_id: str,
                                  timeout_s: float = 10.0) -> None:
    """The device's one decided push ends `sent`, and every FCM request for it carried its
    push_id as data, as Android tag and as APNs collapse id."""
    async def sent() -> bool:
        export = await _export(session, url, device_id)
        assert export is not None, f"{device_id}: the device is gone"
        return [e["state"] for e in export["outbox"]] == ["sent"]

    await _until(sent, f"{device_id}'s push to be sent", timeout_s)
    export = await _export(session, url, device_id)
    assert export is not None
    [push] = export["pushes"]
    [entry] = export["outbox"]
    [decision] = [d for d in export["decisions"] if d["outcome"] == "push"]
    assert push["push_id"] == entry["push_id"] == decision["push_id"]
    sends = _sends(fake, device_id)
    assert sends, f"{device_id}: `sent` without an FCM request"
    ids = [(s["json"]["message"]["data"]["push_id"],
            s["json"]["message"]["android"]["notification"]["tag"],
            s["json"]["message"]["apns"]["headers"]["apns-collapse-id"]) for s in sends]
    assert set(ids) == {(push["push_id"],) * 3}, f"{device_id}: sent under another id: {ids}"
    assert 200 in [s["answer"] for s in sends]
    assert entry["attempts"] >= 1


# -- 1. end to end on Redis --------------------------------------------------------------------


async def test_on_redis_a_visit_sends_one_message_a_revoked_consent_none_an_erasure_no_retry(
        tmp_path: Path, redis_url: str) -> None:
    fake = FakeFcmProcess(tmp_path / "sends.ndjson")
    serve = FcmServe(tmp_path, fake, _redis(redis_url))
    try:
        await serve.start()
        async with aiohttp.ClientSession() as session:
            url = serve.url
            # erased while its push waits for the retry FCM asked for
            fake.then(Reply.unavailable(retry_after="3"), token="fcm-erased")
            erased_token = await _register(session, url, "erased")
            await _drive(session, url, "erased", erased_token)
            await _until(lambda: _waits_for_a_retry(session, url, "erased"),
                         "the 503 to be recorded")
            answered_503_at = time.monotonic()
            resp = await session.delete(f"{url}/v1/devices/erased", headers=DEVICES)
            assert resp.status == 204

            # marketing consent revoked before the drive
            revoked_token = await _register(session, url, "revoked")
            resp = await session.patch(f"{url}/v1/devices/revoked", headers=DEVICES,
                                       json={"consent": {"marketing": False}})
            assert resp.status == 200
            await _drive(session, url, "revoked", revoked_token)

            ana_token = await _register(session, url, "ana")
            await _drive(session, url, "ana", ana_token)
            await _sent_once_under_one_id(session, url, fake, "ana")

            # past the retry the erased push waited for, and then some: nothing more comes
            await asyncio.sleep(max(0.0, answered_503_at + 4.0 - time.monotonic()))
            [message] = [s["json"]["message"] for s in _sends(fake, "ana")]
            export = await _export(session, url, "ana")
            assert export is not None
            assert message["notification"]["title"] == "Hello Ana"
            assert re.fullmatch(r"Fresh bread at bakery-300, \d+ m away",
                                message["notification"]["body"])
            assert message["data"]["push_id"] == export["pushes"][0]["push_id"]
            assert message["android"]["notification"]["channel_id"] == "offers"

            revoked = await _export(session, url, "revoked")
            assert revoked is not None
            assert [(d["rule_id"], d["outcome"], d["reason"]) for d in revoked["decisions"]] \
                == [(RULE, "suppressed", "no_consent")]
            assert revoked["outbox"] == []
            assert _sends(fake, "revoked") == []

            assert [s["answer"] for s in _sends(fake, "erased")] == [503], \
                "a push of an erased device was attempted again"
            assert await _export(session, url, "erased") is None
            assert len(fake.requests()) == 2  # ana's and the erased device's one attempt
    finally:
        serve.close()
        fake.stop()


async def _waits_for_a_retry(session: aiohttp.ClientSession, url: str, device_id: str) -> bool:
    export = await _export(session, url, device_id)
    assert export is not None
    return [(e["state"], e["attempts"]) for e in export["outbox"]] == [("queued", 1)]


# -- 2. SIGKILL before, during and after a send ---------------------------------------------------


async def _kill_at_every_point(serve: FcmServe, fake: FakeFcmProcess, *, in_flight_s: float,
                               rounds_after_answer: int = 3) -> list[str]:
    """Kills `serve` (SIGKILL) once per point, starting it again each time on the same
    config; the devices that pushed. `in_flight_s`: how long the send hangs before the kill
    (on memory, long enough for the `sending` state to reach the journal)."""
    devices: list[str] = []
    async with aiohttp.ClientSession() as session:
        # (a) right after the decision's answer, before the push is sent: killed at once,
        # and FCM hangs on whatever attempt got out by then (it may be queued, claimed, or
        # in flight at the kill; not sent). Answered at once after the restart.
        await serve.start()
        fake.then(Reply.hang(HANG_S), token="fcm-answered", always=True)
        device_token = await _register(session, serve.url, "answered")
        await _drive(session, serve.url, "answered", device_token)
        serve.kill()
        fake.then(Reply.ok(), token="fcm-answered", always=True)
        assert all(s["answer"] == 0 for s in _sends(fake, "answered"))
        devices.append("answered")

        # (b) during the send: FCM has the request and has not answered
        await serve.start()
        fake.then(Reply.hang(HANG_S), token="fcm-in-flight")
        device_token = await _register(session, serve.url, "in-flight")
        await _drive(session, serve.url, "in-flight", device_token)
        await _until(lambda: _requested(fake, "in-flight"), "the send to reach FCM")
        await asyncio.sleep(in_flight_s)
        serve.kill()
        [hung] = _sends(fake, "in-flight")
        assert hung["answer"] == 0, "the send was answered before the kill"
        devices.append("in-flight")

        # (c) after FCM's 200, before (or just after) the state is written: approximated by
        # killing as soon as FCM recorded a request it answers at once; either way is right
        for n in range(rounds_after_answer):
            device_id = f"answered-by-fcm-{n}"
            await serve.start()
            device_token = await _register(session, serve.url, device_id)
            await _drive(session, serve.url, device_id, device_token)
            await _until(partial(_requested, fake, device_id), "the send to reach FCM")
            serve.kill()
            devices.append(device_id)
    return devices


async def _requested(fake: FakeFcmProcess, device_id: str, times: int = 1) -> bool:
    return len(_sends(fake, device_id)) >= times


async def test_sigkill_before_during_and_after_a_send_loses_no_push_on_memory(
        tmp_path: Path) -> None:
    """The memory backend: one process, so a push found `sending` at start is due at once."""
    fake = FakeFcmProcess(tmp_path / "sends.ndjson")
    serve = FcmServe(tmp_path, fake, _memory(tmp_path))
    try:
        # the hung send outlives storage.fsync_every: the journal says `sending` at the kill
        devices = await _kill_at_every_point(serve, fake, in_flight_s=FSYNC_EVERY_S + MARGIN_S)
        await serve.start()
        async with aiohttp.ClientSession() as session:
            for device_id in devices:
                await _sent_once_under_one_id(session, serve.url, fake, device_id)
            # found `sending` at start: attempted again (a second attempt, not a fresh entry)
            export = await _export(session, serve.url, "in-flight")
            assert export is not None and export["outbox"][0]["attempts"] == 2
        assert len(_sends(fake, "in-flight")) == 2
    finally:
        serve.close()
        fake.stop()


async def test_on_redis_a_push_killed_mid_send_keeps_its_id_and_waits_for_its_lease(
        tmp_path: Path, redis_url: str) -> None:
    """Without a short lease: the entry a SIGKILL left `sending` is still there after the
    restart, under its push_id, not sent again under another one."""
    fake = FakeFcmProcess(tmp_path / "sends.ndjson")
    serve = FcmServe(tmp_path, fake, _redis(redis_url))
    try:
        fake.then(Reply.hang(HANG_S), token="fcm-in-flight")
        async with aiohttp.ClientSession() as session:
            await serve.start()
            device_token = await _register(session, serve.url, "in-flight")
            await _drive(session, serve.url, "in-flight", device_token)
            await _until(lambda: _requested(fake, "in-flight"), "the send to reach FCM")
            serve.kill()
            await serve.start()
            await asyncio.sleep(1.0)  # the worker's first rounds
            export = await _export(session, serve.url, "in-flight")
            assert export is not None
            [push] = export["pushes"]
            [entry] = export["outbox"]
            assert (entry["push_id"], entry["state"], entry["attempts"]) == (
                push["push_id"], "sending", 1)
            assert [s["json"]["message"]["data"]["push_id"]
                    for s in _sends(fake, "in-flight")] == [push["push_id"]]
    finally:
        serve.close()
        fake.stop()


async def test_sigkill_before_during_and_after_a_send_loses_no_push_on_redis(
        tmp_path: Path, redis_url: str) -> None:
    fake = FakeFcmProcess(tmp_path / "sends.ndjson")
    serve = FcmServe(tmp_path, fake, _redis(redis_url), **SHORT_LEASE)
    try:
        devices = await _kill_at_every_point(serve, fake, in_flight_s=0.0)
        await serve.start()
        async with aiohttp.ClientSession() as session:
            for device_id in devices:
                await _sent_once_under_one_id(session, serve.url, fake, device_id)
            export = await _export(session, serve.url, "in-flight")
            assert export is not None and export["outbox"][0]["attempts"] == 2
        assert len(_sends(fake, "in-flight")) == 2
    finally:
        serve.close()
        fake.stop()


async def test_on_redis_another_instance_sends_a_push_whose_sender_died_mid_send(
        tmp_path: Path, redis_url: str) -> None:
    fake = FakeFcmProcess(tmp_path / "sends.ndjson")
    dying = FcmServe(tmp_path / "a", fake, _redis(redis_url), **SHORT_LEASE)
    other = FcmServe(tmp_path / "b", fake, _redis(redis_url), **SHORT_LEASE)
    try:
        fake.then(Reply.hang(HANG_S), token="fcm-in-flight")
        async with aiohttp.ClientSession() as session:
            await dying.start()
            device_token = await _register(session, dying.url, "in-flight")
            await _drive(session, dying.url, "in-flight", device_token)
            await _until(lambda: _requested(fake, "in-flight"), "the send to reach FCM")
            # started once `dying` holds the push: only a takeover can send it now
            first_seen = time.monotonic()  # just after the claim
            await other.start()
            dying.kill()
            assert time.monotonic() - first_seen < TIMEOUT_S, \
                "killed after the send timed out: no takeover was tested"
            await _until(lambda: _requested(fake, "in-flight", times=2), "the takeover", 10)
            # not before the lease (from the claim) ran out: the dying instance could still
            # have been sending
            assert time.monotonic() - first_seen >= LEASE_S - 0.5
            await _sent_once_under_one_id(session, other.url, fake, "in-flight")
            assert [s["answer"] for s in _sends(fake, "in-flight")] == [0, 200]
    finally:
        dying.close()
        other.close()
        fake.stop()


# -- 3. the event loop never blocks on a send -----------------------------------------------------


async def test_a_hanging_send_never_blocks_the_event_loop(tmp_path: Path) -> None:
    """Single pings, one after another, from before the push is decided until well into its
    send, which FCM leaves hanging: each is answered at once."""
    fake = FakeFcmProcess(tmp_path / "sends.ndjson")
    serve = FcmServe(tmp_path, fake, _memory(tmp_path))
    try:
        fake.then(Reply.hang(HANG_S), token="fcm-waiting")
        await serve.start()
        async with aiohttp.ClientSession() as session:
            await _register(session, serve.url, "walker")
            device_token = await _register(session, serve.url, "waiting")
            trace = _fresh_trace(ago_s=60.0)
            latencies: list[float] = []

            async def walk() -> None:  # 50 pings over ~2.5 s
                for n in range(50):
                    started = time.perf_counter()
                    resp = await session.post(f"{serve.url}/v1/pings", headers=INGEST,
                                              json=ping("walker", trace[n]))
                    assert resp.status == 200 and (await resp.json())["accepted"] == 1
                    latencies.append(time.perf_counter() - started)
                    await asyncio.sleep(0.05)

            walking = asyncio.create_task(walk())
            await asyncio.sleep(0.2)
            await _drive(session, serve.url, "waiting", device_token)
            await _until(lambda: _requested(fake, "waiting"), "the send to reach FCM")
            assert len(latencies) < 40, "the send began too late to overlap the pings"
            await walking
            latencies.sort()
            p99 = latencies[int(0.99 * len(latencies))]
            assert p99 < 0.2, f"p99 {p99 * 1000:.0f} ms while a send hangs"
            # the send hung all along: the last pings were answered while it was in flight
            [hung] = _sends(fake, "waiting")
            assert hung["answer"] == 0
    finally:
        serve.close()
        fake.stop()
