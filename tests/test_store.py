"""The store on its own: what one acknowledgement costs the disk."""

from __future__ import annotations

import json
import os
import sqlite3
import time
from datetime import UTC, datetime
from pathlib import Path

from bridge.models import decode
from bridge.store import Store
from tests.processes import FIXTURES

WEBHOOKS = 100
# Measured: ~13 KB per webhook at 1 KB pages, ~29 KB at SQLite's default 4 KB pages.
MOST_BYTES_PER_WEBHOOK = 16_000


def test_one_webhook_writes_few_bytes_to_the_wal(tmp_path: Path) -> None:
    """Every commit writes the pages it touched whole, and is fsynced before the answer: the
    bytes per webhook are what the disk (an SD card, often) pays for each acknowledgement."""
    template = json.loads((FIXTURES / "data_usage.json").read_text())
    store = Store(tmp_path / "bridge.db", base="esim")
    store.open()
    try:

        def ingest(n: int) -> None:
            body = dict(template, notifyId=f"wal-{n}")
            body["content"] = dict(template["content"], iccid=f"89000000000000{n % 10:05d}",
                                   remain=5351505742 - n)
            raw = json.dumps(body).encode()
            store.ingest(decode(raw), raw, datetime.now(UTC))

        for n in range(WEBHOOKS):  # the tables are past their first pages
            ingest(n)
        checkpoint = sqlite3.connect(tmp_path / "bridge.db")
        # busy (the store's maintenance thread is checkpointing too): the WAL keeps its
        # size, and the bytes below would count the first round as well; try again
        for _ in range(100):
            if checkpoint.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0] == 0:
                break
            time.sleep(0.01)
        checkpoint.close()
        assert os.path.getsize(tmp_path / "bridge.db-wal") == 0
        for n in range(WEBHOOKS, 2 * WEBHOOKS):  # one webhook per commit: the worst case
            ingest(n)
        written = os.path.getsize(tmp_path / "bridge.db-wal") / WEBHOOKS
    finally:
        store.close()
    assert written <= MOST_BYTES_PER_WEBHOOK, f"{written:,.0f} bytes per webhook"
