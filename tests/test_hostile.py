"""Hostile and broken input against the real bridge process and a real Mosquitto.

Every answer is the contract's (400, 408, 413 or a 200 that publishes the body
raw), never a 5xx, and a refused request changes nothing: no message on
`esim/#` (bridge/info, whose counters may tick, aside) and no accepted, raw or
duplicate webhook in /metrics. Slow and unfinished uploads never stall the
webhooks of others.
"""

from __future__ import annotations

import json
import select
import socket
import struct
import threading
import time
import uuid
from collections.abc import Iterator

import pytest

from tests.brokers import Mosquitto
from tests.processes import (
    BridgeProcess,
    Watcher,
    assert_changes_nothing,
    fixture,
    published,
    survives,
)

LIMIT = 16384
BODY_TIMEOUT = 2.0



@pytest.fixture(scope="module")
def bridge(tmp_path_factory: pytest.TempPathFactory, broker: Mosquitto) -> Iterator[BridgeProcess]:
    sections: dict[str, dict[str, object]] = {
        "homeassistant": {"discovery": False},
        "http": {"max_body_bytes": LIMIT, "body_timeout": BODY_TIMEOUT},
    }
    process = BridgeProcess(tmp_path_factory.mktemp("hostile") / "bridge", broker.url, sections)
    process.start()
    try:
        yield process
    finally:
        process.stop()



def webhook(notify_id: str, size: int = 0) -> bytes:
    """A valid ESIM_STATUS body with a unique notifyId, padded to `size` bytes if given."""
    body = json.loads(fixture("esim_status"))
    body["notifyId"] = notify_id
    body["pad"] = ""
    raw = json.dumps(body, separators=(",", ":")).encode()
    if size:
        raw = raw.replace(b'"pad":""', b'"pad":"' + b"x" * (size - len(raw)) + b'"')
        assert len(raw) == size
    return raw


# -- raw HTTP ---------------------------------------------------------------------------------


def head(bridge: BridgeProcess, length: int | None, extra: str = "") -> bytes:
    framing = f"Content-Length: {length}" if length is not None else "Transfer-Encoding: chunked"
    return (
        f"POST {bridge.path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"{framing}\r\n{extra}\r\n"
    ).encode()


def chunked(body: bytes, size: int = 1000) -> bytes:
    parts = [b"%x\r\n%s\r\n" % (len(body[i : i + size]), body[i : i + size])
             for i in range(0, len(body), size)]
    return b"".join(parts) + b"0\r\n\r\n"


def read_response(sock: socket.socket, timeout: float = 15.0) -> tuple[int, bytes]:
    """One HTTP/1.1 response (Content-Length framed): (status, body)."""
    return read_responses(sock, 1, timeout)[0]


def read_responses(sock: socket.socket, count: int, timeout: float = 15.0
                   ) -> list[tuple[int, bytes]]:
    """`count` responses in a row on one connection (to pipelined requests): what one
    recv() brings past a response is the start of the next, not to be dropped."""
    sock.settimeout(timeout)
    data = b""
    answers: list[tuple[int, bytes]] = []
    while len(answers) < count:
        header, found, rest = data.partition(b"\r\n\r\n")
        if found:
            lines = header.decode("latin-1").split("\r\n")
            fields = {k.strip().lower(): v.strip()
                      for k, _, v in (h.partition(":") for h in lines[1:])}
            length = int(fields.get("content-length", "0"))
            if len(rest) >= length:
                answers.append((int(lines[0].split()[1]), rest[:length]))
                data = rest[length:]
                continue
        chunk = sock.recv(65536)
        if not chunk:
            if found and count == 1:
                return [(int(lines[0].split()[1]), rest)]  # closed early: what came
            raise ConnectionError(f"closed before a response: {data!r}")
        data += chunk
    return answers


def closed_by_server(sock: socket.socket, timeout: float = 10.0) -> bool:
    """True when the server closes the connection (EOF) within `timeout`."""
    sock.settimeout(timeout)
    try:
        while sock.recv(65536):
            pass
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True
    return True


def exchange(bridge: BridgeProcess, data: bytes, hang_up: bool = True) -> tuple[int, bytes, bool]:
    """Send raw bytes; (status, body, whether the server then closed the connection,
    checked only when `hang_up` is expected)."""
    with socket.create_connection(("127.0.0.1", bridge.port), timeout=15) as sock:
        sock.sendall(data)
        status, body = read_response(sock)
        return status, body, hang_up and closed_by_server(sock)


# -- bodies that are not webhooks: 400 -------------------------------------------------------

NOT_WEBHOOKS = {
    "empty": b"",
    "text": b"not json",
    "truncated": b'{"notifyType": "DATA_USAGE", "content": {',
    "array": b"[1, 2]",
    "string": b'"DATA_USAGE"',
    "number": b"42",
    "null": b"null",
    "true": b"true",
    "no-notifyType": b'{"content": {"iccid": "8943108170001029631"}}',
    "notifyType-number": b'{"notifyType": 7}',
    "notifyType-null": b'{"notifyType": null}',
    "notifyType-list": b'{"notifyType": ["DATA_USAGE"]}',
    "notifyType-object": b'{"notifyType": {"type": "DATA_USAGE"}}',
    "invalid-utf8-value": b'{"notifyType": "X", "content": {"iccid": "\xff\xfe"}}',
    "invalid-utf8-type": b'{"notifyType": "DATA_\xc3"}',
    "overlong-utf8": b'{"notifyType": "X", "c": "\xc0\xaf"}',
    "utf8-surrogate": b'{"notifyType": "X", "c": "\xed\xa0\x80"}',
    "escaped-lone-surrogate": b'{"notifyType": "X", "c": "\\udc00x"}',
    "nan": b'{"notifyType": "X", "content": {"remain": NaN}}',
    "infinity": b'{"notifyType": "X", "content": {"remain": Infinity}}',
    "trailing-garbage": b'{"notifyType": "X"} and more',
    "two-objects": b'{"notifyType": "X"}{"notifyType": "Y"}',
    "bom": b'\xef\xbb\xbf{"notifyType": "X"}',
    "nested-array": b"[" * 5000 + b"]" * 5000,
    "nested-in-content": b'{"notifyType": "X", "content": ' + b"[" * 5000 + b"]" * 5000 + b"}",
    "nested-objects": b'{"notifyType": "DATA_USAGE", "content": '
    + b'{"a":' * 2500 + b"1" + b"}" * 2500 + b"}",
}


@pytest.mark.parametrize("body", list(NOT_WEBHOOKS.values()), ids=list(NOT_WEBHOOKS))
def test_a_body_that_is_no_webhook_gets_400_and_changes_nothing(
    body: bytes, bridge: BridgeProcess, watcher: Watcher
) -> None:
    with survives(bridge):
        answers = []
        assert_changes_nothing(
            bridge, watcher, lambda: answers.append(bridge.post(body, method="POST"))
        )
        answer = answers[0]
        assert answer.status == 400, answer
        assert answer.json()["ok"] is False
        assert answer.json()["error"]  # names the problem


# -- odd but well-formed webhooks: 200, published raw or converted, never 5xx ------------------


def _odd(content: dict[str, object] | None = None, **top: object) -> dict[str, object]:
    body: dict[str, object] = {"notifyType": "DATA_USAGE"}
    body.update(top)
    if content is not None:
        body["content"] = {"iccid": "8943108170001029631", **content}
    return body


ODD: dict[str, dict[str, object] | bytes] = {
    "remain-1e400": b'{"notifyType": "DATA_USAGE", "content": {"iccid": "8943108170001029631", '
    b'"totalVolume": 100, "remain": 1e400}}',
    "threshold-1e400": b'{"notifyType": "DATA_USAGE", "content": {"iccid": "8943108170001029631", '
    b'"remainThreshold": -1e400}}',
    "unknown-field-1e400": b'{"notifyType": "NEW_THING", "x": 1e400, "y": -1e-400}',
    "notifyId-1e400": b'{"notifyType": "NEW_THING", "notifyId": 1e400}',
    "eventGenerateTime-1e400": b'{"notifyType": "DATA_USAGE", "eventGenerateTime": -1e400, '
    b'"content": {"iccid": "8943108170001029631"}}',
    "remain-2**70": _odd({"totalVolume": 2**70, "remain": 2**70}),
    "remain--2**70": _odd({"totalVolume": 100, "remain": -(2**70)}),
    "remain-2**64": _odd({"remain": 2**64, "orderUsage": 2**63}),
    "remain-int64-max": _odd({"totalVolume": 2**63 - 1, "remain": 2**63 - 1}),
    "remain-huge-string": _odd({"totalVolume": "1" + "0" * 40, "remain": "5"}),
    "total-zero": _odd({"totalVolume": 0, "remain": 5}),
    "total-negative": _odd({"totalVolume": -3, "remain": 5}),
    "threshold-1e308": _odd({"remainThreshold": 1e308, "remain": 1}),
    "remain-float": _odd({"remain": 1.5, "totalVolume": 3}),
    "remain-bool": _odd({"remain": True}),
    "remain-object": _odd({"remain": {"bytes": 5}}),
    "iccid-number": {"notifyType": "ESIM_STATUS", "content": {"iccid": 8943108170001029631}},
    "iccid-list": {"notifyType": "ESIM_STATUS", "content": {"iccid": ["8943"]}},
    "iccid-empty": {"notifyType": "ESIM_STATUS", "content": {"iccid": ""}},
    "iccid-wildcard": {"notifyType": "ESIM_STATUS", "content": {"iccid": "89+43/#"}},
    "iccid-nul": {"notifyType": "ESIM_STATUS", "content": {"iccid": "89\u000043"}},
    "iccid-unicode": {"notifyType": "ESIM_STATUS", "content": {"iccid": "8943\u0661\U0001f600"}},
    "status-object": {"notifyType": "SMDP_EVENT",
                      "content": {"iccid": "8943108170001029631", "esimStatus": {"a": 1}}},
    "content-list": {"notifyType": "SMDP_EVENT", "content": [1, 2]},
    "content-string": {"notifyType": "ORDER_STATUS", "content": "GOT_RESOURCE"},
    "content-null": {"notifyType": "CHECK_HEALTH", "content": None},
    "order-no-number": {"notifyType": "ORDER_STATUS",
                        "content": {"orderNo": 12, "orderStatus": "GOT_RESOURCE"}},
    "time-garbage": _odd({}, eventGenerateTime="yesterday"),
    "time-number": _odd({}, eventGenerateTime=1700000000),
    "time-year-10000-in-utc": _odd({}, eventGenerateTime="9999-12-31T23:59:59-01:00"),
    "time-year-0-in-utc": _odd({"lastUpdateTime": "0001-01-01T00:00:00+01:00"}),
    "expiry-year-10000-in-utc": {"notifyType": "VALIDITY_USAGE", "content": {
        "iccid": "8943108170001029631", "expiredTime": "9999-12-31T23:30:00-23:59"}},
    "notifyId-number": _odd({}, notifyId=12345),
    "notifyId-object": _odd({}, notifyId={"id": 1}),
    "notifyType-empty": {"notifyType": ""},
    "notifyType-long": {"notifyType": "X" * 3000},
    "notifyType-unicode": {"notifyType": "DATA_USAGE\u2028\U0001f4a5"},
    "unknown-everything": {"notifyType": "FUTURE", "content": {"a": [None, {"b": [1.5]}]}},
}


# a string that cannot be a topic segment: accepted, published on esim/event/INVALID only
INVALID = {"iccid-empty", "iccid-wildcard", "iccid-nul", "iccid-unicode", "notifyType-empty",
           "notifyType-long", "notifyType-unicode"}


@pytest.mark.parametrize("case", list(ODD))
def test_an_odd_webhook_is_acknowledged_and_published_as_received(
    case: str, bridge: BridgeProcess, watcher: Watcher
) -> None:
    with survives(bridge):
        body = ODD[case]
        if isinstance(body, dict):
            body = {**body, "notifyId": body.get("notifyId", uuid.uuid4().hex)}
            raw = json.dumps(body, ensure_ascii=False).encode()
        else:
            raw = body.replace(b"{", b'{"nonce": "%s", ' % uuid.uuid4().hex.encode(), 1)
        answer = bridge.post(raw)
        assert answer.status == 200, answer
        assert answer.json() == {"ok": True}
        notify_type = json.loads(raw)["notifyType"]
        topic = "esim/event/INVALID" if case in INVALID else f"esim/event/{notify_type}"
        assert watcher.wait_for(topic, raw) == raw
        events = [t for t, p in published(bridge, watcher) if t.startswith("esim/event/")]
        assert events == [topic]


# -- over the limit: 413 ---------------------------------------------------------------------


def test_a_body_at_the_limit_is_accepted(bridge: BridgeProcess, watcher: Watcher) -> None:
    with survives(bridge):
        body = webhook("at-the-limit", LIMIT)
        status, answer, _ = exchange(bridge, head(bridge, LIMIT) + body, False)
        assert (status, json.loads(answer)) == (200, {"ok": True})
        chunked_body = webhook("at-the-limit-chunked", LIMIT)
        status, _, _ = exchange(bridge, head(bridge, None) + chunked(chunked_body), False)
        assert status == 200
        watcher.wait_for("esim/event/ESIM_STATUS", chunked_body)


@pytest.mark.parametrize(
    "framing", ["content-length", "chunked", "content-length-without-body", "huge-chunk"]
)
def test_over_the_limit_is_413_and_changes_nothing(
    framing: str, bridge: BridgeProcess, watcher: Watcher
) -> None:
    with survives(bridge):
        body = webhook(f"too-big-{framing}", LIMIT + 1)
        requests = {
            "content-length": head(bridge, len(body)) + body,
            # no Content-Length: the limit must hold while the chunks arrive
            "chunked": head(bridge, None) + chunked(body, 700),
            "content-length-without-body": head(bridge, 10**12),
            "huge-chunk": head(bridge, None) + b"%x\r\n" % 10**12 + body,
        }
        results: list[tuple[int, bytes, bool]] = []
        assert_changes_nothing(
            bridge, watcher, lambda: results.append(exchange(bridge, requests[framing]))
        )
        status, answer, closed = results[0]
        assert status == 413
        assert json.loads(answer)["ok"] is False
        assert closed, "the rest of an oversized body must not be read: the connection is closed"


# -- slow and unfinished uploads ---------------------------------------------------------------


class SlowClient(threading.Thread):
    """Sends the request head, then the body one byte a second, until the server answers."""

    def __init__(self, bridge: BridgeProcess, head_bytes: bytes, body: bytes) -> None:
        super().__init__(daemon=True)
        self.sock = socket.create_connection(("127.0.0.1", bridge.port), timeout=30)
        self.head, self.body = head_bytes, body
        self.sent = 0
        self.started = 0.0
        self.answered_after: float | None = None
        self.status: int | None = None
        self.closed = False
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.started = time.monotonic()
            self.sock.sendall(self.head)
            for byte in self.body:
                readable, _, _ = select.select([self.sock], [], [], 1.0)
                if readable:
                    break
                self.sock.sendall(bytes([byte]))
                self.sent += 1
            self.status, _ = read_response(self.sock)
            self.answered_after = time.monotonic() - self.started
            self.closed = closed_by_server(self.sock)
        except BaseException as exc:  # reported by the test
            self.error = exc
        finally:
            self.sock.close()


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_a_slow_upload_is_cut_off_with_408_and_others_are_served_meanwhile(
    framing: str, bridge: BridgeProcess, watcher: Watcher
) -> None:
    with survives(bridge):
        slow_body = webhook(f"slow-loris-{framing}")
        if framing == "chunked":
            slow = SlowClient(bridge, head(bridge, None), chunked(slow_body, 10))
        else:
            slow = SlowClient(bridge, head(bridge, len(slow_body)), slow_body)
        slow.start()
        served: list[bytes] = []
        while slow.is_alive() and len(served) < 50:
            body = webhook(f"meanwhile-{framing}-{len(served)}")
            answer = bridge.post(body, timeout=5)
            assert answer.status == 200, answer
            served.append(body)
            time.sleep(0.2)
        slow.join(30)
        assert not slow.is_alive()
        assert slow.error is None, slow.error
        assert slow.status == 408
        assert slow.sent < len(slow.body), "the server waited for the whole slow body"
        assert slow.answered_after is not None and slow.answered_after >= BODY_TIMEOUT - 0.1
        assert slow.closed, "a cut-off upload must lose its connection"
        assert len(served) >= 2  # webhooks went through while the slow one was uploading
        for body in served:
            watcher.wait_for("esim/event/ESIM_STATUS", body)
        events = [p for t, p in published(bridge, watcher) if t == "esim/event/ESIM_STATUS"]
        assert slow_body not in events and len(events) == len(served)


def test_unfinished_headers_do_not_stall_others(bridge: BridgeProcess, watcher: Watcher) -> None:
    with survives(bridge):
        partial = [
            b"POST /webh",
            b"POST /webhook HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Le",
            b"POST /webhook HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 10\r\n",
            b"GET /healthz HTTP/1.1\r\n",
        ]
        stalled = [socket.create_connection(("127.0.0.1", bridge.port)) for _ in range(40)]
        try:
            for index, sock in enumerate(stalled):
                sock.sendall(partial[index % len(partial)])
            bodies = [webhook(f"beside-stalled-{i}") for i in range(5)]
            for body in bodies:
                assert bridge.post(body, timeout=5).status == 200
            for body in bodies:
                watcher.wait_for("esim/event/ESIM_STATUS", body)
            assert bridge.get("/healthz").status == 200
        finally:
            for sock in stalled:
                sock.close()


def test_a_huge_head_is_refused_with_431_and_others_are_served_meanwhile(
    bridge: BridgeProcess, watcher: Watcher
) -> None:
    """uvicorn's httptools protocol sets no bound on a request's head: one header line of
    128 MB held the event loop for 14 s. Over 256 KB, the bridge answers 431 and hangs up;
    webhooks sent back to back in one write are still webhooks."""
    with survives(bridge):
        start = f"POST {bridge.path} HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: ".encode()
        for pieces in (128, 1):  # a header line fed slowly, and one a little over, all at once
            with socket.create_connection(("127.0.0.1", bridge.port), timeout=15) as sock:
                sock.sendall(start)
                line = b"a" * (2 * 1024 * 1024 if pieces > 1 else 257 * 1024) + b"\r\n\r\n"
                part = -(-len(line) // pieces)
                try:
                    for i in range(pieces):
                        sock.sendall(line[i * part:(i + 1) * part])
                except (BrokenPipeError, ConnectionResetError):
                    pass  # refused already, as it should be
                status, body = read_response(sock)
                assert status == 431 and b"256 KB" in body
                assert closed_by_server(sock)
        assert bridge.get("/healthz").status == 200
        # requests that end within one write do not count toward the next one's head
        bodies = [webhook(f"pipelined-after-431-{i}", size=LIMIT) for i in range(3)]
        with socket.create_connection(("127.0.0.1", bridge.port), timeout=15) as sock:
            sock.sendall(b"".join(head(bridge, LIMIT) + body for body in bodies))
            assert [status for status, _ in read_responses(sock, 3)] == [200, 200, 200]
        for body in bodies:
            watcher.wait_for("esim/event/ESIM_STATUS", body)
        assert "its head is over" in bridge.log()


def test_a_client_that_disconnects_mid_body_changes_nothing(
    bridge: BridgeProcess, watcher: Watcher
) -> None:
    with survives(bridge):
        body = webhook("hung-up")

        def hang_up() -> None:
            for reset in (False, True):
                sock = socket.create_connection(("127.0.0.1", bridge.port))
                sock.sendall(head(bridge, len(body)) + body[: len(body) // 2])
                time.sleep(0.2)
                if reset:  # RST instead of FIN
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                sock.close()

        assert_changes_nothing(bridge, watcher, hang_up)
