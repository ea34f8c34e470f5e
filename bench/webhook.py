"""The webhook bodies the load generator sends and the subscriber recognises.

Every body is the DATA_USAGE fixture with a unique `notifyId` (the bridge drops
duplicates) and an iccid from a fixed pool (the fleet), or, with a pool of 0, an
iccid no fleet has (an eSIM the bridge has never seen). The `notifyId` is 32 hex digits:
8 for a tag naming the phase, 24 for a sequence number, so a subscriber can tell
which request a published message belongs to without any shared state.
All fields have fixed width, so every request has the same length.
"""

from __future__ import annotations

import time

import msgspec

FIXTURE: dict[str, object] = {
    "notifyType": "DATA_USAGE",
    "eventGenerateTime": "2025-07-21T10:57:28Z",
    "notifyId": "f776267e8d6745db8cc316e4c146ea0c",
    "content": {
        "orderNo": "B25052822150009",
        "transactionId": "unique_id_from_partner",
        "esimTranNo": "25052822150009",
        "iccid": "8943108170001029631",
        "totalVolume": 53687091200,
        "orderUsage": 48335585458,
        "remain": 5351505742,
        "lastUpdateTime": "2025-07-21T09:38:25Z",
        "remainThreshold": 0.1,
    },
}

NOTIFY_ID_KEY = b'"notifyId":"'
_MARK_ID = "N" * 32
_MARK_ICCID = "I" * 19
_MARK_TIME = "T" * 20
NEVER_SEEN = 50_000_000  # iccid indexes from here on belong to no fleet


def iccid(index: int) -> str:
    """A valid-looking 19-digit ICCID; `index` picks one of the pool."""
    return f"89431081700{index:08d}"


def notify_id(tag: int, seq: int) -> str:
    return f"{tag:08x}{seq:024x}"


def parse_notify_id(payload: bytes | bytearray) -> tuple[int, int] | None:
    """(tag, seq) from a published body, or None when it is not one of ours.

    A byte search instead of a JSON decode: the subscriber sees thousands of
    messages a second in one Python thread and must not become the bottleneck.
    """
    start = payload.find(NOTIFY_ID_KEY)
    if start < 0:
        return None
    start += len(NOTIFY_ID_KEY)
    text = payload[start : start + 32]
    try:
        return int(text[:8], 16), int(text[8:], 16)
    except ValueError:
        return None


class BodyFactory:
    """Builds request bodies fast: one template, three fixed-width holes.

    `eventGenerateTime` is the current wall-clock second, so no event is older
    than the one before it and every webhook updates the retained topics (an
    older one would let the bridge skip work, flattering it).
    """

    def __init__(self, tag: int, iccids: int) -> None:
        """`iccids` is the size of the fleet; 0 gives every request a new eSIM."""
        template = dict(FIXTURE)
        template["notifyId"] = _MARK_ID
        template["eventGenerateTime"] = _MARK_TIME
        content = dict(FIXTURE["content"])  # type: ignore[call-overload]
        content["iccid"] = _MARK_ICCID
        template["content"] = content
        text = msgspec.json.encode(template)
        self._parts = self._split(text)
        self.tag = tag
        self.iccids = iccids
        self.length = len(text)
        self._second = -1
        self._stamp = b""

    @staticmethod
    def _split(text: bytes) -> list[bytes]:
        parts: list[bytes] = []
        rest = text
        for mark in (_MARK_TIME, _MARK_ID, _MARK_ICCID):
            head, rest = rest.split(mark.encode(), 1)
            parts.append(head)
        parts.append(rest)
        return parts

    def _now(self) -> bytes:
        second = int(time.time())
        if second != self._second:
            self._second = second
            self._stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(second)).encode()
        return self._stamp

    def body(self, seq: int) -> bytes:
        p = self._parts
        return b"".join(
            (
                p[0],
                self._now(),
                p[1],
                notify_id(self.tag, seq).encode(),
                p[2],
                iccid(seq % self.iccids if self.iccids else NEVER_SEEN + seq).encode(),
                p[3],
            )
        )
