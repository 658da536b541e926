"""GET /v1/stream (WebSocket): each message answered in order with seq; bad messages get an
answer naming the problem and the socket stays open."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp.test_utils import TestClient

from geopush.app import create_app
from tests.api_support import (
    DEVICES,
    INGEST,
    event_tuples,
    expected_events,
    load_trace,
    ping,
    settings_for,
)

Client = TestClient[Any, Any]
MakeClient = Callable[..., Awaitable[Client]]


@pytest.fixture(params=["memory", "redis"])
async def api(request: pytest.FixtureRequest, tmp_path: Path, aiohttp_client: MakeClient
              ) -> Client:
    redis_url = request.getfixturevalue("redis_url") if request.param == "redis" else None
    client = await aiohttp_client(create_app(
        settings_for(tmp_path, backend=request.param, redis_url=redis_url)))
    resp = await client.put("/v1/devices/phone-1", headers=DEVICES,
                            json={"consent": {"location": True, "marketing": True}})
    assert resp.status == 200
    return client


async def test_messages_are_answered_in_order_with_the_trace_events(api: Client) -> None:
    trace = load_trace()
    pings = [ping("phone-1", p) for p in trace]
    async with api.ws_connect("/v1/stream", headers=INGEST) as ws:
        # pipelined: everything is sent before the first answer is read; a lone ping object
        # and an empty list are messages too
        messages: list[Any] = [pings[i:i + 50] for i in range(0, 150, 50)]
        messages += [pings[150], []]
        messages += [pings[i:i + 50] for i in range(151, len(pings), 50)]
        for m in messages:
            await ws.send_str(orjson.dumps(m).decode())
        answers = [await ws.receive_json(timeout=30) for _ in messages]
    assert [a["seq"] for a in answers] == list(range(1, len(messages) + 1))
    assert answers[3]["accepted"] == 1
    assert answers[4] == {"seq": 5, "accepted": 0, "rejected": [], "events": []}
    assert sum(a["accepted"] for a in answers) == len(pings)
    events = [e for a in answers for e in a["events"]]
    assert event_tuples(events) == expected_events("phone-1", trace)


@pytest.mark.parametrize(
    ("message", "code", "says"),
    [
        ("{oops", "invalid", "message is not valid JSON"),
        ('"hello"', "invalid", "got a string"),
        ("42", "invalid", "got a number"),
        ('{"pings": 3}', "invalid", "pings: expected a list"),
    ],
)
async def test_a_bad_message_is_answered_and_the_socket_stays_open(
        api: Client, message: str, code: str, says: str) -> None:
    good = ping("phone-1", load_trace()[300])
    async with api.ws_connect("/v1/stream", headers=INGEST) as ws:
        await ws.send_str(message)
        await ws.send_str(orjson.dumps(good).decode())
        bad_answer = await ws.receive_json(timeout=10)
        good_answer = await ws.receive_json(timeout=10)
    assert bad_answer["seq"] == 1 and bad_answer["accepted"] == 0
    assert bad_answer["error"]["code"] == code and says in bad_answer["error"]["message"]
    assert good_answer["seq"] == 2 and good_answer["accepted"] == 1
    assert [e["type"] for e in good_answer["events"]] == ["enter"]


async def test_bad_pings_in_a_message_are_rejected_one_by_one(api: Client) -> None:
    good = ping("phone-1", load_trace()[300])
    async with api.ws_connect("/v1/stream", headers=INGEST) as ws:
        await ws.send_str(orjson.dumps([{**good, "lat": 95}, good, {"x": 1}]).decode())
        answer = await ws.receive_json(timeout=10)
    assert answer["accepted"] == 1
    assert [(r["index"], r["code"]) for r in answer["rejected"]] == [(0, "invalid"),
                                                                     (2, "invalid")]
    assert "lat = 95" in answer["rejected"][0]["message"]


async def test_binary_and_oversized_batches_are_refused_by_answer(api: Client) -> None:
    good = ping("phone-1", load_trace()[300])
    async with api.ws_connect("/v1/stream", headers=INGEST) as ws:
        await ws.send_bytes(b"\x00\x01")
        await ws.send_str(orjson.dumps([good] * 1001).decode())
        binary = await ws.receive_json(timeout=10)
        too_many = await ws.receive_json(timeout=10)
    assert binary["error"]["code"] == "invalid" and "binary" in binary["error"]["message"]
    assert too_many["seq"] == 2 and too_many["error"]["code"] == "too_large"


async def test_the_stream_needs_the_ingest_scope(api: Client) -> None:
    with pytest.raises(aiohttp.WSServerHandshakeError) as no_key:
        await api.ws_connect("/v1/stream")
    assert no_key.value.status == 401
    with pytest.raises(aiohttp.WSServerHandshakeError) as wrong:
        await api.ws_connect("/v1/stream", headers=DEVICES)
    assert wrong.value.status == 403


async def test_a_plain_get_of_the_stream_is_400(api: Client) -> None:
    resp = await api.get("/v1/stream", headers=INGEST)
    assert resp.status == 400
    assert "WebSocket" in (await resp.json())["error"]["message"]


async def test_the_server_sends_heartbeats(api: Client, monkeypatch: pytest.MonkeyPatch
                                           ) -> None:
    from geopush.api import pings

    monkeypatch.setattr(pings, "WS_HEARTBEAT_S", 0.2)
    async with api.ws_connect("/v1/stream", headers=INGEST, autoping=False) as ws:
        message = await asyncio.wait_for(ws.receive(), 10)
        assert message.type is aiohttp.WSMsgType.PING


async def test_a_phone_that_vanishes_mid_answer_is_no_error(
        api: Client, caplog: pytest.LogCaptureFixture) -> None:
    good = ping("phone-1", load_trace()[300])
    with caplog.at_level("ERROR"):
        ws = await api.ws_connect("/v1/stream", headers=INGEST)
        await ws.send_str(orjson.dumps([good] * 200).decode())
        connection = ws._response.connection
        assert connection is not None and connection.transport is not None
        connection.transport.abort()  # gone without a close frame
        for _ in range(100):
            metrics = await (await api.get("/metrics")).text()
            if "geopush_websocket_connections 0.0" in metrics:
                break
            await asyncio.sleep(0.05)
    assert "geopush_websocket_connections 0.0" in metrics
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []
    assert (await api.get("/healthz")).status == 200


async def test_a_ts_in_year_0_utc_is_rejected_not_a_500_in_the_stream(api: Client) -> None:
    # committed, then its answer could not be written: an HTTP 500 went into the WebSocket
    good = ping("phone-1", load_trace()[300])
    async with api.ws_connect("/v1/stream", headers=INGEST) as ws:
        await ws.send_str(orjson.dumps({**good, "ts": "0001-01-01T00:00:00+23:59"}).decode())
        await ws.send_str(orjson.dumps(good).decode())
        odd = await ws.receive_json(timeout=10)
        fine = await ws.receive_json(timeout=10)
    assert odd["seq"] == 1 and [r["code"] for r in odd["rejected"]] == ["invalid"]
    assert fine["seq"] == 2 and fine["accepted"] == 1


class _Unwritable:
    def as_json(self) -> dict[str, Any]:
        raise RuntimeError("cannot write this answer")


async def test_an_unexpected_error_is_a_json_message_on_the_stream(
        api: Client, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    from geopush.api.appstate import INGESTOR

    ingestor = api.app[INGESTOR]
    real = ingestor.ingest
    calls = 0

    async def first_answer_unwritable(items: Any, now: float, *source: str,
                                      token: Any = None) -> Any:
        nonlocal calls
        calls += 1
        result = await real(items, now, *source)
        return _Unwritable() if calls == 1 else result

    monkeypatch.setattr(ingestor, "ingest", first_answer_unwritable)
    good = ping("phone-1", load_trace()[300])
    with caplog.at_level(logging.ERROR):
        async with api.ws_connect("/v1/stream", headers=INGEST) as ws:
            await ws.send_str(orjson.dumps(good).decode())
            await ws.send_str(orjson.dumps({**good, "ts": good["ts"] + 1000}).decode())
            broken = await ws.receive(timeout=10)
            fine = await ws.receive_json(timeout=10)
    assert broken.type is aiohttp.WSMsgType.TEXT, broken  # not an HTTP response in the stream
    answer = orjson.loads(broken.data)
    assert answer["seq"] == 1 and answer["error"]["code"] == "internal"
    assert "cannot write" not in broken.data
    assert fine["seq"] == 2 and fine["accepted"] == 1
    assert any(r.getMessage() == "stream_message_failed" for r in caplog.records)


async def test_an_error_outside_a_message_closes_the_stream_with_1011(
        api: Client, monkeypatch: pytest.MonkeyPatch) -> None:
    from geopush.api import pings

    def no_answer(obj: Any) -> str:
        raise RuntimeError("the encoder broke")

    monkeypatch.setattr(pings, "_dumps", no_answer)
    good = ping("phone-1", load_trace()[300])
    async with api.ws_connect("/v1/stream", headers=INGEST) as ws:
        await ws.send_str(orjson.dumps(good).decode())
        closing = await ws.receive(timeout=10)
    # nothing can be encoded, so not even the error message: a close with 1011, never an
    # HTTP 500 status line inside the WebSocket
    assert closing.type is aiohttp.WSMsgType.CLOSE
    assert closing.data == aiohttp.WSCloseCode.INTERNAL_ERROR
