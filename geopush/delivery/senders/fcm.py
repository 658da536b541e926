"""The `fcm` sender: Firebase Cloud Messaging HTTP v1 (contract §7).

pyfcm builds the v1 message and gets OAuth access tokens from the service account; the request
itself goes out through aiohttp and the reply is read here. pyfcm's own `notify()` is unusable
in a service: it blocks, sleeps on Retry-After inside the call, and keeps only the HTTP status,
while what to do next depends on the body (`details[].errorCode`, the field a 400 names, whether
a 429 is a project-wide quota).

Every attempt carries the TTL that is *left* (android.ttl, apns-expiration, webpush TTL): a push
retried after ten minutes must not live on the phone's side longer than the offer it announces.
The push_id is the collapse key everywhere, so a duplicate sent after a crash replaces the
first notification instead of adding a second.

Replies, as FCM documents them (https://firebase.google.com/docs/reference/fcm/rest/v1/ErrorCode):
- 2xx: sent (a 200 with an unreadable body is still sent: FCM took the message).
- UNREGISTERED (404), SENDER_ID_MISMATCH (403): failed, the token is dead and is removed.
- 400 INVALID_ARGUMENT: failed; the token is removed only when the error is about the token
  (a field violation on `message.token`, or no field named and a message about the
  registration token), not when it names `message.data` or another field of ours.
- 401 THIRD_PARTY_AUTH_ERROR: failed and an alert (the APNs/web-push credentials in the
  Firebase project), tokens kept. A plain 401 (our access token refused): one new token and one
  more try; refused again, retry later with an alert.
- 403/404 without those error codes: failed with an alert (permission or project id wrong).
- 429: retry after Retry-After, at least 60 s (FCM asks for no sooner); a per-project quota also
  pauses the whole sender that long, since every other push would hit the same wall.
- 5xx: retry, after Retry-After when given (else the worker's backoff).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol, cast
from urllib.parse import quote

import aiohttp
import orjson
from google.auth.credentials import AnonymousCredentials, Credentials
from pyfcm import FCMNotification  # type: ignore[import-untyped]

from geopush.delivery.senders._http import (
    DEFAULT_POOL_LIMIT,
    DEFAULT_TIMEOUT_S,
    HttpPool,
    scrubbed,
    transport_failure,
)
from geopush.delivery.senders.base import OutgoingPush, SendResult
from geopush.delivery.senders.retry_after import retry_after_s

FCM_ENDPOINT = "https://fcm.googleapis.com/v1/projects"
FCM_SCOPE = "https://www.googleapis.com/auth/firebase.messaging"
# FCM's guidance for 429: wait at least a minute, whatever Retry-After says
MIN_QUOTA_WAIT_S = 60.0
UNAUTHENTICATED = "UNAUTHENTICATED"

_FCM_ERROR = "type.googleapis.com/google.firebase.fcm.v1.FcmError"
_BAD_REQUEST = "type.googleapis.com/google.rpc.BadRequest"
_ERROR_INFO = "type.googleapis.com/google.rpc.ErrorInfo"
_DEAD_TOKEN_CODES = frozenset({"UNREGISTERED", "SENDER_ID_MISMATCH"})


# -- access tokens ------------------------------------------------------------------------------


class AccessTokens(Protocol):
    """Where the Bearer of each request comes from."""

    async def get(self) -> str:
        """A token believed valid (cached)."""
        ...

    async def refresh(self, rejected: str) -> str | None:
        """A token other than `rejected`, which FCM refused; None when there is no other."""
        ...


class StaticToken:
    """`delivery.fcm.static_token`: one fixed Bearer for an emulator or a test; never refreshed."""

    def __init__(self, token: str) -> None:
        self._token = token

    async def get(self) -> str:
        return self._token

    async def refresh(self, rejected: str) -> str | None:
        return None


TokenFetch = Callable[[], tuple[str, float | None]]
"""Blocking: a new access token and its expiry (epoch seconds; None if unknown)."""


class TokenUnavailable(Exception):
    """No access token could be had (Google's token endpoint down, the key revoked)."""


class OAuthTokens:
    """Access tokens fetched in a thread (the fetch is blocking HTTP to Google) and cached until
    `margin_s` before they expire; one fetch at a time, however many sends wait for it."""

    def __init__(self, fetch: TokenFetch, *, clock: Callable[[], float] = time.time,
                 margin_s: float = 300.0, unknown_lifetime_s: float = 1800.0,
                 failure_backoff_s: float = 5.0) -> None:
        self._fetch = fetch
        self._clock = clock
        # Google's tokens live an hour; renewing 5 min early keeps a slow request from
        # arriving with a token that expired on the way
        self._margin_s = margin_s
        self._unknown_lifetime_s = unknown_lifetime_s
        # after a failed fetch, the sends queued behind it fail at once instead of each
        # waiting its own turn for the same unreachable endpoint
        self._failure_backoff_s = failure_backoff_s
        self._lock = asyncio.Lock()
        self._token: str | None = None
        self._valid_until = 0.0
        self._failure: str | None = None
        self._failed_until = 0.0
        self.fetches = 0  # how many tokens were fetched (tests, metrics)

    def _cached(self) -> str | None:
        if self._token is not None and self._clock() < self._valid_until:
            return self._token
        return None

    async def get(self) -> str:
        token = self._cached()
        if token is not None:
            return token
        async with self._lock:
            token = self._cached()
            return token if token is not None else await self._renew()

    async def refresh(self, rejected: str) -> str | None:
        async with self._lock:
            token = self._cached()
            if token is not None and token != rejected:
                return token  # another send already replaced the refused token
            return await self._renew()

    async def _renew(self) -> str:
        now = self._clock()
        if self._failure is not None and now < self._failed_until:
            raise TokenUnavailable(self._failure)
        try:
            token, expiry = await asyncio.to_thread(self._fetch)
        except Exception as exc:
            self._failure = f"{type(exc).__name__}: {exc}"
            self._failed_until = self._clock() + self._failure_backoff_s
            raise TokenUnavailable(self._failure) from exc
        self.fetches += 1
        self._failure = None
        now = self._clock()
        self._token = token
        self._valid_until = (expiry - self._margin_s) if expiry is not None \
            else now + self._unknown_lifetime_s
        return token


def pyfcm_token_fetch(fcm: Any) -> TokenFetch:
    """The fetch of an FCMNotification made with service-account credentials: pyfcm refreshes
    them (a signed JWT exchanged at the key's token_uri) and hands back the access token."""

    def fetch() -> tuple[str, float | None]:
        token = fcm._get_access_token()
        expiry = getattr(fcm.credentials, "expiry", None)
        if not isinstance(expiry, datetime):
            return str(token), None
        # google-auth keeps expiry as a naive UTC datetime
        aware = expiry if expiry.tzinfo is not None else expiry.replace(tzinfo=UTC)
        return str(token), aware.timestamp()

    return fetch


def payload_builder(credentials: Credentials | None = None, project_id: str | None = None) -> Any:
    """pyfcm's FCMNotification, used for `parse_payload` (and, with credentials, for tokens).
    pyfcm insists on credentials even to build a message; with a static token there are none,
    and anonymous ones are never used."""
    anonymous = AnonymousCredentials()  # type: ignore[no-untyped-call]
    return FCMNotification(credentials=credentials or anonymous, project_id=project_id)


# -- the sender ---------------------------------------------------------------------------------


class FcmSender:
    """Sends one push per FCM v1 `messages:send` request."""

    name = "fcm"

    def __init__(self, project_id: str, tokens: AccessTokens, *, endpoint: str = FCM_ENDPOINT,
                 android_channels: Mapping[str, str] | None = None, builder: Any = None,
                 timeout_s: float = DEFAULT_TIMEOUT_S, pool_limit: int = DEFAULT_POOL_LIMIT,
                 clock: Callable[[], float] = time.time) -> None:
        self.url = f"{endpoint.rstrip('/')}/{quote(project_id, safe='')}/messages:send"
        self._tokens = tokens
        self._channels = dict(android_channels or {})
        self._builder = builder if builder is not None else payload_builder(project_id=project_id)
        self._pool = HttpPool(limit=pool_limit, timeout_s=timeout_s)
        self._clock = clock

    async def send(self, push: OutgoingPush) -> SendResult:
        started = time.monotonic()
        try:
            access = await self._tokens.get()
        except Exception as exc:
            return _no_access_token(exc, push)
        result = await self._attempt(push, access, started)
        if result.code != UNAUTHENTICATED:
            return result
        # our access token was refused (revoked, or expired early): one new token, one more try
        try:
            fresh = await self._tokens.refresh(access)
        except Exception as exc:
            return _no_access_token(exc, push)
        if fresh is None:
            return result
        return await self._attempt(push, fresh, started)

    async def close(self) -> None:
        await self._pool.close()

    def message(self, push: OutgoingPush, ttl_s: int, now: float) -> bytes:
        """The request body: pyfcm's v1 envelope around our message."""
        data = {str(k): str(v) for k, v in push.data.items()}
        data["push_id"] = push.push_id
        notification = {"tag": push.push_id}
        channel = self._channels.get(push.category)
        if channel:
            notification["channel_id"] = channel
        return cast(bytes, self._builder.parse_payload(
            fcm_token=push.push_token,
            notification_title=push.title,
            notification_body=push.body,
            data_payload=data,
            android_config={"ttl": f"{ttl_s}s", "collapse_key": push.push_id,
                            "notification": notification},
            apns_config={"headers": {"apns-expiration": str(int(now + ttl_s)),
                                     "apns-collapse-id": push.push_id}},
            webpush_config={"headers": {"TTL": str(ttl_s)}},
        ))

    async def _attempt(self, push: OutgoingPush, access: str, started: float) -> SendResult:
        # what is left now, not what was left when the worker claimed it (a token refresh
        # may have taken a while); a whole second at least, as every platform counts in seconds
        ttl_s = max(1, math.ceil(push.ttl_left_s - (time.monotonic() - started)))
        body = self.message(push, ttl_s, self._clock())
        headers = {"Authorization": f"Bearer {access}",
                   "Content-Type": "application/json; charset=UTF-8"}
        try:
            async with self._pool.session().post(self.url, data=body, headers=headers,
                                                 allow_redirects=False) as response:
                status = response.status
                retry_after = response.headers.get("Retry-After")
                raw = await response.read()
        except (aiohttp.ClientError, TimeoutError) as exc:
            return transport_failure(exc, push.push_token, access)
        result = classify(status, raw, retry_after, now=self._clock())
        return _without_secrets(result, push.push_token, access)


def _no_access_token(exc: BaseException, push: OutgoingPush) -> SendResult:
    # the push is fine; ops must fix the credentials or Google's reachability
    return SendResult("retry", code="oauth", alert=True,
                      message=scrubbed(f"no FCM access token: {exc}", push.push_token))


def _without_secrets(result: SendResult, *secrets: str) -> SendResult:
    message = scrubbed(result.message, *secrets)
    if message == result.message:
        return result
    return SendResult(result.outcome, result.code, message, result.remove_token,
                      result.retry_after_s, result.pause_sender_s, result.alert, result.extra)


# -- reading FCM's replies ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FcmError:
    """The parts of a google.rpc.Status error body that decide what happens next."""

    status: str = ""  # google.rpc.Code name: INVALID_ARGUMENT, UNAUTHENTICATED, …
    message: str = ""
    error_code: str | None = None  # FcmError.errorCode: UNREGISTERED, …
    fields: tuple[str, ...] = ()  # BadRequest fieldViolations[].field
    infos: tuple[Mapping[str, Any], ...] = field(default=())  # google.rpc.ErrorInfo details

    @classmethod
    def parse(cls, body: bytes) -> FcmError | None:
        """None when the body is not a JSON error object (a proxy's HTML page, garbage)."""
        try:
            document = orjson.loads(body)
        except orjson.JSONDecodeError:
            return None
        error = document.get("error") if isinstance(document, dict) else None
        if not isinstance(error, dict):
            return None
        details = error.get("details")
        error_code: str | None = None
        fields: list[str] = []
        infos: list[Mapping[str, Any]] = []
        for detail in details if isinstance(details, list) else []:
            if not isinstance(detail, dict):
                continue
            kind = detail.get("@type")
            if kind == _FCM_ERROR and isinstance(detail.get("errorCode"), str):
                error_code = error_code or detail["errorCode"]
            elif kind == _BAD_REQUEST and isinstance(detail.get("fieldViolations"), list):
                fields += [str(v["field"]) for v in detail["fieldViolations"]
                           if isinstance(v, dict) and isinstance(v.get("field"), str)]
            elif kind == _ERROR_INFO:
                infos.append(detail)
        return cls(status=str(error.get("status") or ""), message=str(error.get("message") or ""),
                   error_code=error_code, fields=tuple(fields), infos=tuple(infos))

    def names_the_token(self) -> bool:
        if self.fields:
            return any(f == "message.token" or f.startswith(("message.token.", "message.token["))
                       for f in self.fields)
        # FCM's invalid-token 400 names no field, only says so in words
        return "registration token" in self.message.lower()

    def project_quota(self) -> bool:
        """A quota of the whole project (send requests per minute), not of one device or topic:
        Google's ErrorInfo says so in its quota metadata (`1/min/{project}`,
        `SendsPerMinutePerProject`)."""
        for info in self.infos:
            metadata = info.get("metadata")
            if not isinstance(metadata, dict):
                continue
            if "{project}" in str(metadata.get("quota_unit", "")) \
                    or str(metadata.get("quota_limit", "")).lower().endswith("perproject"):
                return True
        return False

    def reason(self) -> str | None:
        for info in self.infos:
            if isinstance(info.get("reason"), str):
                return str(info["reason"])
        return None


def classify(status: int, body: bytes, retry_after: str | None, *, now: float) -> SendResult:
    """What one FCM reply means for the push (see the module's docstring)."""
    if 200 <= status < 300:
        try:
            name = orjson.loads(body).get("name")
        except (orjson.JSONDecodeError, AttributeError):
            name = None
        if not isinstance(name, str):
            return SendResult("sent", message=f"FCM accepted the push (HTTP {status}) but its "
                                              "answer was not the expected JSON")
        return SendResult("sent", extra={"fcm_message": name})
    error = FcmError.parse(body)
    said = error.message if error is not None else ""
    wait = retry_after_s(retry_after, now=now)

    if status == 429:
        wait = max(MIN_QUOTA_WAIT_S, wait or 0.0)
        code = (error.error_code or error.status) if error is not None else None
        project = error is not None and error.project_quota()
        extra = {"quota": "project"} if project else {}
        reason = error.reason() if error is not None else None
        if reason:
            extra["reason"] = reason
        return SendResult("retry", code=code or "http_429", message=said, retry_after_s=wait,
                          pause_sender_s=wait if project else None, extra=extra)
    if status >= 500:
        code = error.error_code if error is not None else None
        return SendResult("retry", code=code or f"http_{status}", message=said, retry_after_s=wait)
    if status == 401:
        if error is not None and error.error_code == "THIRD_PARTY_AUTH_ERROR":
            return SendResult("failed", code="THIRD_PARTY_AUTH_ERROR", message=said, alert=True)
        return SendResult("retry", code=UNAUTHENTICATED, alert=True,
                          message=said or "FCM refused the access token (HTTP 401)")
    if error is None:
        return SendResult("failed", code="bad_response",
                          message=f"FCM answered HTTP {status} with a body that is not an error object")
    if error.error_code in _DEAD_TOKEN_CODES:
        return SendResult("failed", code=error.error_code, message=said, remove_token=True)
    if status == 400:
        invalid = "INVALID_ARGUMENT" in (error.error_code, error.status)
        return SendResult("failed", code=error.error_code or error.status or "http_400",
                          message=said, remove_token=invalid and error.names_the_token())
    # 403 without SENDER_ID_MISMATCH is a permission of the project (the API disabled, the
    # service account without the FCM role); 404 without UNREGISTERED a wrong project id
    return SendResult("failed", code=f"http_{status}", message=said, alert=status in (403, 404))
