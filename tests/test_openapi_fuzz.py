"""schemathesis against the real app on a local port, driven by its own /openapi.json: no 5xx,
and every response (status, content type, headers, body) conforms to the document.

Bounded: at most 30 examples per operation, so the whole run stays well under a minute.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from aiohttp import web
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from geopush.api.openapi import openapi_document
from geopush.app import create_app
from tests.api_support import ADMIN_KEY, settings_for

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
