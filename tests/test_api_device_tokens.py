"""Device tokens (contract §13) on the real app, on every backend: issued and revoked through
/v1/devices/{id}/token, bound to their device, refused once revoked (a new token, DELETE, an
erasure) but not by PUT or PATCH, rotated secrets, `auth.device_tokens: required`, and nothing
of another device ever revealed to a token's holder."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp.test_utils import TestClient
from pydantic import ValidationError

from geopush import tokens
from geopush.api.auth import DEVICE_TOKEN, KEYLESS, Authenticator
from geopush.app import create_app
from geopush.config import AuthSettings, Settings
from geopush.errors import Forbidden, Unauthorized
from tests.api_support import (
    ADMIN_KEY,
    DEVICES,
    DEVICES_KEY,
    INGEST,
    INGEST_KEY,
    TOKEN_SECRET,
    load_trace,
    ping,
    settings_for,
)

Client = TestClient[Any, Any]
MakeClient = Callable[..., Awaitable[Client]]

RELAY_KEY = "relay-key-0123456789abc"
KEYS = [
    {"name": "app", "key": INGEST_KEY, "scopes": ["ingest"]},
    {"name": "backend", "key": DEVICES_KEY, "scopes": ["devices"]},
    {"name": "ops", "key": ADMIN_KEY, "scopes": ["admin", "devices"]},
    {"name": "relay", "key": RELAY_KEY, "scopes": ["relay"]},
]
RELAY = {"Authorization": f"Bearer {RELAY_KEY}"}
CONSENTING = {"consent": {"location": True, "marketing": True}}
TRACE = load_trace()
# (index, code) pairs of the rejections of an answer
Rejections = list[tuple[int, str]]


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _settings(request: pytest.FixtureRequest, tmp_path: Path, **auth: Any) -> Settings:
    storage: dict[str, Any] = {"backend": "memory"}
    if request.param == "redis":
        storage = {"backend": "redis", "redis_url": request.getfixturevalue("redis_url")}
    elif request.param == "redis-cluster":
        storage = {"backend": "redis", "redis_cluster": True,
                   "redis_url": request.getfixturevalue("redis_cluster_url")}
    return settings_for(tmp_path, keys=KEYS, storage=storage, auth=auth)


@pytest.fixture(params=["memory", "redis", "redis-cluster"])
async def api(request: pytest.FixtureRequest, tmp_path: Path, aiohttp_client: MakeClient
              ) -> Client:
    return await aiohttp_client(create_app(_settings(request, tmp_path)))


@pytest.fixture(params=["memory", "redis", "redis-cluster"])
async def strict_api(request: pytest.FixtureRequest, tmp_path: Path,
                     aiohttp_client: MakeClient) -> Client:
    """auth.device_tokens: required."""
    return await aiohttp_client(create_app(_settings(request, tmp_path,
                                                     device_tokens="required")))


async def register(api: Client, device_id: str, body: dict[str, Any] = CONSENTING) -> None:
    resp = await api.put(f"/v1/devices/{device_id}", headers=DEVICES, json=body)
    assert resp.status == 200, await resp.text()


async def issue(api: Client, device_id: str) -> str:
    resp = await api.post(f"/v1/devices/{device_id}/token", headers=DEVICES)
    assert resp.status == 200, await resp.text()
    body = await resp.json()
    assert set(body) == {"token"}
    token: str = body["token"]
    return token


async def send(api: Client, headers: dict[str, str], *pings: dict[str, Any]
               ) -> tuple[int, Any]:
    resp = await api.post("/v1/pings", headers=headers, json={"pings": list(pings)})
    return resp.status, await resp.json()


def rejections(body: dict[str, Any]) -> Rejections:
    return [(r["index"], r["code"]) for r in body["rejected"]]


# -- issue, use, revoke ------------------------------------------------------------------------


async def test_a_token_is_issued_to_a_registered_device_and_sends_its_pings(api: Client) -> None:
    await register(api, "phone-a")
    resp = await api.post("/v1/devices/phone-a/token", headers=DEVICES)
    assert resp.status == 200
    assert resp.headers["Cache-Control"] == "no-store"
    token = (await resp.json())["token"]
    assert re.fullmatch(r"gpd1\.phone-a\.[A-Za-z0-9_-]{22}\.[A-Za-z0-9_-]{43}", token)
    assert tokens.verify(token, [TOKEN_SECRET]) is not None
    status, body = await send(api, bearer(token), ping("phone-a", TRACE[300]),
                              ping("phone-a", TRACE[301]))
    assert status == 200 and body["accepted"] == 2 and body["rejected"] == []
    assert [e["type"] for e in body["events"]] == ["enter"]
    # never registered (or erased): no token, and nothing stored
    resp = await api.post("/v1/devices/phone-x/token", headers=DEVICES)
    assert resp.status == 404 and (await resp.json())["error"]["code"] == "not_found"
    resp = await api.get("/v1/devices/phone-x", headers=DEVICES)
    assert resp.status == 404


async def test_a_new_token_revokes_the_one_before(api: Client) -> None:
    await register(api, "phone-a")
    old = await issue(api, "phone-a")
    assert (await send(api, bearer(old), ping("phone-a", TRACE[10])))[1]["accepted"] == 1
    new = await issue(api, "phone-a")
    status, body = await send(api, bearer(old), ping("phone-a", TRACE[11]))
    assert status == 401 and body["error"]["code"] == "unauthorized"
    assert "revoked or replaced" in body["error"]["message"]
    status, body = await send(api, bearer(new), ping("phone-a", TRACE[12]))
    assert status == 200 and body["accepted"] == 1


async def test_delete_revokes_the_token_and_the_device_stays(api: Client) -> None:
    await register(api, "phone-a")
    token = await issue(api, "phone-a")
    resp = await api.delete("/v1/devices/phone-a/token", headers=DEVICES)
    assert resp.status == 204
    status, body = await send(api, bearer(token), ping("phone-a", TRACE[10]))
    assert status == 401 and body["error"]["code"] == "unauthorized"
    # the device itself is untouched: its backend may still relay its pings
    assert (await api.get("/v1/devices/phone-a", headers=DEVICES)).status == 200
    assert (await send(api, INGEST, ping("phone-a", TRACE[11])))[1]["accepted"] == 1
    # again: nothing to revoke, still 204; an unknown device: 404
    assert (await api.delete("/v1/devices/phone-a/token", headers=DEVICES)).status == 204
    assert (await api.delete("/v1/devices/phone-x/token", headers=DEVICES)).status == 404


async def test_an_erasure_revokes_the_token_even_when_the_id_comes_back(api: Client) -> None:
    await register(api, "phone-a")
    token = await issue(api, "phone-a")
    assert (await api.delete("/v1/devices/phone-a", headers=DEVICES)).status == 204
    status, body = await send(api, bearer(token), ping("phone-a", TRACE[10]))
    assert status == 401 and body["error"]["code"] == "unauthorized"
    await register(api, "phone-a")  # the same id registered again starts without a token
    status, body = await send(api, bearer(token), ping("phone-a", TRACE[11]))
    assert status == 401
    export = await (await api.get("/v1/devices/phone-a/export", headers=DEVICES)).json()
    assert export["device_token"] is None


async def test_put_and_patch_never_revoke_the_token(api: Client) -> None:
    await register(api, "phone-a")
    token = await issue(api, "phone-a")
    export = await (await api.get("/v1/devices/phone-a/export", headers=DEVICES)).json()
    issued = export["device_token"]
    assert issued["fingerprint"] == _fingerprint(token)
    await register(api, "phone-a", {**CONSENTING, "push_token": "fcm-2", "segments": ["x"]})
    resp = await api.patch("/v1/devices/phone-a", headers=DEVICES,
                           json={"consent": {"marketing": False}, "locale": "de"})
    assert resp.status == 200
    status, body = await send(api, bearer(token), ping("phone-a", TRACE[10]))
    assert status == 200 and body["accepted"] == 1
    export = await (await api.get("/v1/devices/phone-a/export", headers=DEVICES)).json()
    assert export["device_token"] == issued


def _fingerprint(token: str) -> str:
    import hashlib

    nonce = token.split(".")[-2]
    return hashlib.sha256(nonce.encode()).hexdigest()[:16]


# -- bound to its device -----------------------------------------------------------------------


async def test_pings_for_another_device_are_forbidden_and_a_request_of_only_those_is_403(
        api: Client) -> None:
    await register(api, "phone-a")
    await register(api, "phone-b")
    token = await issue(api, "phone-a")
    status, body = await send(api, bearer(token), ping("phone-a", TRACE[10]),
                              ping("phone-b", TRACE[10]), {"device_id": "phone-b", "lat": 999},
                              ping("phone-a", TRACE[11]))
    assert status == 200 and body["accepted"] == 2
    assert rejections(body) == [(1, "forbidden"), (2, "forbidden")]
    status, body = await send(api, bearer(token), ping("phone-b", TRACE[12]))
    assert status == 403 and body["error"]["code"] == "forbidden"
    # phone-b got nothing of it
    export = await (await api.get("/v1/devices/phone-b/export", headers=DEVICES)).json()
    assert export["tracking"]["last_ping"] is None


async def test_a_stolen_token_neither_reads_nor_forges_another_device(api: Client) -> None:
    """B exists, has consent and is inside a store with a ping history; A's token forging B's
    pings gets exactly the answers a never-registered id gets, and B's state does not move."""
    await register(api, "phone-a")
    await register(api, "phone-b")
    token = await issue(api, "phone-a")
    assert (await send(api, INGEST, *[ping("phone-b", p) for p in TRACE[290:302]]))[0] == 200
    before = await (await api.get("/v1/devices/phone-b/export", headers=DEVICES)).json()
    assert before["tracking"]["stays"], "B should be inside the bakery"

    async def forge(victim: str, own_at: int) -> list[tuple[int, Any]]:
        later = [ping(victim, p) for p in TRACE[302:305]]
        earlier = ping(victim, TRACE[100])  # would be out_of_order for B
        leaving = ping(victim, TRACE[420])  # would be B's exit
        return [await send(api, bearer(token), ping("phone-a", TRACE[own_at]), *later, earlier,
                           leaving),
                await send(api, bearer(token), earlier),
                await send(api, bearer(token), *later, leaving)]

    as_b = await forge("phone-b", 5)
    as_nobody = await forge("never-registered", 6)
    assert as_b == as_nobody
    first = as_b[0][1]
    assert first["accepted"] == 1 and {code for _, code in rejections(first)} == {"forbidden"}
    assert "phone-b" not in orjson.dumps(as_b).decode()
    after = await (await api.get("/v1/devices/phone-b/export", headers=DEVICES)).json()
    assert after == before


async def test_pings_are_checked_per_request_in_one_group_commit(api: Client) -> None:
    """Requests sent together run as one group: a revoked token's request, a good token's, a
    relay of both devices by a server key; each gets its own answer."""
    for device in ("phone-a", "phone-b", "phone-c"):
        await register(api, device)
    revoked = await issue(api, "phone-a")
    await issue(api, "phone-a")
    good = await issue(api, "phone-b")
    answers = await asyncio.gather(
        send(api, bearer(revoked), ping("phone-a", TRACE[1])),
        send(api, bearer(good), ping("phone-b", TRACE[1]), ping("phone-c", TRACE[1])),
        send(api, INGEST, ping("phone-c", TRACE[2])),
        send(api, bearer(good), ping("phone-b", TRACE[2])),
    )
    assert answers[0][0] == 401
    assert answers[1][0] == 200 and answers[1][1]["accepted"] == 1
    assert rejections(answers[1][1]) == [(1, "forbidden")]
    assert answers[2][0] == 200 and answers[2][1]["accepted"] == 1
    assert answers[3][0] == 200  # after the request before it on phone-b, or before it
    assert answers[3][1]["accepted"] + len(answers[3][1]["rejected"]) == 1


# -- which credential, where ----------------------------------------------------------------


@pytest.mark.parametrize(("method", "path"), [
    ("GET", "/v1/devices/phone-a"), ("PUT", "/v1/devices/phone-a"),
    ("PATCH", "/v1/devices/phone-a"), ("DELETE", "/v1/devices/phone-a"),
    ("GET", "/v1/devices/phone-a/export"), ("POST", "/v1/devices/phone-a/token"),
    ("DELETE", "/v1/devices/phone-a/token"), ("POST", "/v1/admin/reload"),
])
async def test_a_device_token_outside_the_ping_endpoints_is_403_saying_why(
        api: Client, method: str, path: str) -> None:
    await register(api, "phone-a")
    token = await issue(api, "phone-a")
    resp = await api.request(method, path, headers=bearer(token), json=CONSENTING)
    assert resp.status == 403
    error = (await resp.json())["error"]
    assert error["code"] == "forbidden" and "device token" in error["message"]
    assert "server key" in error["message"]
    # its own device is untouched
    got = await (await api.get("/v1/devices/phone-a", headers=DEVICES)).json()
    assert got["consent"] == CONSENTING["consent"]


def _other_secret_token() -> str:
    return tokens.issue("phone-a", tokens.new_nonce(), "another-deployment-secret-0123456789")


@pytest.mark.parametrize("presented", [
    pytest.param("other-deployment", id="not-ours"),
    pytest.param("gpd1.phone-a", id="no-nonce-no-mac"),
    pytest.param("gpd1.", id="prefix-only"),
    pytest.param("gpd1.phone-a.bm9uY2U.", id="empty-mac"),
    pytest.param("tampered", id="tampered"),
    pytest.param("truncated", id="truncated"),
])
async def test_a_token_that_is_not_ours_or_not_whole_is_401(api: Client, presented: str) -> None:
    await register(api, "phone-a")
    good = await issue(api, "phone-a")
    if presented == "other-deployment":
        presented = _other_secret_token()
    elif presented == "tampered":  # another device's id under phone-a's MAC
        presented = good.replace("gpd1.phone-a.", "gpd1.phone-b.")
    elif presented == "truncated":
        presented = good[:-1]
    for method, path in (("POST", "/v1/pings"), ("GET", "/v1/devices/phone-a")):
        resp = await api.request(method, path, headers=bearer(presented),
                                 json={"pings": [ping("phone-a", TRACE[10])]})
        assert resp.status == 401, path
        error = (await resp.json())["error"]
        assert error["code"] == "unauthorized" and "device token not valid" in error["message"]
        assert resp.headers["WWW-Authenticate"].startswith("Bearer")


async def test_required_mode_refuses_ingest_keys_and_takes_relay_keys_and_device_tokens(
        strict_api: Client) -> None:
    api = strict_api
    await register(api, "phone-a")
    await register(api, "phone-b")
    token = await issue(api, "phone-a")
    status, body = await send(api, INGEST, ping("phone-a", TRACE[1]))
    assert status == 403 and body["error"]["code"] == "forbidden"
    assert "device tokens" in body["error"]["message"] and "'relay'" in body["error"]["message"]
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await api.ws_connect("/v1/stream", headers=INGEST)
    assert refused.value.status == 403
    # a relay key: any device, on /v1/pings and /v1/stream
    status, body = await send(api, RELAY, ping("phone-a", TRACE[2]), ping("phone-b", TRACE[2]))
    assert status == 200 and body["accepted"] == 2
    async with api.ws_connect("/v1/stream", headers=RELAY) as ws:
        await ws.send_str(orjson.dumps([ping("phone-b", TRACE[3])]).decode())
        assert (await ws.receive_json(timeout=10))["accepted"] == 1
    # the relay scope is for pings only
    resp = await api.get("/v1/devices/phone-a", headers=RELAY)
    assert resp.status == 403 and "'devices' scope" in (await resp.json())["error"]["message"]
    # the phone's own token
    status, body = await send(api, bearer(token), ping("phone-a", TRACE[4]))
    assert status == 200 and body["accepted"] == 1


async def test_optional_mode_takes_ingest_and_relay_keys(api: Client) -> None:
    await register(api, "phone-a")
    for headers, at in ((INGEST, 1), (RELAY, 2)):
        status, body = await send(api, headers, ping("phone-a", TRACE[at]))
        assert status == 200 and body["accepted"] == 1
    status, body = await send(api, DEVICES, ping("phone-a", TRACE[3]))
    assert status == 403 and "'ingest' scope" in body["error"]["message"]


async def test_a_token_made_with_an_old_secret_works_while_the_secret_is_listed(
        tmp_path: Path, aiohttp_client: MakeClient) -> None:
    """Rotation across restarts (memory backend: the nonce is in the journal): a new secret put
    first keeps the old tokens working; dropping the old secret ends them."""
    old_secret, new_secret = "the-old-device-token-secret-0123456789", "n" * 40

    async def start(secrets: list[str]) -> Client:
        return await aiohttp_client(create_app(settings_for(
            tmp_path, keys=KEYS, auth={"device_token_secret": secrets})))

    api = await start([old_secret])
    await register(api, "phone-a")
    await register(api, "phone-b")
    old = await issue(api, "phone-a")
    await api.close()

    api = await start([new_secret, old_secret])
    assert (await send(api, bearer(old), ping("phone-a", TRACE[1])))[1]["accepted"] == 1
    new = await issue(api, "phone-b")
    assert tokens.verify(new, [new_secret]) is not None  # issued with the newest secret
    await api.close()

    api = await start([new_secret])
    status, body = await send(api, bearer(old), ping("phone-a", TRACE[2]))
    assert status == 401 and "device token not valid" in body["error"]["message"]
    assert (await send(api, bearer(new), ping("phone-b", TRACE[2])))[1]["accepted"] == 1


async def test_without_a_secret_no_token_is_issued_or_taken(
        tmp_path: Path, aiohttp_client: MakeClient) -> None:
    api = await aiohttp_client(create_app(settings_for(
        tmp_path, keys=KEYS, auth={"device_token_secret": []})))
    await register(api, "phone-a")
    resp = await api.post("/v1/devices/phone-a/token", headers=DEVICES)
    assert resp.status == 409 and (await resp.json())["error"]["code"] == "not_configured"
    status, _ = await send(api, bearer(_other_secret_token()), ping("phone-a", TRACE[1]))
    assert status == 401


async def test_without_keys_a_device_token_is_still_bound_to_its_device(
        tmp_path: Path, aiohttp_client: MakeClient) -> None:
    api = await aiohttp_client(create_app(settings_for(tmp_path, keys=[])))
    for device in ("phone-a", "phone-b"):
        assert (await api.put(f"/v1/devices/{device}", json=CONSENTING)).status == 200
    token = (await (await api.post("/v1/devices/phone-a/token")).json())["token"]
    # keyless as before: anything but a device token is allowed
    assert (await send(api, {}, ping("phone-b", TRACE[1])))[1]["accepted"] == 1
    status, body = await send(api, bearer(token), ping("phone-a", TRACE[1]),
                              ping("phone-b", TRACE[2]))
    assert status == 200 and rejections(body) == [(1, "forbidden")]
    assert (await send(api, bearer(token), ping("phone-b", TRACE[3])))[0] == 403
    assert (await send(api, bearer(_other_secret_token()), ping("phone-a", TRACE[2])))[0] == 401


# -- the stream --------------------------------------------------------------------------------


async def test_the_stream_checks_the_token_at_the_upgrade_and_each_message_s_pings(
        api: Client) -> None:
    await register(api, "phone-a")
    await register(api, "phone-b")
    token = await issue(api, "phone-a")
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await api.ws_connect("/v1/stream", headers=bearer(_other_secret_token()))
    assert refused.value.status == 401
    async with api.ws_connect("/v1/stream", headers=bearer(token)) as ws:
        await ws.send_str(orjson.dumps([ping("phone-a", TRACE[1]),
                                        ping("phone-b", TRACE[1])]).decode())
        answer = await ws.receive_json(timeout=10)
        assert answer["accepted"] == 1 and rejections(answer) == [(1, "forbidden")]
        await ws.send_str(orjson.dumps(ping("phone-b", TRACE[2])).decode())
        answer = await ws.receive_json(timeout=10)
        assert answer["seq"] == 2 and answer["error"]["code"] == "forbidden"
        # revoked mid-stream: the next message says so, then the socket closes (1008)
        assert (await api.delete("/v1/devices/phone-a/token", headers=DEVICES)).status == 204
        await ws.send_str(orjson.dumps(ping("phone-a", TRACE[3])).decode())
        answer = await ws.receive_json(timeout=10)
        assert answer["seq"] == 3 and answer["accepted"] == 0
        assert answer["error"]["code"] == "unauthorized"
        closing = await ws.receive(timeout=10)
        assert closing.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
        assert ws.close_code == aiohttp.WSCloseCode.POLICY_VIOLATION


# -- the Authenticator, for the endpoints that take a token from elsewhere --------------------


def _authenticator(keys: list[dict[str, Any]] | None = None, **auth: Any) -> Authenticator:
    return Authenticator(AuthSettings.model_validate(
        {"keys": KEYS if keys is None else keys, "device_token_secret": [TOKEN_SECRET], **auth}))


@pytest.mark.parametrize("keys", [KEYS, []], ids=["with-keys", "keyless"])
def test_a_basic_auth_password_that_is_a_server_key_is_not_a_device_token(
        keys: list[dict[str, Any]]) -> None:
    """OwnTracks sends the token as Basic auth's password, OsmAnd in the query: there only a
    device token will do (`server_keys=False`), even without auth.keys."""
    auth = _authenticator(keys)
    for presented in (INGEST_KEY, RELAY_KEY, ADMIN_KEY, "", "phone-a"):
        with pytest.raises(Unauthorized, match="not a device token"):
            auth.credential(presented, server_keys=False)
    token = tokens.issue("phone-a", tokens.new_nonce(), TOKEN_SECRET)
    credential = auth.credential(token, server_keys=False)
    assert credential.device_id == "phone-a" and credential.token is not None
    assert credential.name == DEVICE_TOKEN and credential.scopes == frozenset()
    assert credential.identity == "device:phone-a"
    with pytest.raises(Unauthorized, match="device token not valid"):
        auth.credential(_other_secret_token(), server_keys=False)


def test_a_raw_credential_is_a_server_key_or_a_device_token() -> None:
    auth = _authenticator()
    ingest = auth.credential(INGEST_KEY)
    assert (ingest.name, ingest.device_id, ingest.identity) == ("app", None, "key:app")
    assert auth.credential(RELAY_KEY).name == "relay"
    with pytest.raises(Unauthorized, match="unknown API key"):
        auth.credential("nobody-knows-this-key")
    with pytest.raises(Forbidden, match="'ingest' scope"):
        auth.credential(DEVICES_KEY)
    # opens (`relay=False`): the relay scope is for /v1/pings and /v1/stream only
    with pytest.raises(Forbidden, match="'ingest' scope"):
        auth.credential(RELAY_KEY, relay=False)
    strict = _authenticator(device_tokens="required")
    with pytest.raises(Forbidden, match="device_tokens is required"):
        strict.credential(INGEST_KEY)
    with pytest.raises(Forbidden, match="device_tokens is required"):
        strict.credential(RELAY_KEY, relay=False)
    assert strict.credential(RELAY_KEY).name == "relay"
    assert _authenticator([]).credential("anything") == KEYLESS


def test_a_server_key_cannot_look_like_a_device_token() -> None:
    with pytest.raises(ValidationError, match="prefix of device tokens"):
        AuthSettings.model_validate(
            {"keys": [{"name": "a", "key": "gpd1.0123456789abcdef", "scopes": ["ingest"]}]})
