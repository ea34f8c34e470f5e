"""Realistic example webhooks, shaped like the provider's published examples.

`esim-bridge send` posts these so that people wiring automations can make the
bridge's topics appear without waiting for a real eSIM to do something.
Each one gets a fresh notifyId and the current time, so it is never a duplicate, also
for the types whose published examples carry neither: without a notifyId, the bridge
knows a webhook by a hash of its body, and a second `send CHECK_HEALTH` would be a
duplicate of the first.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

from bridge.models import KNOWN_TYPES

EXAMPLE_ICCID = "8943108170001029631"
GIB = 1024**3


def _now() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


def _stamp(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def example(notify_type: str, iccid: str = EXAMPLE_ICCID) -> dict[str, Any]:
    """One webhook body of the given type (case-insensitive), ready to post as JSON."""
    kind = notify_type.upper()
    now = _now()
    order: dict[str, Any] = {"orderNo": "B25052822150009", "transactionId": "esim-bridge-example"}
    esim = {**order, "iccid": iccid, "esimTranNo": "25052822150009"}
    newer = {"eventGenerateTime": _stamp(now), "notifyId": uuid.uuid4().hex}
    if kind == "CHECK_HEALTH":
        content: dict[str, Any] = {"orderNo": "1234567890", "orderStatus": "Test"}
        return {"notifyType": kind, **newer, "content": content}
    if kind == "ORDER_STATUS":
        content = {"orderNo": order["orderNo"], "orderStatus": "GOT_RESOURCE"}
        return {"notifyType": kind, **newer, "content": content}
    if kind == "SMDP_EVENT":
        content = {**esim, "eid": "89049032007108882600137544319616",
                   "esimStatus": "IN_USE", "smdpStatus": "ENABLED"}
        return {"notifyType": kind, **newer, "content": content}
    if kind == "ESIM_STATUS":
        content = {**esim, "esimStatus": "IN_USE", "smdpStatus": "ENABLED"}
        return {"notifyType": kind, **newer, "content": content}
    if kind == "DATA_USAGE":
        total = 50 * GIB
        remain = total // 10
        content = {**esim, "totalVolume": total, "orderUsage": total - remain, "remain": remain,
                   "lastUpdateTime": _stamp(now - timedelta(minutes=5)), "remainThreshold": 0.1}
        return {"notifyType": kind, **newer, "content": content}
    if kind == "VALIDITY_USAGE":
        content = {**order, "iccid": iccid, "durationUnit": "DAY", "totalDuration": 30,
                   "expiredTime": _stamp(now + timedelta(days=1)), "remain": 1}
        return {"notifyType": kind, **newer, "content": content}
    raise KeyError(notify_type)


WITHOUT_ICCID = ("CHECK_HEALTH", "ORDER_STATUS")
TYPES = KNOWN_TYPES
