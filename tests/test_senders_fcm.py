"""The FCM sender (contract §7) against a local fake FCM v1 server answering with Firebase's real
bodies (tests/fixtures/fcm/): the message each attempt carries, what each reply means for the
push, its token and the sender, and OAuth through the real pyfcm/google-auth refresh.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import AsyncIterator, Callable
from email.utils import formatdate
from pathlib import Path
from typing import Any

import pytest

from geopush.config import DeliverySettings
from geopush.delivery.senders.base import OutgoingPush
from geopush.delivery.senders.build import build_sender, service_account_problem
from geopush.delivery.senders.fcm import FcmSender, OAuthTokens, StaticToken, classify
from geopush.errors import ConfigError
from tests.fakefcm import FIXTURES, FakeFcm, FakeFcmProcess, Reply, service_account_key

PROJECT = "geopush-test"
STATIC = "static-bearer-token"
PUSH_TOKEN = "bk3RNwTe3H0:CI2k_HHwgIpoDKCIZvvDMExUdFQ3P1-secret-push-token"
NOW = 1_780_000_000.0
CHANNELS = {"marketing": "offers", "service": "orders"}
TIMEOUT_S = 0.2
FCM_ERROR = "type.googleapis.com/google.firebase.fcm.v1.FcmError"


def push(**changes: Any) -> OutgoingPush:
    values: dict[str, Any] = dict(
        push_id="p-7f3a", device_id="phone-1", push_token=PUSH_TOKEN, platform="android",
        title="Fresh bread at Lidl Bled", body="Two for one until 18:00",
        data={"store_id": "s-1", "deeplink": "app://offers/42"}, category="marketing",
        rule_id="bread", store_id="s-1", geofence_id="g-1", event="enter",
        created_at=NOW - 5, ttl_left_s=1234.4)
    values.update(changes)
    return OutgoingPush(**values)


def fixed_clock() -> float:
    return NOW


@pytest.fixture
async def fake() -> AsyncIterator[FakeFcm]:
    async with FakeFcm() as server:
        yield server


def make_sender(fake: FakeFcm, tokens: Any = None, **kw: Any) -> FcmSender:
    return FcmSender(PROJECT, tokens or StaticToken(STATIC), endpoint=fake.endpoint,
                     android_channels=CHANNELS, timeout_s=kw.pop("timeout_s", TIMEOUT_S),
                     clock=kw.pop("clock", fixed_clock), **kw)


@pytest.fixture
async def sender(fake: FakeFcm) -> AsyncIterator[FcmSender]:
    s = make_sender(fake)
    yield s
    await s.close()


class _closing:
    """`async with` for a sender: closed however the test ends."""

    def __init__(self, sender: FcmSender) -> None:
        self.sender = sender

    async def __aenter__(self) -> FcmSender:
        return self.sender

    async def __aexit__(self, *exc: object) -> None:
        await self.sender.close()


class CountingFetch:
    """A token fetch that hands out tok-1, tok-2, … and notes the thread it ran on."""

    def __init__(self, lifetime_s: float | None = 3600.0, clock: Callable[[], float] = time.time,
                 delay_s: float = 0.0) -> None:
        self.calls = 0
        self.threads: set[int] = set()
        self.lifetime_s = lifetime_s
        self.clock = clock
        self.delay_s = delay_s

    def __call__(self) -> tuple[str, float | None]:
        self.threads.add(threading.get_ident())
        time.sleep(self.delay_s)  # blocking, as google-auth's HTTP call is
        self.calls += 1
        expiry = None if self.lifetime_s is None else self.clock() + self.lifetime_s
        return f"tok-{self.calls}", expiry


# -- the message ---------------------------------------------------------------------------------


async def test_a_send_carries_the_full_v1_message(fake: FakeFcm, sender: FcmSender) -> None:
    result = await sender.send(push())

    assert result.outcome == "sent" and result.code is None
    assert result.extra["fcm_message"].startswith(f"projects/{PROJECT}/messages/0:")
    [seen] = fake.requests
    assert seen.path == f"/v1/projects/{PROJECT}/messages:send"
    assert seen.headers["Authorization"] == f"Bearer {STATIC}"
    assert seen.headers["Content-Type"].startswith("application/json")
    message = seen.message
    assert message["token"] == PUSH_TOKEN
    assert message["notification"] == {"title": "Fresh bread at Lidl Bled",
                                       "body": "Two for one until 18:00"}
    assert message["data"] == {"store_id": "s-1", "deeplink": "app://offers/42", "push_id": "p-7f3a"}
    # the TTL left, 1234.4 s, rounded up to whole seconds on every platform
    assert message["android"] == {"ttl": "1235s", "collapse_key": "p-7f3a",
                                  "notification": {"tag": "p-7f3a", "channel_id": "offers"}}
    assert message["apns"] == {"headers": {"apns-expiration": str(int(NOW + 1235)),
                                           "apns-collapse-id": "p-7f3a"}}
    assert message["webpush"] == {"headers": {"TTL": "1235"}}
    assert seen.json["validate_only"] is False


async def test_the_message_has_the_shape_of_firebases_own_example(fake: FakeFcm, sender: FcmSender) -> None:
    documented = json.loads((FIXTURES / "fcm_v1_send_request.json").read_text())["body"]
    await sender.send(push())
    message = fake.requests[0].message
    for key, value in documented["message"].items():
        assert type(message[key]) is type(value)
        if isinstance(value, dict):
            assert set(value) <= set(message[key])


@pytest.mark.parametrize(("category", "channel"), [("marketing", "offers"), ("service", "orders")])
async def test_the_android_channel_is_the_categorys(fake: FakeFcm, sender: FcmSender,
                                                    category: str, channel: str) -> None:
    await sender.send(push(category=category))
    assert fake.requests[0].message["android"]["notification"]["channel_id"] == channel


async def test_data_values_are_strings_and_push_id_wins(fake: FakeFcm, sender: FcmSender) -> None:
    await sender.send(push(data={"push_id": "forged", "n": 3}))
    assert fake.requests[0].message["data"] == {"push_id": "p-7f3a", "n": "3"}


@pytest.mark.parametrize(("ttl_left", "expected"), [(0.2, 1), (59.0, 59), (59.01, 60)])
async def test_the_ttl_is_whole_seconds_left_at_least_one(fake: FakeFcm, sender: FcmSender,
                                                          ttl_left: float, expected: int) -> None:
    await sender.send(push(ttl_left_s=ttl_left))
    message = fake.requests[0].message
    assert message["android"]["ttl"] == f"{expected}s"
    assert message["apns"]["headers"]["apns-expiration"] == str(int(NOW + expected))
    assert message["webpush"]["headers"]["TTL"] == str(expected)


# -- replies ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("fixture", "code"), [
    ("fcm_v1_404_UNREGISTERED.json", "UNREGISTERED"),
    ("fcm_v1_403_SENDER_ID_MISMATCH.json", "SENDER_ID_MISMATCH"),
])
async def test_a_dead_token_fails_and_is_removed(fake: FakeFcm, sender: FcmSender,
                                                 fixture: str, code: str) -> None:
    fake.then(Reply.real(fixture))
    result = await sender.send(push())
    assert (result.outcome, result.code, result.remove_token) == ("failed", code, True)
    assert not result.alert and result.retry_after_s is None
    assert len(fake.requests) == 1


async def test_invalid_argument_about_the_token_removes_it(fake: FakeFcm, sender: FcmSender) -> None:
    # the real body names no field: only its message says it is the registration token
    fake.then(Reply.real("fcm_v1_400_INVALID_ARGUMENT_bad_token.json"))
    result = await sender.send(push())
    assert (result.outcome, result.code, result.remove_token) == ("failed", "INVALID_ARGUMENT", True)
    assert "registration token" in result.message


async def test_invalid_argument_about_the_data_keeps_the_token(fake: FakeFcm, sender: FcmSender) -> None:
    fake.then(Reply.real("fcm_v1_400_INVALID_ARGUMENT_bad_data_value.json"))
    result = await sender.send(push())
    assert (result.outcome, result.code, result.remove_token) == ("failed", "INVALID_ARGUMENT", False)
    assert len(fake.requests) == 1  # no retry


def _bad_request(message: str, *fields: str) -> dict[str, Any]:
    details = [{"@type": "type.googleapis.com/google.rpc.BadRequest",
                "fieldViolations": [{"field": f, "description": message} for f in fields]}]
    return {"error": {"code": 400, "message": message, "status": "INVALID_ARGUMENT",
                      "details": details if fields else []}}


@pytest.mark.parametrize(("body", "removed"), [
    (_bad_request("Invalid value at 'message.token'", "message.token"), True),
    # a field other than the token: ours to fix, even if the words mention a registration token
    (_bad_request("registration token: android.ttl must be a duration", "message.android.ttl"), False),
    (_bad_request("Recipient of the message is not set."), False),
])
def test_only_a_violation_of_message_token_removes_it(body: dict[str, Any], removed: bool) -> None:
    result = classify(400, json.dumps(body).encode(), None, now=NOW)
    assert (result.outcome, result.remove_token) == ("failed", removed)


async def test_third_party_auth_error_alerts_and_keeps_the_token(fake: FakeFcm) -> None:
    fetch = CountingFetch()
    async with _closing(make_sender(fake, OAuthTokens(fetch))) as sender:
        fake.then(Reply.real("fcm_v1_401_THIRD_PARTY_AUTH_ERROR.json"))
        result = await sender.send(push())
    assert (result.outcome, result.code) == ("failed", "THIRD_PARTY_AUTH_ERROR")
    assert result.alert and not result.remove_token
    assert fetch.calls == 1 and len(fake.requests) == 1  # not taken for our own token's refusal


async def test_a_refused_access_token_is_refreshed_once_and_the_attempt_retried(fake: FakeFcm) -> None:
    fetch = CountingFetch()
    fake.accept_only("tok-2")  # tok-1 was revoked
    async with _closing(make_sender(fake, OAuthTokens(fetch))) as sender:
        result = await sender.send(push())
    assert result.outcome == "sent"
    assert fetch.calls == 2
    assert [r.bearer for r in fake.requests] == ["tok-1", "tok-2"]
    # the retried attempt is the same message, with the TTL left
    assert fake.requests[1].message == fake.requests[0].message
    assert fake.requests[1].message["android"]["ttl"] == "1235s"


async def test_refused_twice_is_retried_later_with_an_alert(fake: FakeFcm) -> None:
    fetch = CountingFetch()
    fake.accept_only()
    async with _closing(make_sender(fake, OAuthTokens(fetch))) as sender:
        result = await sender.send(push())
    assert (result.outcome, result.code, result.alert) == ("retry", "UNAUTHENTICATED", True)
    assert not result.remove_token
    assert fetch.calls == 2 and len(fake.requests) == 2


async def test_a_refused_static_token_is_not_retried(fake: FakeFcm, sender: FcmSender) -> None:
    fake.then(Reply.unauthenticated())
    result = await sender.send(push())
    assert (result.outcome, result.code, result.alert) == ("retry", "UNAUTHENTICATED", True)
    assert len(fake.requests) == 1


async def test_concurrent_refusals_refresh_the_token_once(fake: FakeFcm) -> None:
    fetch = CountingFetch(delay_s=0.05)
    fake.accept_only("tok-2")
    async with _closing(make_sender(fake, OAuthTokens(fetch))) as sender:
        results = await asyncio.gather(*(sender.send(push(push_id=f"p-{n}")) for n in range(5)))
    assert all(r.outcome == "sent" for r in results)
    assert fetch.calls == 2


async def test_the_access_token_is_cached_until_near_expiry_and_fetched_off_the_loop(
        fake: FakeFcm) -> None:
    clock = [NOW]
    fetch = CountingFetch(lifetime_s=3600.0, clock=lambda: clock[0])
    tokens = OAuthTokens(fetch, clock=lambda: clock[0], margin_s=300.0)
    async with _closing(make_sender(fake, tokens)) as sender:
        await sender.send(push())
        clock[0] += 3200.0  # 400 s left: still good
        await sender.send(push())
        assert fetch.calls == 1
        clock[0] += 200.0  # 200 s left, under the margin: renewed before it is used
        await sender.send(push())
    assert fetch.calls == 2
    assert [r.bearer for r in fake.requests] == ["tok-1", "tok-1", "tok-2"]
    assert threading.get_ident() not in fetch.threads


async def test_a_failing_token_fetch_is_a_retry_with_an_alert(fake: FakeFcm) -> None:
    def fetch() -> tuple[str, float | None]:
        raise OSError("oauth2.googleapis.com unreachable")

    async with _closing(make_sender(fake, OAuthTokens(fetch))) as sender:
        result = await sender.send(push())
    assert (result.outcome, result.code, result.alert) == ("retry", "oauth", True)
    assert "unreachable" in result.message
    assert fake.requests == []


@pytest.mark.parametrize(("retry_after", "wait"), [
    ("120", 120.0),
    ("10", 60.0),  # never sooner than a minute after a 429
    (None, 60.0),
    (formatdate(NOW + 300, usegmt=True), 300.0),  # the HTTP-date form
])
async def test_the_project_quota_pauses_the_sender(fake: FakeFcm, sender: FcmSender,
                                                   retry_after: str | None, wait: float) -> None:
    fake.then(Reply.quota(retry_after))
    result = await sender.send(push())
    assert (result.outcome, result.code) == ("retry", "RESOURCE_EXHAUSTED")
    assert result.retry_after_s == wait
    assert result.pause_sender_s == wait  # the body's quota is per project: every push waits
    assert result.extra == {"quota": "project", "reason": "RATE_LIMIT_EXCEEDED"}
    assert not result.remove_token


async def test_a_quota_of_one_device_pauses_only_its_push(fake: FakeFcm, sender: FcmSender) -> None:
    body = {"error": {"code": 429, "message": "Message rate exceeded for this device.",
                      "status": "RESOURCE_EXHAUSTED",
                      "details": [{"@type": FCM_ERROR, "errorCode": "QUOTA_EXCEEDED"}]}}
    fake.then(Reply(status=429, body=body, headers={"Retry-After": "90"}))
    result = await sender.send(push())
    assert (result.outcome, result.code, result.retry_after_s) == ("retry", "QUOTA_EXCEEDED", 90.0)
    assert result.pause_sender_s is None


@pytest.mark.parametrize(("reply", "code", "wait"), [
    (Reply.unavailable(), "http_503", None),  # no Retry-After: the worker's backoff decides
    (Reply.unavailable("30"), "http_503", 30.0),
    (Reply.unavailable(formatdate(NOW + 45, usegmt=True)), "http_503", 45.0),
    (Reply.unavailable(formatdate(NOW - 45, usegmt=True)), "http_503", 0.0),  # a date passed
    (Reply.unavailable(status=500), "http_500", None),
    (Reply(status=503, body={"error": {"code": 503, "status": "UNAVAILABLE", "message": "x", "details": [
        {"@type": FCM_ERROR, "errorCode": "UNAVAILABLE"}]}}), "UNAVAILABLE", None),
])
async def test_server_errors_are_retried(fake: FakeFcm, sender: FcmSender, reply: Reply,
                                         code: str, wait: float | None) -> None:
    fake.then(reply)
    result = await sender.send(push())
    assert (result.outcome, result.code, result.retry_after_s) == ("retry", code, wait)
    assert result.pause_sender_s is None and not result.remove_token


async def test_a_timeout_is_retried(fake: FakeFcm, sender: FcmSender) -> None:
    fake.then(Reply.hang(5.0))
    started = time.monotonic()
    result = await sender.send(push())
    assert (result.outcome, result.code) == ("retry", "timeout")
    assert time.monotonic() - started < 2.0


async def test_a_dropped_connection_is_retried(fake: FakeFcm, sender: FcmSender) -> None:
    fake.then(Reply.dropped())
    result = await sender.send(push())
    assert (result.outcome, result.code) == ("retry", "connection")


async def test_a_refused_connection_is_retried(fake: FakeFcm) -> None:
    endpoint = fake.endpoint
    await fake.stop()
    async with _closing(FcmSender(PROJECT, StaticToken(STATIC), endpoint=endpoint,
                                  timeout_s=TIMEOUT_S)) as sender:
        result = await sender.send(push())
    assert (result.outcome, result.code) == ("retry", "connection")


@pytest.mark.parametrize(("reply", "outcome", "code"), [
    (Reply.garbage(502), "retry", "http_502"),  # a proxy's error page
    (Reply.garbage(400), "failed", "bad_response"),
    (Reply.garbage(404, b"<!DOCTYPE html><title>Error 404 (Not Found)!!1</title>"), "failed",
     "bad_response"),
    (Reply.garbage(429), "retry", "http_429"),  # still a 429: wait, never give up
])
async def test_garbage_answers(fake: FakeFcm, sender: FcmSender, reply: Reply,
                               outcome: str, code: str) -> None:
    fake.then(reply)
    result = await sender.send(push())
    assert (result.outcome, result.code, result.remove_token) == (outcome, code, False)


async def test_garbage_with_200_is_sent_and_noted(fake: FakeFcm, sender: FcmSender) -> None:
    fake.then(Reply.garbage(200, b"ok"))
    result = await sender.send(push())
    assert result.outcome == "sent"
    assert "not the expected JSON" in result.message


@pytest.mark.parametrize(("status", "body", "alert"), [
    (413, {"error": {"code": 413, "message": "Request payload too large", "status": "INVALID_ARGUMENT"}},
     False),
    # no UNREGISTERED: the project id is wrong, not the token
    (404, {"error": {"code": 404, "message": "Requested entity was not found.", "status": "NOT_FOUND"}},
     True),
    # no SENDER_ID_MISMATCH: the service account lacks the permission
    (403, {"error": {"code": 403, "message": "Permission 'cloudmessaging.messages.create' denied",
                     "status": "PERMISSION_DENIED"}}, True),
])
async def test_other_client_errors_fail_and_keep_the_token(fake: FakeFcm, sender: FcmSender,
                                                           status: int, body: Any, alert: bool) -> None:
    fake.then(Reply(status=status, body=body))
    result = await sender.send(push())
    assert (result.outcome, result.code, result.remove_token) == ("failed", f"http_{status}", False)
    assert result.alert is alert
    assert len(fake.requests) == 1


async def test_messages_never_carry_the_push_token_or_the_access_token(fake: FakeFcm) -> None:
    fake.then(Reply(status=400, body=_bad_request(f"Invalid value at 'message.token', {PUSH_TOKEN}",
                                                  "message.token")),
              Reply(status=503, body={"error": {"code": 503, "status": "UNAVAILABLE",
                                                "message": f"backend saw Bearer tok-1 for {PUSH_TOKEN}"}}))
    async with _closing(make_sender(fake, OAuthTokens(CountingFetch()))) as sender:
        results = [await sender.send(push()), await sender.send(push())]
    for result in results:
        assert PUSH_TOKEN not in result.message and "tok-1" not in result.message
        assert "<redacted>" in result.message
    assert results[0].remove_token


# -- the connection pool ---------------------------------------------------------------------


async def test_sends_reuse_one_kept_alive_connection(fake: FakeFcm, sender: FcmSender) -> None:
    for n in range(3):
        await sender.send(push(push_id=f"p-{n}"))
    assert len({r.peer for r in fake.requests}) == 1


async def test_the_pool_bounds_open_connections(fake: FakeFcm) -> None:
    fake.always(Reply(delay_s=0.05))
    async with _closing(make_sender(fake, pool_limit=2, timeout_s=2.0)) as sender:
        results = await asyncio.gather(*(sender.send(push(push_id=f"p-{n}")) for n in range(6)))
    assert all(r.outcome == "sent" for r in results)
    assert fake.max_in_flight == 2


async def test_a_closed_sender_refuses_to_send(fake: FakeFcm) -> None:
    sender = make_sender(fake)
    await sender.send(push())
    await sender.close()
    with pytest.raises(RuntimeError, match="closed"):
        await sender.send(push())


# -- OAuth through pyfcm, and build_sender -----------------------------------------------------


def _settings(**fcm: Any) -> DeliverySettings:
    return DeliverySettings(sender="fcm", fcm={"project_id": PROJECT, **fcm})


async def test_service_account_tokens_come_from_pyfcm_and_are_refreshed_when_refused(
        fake: FakeFcm, tmp_path: Path) -> None:
    key = tmp_path / "service-account.json"
    key.write_text(json.dumps(service_account_key(fake.token_uri)))
    fake.accept_only()  # only tokens issued by the fake's token endpoint are good
    sender = build_sender(_settings(endpoint=fake.endpoint, service_account_file=key))
    assert isinstance(sender, FcmSender)
    try:
        first = await sender.send(push())
        again = await sender.send(push())
        assert fake.token_requests == 1  # cached
        fake.revoke("ya29.fake-1")
        after = await sender.send(push())
    finally:
        await sender.close()
    assert [first.outcome, again.outcome, after.outcome] == ["sent"] * 3
    assert fake.token_requests == 2
    assert [r.bearer for r in fake.requests] == ["ya29.fake-1", "ya29.fake-1", "ya29.fake-1",
                                                 "ya29.fake-2"]


async def test_a_refused_service_account_is_a_retry_with_an_alert(fake: FakeFcm, tmp_path: Path) -> None:
    key = tmp_path / "service-account.json"
    key.write_text(json.dumps(service_account_key(fake.token_uri)))
    fake.then_token(Reply(status=400, body={"error": "invalid_grant",
                                            "error_description": "Invalid JWT Signature."}))
    sender = build_sender(_settings(endpoint=fake.endpoint, service_account_file=key))
    try:
        result = await sender.send(push())
    finally:
        await sender.close()
    assert (result.outcome, result.code, result.alert) == ("retry", "oauth", True)
    assert "invalid_grant" in result.message
    assert fake.requests == []


async def test_a_static_token_replaces_oauth(fake: FakeFcm, tmp_path: Path) -> None:
    sender = build_sender(_settings(endpoint=fake.endpoint, static_token=STATIC,
                                    service_account_file=tmp_path / "never-read.json"))
    try:
        assert (await sender.send(push())).outcome == "sent"
    finally:
        await sender.close()
    assert fake.requests[0].bearer == STATIC and fake.token_requests == 0
    assert fake.requests[0].path == f"/v1/projects/{PROJECT}/messages:send"


def test_the_default_endpoint_is_googles() -> None:
    sender = build_sender(_settings(static_token=STATIC))
    assert isinstance(sender, FcmSender)
    assert sender.url == f"https://fcm.googleapis.com/v1/projects/{PROJECT}/messages:send"


_BAD_PEM = "-----BEGIN PRIVATE KEY-----\nSECRETSTUFF\n-----END PRIVATE KEY-----\n"


class _KeyWith(dict[str, Any]):
    """A real service account key with these fields changed."""


@pytest.fixture(scope="module")
def good_key() -> dict[str, Any]:
    return service_account_key("http://127.0.0.1:9/token")


@pytest.mark.parametrize(("content", "reason"), [
    (None, "not found"),
    ("DIR", "is a folder"),
    ("{not json", "is not JSON (line 1"),
    (["a"], "not an object"),
    # google-services.json, the app's config, is the usual mix-up
    ({"project_info": {"project_number": "1"}}, 'not a service account key (no "type")'),
    ({"type": "authorized_user"}, 'not a service account key ("type": "authorized_user")'),
    (_KeyWith(private_key=""), "lacks private_key"),
    (_KeyWith(private_key=_BAD_PEM), "private_key is not a readable PEM private key"),
])
def test_an_unusable_service_account_file_is_one_clear_line(tmp_path: Path, good_key: dict[str, Any],
                                                            content: Any, reason: str) -> None:
    path = tmp_path / "key.json"
    if content == "DIR":
        path.mkdir()
    elif isinstance(content, _KeyWith):
        path.write_text(json.dumps({**good_key, **content}))
    elif content is not None:
        path.write_text(content if isinstance(content, str) else json.dumps(content))
    with pytest.raises(ConfigError) as caught:
        build_sender(_settings(service_account_file=path))
    text = str(caught.value)
    assert text.startswith(f"delivery.fcm.service_account_file = {str(path)!r}: ")
    assert reason in text and "expected a Google service account JSON key file" in text
    assert "\n" not in text and "SECRETSTUFF" not in text
    assert service_account_problem(path) == text


def test_a_relative_service_account_file_is_taken_from_the_config_folder(
        tmp_path: Path, good_key: dict[str, Any]) -> None:
    (tmp_path / "sa.json").write_text(json.dumps(good_key))
    assert service_account_problem(tmp_path / "sa.json") is None
    sender = build_sender(_settings(service_account_file=Path("sa.json")), config_dir=tmp_path)
    assert isinstance(sender, FcmSender)
    with pytest.raises(ConfigError, match="not found"):
        build_sender(_settings(service_account_file=Path("sa.json")), config_dir=tmp_path / "elsewhere")


# -- the fake as a process (for end-to-end tests of `serve`) ----------------------------------


async def test_the_fake_runs_as_a_process_scripted_over_http(tmp_path: Path) -> None:
    record = tmp_path / "sends.ndjson"
    with FakeFcmProcess(record) as process:
        process.then(Reply.real("fcm_v1_404_UNREGISTERED.json"), token="dead-token")
        process.then(Reply.quota("120"))
        async with _closing(FcmSender(PROJECT, StaticToken(STATIC), endpoint=process.endpoint,
                                      timeout_s=2.0)) as sender:
            quota = await sender.send(push())
            dead = await sender.send(push(push_token="dead-token"))
            ok = await sender.send(push())
        seen = process.requests()
    assert (quota.code, quota.retry_after_s) == ("RESOURCE_EXHAUSTED", 120.0)
    assert (dead.code, dead.remove_token) == ("UNREGISTERED", True)
    assert ok.outcome == "sent"
    assert [r["answer"] for r in seen] == [429, 404, 200]
    lines = [json.loads(line) for line in record.read_text().splitlines()]
    assert [line["json"]["message"]["token"] for line in lines] == [PUSH_TOKEN, "dead-token", PUSH_TOKEN]
    assert lines[0]["headers"]["Authorization"] == f"Bearer {STATIC}"

