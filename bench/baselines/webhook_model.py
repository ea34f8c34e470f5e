"""The typed DATA_USAGE webhook the Litestar baselines decode, with msgspec.

Decoding into a typed struct (not `json.loads`) is what the bridge does too, so
the baselines pay the same per-request decoding cost.
"""

from __future__ import annotations

import msgspec


class DataUsageContent(msgspec.Struct, rename="camel"):
    iccid: str
    order_no: str | None = None
    transaction_id: str | None = None
    esim_tran_no: str | None = None
    total_volume: int | None = None
    order_usage: int | None = None
    remain: int | None = None
    last_update_time: str | None = None
    remain_threshold: float | None = None


class Webhook(msgspec.Struct, rename="camel"):
    notify_type: str
    content: DataUsageContent
    notify_id: str | None = None
    event_generate_time: str | None = None
