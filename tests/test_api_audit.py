"""Device changes, erasures and reloads each leave a JSON log line naming the credential, the
device pseudonymised (contract §12); the erasure record is found again from the device id with
`geopush erasure-hash` (docs/security.md)."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp.test_utils import TestClient

from geopush.api.appstate import STATE
from geopush.app import create_app
from geopush.cli.main import main
from geopush.config import LoggingSettings, load_settings
from geopush.logs import make_formatter, pseudonym
from tests.api_support import ADMIN_KEY, DEVICES, KEYS, load_trace, write_stores

Client = TestClient[Any, Any]
MakeClient = Callable[..., Awaitable[Client]]
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
SECRET = "audit-test-pseudonym-secret-0123456789"


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("GEOPUSH_"):
            monkeypatch.delenv(name)


def _config(tmp_path: Path, keys: list[dict[str, Any]]) -> Path:
    stores = write_stores(tmp_path / "stores.geojson", load_trace())
    path = tmp_path / "geopush.yaml"
    path.write_text(yaml.safe_dump({
        "stores_file": str(stores), "rules_dir": "rules",
        "auth": {"keys": keys, "device_token_secret": ["audit-device-token-secret-0123456789"]},
        "logging": {"pseudonym_key": SECRET}}))
    return path


@pytest.fixture
def config(tmp_path: Path) -> Path:
    return _config(tmp_path, KEYS)


@pytest.fixture
async def api(config: Path, aiohttp_client: MakeClient) -> Client:
    return await aiohttp_client(create_app(load_settings(config)))


def _lines(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    """The audit records as the JSON lines the service writes."""
    formatter = make_formatter(LoggingSettings(pseudonym_key=SECRET))
    return [json.loads(formatter.format(r)) for r in caplog.records if r.name == "geopush.audit"]


async def test_device_changes_leave_a_line_with_the_credential_and_the_fields_changed(
        api: Client, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="geopush.audit"):
        await api.put("/v1/devices/phone-1", headers=DEVICES,
                      json={"push_token": "fcm-token-1", "locale": "fr-CA",
                            "consent": {"location": True}})
        await api.patch("/v1/devices/phone-1", headers=DEVICES, json={"locale": "de-DE"})
        await api.patch("/v1/devices/phone-1", headers=DEVICES,
                        json={"consent": {"marketing": True}})
    lines = _lines(caplog)
    assert [(line["event"], line["credential"], line["method"], line["changed"])
            for line in lines] == [
        ("device_changed", "backend", "PUT",
         ["push_token", "platform", "locale", "timezone", "attributes", "segments", "consent"]),
        ("device_changed", "backend", "PATCH", ["locale"]),
        ("device_changed", "backend", "PATCH", ["consent"]),
    ]
    assert [line.get("consent") for line in lines] == [
        {"location": True, "marketing": False}, None, {"location": True, "marketing": True}]
    assert [line["created"] for line in lines] == [True, False, False]
    text = json.dumps(lines)
    assert "phone-1" not in text and "fcm-token-1" not in text and "de-DE" not in text
    assert {line["device"] for line in lines} == {pseudonym("phone-1", SECRET)}


async def test_device_tokens_issued_and_revoked_leave_a_line_without_the_token(
        api: Client, caplog: pytest.LogCaptureFixture) -> None:
    await api.put("/v1/devices/phone-1", headers=DEVICES, json={"consent": {"location": True}})
    with caplog.at_level(logging.INFO, logger="geopush.audit"):
        resp = await api.post("/v1/devices/phone-1/token", headers=DEVICES)
        token = (await resp.json())["token"]
        assert (await api.delete("/v1/devices/phone-1/token", headers=DEVICES)).status == 204
    lines = _lines(caplog)
    assert [(line["event"], line["credential"], line["device"]) for line in lines] == [
        ("device_token_issued", "backend", pseudonym("phone-1", SECRET)),
        ("device_token_revoked", "backend", pseudonym("phone-1", SECRET))]
    text = json.dumps(lines)
    assert "phone-1" not in text and token.split(".")[2] not in text


async def test_an_erasure_leaves_a_line_and_its_record_is_found_from_the_device_id(
        api: Client, config: Path, caplog: pytest.LogCaptureFixture,
        capsys: pytest.CaptureFixture[str]) -> None:
    await api.put("/v1/devices/phone-1", headers=DEVICES, json={"consent": {"location": True}})
    with caplog.at_level(logging.INFO, logger="geopush.audit"):
        assert (await api.delete("/v1/devices/phone-1", headers=DEVICES)).status == 204
    [line] = _lines(caplog)
    assert (line["event"], line["credential"], line["device"]) == (
        "device_erased", "backend", pseudonym("phone-1", SECRET))

    # the operator's way to the record (docs/security.md): geopush erasure-hash DEVICE_ID
    assert main(["erasure-hash", "phone-1", "-c", str(config)]) == 0
    record_hash = capsys.readouterr().out.strip()
    assert api.app is not None
    record = await api.app[STATE].erasure_record(record_hash)
    assert record is not None and record.last_consent is not None
    assert record.last_consent.location is True
    # the log pseudonym is not a prefix of the record's hash: separate keys
    assert not record_hash.startswith(line["device"])


async def test_a_reload_leaves_a_line_with_the_credential(
        api: Client, config: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="geopush.audit"):
        assert (await api.post("/v1/admin/reload", headers=ADMIN)).status == 200
        stores = load_settings(config).stores_file
        stores.write_text('{"type": "FeatureCollection", "features": [{"type": "Feature"}]}')
        assert (await api.post("/v1/admin/reload", headers=ADMIN)).status == 422
    lines = _lines(caplog)
    assert [(line["event"], line["credential"]) for line in lines] == [
        ("reloaded", "ops"), ("reload_refused", "ops")]
    assert lines[0]["geofences"] == 2 and lines[1]["errors"] >= 1


async def test_without_keys_the_credential_is_null(
        tmp_path: Path, aiohttp_client: MakeClient, caplog: pytest.LogCaptureFixture) -> None:
    api = await aiohttp_client(create_app(load_settings(_config(tmp_path, []))))
    with caplog.at_level(logging.INFO, logger="geopush.audit"):
        await api.put("/v1/devices/phone-1", json={})
    [line] = _lines(caplog)
    assert line["event"] == "device_changed" and line["credential"] is None
