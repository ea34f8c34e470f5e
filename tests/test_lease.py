"""The publisher's lease (bridge/lease.py) on the local PostgreSQL: one holder at a time,
the next one only `LEASE` seconds after it got the lock, and a holder whose session
ends (let go, or ended by the server) stops holding at once."""

from __future__ import annotations

import time

import psycopg
import pytest

from bridge.lease import BEAT, LEASE, Lease

pytestmark = pytest.mark.timeout(60)


def watch(leases: list[Lease], until: float, stop_when: list[Lease] | None = None) -> None:
    """Look every few milliseconds until `until` (or until one of `stop_when` holds):
    never two holders at once."""
    while time.monotonic() < until:
        holders = [lease for lease in leases if lease.holds()]
        assert len(holders) <= 1, "two leases held at once"
        if stop_when is not None and holders and holders[0] in stop_when:
            return
        time.sleep(0.005)
    assert stop_when is None, "nobody held the lease in time"


def test_one_holder_at_a_time_and_the_next_waits_out_the_lease(database: str) -> None:
    first, second = Lease(database), Lease(database)
    first.start()
    try:
        started = time.monotonic()
        watch([first], started + 3 * BEAT + LEASE, stop_when=[first])
        assert time.monotonic() - started >= LEASE, "it published before the lease allows"
        second.start()
        watch([first, second], time.monotonic() + 2 * BEAT)
        assert first.holds() and not second.holds()

        first.stop()  # its session ends: the lock is free
        stopped = time.monotonic()
        watch([first, second], stopped + 3 * BEAT + LEASE, stop_when=[second])
        assert time.monotonic() - stopped >= LEASE, "the next one started before the lease ran out"
    finally:
        first.stop()
        second.stop()


def test_a_holder_whose_session_the_server_ends_stops_holding_within_a_beat(
    database: str,
) -> None:
    holder, standby = Lease(database), Lease(database)
    holder.start()
    try:
        watch([holder], time.monotonic() + 3 * BEAT + LEASE, stop_when=[holder])
        standby.start()
        with psycopg.connect(database, autocommit=True) as admin:
            ended = admin.execute(
                # this test's database only: other tests may hold leases on the server
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE application_name = 'esim-bridge-lease' AND datname = current_database() "
                "AND pid IN (SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted)"
            ).fetchall()
        assert ended == [(True,)]
        cut = time.monotonic()
        while holder.holds():
            assert time.monotonic() - cut < 2 * BEAT + 1, "it still holds a lock it lost"
            time.sleep(0.01)
        # then one of them (the first to try) holds it again, never both
        watch([holder, standby], time.monotonic() + 3 * BEAT + LEASE,
              stop_when=[holder, standby])
    finally:
        holder.stop()
        standby.stop()
