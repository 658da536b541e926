"""A local fake of FCM HTTP v1 (and of Google's OAuth token endpoint), answering with Firebase's
real bodies (tests/fixtures/fcm/), for the sender's tests and for end-to-end tests of `serve`.

It records every send (path, headers, exact body) and answers from a script: replies queued
for the next sends (or for the next sends to one push token, so concurrent pushes of an
end-to-end test get predictable answers), else a standing reply, else FCM's 200. A reply can be
any status and body (the real error bodies by file name), a Retry-After, a delay longer than
the client's timeout, a dropped connection, or garbage.

In a test:

    async with FakeFcm() as fake:
        fake.then(Reply.real("fcm_v1_404_UNREGISTERED.json"))
        sender = FcmSender("proj", StaticToken("t"), endpoint=fake.endpoint)
        ...
        fake.requests[0].message["token"]

As a process (`serve` end-to-end tests):

    python -m tests.fakefcm --port 0 --record sends.ndjson [--check-tokens]

prints one JSON line `{"endpoint", "token_uri", "control"}` once it listens and runs until
SIGTERM/SIGINT; `FakeFcmProcess` does that for a test. Scripting then goes over HTTP:
`POST {control}/replies {"replies": [reply, …], "token": null, "always": false}` (a reply as
`Reply.to_json` writes it, e.g. `{"fixture": "fcm_v1_404_UNREGISTERED.json"}` or
`{"status": 429, "headers": {"Retry-After": "120"}, "fixture": "…"}`), `GET {control}/requests`,
`POST {control}/reset`, `POST {control}/accept {"tokens": […]}`.

The OAuth side: `token_uri` issues access tokens (`ya29.fake-1`, …) to any JWT-bearer
request and counts them; put it in a service account key (`service_account_key`) to run the
real pyfcm/google-auth refresh against it. With `check_tokens`, a send whose Bearer was not
issued here (or was revoked) gets Google's plain 401.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import re
import signal
import subprocess
import sys
import urllib.request
from collections import deque
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from aiohttp import web

FIXTURES = Path(__file__).parent / "fixtures" / "fcm"
_SEND_PATH = re.compile(r"^/v1/projects/(?P<project>[^/]+)/messages:send$")

# Written, not recorded (no real body was found; tests/fixtures/fcm/README.md): Google APIs'
# standard answer to a refused OAuth access token, and the 5xx texts FCM's docs give.
UNAUTHENTICATED_BODY: dict[str, Any] = {"error": {
    "code": 401,
    "message": "Request had invalid authentication credentials. Expected OAuth 2 access token, "
               "login cookie or other valid authentication credential. See "
               "https://developers.google.com/identity/sign-in/web/devconsole-project.",
    "status": "UNAUTHENTICATED"}}
UNAVAILABLE_BODY: dict[str, Any] = {"error": {
    "code": 503, "message": "The service is currently unavailable.", "status": "UNAVAILABLE"}}
INTERNAL_BODY: dict[str, Any] = {"error": {
    "code": 500, "message": "Internal error encountered.", "status": "INTERNAL"}}
GARBAGE = b"<html><head><title>502 Bad Gateway</title></head><body>upstream hiccup</body></html>"


def real(name: str) -> tuple[int, Any]:
    """(HTTP status, body) of a real FCM answer in tests/fixtures/fcm/."""
    document = json.loads((FIXTURES / name).read_text(encoding="utf-8"))
    return int(document["_meta"].get("http_status", 200)), document["body"]


@dataclass(frozen=True)
class Reply:
    """One answer of the fake."""

    status: int = 200
    body: Any = None  # JSON; None on a 2xx: FCM's success body with a fresh message name
    raw: bytes | None = None  # sent as it is instead of JSON (garbage)
    headers: Mapping[str, str] = field(default_factory=dict)
    delay_s: float = 0.0  # wait first (longer than the client's timeout: a timeout)
    drop: bool = False  # close the connection instead of answering
    fixture: str | None = None  # the file the body came from (for to_json)

    @classmethod
    def ok(cls) -> Reply:
        return cls()

    @classmethod
    def real(cls, name: str, *, headers: Mapping[str, str] | None = None) -> Reply:
        status, body = real(name)
        return cls(status=status, body=body, headers=dict(headers or {}), fixture=name)

    @classmethod
    def quota(cls, retry_after: str | None = None) -> Reply:
        """FCM's real per-project 429."""
        return cls.real("fcm_v1_429_RESOURCE_EXHAUSTED_project_rate_limit.json",
                        headers={"Retry-After": retry_after} if retry_after is not None else None)

    @classmethod
    def unavailable(cls, retry_after: str | None = None, status: int = 503) -> Reply:
        body = UNAVAILABLE_BODY if status == 503 else INTERNAL_BODY
        return cls(status=status, body=body,
                   headers={"Retry-After": retry_after} if retry_after is not None else {})

    @classmethod
    def unauthenticated(cls) -> Reply:
        return cls(status=401, body=UNAUTHENTICATED_BODY,
                   headers={"WWW-Authenticate": 'Bearer realm="https://accounts.google.com/"'})

    @classmethod
    def garbage(cls, status: int = 502, raw: bytes = GARBAGE) -> Reply:
        return cls(status=status, raw=raw, headers={"Content-Type": "text/html"})

    @classmethod
    def hang(cls, seconds: float = 30.0) -> Reply:
        return cls(delay_s=seconds)

    @classmethod
    def dropped(cls) -> Reply:
        return cls(drop=True)

    def to_json(self) -> dict[str, Any]:
        spec: dict[str, Any] = {"status": self.status}
        if self.fixture is not None:
            spec["fixture"] = self.fixture
        elif self.body is not None:
            spec["body"] = self.body
        if self.raw is not None:
            spec["raw"] = self.raw.decode("utf-8", "replace")
        if self.headers:
            spec["headers"] = dict(self.headers)
        if self.delay_s:
            spec["delay_s"] = self.delay_s
        if self.drop:
            spec["drop"] = True
        return spec

    @classmethod
    def from_json(cls, spec: Mapping[str, Any]) -> Reply:
        headers = {str(k): str(v) for k, v in (spec.get("headers") or {}).items()}
        if spec.get("fixture"):
            status, body = real(str(spec["fixture"]))
            return cls(status=int(spec.get("status", status)), body=body, headers=headers,
                       delay_s=float(spec.get("delay_s", 0.0)), fixture=str(spec["fixture"]))
        raw = spec.get("raw")
        return cls(status=int(spec.get("status", 200)), body=spec.get("body"),
                   raw=raw.encode() if isinstance(raw, str) else None, headers=headers,
                   delay_s=float(spec.get("delay_s", 0.0)), drop=bool(spec.get("drop", False)))


@dataclass
class Recorded:
    """One send as it arrived, and what it was answered."""

    path: str
    headers: dict[str, str]
    body: bytes
    answer: int | str = 0  # the status, or "dropped"
    peer: str = ""  # the client's address and port: one per connection (keep-alive shows)

    @property
    def json(self) -> Any:
        try:
            return json.loads(self.body)
        except ValueError:
            return None

    @property
    def message(self) -> dict[str, Any]:
        document = self.json
        return document.get("message", {}) if isinstance(document, dict) else {}

    @property
    def bearer(self) -> str | None:
        value = self.headers.get("Authorization", "")
        return value[len("Bearer "):] if value.startswith("Bearer ") else None

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "headers": self.headers, "json": self.json,
                "body": self.body.decode("utf-8", "replace"), "answer": self.answer, "peer": self.peer}


class FakeFcm:
    """The fake server; see the module's docstring."""

    def __init__(self, *, record: Path | None = None, check_tokens: bool = False) -> None:
        self.requests: list[Recorded] = []
        self.token_requests = 0  # OAuth token fetches
        self.in_flight = 0  # sends being answered now
        self.max_in_flight = 0
        self.issued: list[str] = []
        # Bearer tokens accepted; None: any
        self.accepted: set[str] | None = set() if check_tokens else None
        self._queue: deque[Reply] = deque()
        self._per_token: dict[str, deque[Reply]] = {}
        self._standing: dict[str | None, Reply] = {}
        self._token_replies: deque[Reply] = deque()
        self._record: IO[str] | None = record.open("a", encoding="utf-8") if record else None
        self._runner: web.AppRunner | None = None
        self._stopping = asyncio.Event()
        self._sent = 0
        self.base_url = ""

    # -- the script ------------------------------------------------------------------------

    def then(self, *replies: Reply, token: str | None = None) -> None:
        """Answer the next sends (to `token`, or any) with these, in order, once each."""
        if token is None:
            self._queue.extend(replies)
        else:
            self._per_token.setdefault(token, deque()).extend(replies)

    def always(self, reply: Reply, *, token: str | None = None) -> None:
        """Answer every send (to `token`, or any) with this when nothing is queued."""
        self._standing[token] = reply

    def then_token(self, *replies: Reply) -> None:
        """Answer the next OAuth token requests with these instead of a token."""
        self._token_replies.extend(replies)

    def accept_only(self, *tokens: str) -> None:
        """From now on a send with another Bearer gets a plain 401 (tokens issued later count)."""
        self.accepted = set(tokens)

    def revoke(self, token: str) -> None:
        if self.accepted is None:
            self.accepted = set(self.issued)
        self.accepted.discard(token)

    def reset(self) -> None:
        self.requests.clear()
        self._queue.clear()
        self._per_token.clear()
        self._standing.clear()
        self._token_replies.clear()
        self.token_requests = 0
        self.max_in_flight = self.in_flight

    def _next(self, token: str | None) -> Reply:
        mine = self._per_token.get(token) if token is not None else None
        if mine:
            return mine.popleft()
        if self._queue:
            return self._queue.popleft()
        return self._standing.get(token) or self._standing.get(None) or Reply.ok()

    # -- addresses -------------------------------------------------------------------------

    @property
    def endpoint(self) -> str:
        """What `delivery.fcm.endpoint` should be."""
        return f"{self.base_url}/v1/projects"

    @property
    def token_uri(self) -> str:
        return f"{self.base_url}/token"

    @property
    def control(self) -> str:
        return f"{self.base_url}/_fake"

    # -- life ------------------------------------------------------------------------------

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> FakeFcm:
        app = web.Application()
        app.router.add_post("/token", self._token)
        app.router.add_post("/_fake/replies", self._control_replies)
        app.router.add_get("/_fake/requests", self._control_requests)
        app.router.add_post("/_fake/reset", self._control_reset)
        app.router.add_post("/_fake/accept", self._control_accept)
        app.router.add_post("/{tail:.*}", self._send)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        address = self._runner.addresses[0]
        self.base_url = f"http://{address[0]}:{address[1]}"
        return self

    async def stop(self) -> None:
        self._stopping.set()  # ends every delayed answer at once
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._record is not None:
            self._record.close()
            self._record = None

    async def __aenter__(self) -> FakeFcm:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- handlers --------------------------------------------------------------------------

    async def _send(self, request: web.Request) -> web.StreamResponse:
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            return await self._record_and_answer(request)
        finally:
            self.in_flight -= 1

    async def _record_and_answer(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        peer = request.transport.get_extra_info("peername") if request.transport else None
        seen = Recorded(request.path, dict(request.headers), body,
                        peer=f"{peer[0]}:{peer[1]}" if peer else "")
        self.requests.append(seen)
        match = _SEND_PATH.match(request.path)
        if match is None:
            # Google's front end answers an unknown path with an HTML page
            reply = Reply.garbage(404, b"<!DOCTYPE html><title>Error 404 (Not Found)!!1</title>")
        elif self.accepted is not None and seen.bearer not in self.accepted:
            reply = Reply.unauthenticated()
        else:
            push_token = seen.message.get("token")
            reply = self._next(push_token if isinstance(push_token, str) else None)
        response = await self._answer(request, reply, match["project"] if match else "")
        seen.answer = "dropped" if response is None else response.status
        if self._record is not None:
            self._record.write(json.dumps(seen.to_json()) + "\n")
            self._record.flush()
        return response if response is not None else web.Response()

    async def _answer(self, request: web.Request, reply: Reply,
                      project: str) -> web.StreamResponse | None:
        if reply.delay_s > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), reply.delay_s)
        if reply.drop or self._stopping.is_set():
            if request.transport is not None:
                request.transport.abort()  # no status line, no body: "server disconnected"
            return None
        headers = dict(reply.headers)
        if reply.raw is not None:
            return web.Response(status=reply.status, body=reply.raw, headers=headers)
        body = reply.body
        if body is None and 200 <= reply.status < 300:
            self._sent += 1
            _, success = real("fcm_v1_200_success.json")
            # the real name, in this project, one message id per send
            name = re.sub(r"^projects/[^/]+/", f"projects/{project}/", success["name"])
            body = {"name": re.sub(r"0:\d+", f"0:{1500415314455276 + self._sent}", name)}
        return web.json_response(body, status=reply.status, headers=headers)

    async def _token(self, request: web.Request) -> web.StreamResponse:
        form = await request.post()
        self.token_requests += 1
        if self._token_replies:
            answer = await self._answer(request, self._token_replies.popleft(), "")
            return answer if answer is not None else web.Response()
        if form.get("grant_type") != "urn:ietf:params:oauth:grant-type:jwt-bearer" \
                or not form.get("assertion"):
            return web.json_response({"error": "invalid_grant", "error_description": "Bad Request"},
                                     status=400)
        token = f"ya29.fake-{len(self.issued) + 1}"
        self.issued.append(token)
        if self.accepted is not None:
            self.accepted.add(token)
        return web.json_response({"access_token": token, "expires_in": 3599, "token_type": "Bearer"})

    async def _control_replies(self, request: web.Request) -> web.StreamResponse:
        spec = await request.json()
        replies = [Reply.from_json(r) for r in spec.get("replies", [])]
        token = spec.get("token")
        if spec.get("always"):
            for reply in replies:
                self.always(reply, token=token)
        else:
            self.then(*replies, token=token)
        return web.json_response({"queued": len(replies)})

    async def _control_requests(self, request: web.Request) -> web.StreamResponse:
        return web.json_response({"requests": [r.to_json() for r in self.requests],
                                  "token_requests": self.token_requests})

    async def _control_reset(self, request: web.Request) -> web.StreamResponse:
        self.reset()
        return web.json_response({})

    async def _control_accept(self, request: web.Request) -> web.StreamResponse:
        spec = await request.json()
        self.accept_only(*spec.get("tokens", []))
        return web.json_response({})


def service_account_key(token_uri: str, *, project_id: str = "geopush-test") -> dict[str, Any]:
    """A service account key file's content, with a fresh RSA key, whose tokens come from the
    fake's `token_uri`."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption()).decode()
    return {
        "type": "service_account",
        "project_id": project_id,
        "private_key_id": "0123456789abcdef0123456789abcdef01234567",
        "private_key": pem,
        "client_email": f"firebase-adminsdk@{project_id}.iam.gserviceaccount.com",
        "client_id": "100000000000000000000",
        "auth_uri": "https://accounts.google.com/o/oauth2/auth",
        "token_uri": token_uri,
    }


# -- as a process -------------------------------------------------------------------------------


class FakeFcmProcess:
    """`python -m tests.fakefcm` in a subprocess, scripted over HTTP (blocking calls: for tests
    that drive a `geopush serve` subprocess)."""

    def __init__(self, record: Path | None = None, *, port: int = 0, check_tokens: bool = False) -> None:
        args = [sys.executable, "-m", "tests.fakefcm", "--port", str(port)]
        if record is not None:
            args += ["--record", str(record)]
        if check_tokens:
            args.append("--check-tokens")
        self.proc = subprocess.Popen(args, cwd=Path(__file__).parent.parent, stdout=subprocess.PIPE,
                                     text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait(5)
            raise RuntimeError(f"tests.fakefcm did not start (exit {self.proc.returncode})")
        ready = json.loads(line)
        self.endpoint: str = ready["endpoint"]
        self.token_uri: str = ready["token_uri"]
        self.control: str = ready["control"]

    def then(self, *replies: Reply, token: str | None = None, always: bool = False) -> None:
        self._post("replies", {"replies": [r.to_json() for r in replies], "token": token,
                               "always": always})

    def requests(self) -> list[dict[str, Any]]:
        with urllib.request.urlopen(f"{self.control}/requests", timeout=5) as answer:
            return list(json.load(answer)["requests"])

    def reset(self) -> None:
        self._post("reset", {})

    def _post(self, what: str, spec: dict[str, Any]) -> None:
        request = urllib.request.Request(f"{self.control}/{what}", data=json.dumps(spec).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=5) as answer:
            answer.read()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()

    def __enter__(self) -> FakeFcmProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextlib.contextmanager
def fake_fcm_process(record: Path | None = None, **kw: Any) -> Iterator[FakeFcmProcess]:
    process = FakeFcmProcess(record, **kw)
    try:
        yield process
    finally:
        process.stop()


async def _serve(args: argparse.Namespace) -> None:
    fake = FakeFcm(record=args.record, check_tokens=args.check_tokens)
    await fake.start(args.host, args.port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    # the one line the parent waits for: where to send, where to fetch tokens, where to script
    sys.stdout.write(json.dumps({"endpoint": fake.endpoint, "token_uri": fake.token_uri,
                                 "control": fake.control}) + "\n")
    sys.stdout.flush()
    try:
        await stop.wait()
    finally:
        await fake.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.fakefcm", description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0: a free port (printed)")
    parser.add_argument("--record", type=Path, help="append each send as a JSON line to this file")
    parser.add_argument("--check-tokens", action="store_true",
                        help="answer a plain 401 to a Bearer not issued by /token")
    asyncio.run(_serve(parser.parse_args(argv)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
