"""The webhook route, `POST <http.path>`: guard, read, decode, store, answer.

It is a Litestar ASGI route handler (`@asgi`), not a typed `@post` handler. The webhook
is the one route that carries load, and Litestar's request cycle around a typed
handler (a Request object, the signature model, the Response and its conversion to
ASGI) cost more than everything the handler itself does: 160-245 µs a request against
76-84 µs for the same decode-and-answer as an ASGI handler, measured side by side on
the benchmark machine. Here the body is read from `receive()` and the answer is two
`send()` calls with prebuilt headers. Errors are still Litestar's: an HTTPException
raised here is rendered by the app's exception handlers, like on every other route.
"""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING, cast
from urllib.parse import parse_qs

import msgspec
from litestar.exceptions import (
    MethodNotAllowedException,
    NotAuthorizedException,
    NotFoundException,
    PermissionDeniedException,
)
from litestar.openapi.spec import (
    OpenAPIMediaType,
    OpenAPIResponse,
    OpenAPIType,
    Operation,
    PathItem,
    RequestBody,
    Schema,
)
from litestar.types import HTTPScope, Receive, Scope, Send

from bridge.metrics import Metrics
from bridge.models import KNOWN_TYPES, BadWebhook, decode
from bridge.security import Gate
from bridge.store import OutboxFull, StoreUnavailable

if TYPE_CHECKING:
    from bridge.committer import Committer
    from bridge.config import HttpConfig

log = logging.getLogger("bridge.webhook")

OK = b'{"ok":true}'
DUPLICATE = b'{"ok":true,"duplicate":true}'
_JSON = (b"content-type", b"application/json")
_CLOSE = (b"connection", b"close")
_RETRY = (b"retry-after", b"30")


def _header(scope: HTTPScope, name: bytes) -> str | None:
    """The first value of a header (names arrive lower-cased), or None."""
    for key, value in scope["headers"]:
        if key == name:
            return value.decode("latin-1")
    return None


async def _answer(
    send: Send, status: int, body: bytes, extra: tuple[tuple[bytes, bytes], ...] = ()
) -> None:
    headers = [_JSON, (b"content-length", str(len(body)).encode()), *extra]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def _error(
    send: Send, status: int, message: str, extra: tuple[tuple[bytes, bytes], ...] = ()
) -> None:
    await _answer(send, status, msgspec.json.encode({"ok": False, "error": message}), extra)


class _TooLarge(Exception):
    pass


class WebhookRoute:
    """The ASGI callable behind `POST <path>` (and `POST <path>/<token>`)."""

    def __init__(
        self, http: HttpConfig, gate: Gate, metrics: Metrics, store: Committer
    ) -> None:
        # With a token, the route is mounted at the path: `<path>/<token>` reaches it too,
        # the token in what is left of the path. (Not a `{token:str}` path parameter:
        # Litestar 2 looks an ASGI route's parameters up by the request's method, and
        # keeps them under "asgi": a KeyError, answered 500.)
        self.mounted = gate.token is not None
        self.limit = http.max_body_bytes
        self.body_timeout = http.body_timeout
        self.gate = gate
        self.metrics = metrics
        self.store = store  # the lifespan opens the store after the routes exist

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        http = cast(HTTPScope, scope)  # Litestar routes only http to an ASGI route handler
        if http["method"] != "POST":
            raise MethodNotAllowedException(headers={"Allow": "POST"})
        started = time.perf_counter()
        if self.mounted and "/" in http["path"].strip("/"):
            raise NotFoundException()  # deeper than <path>/<token>
        self.admit(http)
        metrics = self.metrics
        length = _header(http, b"content-length")
        try:
            if length is not None and length.isdigit() and int(length) > self.limit:
                raise _TooLarge
            async with asyncio.timeout(self.body_timeout):
                body = await self.read(receive)
        except _TooLarge:
            # the rest of the body is never read: close, so that it cannot keep the
            # connection (RFC 9110: 413)
            metrics.count("-", "rejected")
            await _error(send, 413, f"the body is larger than {self.limit} bytes "
                         "(http.max_body_bytes)", (_CLOSE,))
            return
        except TimeoutError:
            metrics.count("-", "rejected")
            await _error(send, 408, "the body did not arrive in time", (_CLOSE,))
            return
        if body is None:
            return  # the client went away before its body was complete
        received_at = datetime.now(UTC)
        try:
            decoded = decode(body)
        except BadWebhook as exc:
            metrics.count("-", "rejected")
            log.warning("rejected a webhook: %s", exc)
            await _error(send, 400, str(exc))
            return
        label = decoded.notify_type if decoded.notify_type in KNOWN_TYPES else "OTHER"
        # the sender's own string, quoted and cut when unknown: it must not forge log lines
        shown = decoded.notify_type if label != "OTHER" else repr(decoded.notify_type[:64])
        try:
            accepted = await self.store.submit_async(decoded, body, received_at)
        except StoreUnavailable as exc:
            metrics.count(label, "unavailable")
            log.error("%s answered 503: %s", shown, exc)
            await _error(send, 503, str(exc), (_RETRY,) if isinstance(exc, OutboxFull) else ())
            return
        elapsed = time.perf_counter() - started
        metrics.ack_seconds.observe(elapsed)
        if accepted.duplicate:
            outcome = "duplicate"
        elif accepted.warning:
            outcome = "raw"
            metrics.warnings.inc()
            log.warning("%s accepted raw: %r", shown, accepted.warning)
        else:
            outcome = "accepted"
            if accepted.notice:
                metrics.warnings.inc()
                log.warning("%s accepted: %s", shown, accepted.notice)
        metrics.count(label, outcome)
        log.info("%s iccid=%s %s %.1fms", shown, accepted.iccid or "-", outcome, elapsed * 1000)
        await _answer(send, 200, DUPLICATE if accepted.duplicate else OK)

    async def read(self, receive: Receive) -> bytes | None:
        """The whole body (None if the client disconnected); _TooLarge past the limit,
        for a body sent without Content-Length (chunked)."""
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = cast(bytes, message.get("body", b""))
            size += len(chunk)
            if size > self.limit:
                raise _TooLarge
            chunks.append(chunk)
            if not message.get("more_body", False):
                return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def admit(self, scope: HTTPScope) -> None:
        """Sender IP, then token; raises 403 or 401. Before the body is read."""
        gate, metrics = self.gate, self.metrics
        client_addr = scope.get("client")
        peer = client_addr[0] if client_addr else None
        forwarded = None
        if gate.proxies:  # believed only from a trusted proxy: with none, never parsed
            # a repeated X-Forwarded-For is one list (RFC 9110 5.3): a proxy may add its own
            values = [v.decode("latin-1") for k, v in scope["headers"] if k == b"x-forwarded-for"]
            forwarded = ",".join(values) or None
        client, allowed = gate.judge(peer, forwarded)
        if not allowed:
            metrics.count("-", "forbidden")
            log.warning("refused a webhook from %s: not in http.allowed_ips", client)
            raise PermissionDeniedException(f"sender {client} is not allowed (http.allowed_ips)")
        if gate.token is None:
            return  # no token configured: nothing more to look at
        presented = self.path_token(scope) or _query_token(scope)
        if not presented:
            presented = _header(scope, b"x-webhook-token")
        if not gate.token_ok(presented):
            metrics.count("-", "unauthorized")
            log.warning("refused a webhook from %s: missing or wrong token", client)
            raise NotAuthorizedException("missing or wrong webhook token")


    def path_token(self, scope: HTTPScope) -> str | None:
        """`<token>` of `<path>/<token>`: what the mount left of the path."""
        if not self.mounted:
            return None
        return scope["path"].strip("/") or None


def _query_token(scope: HTTPScope) -> str | None:
    query = scope["query_string"]
    if not query:
        return None
    values = parse_qs(query.decode("latin-1")).get("token")
    return values[0] if values else None


def webhook_path_item() -> PathItem:
    """The webhook route's entry in `/schema` (an ASGI route has none by itself)."""
    answer = Schema(
        type=OpenAPIType.OBJECT,
        properties={
            "ok": Schema(type=OpenAPIType.BOOLEAN),
            "duplicate": Schema(type=OpenAPIType.BOOLEAN),
            "error": Schema(type=OpenAPIType.STRING),
        },
        required=["ok"],
    )
    content = {"application/json": OpenAPIMediaType(schema=answer)}
    outcomes = {
        "200": "stored durably (or a duplicate: `duplicate: true`); published after",
        "400": "not JSON, not an object, or no string notifyType",
        "401": "missing or wrong token (http.token)",
        "403": "the sender's IP is not in http.allowed_ips",
        "408": "the body did not arrive within http.body_timeout",
        "413": "the body is larger than http.max_body_bytes",
        "503": "the store cannot write: retry later",
    }
    body = Schema(
        type=OpenAPIType.OBJECT,
        properties={
            "notifyType": Schema(type=OpenAPIType.STRING),
            "notifyId": Schema(type=OpenAPIType.STRING),
            "eventGenerateTime": Schema(type=OpenAPIType.STRING),
            "content": Schema(type=OpenAPIType.OBJECT),
        },
        required=["notifyType"],
    )
    return PathItem(
        post=Operation(
            operation_id="ReceiveWebhook",
            summary="Receive an eSIM Access webhook",
            request_body=RequestBody(
                content={"application/json": OpenAPIMediaType(schema=body)}, required=True
            ),
            responses={
                code: OpenAPIResponse(description=text, content=content)
                for code, text in outcomes.items()
            },
        )
    )
