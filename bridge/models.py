"""The webhooks eSIM Access sends, as msgspec structs.

One tagged union on `notifyType` decodes every known type in one pass from
the raw bytes. Every content field is optional ("the content object structure
may vary slightly"), numbers sent as strings are converted, and unknown fields
are ignored here: the event topics carry the body exactly as received anyway.
A body that is JSON with a string `notifyType` but does not fit its struct, or
has a type we do not know, is still accepted and published raw.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, get_args

import msgspec

# The store keeps state as msgpack, which holds 64-bit integers: a larger number does
# not fit the struct, so such a body is accepted raw instead of failing to store.
Int64 = Annotated[int, msgspec.Meta(ge=-(2**63), le=2**63 - 1)]
# An identifier the provider documents as a string may come as a number ("esimTranNo":
# 25080323490020): it is taken as its digits rather than turning the body raw.
Id = str | Int64


class _Content(msgspec.Struct, rename="camel", kw_only=True):
    order_no: Id | None = None


class _Webhook(msgspec.Struct, tag_field="notifyType", rename="camel", kw_only=True):
    event_generate_time: datetime | None = None
    notify_id: str | None = None


class OrderContent(_Content):
    order_status: str | None = None


class EsimContent(_Content):
    iccid: str | None = None
    esim_tran_no: Id | None = None
    transaction_id: Id | None = None


class SmdpContent(EsimContent):
    eid: str | None = None
    esim_status: str | None = None
    smdp_status: str | None = None


class DataUsageContent(EsimContent):
    total_volume: Int64 | None = None
    order_usage: Int64 | None = None
    remain: Int64 | None = None
    last_update_time: datetime | None = None
    remain_threshold: float | None = None


class ValidityContent(EsimContent):
    duration_unit: str | None = None
    total_duration: Int64 | None = None
    expired_time: datetime | None = None
    remain: Int64 | None = None


class CheckHealth(_Webhook, tag="CHECK_HEALTH"):
    content: OrderContent = msgspec.field(default_factory=OrderContent)


class OrderStatus(_Webhook, tag="ORDER_STATUS"):
    content: OrderContent = msgspec.field(default_factory=OrderContent)


class SmdpEvent(_Webhook, tag="SMDP_EVENT"):
    content: SmdpContent = msgspec.field(default_factory=SmdpContent)


class EsimStatus(_Webhook, tag="ESIM_STATUS"):
    content: SmdpContent = msgspec.field(default_factory=SmdpContent)


class DataUsage(_Webhook, tag="DATA_USAGE"):
    content: DataUsageContent = msgspec.field(default_factory=DataUsageContent)


class ValidityUsage(_Webhook, tag="VALIDITY_USAGE"):
    content: ValidityContent = msgspec.field(default_factory=ValidityContent)


Webhook = CheckHealth | OrderStatus | SmdpEvent | EsimStatus | DataUsage | ValidityUsage
# The notify types the bridge understands: the union's tags, the one list of them.
KNOWN_TYPES: tuple[str, ...] = tuple(
    str(kind.__struct_config__.tag) for kind in get_args(Webhook)
)


class Envelope(msgspec.Struct):
    """The least a body must be to be accepted: a JSON object with a string notifyType."""

    notifyType: str
    # Raw: kept unparsed, so a value msgspec cannot hold (1e400) does not make the body a 400
    notifyId: msgspec.Raw = msgspec.Raw()
    eventGenerateTime: msgspec.Raw = msgspec.Raw()
    content: msgspec.Raw = msgspec.Raw()


class _LooseContent(msgspec.Struct):
    """Of a content that did not fit its type, the iccid, if it is a string."""

    iccid: msgspec.Raw = msgspec.Raw()


class BadWebhook(ValueError):
    """The body is not something we can accept at all (answered with 400)."""


class Decoded(msgspec.Struct, frozen=True):
    """What a body turned out to be.

    `event` is the typed webhook, or None when the body is accepted raw, in
    which case `problem` says why it did not fit and `iccid` is the content's iccid,
    if it has a string one (for the log line).
    """

    notify_type: str
    notify_id: str | None
    event_time: datetime | None
    event: Webhook | None = None
    problem: str | None = None
    iccid: str | None = None


_typed = msgspec.json.Decoder(Webhook, strict=False)
_envelope = msgspec.json.Decoder(Envelope)
_loose_content = msgspec.json.Decoder(_LooseContent)


def _iccid(content: msgspec.Raw) -> str | None:
    """The iccid of a raw content, if it is an object with a string iccid."""
    try:
        return _string(_loose_content.decode(content).iccid) if content else None
    except (msgspec.DecodeError, RecursionError):
        return None


def _string(raw: msgspec.Raw) -> str | None:
    """The value if it is a JSON string, else None."""
    try:
        return msgspec.json.decode(raw, type=str) if raw else None
    except msgspec.DecodeError:
        return None


def _parse_time(value: str | None) -> datetime | None:
    if value is None:
        return None
    try:
        return msgspec.convert(value, datetime)
    except msgspec.ValidationError:
        return None


def _time_without_utc(event: Webhook) -> str | None:
    """The name of a time field whose offset pushes it outside years 1-9999 in UTC.

    msgspec accepts `9999-12-31T23:59:59-01:00`, but it has no UTC equivalent, and
    every time the bridge publishes is in UTC: such a body is accepted raw.
    """
    times = (
        ("eventGenerateTime", event.event_generate_time),
        ("lastUpdateTime", getattr(event.content, "last_update_time", None)),
        ("expiredTime", getattr(event.content, "expired_time", None)),
    )  # every datetime field of the structs above; msgspec.structs.fields is too slow here
    for name, value in times:
        if isinstance(value, datetime) and value.tzinfo is not None:
            try:
                value.astimezone(UTC)
            except OverflowError:
                return name
    return None


def decode(body: bytes) -> Decoded:
    """Decode one webhook body, or raise BadWebhook saying what is wrong with it."""
    if body.startswith(b"\x1f\x8b"):  # gzip's magic number: not UTF-8, but why is not that
        raise BadWebhook("the body is gzip-compressed: send it uncompressed")
    try:
        body.decode()  # msgspec skips unknown fields unread; JSON must be UTF-8 throughout
    except UnicodeDecodeError as exc:
        raise BadWebhook(f"the body is not valid UTF-8 (byte {exc.start})") from None
    try:
        event = _typed.decode(body)
    except (msgspec.DecodeError, RecursionError) as exc:
        typed_error: Exception = exc
    else:
        stray = _time_without_utc(event)
        if stray is None:
            return Decoded(str(event.__struct_config__.tag), event.notify_id,
                           event.event_generate_time, event)
        typed_error = ValueError(f"`{stray}` is outside the years 1 to 9999 in UTC")
    try:
        envelope = _envelope.decode(body)
    except msgspec.ValidationError as exc:  # a subclass of DecodeError: test it first
        raise BadWebhook(
            f"the body must be a JSON object with a string notifyType: {exc}"
        ) from None
    except msgspec.DecodeError as exc:
        raise BadWebhook(f"the body is not valid JSON: {exc}") from None
    except RecursionError:
        raise BadWebhook("the body is nested too deeply to be a webhook") from None
    notify_id = _string(envelope.notifyId)
    if envelope.notifyType in KNOWN_TYPES:
        problem = f"content does not fit {envelope.notifyType}: {typed_error}"
    else:
        problem = f"unknown notifyType {envelope.notifyType!r}"
    return Decoded(envelope.notifyType, notify_id, _parse_time(_string(envelope.eventGenerateTime)),
                   None, problem, _iccid(envelope.content))
