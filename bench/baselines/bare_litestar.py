"""Bare Litestar on uvicorn: decode the webhook and answer 200, no MQTT at all.

The ceiling for any Litestar-based bridge on this machine: whatever the bridge
does beyond this (store, publish) shows as the gap to this row.
Run: `python -m bench.baselines.bare_litestar --port N`.
"""

from __future__ import annotations

import argparse

import uvicorn
from litestar import Litestar, get, post

from bench.baselines.webhook_model import Webhook


@post("/webhook", status_code=200)
async def webhook(data: Webhook) -> dict[str, bool]:
    return {"ok": True}


@get("/readyz")
async def readyz() -> dict[str, bool]:
    return {"ok": True}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    app = Litestar([webhook, readyz], openapi_config=None)
    uvicorn.run(
        app,
        host="127.0.0.1",
        port=args.port,
        loop="uvloop",
        http="httptools",
        log_level="warning",
        access_log=False,
    )


if __name__ == "__main__":
    main()
