"""A stand-in for the provider's REST API, built to ../shared/PROVIDER-API.md.

A real HTTP server on 127.0.0.1 (a free port, a thread per request), because the real
API cannot be reached from here and must never be targeted. It checks the access code
and, with a secret key, the signature; serves a fleet of profiles in pages, usage 10 at
a time and the balance; answers `200010` for an order that is still being allocated;
counts requests in every sliding second, refusing past 8 as the provider would; and
can be made slow, down, or to answer given errors. It records every request.

    with ProviderStandin(access_code="ac", esims=300) as standin:
        standin.url  # -> provider.base_url
"""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
import time
from collections import deque
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

PREFIX = "/api/v1/open/"
LIMIT_PER_SECOND = 8  # the provider's documented limit per account


@dataclass(frozen=True)
class Request:
    """One request as it arrived."""

    path: str  # after /api/v1/open/
    headers: dict[str, str]
    body: bytes
    at: float  # time.monotonic()
    peer: tuple[str, int]  # the client's address and port: one per connection

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Answer:
    """A scripted answer: an HTTP status with an empty body, or an error code."""

    status: int = 200
    code: str | int | None = None  # the provider sends strings, numbers are seen too
    message: str = "scripted"
    retry_after: str | None = None


def profile(number: int, order_no: str = "B24000000000001", **fields: Any) -> dict[str, Any]:
    """A profile as `esim/query` lists it; `fields` override (in the provider's spelling)."""
    base: dict[str, Any] = {
        "esimTranNo": f"T{number:08d}",
        "orderNo": order_no,
        "transactionId": f"tx-{number}",
        "iccid": f"89852000000{number:08d}",
        "imsi": f"4540000{number:08d}",
        "eid": None,
        "ac": f"LPA:1$smdp.example$SECRET-MATCHING-{number}",
        "qrCodeUrl": f"https://p.example/qr/{number}.png",
        "pin": "1234",
        "puk": "12345678",
        "esimStatus": "GOT_RESOURCE",
        "smdpStatus": "RELEASED",
        "activateTime": None,
        "expiredTime": "2030-05-29T18:34:17+0000",
        "totalVolume": 5368709120,
        "totalDuration": 30,
        "durationUnit": "DAY",
        "orderUsage": 0,
        "packageList": [{"packageName": "Europe 5GB 30Days", "packageCode": "EU-5_30",
                         "slug": "EU-5_30", "duration": 30, "volume": 5368709120,
                         "locationCode": "EU", "createTime": "2024-05-01T10:00:00+0000"}],
    }
    base.update(fields)
    return base


class ProviderStandin:
    """The provider, on 127.0.0.1. Change its attributes at any time to change what it
    answers: `delay` (seconds before each answer), `down` (connections closed at once,
    unanswered), `script` (answers used up one per request, before anything else),
    `always` (an answer for every request), `over_limit` ("429" or "900001"),
    `unauthorized` ("000101" or "401": how a wrong access code is refused)."""

    def __init__(self, access_code: str = "standin-access-code", secret_key: str | None = None,
                 esims: int = 0, balance: int = 940_000) -> None:
        self.access_code = access_code
        self.secret_key = secret_key
        self.profiles: list[dict[str, Any]] = [profile(n) for n in range(1, esims + 1)]
        self.usage: dict[str, dict[str, Any]] = {}  # esimTranNo -> usage entry
        self.usage_as_list = False  # obj as the bare list, as an older reference shows
        self.balance = balance
        self.pending: dict[str, float] = {}  # orderNo -> monotonic time it is ready at
        self.pending_calls: dict[str, int] = {}  # orderNo -> 200010 answers still to give
        self.delay = 0.0
        self.down = False
        self.script: deque[Answer] = deque()
        self.always: Answer | None = None
        self.over_limit = "429"
        self.unauthorized = "000101"
        self.requests: list[Request] = []
        self.max_per_second = 0  # the most requests seen within any one second
        self._recent: deque[float] = deque()
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._server.daemon_threads = True
        self.port: int = self._server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread: threading.Thread | None = None

    def start(self) -> ProviderStandin:
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True,
                                        kwargs={"poll_interval": 0.05})
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving; the port then refuses connections."""
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join()
            self._thread = None
        self._server.server_close()

    def __enter__(self) -> ProviderStandin:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()

    def allocate(self, order_no: str, count: int, calls: int = 0, seconds: float = 0.0
                 ) -> list[dict[str, Any]]:
        """A new order of `count` profiles, answered `200010` for its first `calls`
        queries and for `seconds` from now."""
        start = len(self.profiles) + 1
        added = [profile(n, order_no=order_no) for n in range(start, start + count)]
        with self._lock:
            self.profiles.extend(added)
            self.pending_calls[order_no] = calls
            self.pending[order_no] = time.monotonic() + seconds
        return added

    def crowd(self, count: int) -> None:
        """`count` requests of another client of the same account, arriving now: they
        count towards the limit (and `max_per_second`), not in `requests`."""
        with self._lock:
            self._recent.extend([time.monotonic()] * count)

    def paths(self) -> list[str]:
        with self._lock:
            return [request.path for request in self.requests]

    # -- answering (in the server's threads) ------------------------------------------

    def _arrived(self, request: Request) -> int:
        """Record the request; how many arrived within the second up to it."""
        with self._lock:
            self.requests.append(request)
            self._recent.append(request.at)
            while self._recent[0] <= request.at - 1.0:
                self._recent.popleft()
            self.max_per_second = max(self.max_per_second, len(self._recent))
            return len(self._recent)

    def answer(self, request: Request, in_this_second: int) -> tuple[int, dict[str, str], bytes]:
        """(status, headers, body) for one request."""
        with self._lock:
            scripted = self.script.popleft() if self.script else self.always
        if scripted is not None:
            return _scripted(scripted)
        if in_this_second > LIMIT_PER_SECOND:
            return _scripted(Answer(429) if self.over_limit == "429"
                             else Answer(code="900001", message="system busy"))
        code = request.headers.get("rt-accesscode")
        if code != self.access_code:
            if self.unauthorized == "401":
                return _scripted(Answer(401))
            # echoes what it was sent, so tests see that the client never repeats it
            return _refuse("000101", f"accessCode {code} is invalid")
        if self.secret_key is not None and not self._signed(request):
            return _refuse("101003", "signature mismatch")
        try:
            body = request.json()
        except ValueError:
            return _refuse("000103", "body is not JSON")
        if request.path == "balance/query":
            return _ok({"balance": self.balance})
        if request.path == "esim/query":
            return self._query(body)
        if request.path == "esim/usage/query":
            return self._usage(body)
        return 404, {}, b""

    def _signed(self, request: Request) -> bool:
        assert self.secret_key is not None
        headers = request.headers
        message = (headers.get("rt-timestamp", "") + headers.get("rt-requestid", "")
                   + headers.get("rt-accesscode", "")).encode() + request.body
        wanted = hmac.new(self.secret_key.encode(), message, hashlib.sha256).hexdigest()
        return hmac.compare_digest(wanted, headers.get("rt-signature", "").lower())

    def _query(self, body: dict[str, Any]) -> tuple[int, dict[str, str], bytes]:
        pager = body.get("pager")
        if not isinstance(pager, dict):
            return _refuse("000104", "pager is required")
        page_num, page_size = pager.get("pageNum"), pager.get("pageSize")
        if not isinstance(page_num, int) or page_num < 1:
            return _refuse("000104", "pageNum must be 1 or more")
        if not isinstance(page_size, int) or not 5 <= page_size <= 500:
            return _refuse("000104", "pageSize must be 5-500")
        order_no = body.get("orderNo")
        with self._lock:
            if order_no in self.pending and (self.pending_calls[order_no] > 0
                                             or time.monotonic() < self.pending[order_no]):
                self.pending_calls[order_no] -= 1
                return _refuse("200010", "profiles are being allocated")
            found = [p for p in self.profiles
                     if all(p.get(key) == body[key] for key in ("orderNo", "iccid", "esimTranNo")
                            if key in body)]
        if order_no is not None and not found:
            return _refuse("310272", "orderNo does not exist")
        start = (page_num - 1) * page_size
        return _ok({"esimList": found[start : start + page_size],
                    "pager": {"pageNum": page_num, "pageSize": page_size, "total": len(found)}})

    def _usage(self, body: dict[str, Any]) -> tuple[int, dict[str, str], bytes]:
        wanted = body.get("esimTranNoList")
        if not isinstance(wanted, list) or not wanted:
            return _refuse("000104", "esimTranNoList is required")
        if len(wanted) > 10:
            return _refuse("000104", "esimTranNoList holds at most 10")
        with self._lock:
            known = {p["esimTranNo"]: p for p in self.profiles}
            entries = [self.usage.get(number) or {
                "esimTranNo": number, "dataUsage": known[number]["orderUsage"],
                "totalData": known[number]["totalVolume"],
                "lastUpdateTime": "2024-05-29T18:34:17+0000",
            } for number in wanted if number in known]
        return _ok(entries if self.usage_as_list else {"esimUsageList": entries})


def _ok(obj: Any) -> tuple[int, dict[str, str], bytes]:
    return 200, {}, json.dumps({"success": True, "errorCode": None, "errorMsg": None,
                                "obj": obj}).encode()


def _refuse(code: str | int, message: str) -> tuple[int, dict[str, str], bytes]:
    return 200, {}, json.dumps({"success": False, "errorCode": code, "errorMsg": message,
                                "obj": None}).encode()


def _scripted(answer: Answer) -> tuple[int, dict[str, str], bytes]:
    headers = {"Retry-After": answer.retry_after} if answer.retry_after else {}
    if answer.code is not None:
        status, _, body = _refuse(answer.code, answer.message)
        return status, headers, body
    return answer.status, headers, b""


def _handler(standin: ProviderStandin) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive: the client is meant to reuse connections

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length)
            path = self.path.removeprefix(PREFIX) if self.path.startswith(PREFIX) else self.path
            request = Request(path, {k.lower(): v for k, v in self.headers.items()}, body,
                              time.monotonic(), self.client_address)
            in_this_second = standin._arrived(request)
            if standin.down:
                self.close_connection = True
                return
            if standin.delay:
                time.sleep(standin.delay)
            status, headers, payload = standin.answer(request, in_this_second)
            try:
                self.send_response(status)
                for name, value in {"Content-Type": "application/json", **headers}.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)
            except OSError:  # the client gave up (a timeout test): nothing to answer to
                self.close_connection = True

        def log_message(self, format: str, *args: Any) -> None:
            """Quiet: the tests read `requests`, not stderr."""

    return Handler
