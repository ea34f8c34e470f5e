"""The store: dedup, state, the outbox and the retained topics, in one transaction.

Every write goes through `Store.apply`, one transaction body for a batch of writes of
three kinds: a webhook (`Webhook`), finished messages the bridge posts itself (`Post`,
`bridge/info`), and a resync that brings every retained topic in line with the state
and the settings (`Resync`, at start). `bridge/committer.py` batches writes and calls
it; this module knows nothing of asyncio or threads, nor of the engine under it: SQLite
(`bridge/sqlite.py`, the default) or PostgreSQL (`bridge/postgres.py`, `store.url`), each
a `bridge/backend.py` Backend.

For one webhook: `topics.route` says which entity it changes, its record is loaded,
`topics.plan` gives the new record and the messages, the Home Assistant extension the
discovery configs (only when their inputs changed), and all of it is written together.

Tables:
- `seen`: notify ids (or body hashes) with the time they were first accepted;
- `entity`: one `Record` per eSIM, order and the bridge (the merged state);
- `outbox`: finished MQTT messages in the order they must leave (`bridge/outbox.py`);
- `retained`: every retained topic's latest payload, and the entity it belongs to
  (`owner`), written with the outbox: what the publisher republishes on connect.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import msgspec

from bridge import topics
from bridge.backend import Backend, Connection
from bridge.backend import StoreUnavailable as StoreUnavailable
from bridge.homeassistant import HomeAssistant
from bridge.models import Decoded
from bridge.outbox import Message, backlog
from bridge.sqlite import Sqlite
from bridge.topics import BRIDGE, Entity, Record, Topics

log = logging.getLogger(__name__)

# The owner of the messages the bridge posts itself (bridge/info): no record stands for
# them, so a resync leaves them alone.
POSTED = "posted"

_record_encoder = msgspec.msgpack.Encoder()
_record_decoder = msgspec.msgpack.Decoder(Record)


class OutboxFull(StoreUnavailable):
    """The outbox holds `store.max_outbox` messages that the broker has not taken yet."""


# -- the writes ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Webhook:
    """One accepted webhook body. Its outcome: `Accepted`."""

    decoded: Decoded
    body: bytes
    received_at: datetime


@dataclass(frozen=True, slots=True)
class Post:
    """Finished messages the bridge posts itself. Its outcome: how many."""

    messages: list[Message]


@dataclass(frozen=True, slots=True)
class Resync:
    """Bring every retained topic in line with the state and the settings: discovery
    for the current prefix (or none), the bridge's device, every entity's topics under
    the current base; what is no longer wanted is cleared. Its outcome: messages sent."""


@dataclass(frozen=True, slots=True)
class Poll:
    """What the provider's API said of some eSIMs (read at `at`), and, for the profiles
    of one order, its orderNo. Its outcome: how many messages it sent."""

    readings: list[topics.Reading]
    at: datetime
    order_no: str | None = None


@dataclass(frozen=True, slots=True)
class Forget:
    """Remove from Home Assistant the eSIMs that ended `homeassistant.forget_ended_days`
    ago (days pass without events: the app asks hourly). Its outcome: configs cleared."""


Write = Webhook | Post | Resync | Poll | Forget


@dataclass(frozen=True, slots=True)
class Accepted:
    duplicate: bool
    iccid: str | None = None
    warning: str | None = None  # why it was published raw
    messages: int = 0
    notice: str | None = None  # something odd about it, though understood


Outcome = Accepted | int | BaseException


@dataclass(slots=True)
class Batch:
    """A batch applied but not yet committed: an outcome per write, and what to send."""

    outcomes: list[Outcome] = field(default_factory=list)
    outbox: list[Message] = field(default_factory=list)
    # entity key -> its record as the batch leaves it: read ahead, loaded or written
    records: dict[str, Record | None] = field(default_factory=dict)
    # dedup key -> when it was first accepted, None: never; read ahead or written
    seen: dict[str, float | None] = field(default_factory=dict)
    new_esims: int = 0
    orders_ready: list[str] = field(default_factory=list)  # ORDER_STATUS GOT_RESOURCE
    # (owner, retained topic) -> its payload as the batch leaves it; b"" clears the topic
    retained: dict[tuple[str, str], bytes] = field(default_factory=dict)


@dataclass(slots=True)
class Keys:
    """What a batch will read and write, known before its first statement."""

    entities: list[str] = field(default_factory=list)  # entity keys (and POSTED)
    dedup: list[str] = field(default_factory=list)  # the webhooks' dedup keys
    everything: bool = False  # it reads every entity (a resync, a forget)


def dedup_key(decoded: Decoded, body: bytes) -> str:
    if decoded.notify_id:
        return "id:" + decoded.notify_id
    return "sha256:" + hashlib.sha256(body).hexdigest()


class Store:
    """The store, on SQLite (`path`) or on PostgreSQL (`url`). `open()` before use,
    `close()` after. One writer, used by one caller at a time (the committer): begin,
    apply, commit or roll back."""

    def __init__(
        self,
        path: Path,
        *,
        topics: Topics,
        dedup_hours: float = 72.0,
        max_outbox: int = 1_000_000,
        synchronous: str = "full",
        homeassistant: HomeAssistant | None = None,
        keep_activation: bool = False,
        url: str | None = None,
    ) -> None:
        if url is None:
            self.backend: Backend = Sqlite(path, synchronous)
        else:
            from bridge.postgres import Postgres  # psycopg: only with esim-bridge[postgres]

            self.backend = Postgres(url)
        self.sql = self.backend.sql
        self.errors = self.backend.errors  # the engine's errors: the batch fails
        self.topics = topics
        self.dedup_seconds = dedup_hours * 3600
        self.max_outbox = max_outbox
        self.homeassistant = homeassistant
        self.keep_activation = keep_activation  # provider.publish_activation: the QR code
        self._esims = 0  # counted at open, then this process's new ones added
        self._conn: Connection | None = None  # while a transaction is open
        self._open = False

    # -- lifecycle ---------------------------------------------------------------------------

    def open(self) -> None:
        self.backend.open()
        with self.backend.reading() as conn:
            self._esims = conn.execute(self.sql.count_esims).fetchone()[0]
        self._open = True

    def close(self) -> None:
        self.backend.close()
        self._conn = None
        self._open = False

    @property
    def is_open(self) -> bool:
        return self._open

    @property
    def esims(self) -> int:
        """eSIMs known to the store (with replicas, also those the others added)."""
        counted = self.backend.esims()
        return self._esims if counted is None else counted

    @property
    def backlog(self) -> int:
        """Messages in the outbox that the broker has not acknowledged yet."""
        return self.backend.backlog()

    def in_use(self) -> list[tuple[str, str]]:
        """(iccid, esimTranNo) of the eSIMs in use (blocking: run it on a thread)."""
        with self._reading() as conn:
            return esims_in_use(conn, self.sql.esim_records)

    def pending_orders(self) -> list[str]:
        """The orderNo of every order waiting for its eSIMs to be read (`order_pending`),
        whichever bridge stored it (blocking: run it on a thread)."""
        with self._reading() as conn:
            rows = conn.execute(self.sql.unresolved_orders).fetchall()
        return [Entity.parse(key).name for key, blob in rows
                if topics.order_pending(_record_decoder.decode(blob))]

    @contextmanager
    def _reading(self) -> Iterator[Connection]:
        """A connection of its own, for reads off the write path; StoreUnavailable when
        the store cannot be read (the database out of reach), as for a write."""
        try:
            with self.backend.reading() as conn:
                yield conn
        except self.errors as exc:
            raise StoreUnavailable(f"the store cannot be read: {exc}") from exc

    def is_busy(self, exc: Exception) -> bool:
        """Another writer holds the store: nothing is wrong, `begin` again later."""
        return self.backend.is_busy(exc)

    # -- one transaction ---------------------------------------------------------------------

    def begin(self) -> None:
        """Begin the write transaction, without waiting: an engine error that `is_busy`
        recognises when another connection is writing."""
        self._conn = self.backend.begin()

    def commit(self, batch: Batch) -> None:
        """COMMIT, the fsync included (the committer may run it on a thread of its own)."""
        try:
            self.backend.commit()
        except self.errors:
            self.rollback()
            raise
        finally:
            self._conn = None
        self._esims += batch.new_esims

    def rollback(self) -> None:
        self._conn = None
        self.backend.rollback()

    def apply(self, writes: list[Write]) -> Batch:
        """Every statement of a batch of writes, inside the transaction `begin` opened,
        short of the COMMIT: the one transaction body. A write that fails for itself
        alone (a bug) becomes its outcome, and leaves nothing behind (everything that can
        fail happens before its first statement that writes); an engine error fails the
        whole batch (raised: the caller rolls back)."""
        conn = self._writer()
        batch = Batch()
        waiting = self._start(conn, writes, batch)
        for write in writes:
            try:
                if isinstance(write, Webhook):
                    outcome: Outcome = self._webhook(conn, write, batch, waiting)
                elif isinstance(write, Post):
                    outcome = self._post(conn, write, batch)
                elif isinstance(write, Poll):
                    outcome = self._poll(conn, write, batch)
                elif isinstance(write, Forget):
                    outcome = self._forget(conn, batch)
                else:
                    outcome = self._resync(conn, batch)
            except self.errors:
                raise
            except Exception as exc:
                log.exception("could not store %s", _name(write))
                outcome = exc
            batch.outcomes.append(outcome)
        if batch.outbox:
            self.backend.before_outbox(conn)
        self.backend.executemany(
            conn, self.sql.put_outbox,
            [(m.topic, m.payload, int(m.retain)) for m in batch.outbox],
        )
        self._write_retained(conn, batch)
        return batch

    def _writer(self) -> Connection:
        if self._conn is None:
            raise StoreUnavailable("the store is closed")
        return self._conn

    def _start(self, conn: Connection, writes: list[Write], batch: Batch) -> int:
        """What comes before a batch's first write; returns the outbox's backlog. With
        several writers, the locks on what the batch touches (`Backend.lock`), before its
        first read. On a remote backend, the records and dedup keys its webhooks and polls
        will read, read ahead in one statement per table instead of two statements per
        webhook: sent before the backlog's read and taken after it, so that on PostgreSQL
        (a pipeline, `bridge/postgres.py`) BEGIN, the locks and the three reads reach the
        server together and come back in one round trip."""
        if not (self.backend.locks or self.backend.remote):
            return backlog(conn)  # SQLite: every read is a function call, made when needed
        keys = self._keys(writes)
        if self.backend.locks:
            self.backend.lock(conn, keys.entities + keys.dedup, keys.everything)
        records = seen = None
        if self.backend.remote and keys.entities:
            records = conn.execute(self.sql.records_of, (keys.entities,))
        if self.backend.remote and keys.dedup:
            seen = conn.execute(self.sql.seen_of, (keys.dedup,))
        waiting = backlog(conn)
        if records is not None:
            batch.records.update(dict.fromkeys(keys.entities))  # None: not stored
            for key, blob in records.fetchall():
                batch.records[key] = _record_decoder.decode(blob)
        if seen is not None:
            batch.seen.update(dict.fromkeys(keys.dedup))
            batch.seen.update(seen.fetchall())
        return waiting

    def _keys(self, writes: list[Write]) -> Keys:
        """Every entity and dedup key a batch reads and writes, from the writes alone."""
        keys = Keys()
        for write in writes:
            if isinstance(write, Webhook):
                keys.dedup.append(dedup_key(write.decoded, write.body))
                try:
                    entity = topics.route(write.decoded).entity
                except Exception:  # a bug: `_webhook` makes it the write's outcome
                    continue
                if entity is not None:
                    keys.entities.append(entity.key)
            elif isinstance(write, Poll):
                keys.entities += [Entity("esim", r.iccid).key for r in write.readings]
                if write.order_no is not None:
                    keys.entities.append(Entity("order", write.order_no).key)
            elif isinstance(write, Post):
                # no entity, but the owner of the bridge's own retained topics: locked as one
                keys.entities.append(POSTED)
            else:  # a resync or a forget reads every entity
                keys.everything = True
        return keys

    # -- the writes, inside the transaction ---------------------------------------------------

    def _webhook(
        self, conn: Connection, write: Webhook, batch: Batch, waiting: int
    ) -> Accepted | OutboxFull:
        decoded = write.decoded
        key = dedup_key(decoded, write.body)
        now = write.received_at.timestamp()
        seen_at = self._seen_at(conn, batch, key)
        if seen_at is not None and seen_at >= now - self.dedup_seconds:
            return Accepted(duplicate=True)
        pending = waiting + len(batch.outbox)
        if pending >= self.max_outbox:
            return OutboxFull(
                f"the outbox is full ({pending} messages wait for the broker): "
                "check the broker, or raise store.max_outbox"
            )
        to = topics.route(decoded)
        entity = to.entity
        prior = None if entity is None else self._record(conn, entity, batch)
        plan = topics.plan(to, decoded, write.body, prior, write.received_at, self.topics)
        count = self._change(conn, entity, prior, plan, batch, now, seen=(key, now))
        if entity is not None and entity.kind == "order" and plan.record is not None and (
            plan.record.fields.get("order_status") == "GOT_RESOURCE"
            and any(m.retain for m in plan.messages)
        ):
            batch.orders_ready.append(entity.name)  # its eSIMs can be read from the API now
        iccid = entity.name if entity is not None and entity.kind == "esim" else decoded.iccid
        return Accepted(False, iccid, to.warning, count, plan.notice)

    def _poll(self, conn: Connection, write: Poll, batch: Batch) -> int:
        at, count, iccids = write.at.timestamp(), 0, []
        for reading in write.readings:
            if topics.iccid_problem(reading.iccid) is not None:
                log.warning("the provider's API names an iccid %r that cannot be a topic "
                            "segment: left out", reading.iccid[:64])
                continue
            entity = Entity("esim", reading.iccid)
            prior = self._record(conn, entity, batch)
            plan = topics.plan_reading(reading, prior, at, self.topics)
            count += self._change(conn, entity, prior, plan, batch, at)
            iccids.append(reading.iccid)
        if write.order_no is not None and topics.SEGMENT.match(write.order_no):
            entity = Entity("order", write.order_no)
            prior = self._record(conn, entity, batch)
            plan = topics.plan_order_esims(write.order_no, iccids, prior, at, self.topics)
            count += self._change(conn, entity, prior, plan, batch, at)
        return count

    def _change(
        self,
        conn: Connection,
        entity: Entity | None,
        prior: Record | None,
        plan: topics.Plan,
        batch: Batch,
        now: float,
        seen: tuple[str, float] | None = None,
    ) -> int:
        """Write what a plan changes: the entity's record, its retained topics, its
        discovery, the outbox (and, for a webhook, its dedup key). Returns how many
        messages it sent. Everything that can fail comes before the first write."""
        configs: list[Message] = []
        cleared: list[Message] = []
        changed = entity is not None and plan.record is not None and plan.record != prior
        if changed:
            assert entity is not None and plan.record is not None
            blob = _record_encoder.encode(plan.record)
            configs, cleared = self._beside(conn, batch, entity, prior, plan, now)

        # writes from here on
        if seen is not None:
            conn.execute(self.sql.put_seen, seen)
            batch.seen[seen[0]] = seen[1]
        if changed:
            assert entity is not None and plan.record is not None
            batch.records[entity.key] = plan.record
            conn.execute(self.sql.put_record, (entity.key, blob))
            self._keep(batch, entity.key, configs + cleared)
            self._keep(batch, entity.key, [m for m in plan.messages if m.retain])
            batch.new_esims += int(prior is None and entity.kind == "esim")
        # a config first (an entity it drops is gone before its topic is cleared), then
        # what the earlier eSIM of a reused iccid left, then the plan's own messages
        batch.outbox += configs + cleared + plan.messages
        return len(configs) + len(cleared) + len(plan.messages)

    def _beside(
        self, conn: Connection, batch: Batch, entity: Entity, prior: Record | None,
        plan: topics.Plan, now: float,
    ) -> tuple[list[Message], list[Message]]:
        """What an event changes besides its own messages: the entity's discovery configs
        that changed (made only when their inputs may have: an eSIM's config is 5 KB of
        JSON), a config no longer wanted (an eSIM Home Assistant forgets), and, when its
        iccid went to another eSIM, the earlier eSIM's retained topics that the new one
        does not set. Returns (to send, to clear)."""
        assert plan.record is not None
        ha = self.homeassistant
        configs: list[Message] = []
        unwanted: list[str] = []
        if ha is not None and (plan.reused or ha.changes(prior, plan.record)):
            configs = ha.entity(entity, plan.record, now)
            if not configs and entity.kind == "esim":
                unwanted.append(ha.config_topic(entity))
        if plan.reused:
            keep = {m.topic for m in configs} | {m.topic for m in plan.messages}
            unwanted += [t for t in self._held(conn, batch, entity.key) if t not in keep]
        cleared = [Message(t, b"", True) for t in dict.fromkeys(unwanted)
                   if self._payload(conn, batch, entity.key, t)]
        return self._changed(conn, batch, entity.key, configs), cleared

    def _forget(self, conn: Connection, batch: Batch) -> int:
        """Clear the discovery config of every eSIM Home Assistant should forget by now."""
        ha, now = self.homeassistant, time.time()
        if ha is None:
            return 0
        cleared = []
        rows = conn.execute(self.sql.esim_records).fetchall()
        for key, blob in rows:
            if not ha.forgotten(_record_decoder.decode(blob), now):
                continue
            topic = ha.config_topic(Entity.parse(key))
            if self._payload(conn, batch, key, topic):  # not cleared yet
                cleared.append(Message(topic, b"", True))
                self._keep(batch, key, cleared[-1:])
        batch.outbox += cleared
        return len(cleared)

    def _post(self, conn: Connection, write: Post, batch: Batch) -> int:
        self._keep(batch, POSTED, [m for m in write.messages if m.retain])
        batch.outbox += write.messages
        return len(write.messages)

    def _resync(self, conn: Connection, batch: Batch) -> int:
        ha, now = self.homeassistant, time.time()
        wanted: dict[str, list[Message]] = {BRIDGE.key: ha.bridge() if ha else []}
        for key, blob in conn.execute(self.sql.records).fetchall():
            entity, record = Entity.parse(key), _record_decoder.decode(blob)
            if entity.kind == "esim" and topics.iccid_problem(entity.name) is not None:
                continue  # stored by a version that did not refuse it: it has no topics
            if not self.keep_activation and "qr_code_url" in record.fields:
                # provider.publish_activation was turned off: the URL goes, on the broker too
                del record.fields["qr_code_url"]
                record.times.pop("qr_code_url", None)
                conn.execute(self.sql.put_record, (key, _record_encoder.encode(record)))
                batch.records[key] = record
            messages = topics.retained(entity, record, self.topics)
            if ha is not None:
                messages += ha.entity(entity, record, now)
            wanted.setdefault(key, []).extend(messages)
        owners = {row[0] for row in conn.execute(self.sql.owners)}
        sent = 0
        for owner in sorted((owners | wanted.keys()) - {POSTED}):
            out = self._reconcile(conn, batch, owner, wanted.get(owner, []))
            batch.outbox += out
            sent += len(out)
        return sent

    # -- the table of retained topics ---------------------------------------------------------

    def _keep(self, batch: Batch, owner: str, messages: list[Message]) -> None:
        """Note retained messages that are being sent: the batch writes the latest payload
        per topic to the table once, at its end (`_write_retained`); an empty payload
        clears the topic, and so its row."""
        for message in messages:
            batch.retained[owner, message.topic] = message.payload

    def _held(self, conn: Connection, batch: Batch, owner: str) -> dict[str, bytes]:
        """The retained topics an owner holds now (in the table, as this batch leaves it)."""
        held = {
            topic: bytes(payload)
            for topic, payload in conn.execute(self.sql.held, (owner,))
        }
        for (holder, topic), payload in batch.retained.items():
            if holder == owner:
                held[topic] = payload
        return {topic: payload for topic, payload in held.items() if payload}

    def _changed(
        self, conn: Connection, batch: Batch, owner: str, messages: list[Message]
    ) -> list[Message]:
        """The messages whose payload differs from what their topic holds now."""
        return [m for m in messages if self._payload(conn, batch, owner, m.topic) != m.payload]

    def _payload(
        self, conn: Connection, batch: Batch, owner: str, topic: str
    ) -> bytes | None:
        """What a retained topic holds now (as this batch leaves it); None: nothing."""
        if (owner, topic) in batch.retained:
            return batch.retained[owner, topic] or None
        row = conn.execute(self.sql.payload, (owner, topic)).fetchone()
        return None if row is None else bytes(row[0])

    def _reconcile(
        self, conn: Connection, batch: Batch, owner: str, wanted: list[Message]
    ) -> list[Message]:
        """Make an owner's retained topics exactly `wanted`: send what changed, clear what
        is no longer wanted (an empty retained payload). Returns what it sends."""
        want = {m.topic: m.payload for m in wanted}
        held = self._held(conn, batch, owner)
        # what changed first, then the clears: an image leaves its device's config
        # before the topic holding its URL is cleared (Home Assistant errs on an empty one)
        out = [Message(t, p, True) for t, p in want.items() if held.get(t) != p]
        out += [Message(topic, b"", True) for topic in sorted(held.keys() - want.keys())]
        self._keep(batch, owner, out)
        return out

    def _seen_at(self, conn: Connection, batch: Batch, key: str) -> float | None:
        """When a dedup key was first accepted, as this batch leaves it or as stored;
        None: never."""
        if key in batch.seen:
            return batch.seen[key]
        row = conn.execute(self.sql.seen_at, (key,)).fetchone()
        return None if row is None else float(row[0])

    def _record(self, conn: Connection, entity: Entity, batch: Batch) -> Record | None:
        """An entity's record as this batch left it (or read it ahead), or as stored."""
        if entity.key in batch.records:
            return batch.records[entity.key]
        row = conn.execute(self.sql.record, (entity.key,)).fetchone()
        return None if row is None else _record_decoder.decode(row[0])

    def _write_retained(self, conn: Connection, batch: Batch) -> None:
        """The table of retained topics as the batch leaves it: one statement for the new
        payloads, one for the topics cleared (per batch, not per write: a fifth of a
        webhook's store work when it was per write)."""
        kept, cleared = [], []
        for (owner, topic), payload in batch.retained.items():
            if payload:
                kept.append((owner, topic, payload))
            else:
                cleared.append((owner, topic))
        self.backend.executemany(conn, self.sql.put_retained, kept)
        if cleared:
            self.backend.executemany(conn, self.sql.clear_retained, cleared)


def esims_in_use(conn: Connection, sql: str) -> list[tuple[str, str]]:
    """(iccid, esimTranNo) of every eSIM in use: those whose data the provider's API is
    asked for (an eSIM not installed yet, or ended, uses none)."""
    out = []
    for key, blob in conn.execute(sql):
        fields = _record_decoder.decode(blob).fields
        tran = fields.get("esim_tran_no")
        if fields.get("status") == "IN_USE" and isinstance(tran, str):
            out.append((Entity.parse(key).name, tran))
    return out


def _name(write: Write) -> str:
    if isinstance(write, Webhook):
        return f"a {write.decoded.notify_type} webhook"
    return type(write).__name__
