"""Redis behind a real `geopush serve` (contract §10, §12; issue #8 "done when"): clients storm
registrations, pings, consent revocations and erasures while Redis is stalled past the socket
timeout (DEBUG SLEEP) again and again, and the serve process is killed (SIGKILL) and started
again. Counted at the end, over every answer a client got: acknowledged registrations lost,
acknowledged pings lost, revocations and erasures undone, and 5xx other than 503 (a 503 says
nothing was committed: the client sends the same call again). All must be 0."""

from __future__ import annotations

import asyncio
import random
import time
from pathlib import Path
from typing import Any

import aiohttp

from geopush.timeutil import parse_ts
from tests.api_support import DEVICES, INGEST, load_trace, ping
from tests.conftest import PrivateRedis, _need_redis_server
from tests.test_faults_memory import Serve

STALL_S = 1
SOCKET_TIMEOUT_S = 0.3  # storage.redis_timeout below
RETRY_PAUSE_S = 0.2


class _Tally:
    def __init__(self) -> None:
        self.registered: set[str] = set()
        self.erased: set[str] = set()
        self.revoked: set[str] = set()
        self.last_ping: dict[str, float] = {}  # device → its latest acknowledged ping's ts
        self.unanswered: set[str] = set()  # a call in flight at the kill: either way is right
        self.server_errors: list[str] = []
        self.unavailable = 0  # 503s (sent again)
        self.stalled = 0  # calls that waited out a stall (longer than the socket timeout)


async def _until_answered(tally: _Tally, session: aiohttp.ClientSession, method: str,
                          url: str, headers: dict[str, str],
                          body: dict[str, Any] | None = None) -> tuple[int, Any]:
    """The call's status and JSON body once it is not 503 (sent again after each 503, as a
    client does: a 503 says nothing was committed)."""
    while True:
        started = time.monotonic()
        resp = await session.request(method, url, headers=headers, json=body)
        if time.monotonic() - started > SOCKET_TIMEOUT_S:
            tally.stalled += 1
        if resp.status != 503:
            if resp.status >= 500:
                tally.server_errors.append(f"{method} {url}: {resp.status} {await resp.text()}")
            answer = await resp.json() if resp.status != 204 else None
            return resp.status, answer
        tally.unavailable += 1
        await asyncio.sleep(RETRY_PAUSE_S)


async def _client(session: aiohttp.ClientSession, url: str, tally: _Tally, name: str) -> None:
    trace = load_trace()
    for n in range(10_000):
        device_id = f"{name}-{n}"
        device = f"{url}/v1/devices/{device_id}"
        tally.unanswered.add(device_id)
        status, _ = await _until_answered(tally, session, "PUT", device, DEVICES,
                                          {"consent": {"location": True, "marketing": True}})
        assert status == 200, status
        tally.registered.add(device_id)
        for at in (290, 300, 310):  # walking into a store of the trace
            status, answer = await _until_answered(
                tally, session, "POST", f"{url}/v1/pings", INGEST,
                {"pings": [ping(device_id, trace[at])]})
            assert status == 200, status
            if answer["accepted"] != 1:  # sent once after every 503: it must count once
                tally.server_errors.append(f"ping of {device_id} at {at}: {answer}")
            tally.last_ping[device_id] = trace[at].ts
        if n % 3 == 0:
            status, _ = await _until_answered(tally, session, "DELETE", device, DEVICES)
            assert status == 204, status
            tally.erased.add(device_id)
        elif n % 3 == 1:
            status, _ = await _until_answered(tally, session, "PATCH", device, DEVICES,
                                              {"consent": {"location": False}})
            assert status == 200, status
            tally.revoked.add(device_id)
        tally.unanswered.discard(device_id)


async def _stall_every(port: int, pause_s: float) -> None:
    """DEBUG SLEEP, its answer awaited (sent without waiting, sleeps queue up back to back),
    then a pause: Redis is stalled STALL_S of every STALL_S + pause_s."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    seconds = str(STALL_S)
    try:
        while True:
            await asyncio.sleep(pause_s)
            writer.write(f"*3\r\n$5\r\nDEBUG\r\n$5\r\nSLEEP\r\n${len(seconds)}\r\n{seconds}"
                         "\r\n".encode())
            assert await reader.readline() == b"+OK\r\n"
    finally:
        writer.close()


async def test_stalls_and_sigkills_under_a_storm_lose_and_undo_nothing(tmp_path: Path) -> None:
    _need_redis_server()
    redis_server = PrivateRedis(tmp_path, "--enable-debug-command", "local")
    redis_server.start()
    serve = Serve(tmp_path, {"backend": "redis", "redis_url": redis_server.url,
                             "redis_timeout": SOCKET_TIMEOUT_S})
    # a rule on the store the clients walk into: each enter is decided once, in the commit
    # that the stalls and kills hit too
    (tmp_path / "rules").mkdir()
    (tmp_path / "rules" / "hello.yaml").write_text(
        "id: hello\ntrigger: {on: enter, geofences: {ids: [bakery-300]}}\n"
        "message: {title: Hello, body: 'at {{ store.name }}'}\n")
    tally = _Tally()
    rng = random.Random(12)
    try:
        for round_no in range(3):
            await serve.start()
            async with aiohttp.ClientSession() as session:
                clients = [asyncio.create_task(_client(session, serve.url, tally,
                                                       f"r{round_no}-c{c}"))
                           for c in range(4)]
                stalls = asyncio.create_task(_stall_every(redis_server.port, 0.5))
                await asyncio.sleep(2.5 + rng.random())
                serve.kill()
                stalls.cancel()
                outcomes = await asyncio.gather(*clients, stalls, return_exceptions=True)
            # every client ends on the kill, with a connection error, not an assertion
            for outcome in outcomes[:-1]:
                assert isinstance(outcome, aiohttp.ClientError), repr(outcome)
            assert isinstance(outcomes[-1], asyncio.CancelledError), repr(outcomes[-1])

        await serve.start()
        settled = tally.registered - tally.unanswered
        assert len(tally.erased) >= 10 and len(tally.revoked) >= 10
        # the stalls hit calls in flight (answered after RESOLVE, or 503 and sent again)
        assert tally.stalled >= 5, "the stalls hit no call: nothing was tested"
        lost: list[str] = []
        undone: list[str] = []
        async with aiohttp.ClientSession() as session:
            for device_id in sorted(settled):
                resp = await session.get(f"{serve.url}/v1/devices/{device_id}/export",
                                         headers=DEVICES)
                if device_id in tally.erased:
                    if resp.status != 404:
                        undone.append(f"{device_id}: erasure undone ({resp.status})")
                    continue
                if resp.status != 200:
                    lost.append(f"{device_id}: registration lost ({resp.status})")
                    continue
                export: dict[str, Any] = await resp.json()
                location = export["profile"]["consent"]["location"]
                if location is not (device_id not in tally.revoked):
                    undone.append(f"{device_id}: revocation undone")
                # each consent change recorded once: the grant, and the revocation if any
                changes = [c["location"] for c in export["consent_history"]]
                if changes != ([True, False] if device_id in tally.revoked else [True]):
                    undone.append(f"{device_id}: consent history {changes}")
                # the enter of the acknowledged pings was decided exactly once (no push
                # token: suppressed no_token), the record written with the ping, never twice
                decided = [(d["rule_id"], d["event"]) for d in export["decisions"]]
                if decided != [("hello", "enter")]:
                    undone.append(f"{device_id}: decisions {decided}")
                if device_id in tally.revoked:
                    continue  # a revocation ends the tracking (contract §5)
                last = export["tracking"]["last_ping"]
                if last is None or parse_ts(last) < tally.last_ping[device_id]:
                    lost.append(f"{device_id}: acknowledged ping lost (last {last})")
        assert tally.server_errors == [], tally.server_errors[:5]
        assert lost == [] and undone == [], (lost + undone)[:10]
    finally:
        serve.close()
        redis_server.stop()
