"""schemathesis against the real app on a local port, driven by its own /openapi.json: no 5xx,
and every response (status, content type, headers, body) conforms to the document.

Bounded: at most 30 examples per operation, so the whole run stays well under a minute.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from aiohttp import web
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from geopush.api.openapi import openapi_document
from geopush.app import create_app
from tests.api_support import ADMIN_KEY, load_trace, settings_for
from tests.test_pings import _activities, _ids, _numbers, _timestamps

AUTH = {"Authorization": f"Bearer {ADMIN_KEY}"}
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
          response_headers_conformance, response_schema_conformance]


class _ServerThread:
    """The app on its own event loop in a thread: schemathesis calls it synchronously."""

    def __init__(self, app: web.Application) -> None:
        self._app = app
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._runner: web.AppRunner | None = None
        self.url = ""

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._start())
        self._ready.set()
        self._loop.run_forever()
        self._loop.run_until_complete(self._stop())
        self._loop.close()

    async def _start(self) -> None:
        self._runner = web.AppRunner(self._app, shutdown_timeout=5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        host, port = self._runner.addresses[0][:2]
        self.url = f"http://{host}:{port}"

    async def _stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def __enter__(self) -> _ServerThread:
        self._thread.start()
        assert self._ready.wait(30), "the app did not start"
        return self

    def __exit__(self, *exc: object) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(30)


@pytest.fixture(scope="module")
def live_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    tmp: Path = tmp_path_factory.mktemp("fuzz")
    with _ServerThread(create_app(settings_for(tmp))) as server:
        yield server.url


# The document the app serves (tested to be the same below), loaded at collection time.
schema = schemathesis.openapi.from_dict(openapi_document())


def test_the_app_serves_this_document(live_url: str) -> None:
    import json
    import urllib.request

    with urllib.request.urlopen(f"{live_url}/openapi.json") as resp:
        assert json.load(resp) == json.loads(json.dumps(openapi_document()))


@schema.parametrize()
@settings(max_examples=30, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                                 HealthCheck.function_scoped_fixture])
def test_api_conforms_to_its_openapi(case: schemathesis.Case[Any], live_url: str) -> None:
    case.call_and_validate(base_url=live_url, headers=AUTH, checks=CHECKS)


# -- beyond the document: the inputs of issue #8 that once made 500s ------------------------
# schemathesis draws from the schemas, which say "date-time" and "object"; these strategies
# go where the schemas do not: every offset and year of a ts, attributes nested and wide,
# ids that are paths. Whatever comes in, the answer is below 500 and in the JSON envelope.

FUZZ_DEVICE = "<the example's device>"
_json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**20, 10**20),
                          st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=20))


def _nested(depth: int) -> Any:
    value: Any = "leaf"
    for i in range(depth):
        value = {"k": value} if i % 2 else [value]
    return value


_attributes = st.one_of(
    st.recursive(_json_scalars, lambda inner: st.lists(inner, max_size=5)
                 | st.dictionaries(st.text(max_size=8), inner, max_size=8), max_leaves=80),
    st.one_of(st.sampled_from([4, 5, 254, 255, 256]), st.integers(1, 300)).map(
        lambda depth: {"deep": _nested(depth)}),
    st.one_of(st.sampled_from([63, 64, 65, 60_000]), st.integers(0, 3000)).map(
        lambda n: {f"k{i}": i for i in range(n)}),
    st.one_of(st.sampled_from([8180, 8183, 8200]), st.integers(0, 20_000)).map(
        lambda n: {"bio": "x" * n}),
)
_segments = st.one_of(st.lists(st.text(max_size=80), max_size=40), _json_scalars)
_valid_ids = st.from_regex(r"[A-Za-z0-9._:@-]{1,16}", fullmatch=True)
# valid ids most of the time: a bad id is refused before the body is even read
_path_ids = st.one_of(
    _valid_ids, _valid_ids,
    st.sampled_from([".", "..", "...", "a%2Fb", "phone-1\n", "x" * 129, " ", "é", "a:b@c"]),
    st.text(max_size=12))


def _request(url: str, method: str, path: str, body: Any = None,
             content_type: str = "application/json") -> tuple[int, str, bytes]:
    import json
    import urllib.error
    import urllib.request

    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url + path, data=data, method=method,
                                     headers={**AUTH, "Content-Type": content_type})
    try:
        with urllib.request.urlopen(request, timeout=30) as resp:
            return resp.status, resp.headers.get_content_type(), resp.read()
    except urllib.error.HTTPError as err:
        with err:
            return err.code, err.headers.get_content_type(), err.read()


def _assert_answered(status: int, content_type: str, body: bytes) -> Any:
    import json

    assert status < 500, body[:500]
    if status == 204:
        return None
    assert content_type == "application/json", (status, content_type, body[:200])
    document = json.loads(body)
    if status >= 400:
        assert set(document["error"]) == {"code", "message", "details"}
    return document


_fresh = itertools.count()
_IN_A_FENCE = load_trace()[300]


def _fresh_device(url: str) -> str:
    """A device of its own for each example: a ts far in the past is taken (not out_of_order)
    only as a device's first ping."""
    device_id = f"fuzz-{next(_fresh)}"
    _assert_answered(*_request(url, "PUT", f"/v1/devices/{device_id}",
                               {"consent": {"location": True, "marketing": True}}))
    return device_id


_fuzz_settings = settings(max_examples=60, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow,
                                                 HealthCheck.function_scoped_fixture])


@_fuzz_settings
@given(pings=st.lists(st.fixed_dictionaries(
    {"device_id": st.one_of(st.just(FUZZ_DEVICE), st.just(FUZZ_DEVICE), _ids),
     # in the bakery's fence now and then, so that pings make events, whose times are shown
     "lat": st.one_of(st.just(_IN_A_FENCE.lat), st.floats(-90, 90)),
     "lon": st.one_of(st.just(_IN_A_FENCE.lon), st.floats(-180, 180)),
     "ts": st.one_of(_timestamps, st.integers(946_684_800_000, 1_800_000_000_000))},
    optional={"heading_deg": _numbers, "altitude_m": _numbers, "activity": _activities,
              "accuracy_m": _numbers}), min_size=1, max_size=5))
# the findings of issue #8, always tried first
@example(pings=[{"device_id": FUZZ_DEVICE, "lat": _IN_A_FENCE.lat, "lon": _IN_A_FENCE.lon,
                 "ts": "0001-01-01T00:00:00+23:59"}])
@example(pings=[{"device_id": FUZZ_DEVICE, "lat": 1.0, "lon": 2.0, "ts": "0001-01-01T00:00:00+23:59",
                 "heading_deg": 90, "altitude_m": 1, "activity": "walking"}])
def test_no_ping_makes_a_5xx(live_url: str, pings: list[Any]) -> None:
    device_id = _fresh_device(live_url)
    pings = [{**p, "device_id": device_id} if p["device_id"] == FUZZ_DEVICE else p
             for p in pings]
    status, content_type, body = _request(live_url, "POST", "/v1/pings", {"pings": pings})
    answer = _assert_answered(status, content_type, body)
    if status == 200:  # else a NaN made the body JSON no more: a 400
        assert answer["accepted"] + len(answer["rejected"]) == len(pings)
    _assert_answered(*_request(live_url, "GET", f"/v1/devices/{device_id}/export"))


@_fuzz_settings
@given(device_id=_path_ids, attributes=_attributes, segments=_segments)
@example(device_id="phone-1", attributes={"deep": _nested(255)}, segments=[])
@example(device_id=".", attributes={}, segments=[])
def test_no_profile_makes_a_5xx(live_url: str, device_id: str, attributes: Any,
                                segments: Any) -> None:
    from urllib.parse import quote

    path = "/v1/devices/" + quote(device_id, safe="")
    for method, body in (("PUT", {"attributes": attributes, "segments": segments}),
                         ("PATCH", {"attributes": attributes}), ("GET", None)):
        _assert_answered(*_request(live_url, method, path, body))
    _assert_answered(*_request(live_url, "GET", path + "/export"))
    _assert_answered(*_request(live_url, "DELETE", path))
