"""The webhook route, `POST <http.path>`: admit, read, decode, store, answer.

It is a Litestar ASGI route handler (`@asgi`), not a typed `@post` handler. The webhook
is the one route that carries load, and Litestar's request cycle around a typed
handler (a Request object, the signature model, the Response and its conversion to
ASGI) cost more than everything the handler itself does: 160-245 µs a request against
76-84 µs for the same decode-and-answer as an ASGI handler, measured side by side on
the benchmark machine. Here the body is read from `receive()` and the answer is two
`send()` calls with prebuilt headers.

Each step either hands its result to the next or raises an HTTPException, and every
error answer of the bridge, here and from the app's exception handlers, is rendered
by `error_answer`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, NamedTuple, Protocol, cast
from urllib.parse import parse_qs

import msgspec
from litestar.exceptions import (
    HTTPException,
    MethodNotAllowedException,
    NotAuthorizedException,
    NotFoundException,
    PermissionDeniedException,
    ServiceUnavailableException,
)
from litestar.openapi.spec import (
    OpenAPIHeader,
    OpenAPIMediaType,
    OpenAPIResponse,
    OpenAPIType,
    Operation,
    PathItem,
    Reference,
    RequestBody,
    Schema,
)
from litestar.types import HTTPScope, Receive, Scope, Send

from bridge.metrics import Metrics
from bridge.models import KNOWN_TYPES, BadWebhook, Decoded
from bridge.models import decode as decode_body
from bridge.security import Address, Gate
from bridge.store import Accepted, OutboxFull, StoreUnavailable

if TYPE_CHECKING:
    from bridge.config import HttpConfig

log = logging.getLogger("bridge.webhook")

OK = b'{"ok":true}'
DUPLICATE = b'{"ok":true,"duplicate":true}'
_JSON = (b"content-type", b"application/json")
RETRY_AFTER = "30"  # seconds a sender waits when the outbox is full


class Ingest(Protocol):
    """Where the route stores a webhook. What `submit_async` returns resolves once the
    webhook is durably stored (200 may be said then, not before), or fails with
    StoreUnavailable, OutboxFull when the broker has fallen behind (503)."""

    def submit_async(
        self, decoded: Decoded, body: bytes, received_at: datetime
    ) -> Awaitable[Accepted]: ...


class ErrorAnswer(NamedTuple):
    """An error answer, for either way out: ASGI messages from the webhook route, or a
    Response from the app's exception handlers."""

    status: int
    body: bytes
    headers: dict[str, str]


def error_answer(exc: HTTPException) -> ErrorAnswer:
    """Every error answer of the bridge: JSON that says what went wrong, with the
    exception's own headers (405's Allow, 503's Retry-After). After 408 and 413 the
    connection is closed: the rest of the body is never read, so a slow or oversized
    upload cannot keep its connection (RFC 9110)."""
    headers = dict(exc.headers or {})
    if exc.status_code in (408, 413):
        headers["connection"] = "close"
    body = msgspec.json.encode({"ok": False, "error": exc.detail})
    return ErrorAnswer(exc.status_code, body, headers)


async def _answer(
    send: Send, status: int, body: bytes, extra: list[tuple[bytes, bytes]] | None = None
) -> None:
    headers = [_JSON, (b"content-length", str(len(body)).encode())]
    if extra:
        headers.extend(extra)
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def _refuse(send: Send, exc: HTTPException) -> None:
    """An error answer straight from the route, as the app's handlers would give it."""
    status, body, headers = error_answer(exc)
    extra = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]
    await _answer(send, status, body, extra)


def _header(scope: HTTPScope, name: bytes) -> str | None:
    """The first value of a header (names arrive lower-cased), or None."""
    for key, value in scope["headers"]:
        if key == name:
            return value.decode("latin-1")
    return None


def _declared_length(scope: HTTPScope) -> int:
    """The Content-Length, or 0 without one (a chunked body is counted as it arrives)."""
    length = _header(scope, b"content-length")
    return int(length) if length is not None and length.isdecimal() else 0


def _query_token(scope: HTTPScope) -> str | None:
    query = scope["query_string"]
    if not query:
        return None
    values = parse_qs(query.decode("latin-1")).get("token")
    return values[0] if values else None


def _names(notify_type: str) -> tuple[str, str]:
    """The metrics label and the name for the log. An unknown type is `OTHER` in the
    metrics, and in the log the sender's own string quoted and cut: it must not forge
    log lines."""
    if notify_type in KNOWN_TYPES:
        return notify_type, notify_type
    return "OTHER", repr(notify_type[:64])


def _outcome(accepted: Accepted) -> tuple[str, str | None]:
    """The metrics outcome, and what to warn about: a body published raw, or a notice
    about one that was understood."""
    if accepted.duplicate:
        return "duplicate", None
    if accepted.warning:
        return "raw", f"accepted raw: {accepted.warning!r}"
    return "accepted", f"accepted: {accepted.notice}" if accepted.notice else None


class WebhookRoute:
    """The ASGI callable behind `POST <path>` (and `POST <path>/<token>`)."""

    def __init__(self, http: HttpConfig, gate: Gate, metrics: Metrics, ingest: Ingest) -> None:
        # With a token, the route is mounted at the path: `<path>/<token>` reaches it too,
        # the token in what is left of the path. (Not a `{token:str}` path parameter:
        # Litestar 2 looks an ASGI route's parameters up by the request's method, and
        # keeps them under "asgi": a KeyError, answered 500.)
        self.mounted = gate.token is not None
        self.limit = http.max_body_bytes
        self.body_timeout = http.body_timeout
        self.gate = gate
        self.metrics = metrics
        self.ingest = ingest

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        http = cast(HTTPScope, scope)  # Litestar routes only http to an ASGI route handler
        started = time.perf_counter()
        try:
            self.admit(http)
            body = await self.read(http, receive)
            if body is None:
                return  # the client went away before its body was complete
            received_at = datetime.now(UTC)
            decoded = self.decode(body)
            accepted = await self.store(decoded, body, received_at)
        except HTTPException as exc:
            await _refuse(send, exc)
            return
        await self.answer(send, decoded, accepted, started)

    # -- admit: 405, 404, 403, 401, before a byte of the body is read ----------------------

    def admit(self, scope: HTTPScope) -> None:
        """Method, path, sender IP, then token."""
        if scope["method"] != "POST":
            raise MethodNotAllowedException(headers={"Allow": "POST"})
        if self.mounted and "/" in scope["path"].strip("/"):
            raise NotFoundException()  # deeper than <path>/<token>
        client = self.sender(scope)
        if self.gate.token is not None:  # no token configured: nothing more to look at
            self.check_token(scope, client)

    def sender(self, scope: HTTPScope) -> Address | None:
        """The client, for the log; 403 unless http.allowed_ips lets it in."""
        client_addr = scope.get("client")
        peer = client_addr[0] if client_addr else None
        forwarded = None
        if self.gate.proxies:  # believed only from a trusted proxy: with none, never parsed
            # a repeated X-Forwarded-For is one list (RFC 9110 5.3): a proxy may add its own
            values = [v.decode("latin-1") for k, v in scope["headers"] if k == b"x-forwarded-for"]
            forwarded = ",".join(values) or None
        client, allowed = self.gate.judge(peer, forwarded)
        if not allowed:
            self.metrics.count("-", "forbidden")
            log.warning("refused a webhook from %s: not in http.allowed_ips", client)
            raise PermissionDeniedException(f"sender {client} is not allowed (http.allowed_ips)")
        return client

    def check_token(self, scope: HTTPScope, client: Address | None) -> None:
        """401 unless the token comes as `<path>/<token>`, `?token=` or X-Webhook-Token."""
        presented = self.path_token(scope) or _query_token(scope)
        if not presented:
            presented = _header(scope, b"x-webhook-token")
        if not self.gate.token_ok(presented):
            self.metrics.count("-", "unauthorized")
            log.warning("refused a webhook from %s: missing or wrong token", client)
            raise NotAuthorizedException("missing or wrong webhook token")

    def path_token(self, scope: HTTPScope) -> str | None:
        """`<token>` of `<path>/<token>`: what the mount left of the path."""
        if not self.mounted:
            return None
        return scope["path"].strip("/") or None

    # -- read: 413, 408 --------------------------------------------------------------------

    async def read(self, scope: HTTPScope, receive: Receive) -> bytes | None:
        """The whole body within http.max_body_bytes and http.body_timeout; None if the
        client went away first."""
        if _declared_length(scope) > self.limit:
            raise self.too_large()  # announced: not a byte of it is read
        try:
            async with asyncio.timeout(self.body_timeout):
                return await self.receive_body(receive)
        except TimeoutError:
            raise self.rejected(408, "the body did not arrive in time") from None

    async def receive_body(self, receive: Receive) -> bytes | None:
        """The body's chunks joined, counted as they arrive: a chunked body has no
        Content-Length to refuse it by."""
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = cast(bytes, message.get("body", b""))
            size += len(chunk)
            if size > self.limit:
                raise self.too_large()
            chunks.append(chunk)
            if not message.get("more_body", False):
                return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def too_large(self) -> HTTPException:
        return self.rejected(413, f"the body is larger than {self.limit} bytes "
                                  "(http.max_body_bytes)")

    def rejected(self, status: int, message: str) -> HTTPException:
        """A body refused (400, 408, 413), counted as such."""
        self.metrics.count("-", "rejected")
        return HTTPException(status_code=status, detail=message)

    # -- decode: 400 -----------------------------------------------------------------------

    def decode(self, body: bytes) -> Decoded:
        try:
            return decode_body(body)
        except BadWebhook as exc:
            log.warning("rejected a webhook: %s", exc)
            raise self.rejected(400, str(exc)) from None

    # -- store: 503 ------------------------------------------------------------------------

    async def store(self, decoded: Decoded, body: bytes, received_at: datetime) -> Accepted:
        """Durably stored, or 503 so that the sender tries again later."""
        try:
            return await self.ingest.submit_async(decoded, body, received_at)
        except StoreUnavailable as exc:
            label, shown = _names(decoded.notify_type)
            self.metrics.count(label, "unavailable")
            log.error("%s answered 503: %s", shown, exc)
            retry = {"Retry-After": RETRY_AFTER} if isinstance(exc, OutboxFull) else None
            raise ServiceUnavailableException(str(exc), headers=retry) from None

    # -- answer: 200 -----------------------------------------------------------------------

    async def answer(
        self, send: Send, decoded: Decoded, accepted: Accepted, started: float
    ) -> None:
        """200 once stored, counted and logged."""
        elapsed = time.perf_counter() - started
        self.metrics.ack_seconds.observe(elapsed)
        label, shown = _names(decoded.notify_type)
        outcome, warning = _outcome(accepted)
        if warning:
            self.metrics.warnings.inc()
            log.warning("%s %s", shown, warning)
        self.metrics.count(label, outcome)
        log.info("%s iccid=%s %s %.1fms", shown, accepted.iccid or "-", outcome, elapsed * 1000)
        await _answer(send, 200, DUPLICATE if accepted.duplicate else OK)


ACCEPTED = """Any JSON object with a string `notifyType` is answered 200 once it is durably \
stored. A known type whose content fits its shape is decoded and published on its topics; \
anything else (an unknown notifyType, a content of another shape or of any other JSON \
type, a notifyId that is not a string) is stored as well and published raw on \
`<base>/event/<notifyType>`: a sender's surprise is never dropped. A notifyId that is a \
string is the dedup key, otherwise a hash of the body is. The Content-Type is not looked at.

With `http.token` set, the token goes as the last path segment (`POST <path>/<token>`), \
as `?token=`, or as header `X-Webhook-Token`. Any other method on this path is answered \
405 with `Allow: POST`."""

ANSWERS = {
    "200": "stored durably; `duplicate: true` when this notifyId (or, without one, this body) "
           "was stored within store.dedup_hours: nothing is published again",
    "400": "not JSON (not UTF-8, gzip-compressed, nested too deeply), not an object, or no "
           "string notifyType; `error` says which",
    "401": "missing or wrong token (http.token)",
    "403": "the sender's IP is not in http.allowed_ips",
    "408": "the body did not arrive within http.body_timeout; the connection is closed",
    "413": "the body is larger than http.max_body_bytes; the connection is closed",
    "431": "the request line and headers are over 256 KB; the connection is closed",
    "503": "the store cannot write (disk full, locked, the outbox full): nothing was "
           "stored, try again later",
}


def webhook_path_item() -> PathItem:
    """The webhook route's entry in `/schema` (an ASGI route has none by itself). It
    describes what the route really takes, which is looser than a provider webhook on
    purpose, so that a client generated from it, or a fuzzer, expects what it gets."""
    return PathItem(
        post=Operation(
            operation_id="ReceiveWebhook",
            summary="Receive an eSIM Access webhook",
            description=ACCEPTED,
            request_body=RequestBody(
                content={"application/json": OpenAPIMediaType(schema=_webhook_schema())},
                required=True,
            ),
            responses={code: _response(code, text) for code, text in ANSWERS.items()},
        )
    )


def _webhook_schema() -> Schema:
    """A JSON object with a string notifyType; every other member may be any JSON value."""
    anything = "any JSON value; "
    return Schema(
        type=OpenAPIType.OBJECT,
        properties={
            "notifyType": Schema(type=OpenAPIType.STRING, description=(
                "CHECK_HEALTH, ORDER_STATUS, SMDP_EVENT, ESIM_STATUS, DATA_USAGE or "
                "VALIDITY_USAGE are decoded; any other string is published raw")),
            "notifyId": Schema(description=anything + "a string is the dedup key"),
            "eventGenerateTime": Schema(description=anything + "an ISO 8601 or "
                                        "`yyyy-MM-dd HH:mm:ss` string orders the event"),
            "content": Schema(description=anything + "the event's fields"),
        },
        required=["notifyType"],
        additional_properties=True,
    )


def _response(code: str, text: str) -> OpenAPIResponse:
    return OpenAPIResponse(
        description=text,
        content={"application/json": OpenAPIMediaType(schema=_answer_schema(code == "200"))},
        headers=_answer_headers(code) or None,
    )


def _answer_schema(ok: bool) -> Schema:
    """`{"ok": true}` (with `"duplicate": true` for one), or `{"ok": false, "error": ...}`."""
    other = ("duplicate", Schema(const=True)) if ok else ("error", Schema(type=OpenAPIType.STRING))
    members: dict[str, Schema | Reference] = {"ok": Schema(const=ok), other[0]: other[1]}
    return Schema(type=OpenAPIType.OBJECT, properties=members,
                  required=["ok"] if ok else ["ok", "error"], additional_properties=False)


def _answer_headers(code: str) -> dict[str, OpenAPIHeader | Reference]:
    """Connection: close where the rest of the request is never read; Retry-After on 503."""
    if code in ("408", "413", "431"):
        close = OpenAPIHeader(schema=Schema(const="close"), required=True)
        return {"Connection": close}
    if code == "503":
        wait = OpenAPIHeader(schema=Schema(type=OpenAPIType.STRING, pattern="^[0-9]+$"),
                             description=f"seconds ({RETRY_AFTER}); sent when the outbox is full")
        return {"Retry-After": wait}
    return {}
