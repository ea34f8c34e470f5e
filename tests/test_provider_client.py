"""The provider's client against a real HTTP server: the stand-in of tests/provider_standin.py.

What a caller would see: every profile of a big account, usage asked 10 at a time,
signatures, an order that is still being allocated, a rate limit that is never passed,
backoff, and every failure classified into the outcome `<base>/bridge/provider` shows,
with the credentials in no log line and no error.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pytest

from bridge.config import ProviderConfig
from bridge.metrics import Metrics
from bridge.provider import (
    NotReady,
    ProviderClient,
    ProviderError,
    RateLimit,
    Refused,
    Unauthorized,
    Unreachable,
)
from tests.brokers import free_port
from tests.provider_standin import Answer, ProviderStandin, profile

T = TypeVar("T")
FAST = {"backoff": 0.01, "order_poll": 0.05}


def call(standin: ProviderStandin, use: Callable[[ProviderClient], Awaitable[T]],
         secret_key: str | None = None, max_rps: int = 8, **options: Any) -> T:
    """Run `use` with a client of the stand-in, as the bridge will: in an event loop."""
    settings = ProviderConfig(access_code=standin.access_code, secret_key=secret_key,
                              base_url=standin.url, max_rps=max_rps)

    async def run() -> T:
        async with ProviderClient(settings, **{**FAST, **options}) as client:
            return await use(client)

    return asyncio.run(run())


def failure(standin: ProviderStandin, use: Callable[[ProviderClient], Awaitable[Any]],
            **options: Any) -> ProviderError:
    with pytest.raises(ProviderError) as caught:
        call(standin, use, **options)
    return caught.value


async def every_profile(client: ProviderClient) -> list[Any]:
    return [p async for p in client.all_profiles()]


def test_every_page_is_read(standin: ProviderStandin) -> None:
    standin.profiles = [profile(n) for n in range(1, 1201)]
    profiles = call(standin, every_profile)
    assert len({p.iccid for p in profiles}) == 1200
    pages = [r.json()["pager"] for r in standin.requests]
    assert pages == [{"pageNum": n, "pageSize": 500} for n in (1, 2, 3)]
    assert len({r.peer for r in standin.requests}) == 1  # one connection, reused


def test_a_profile_decodes_with_the_providers_times(standin: ProviderStandin) -> None:
    standin.profiles = [profile(1, activateTime="2024-05-29T18:34:17+0000", eid="8904" * 8,
                                esimStatus="IN_USE", smdpStatus="ENABLED", orderUsage=1024),
                        profile(2, expiredTime="")]
    first, second = call(standin, every_profile)
    assert first.activated_at is not None and first.activated_at.isoformat() == (
        "2024-05-29T18:34:17+00:00")
    assert first.expires_at is not None and first.expires_at.year == 2030
    assert (first.esim_tran_no, first.order_no, first.transaction_id) == (
        "T00000001", "B24000000000001", "tx-1")
    assert (first.esim_status, first.smdp_status, first.eid) == ("IN_USE", "ENABLED", "8904" * 8)
    assert (first.total_volume, first.total_duration, first.duration_unit) == (
        5368709120, 30, "DAY")
    assert first.order_usage == 1024 and first.package == "Europe 5GB 30Days"
    assert first.qr_code_url == "https://p.example/qr/1.png"
    assert second.expires_at is None and second.activated_at is None


def test_one_profile_by_iccid(standin: ProviderStandin) -> None:
    standin.profiles = [profile(n) for n in range(1, 4)]
    found = call(standin, lambda client: client.profile("8985200000000000002"))
    assert found is not None and found.esim_tran_no == "T00000002"
    assert call(standin, lambda client: client.profile("0000")) is None


def test_usage_is_asked_ten_at_a_time(standin: ProviderStandin) -> None:
    standin.profiles = [profile(n, orderUsage=n) for n in range(1, 26)]
    numbers = [p["esimTranNo"] for p in standin.profiles]
    usage = call(standin, lambda client: client.usage(numbers))
    assert [u.data_usage for u in usage] == list(range(1, 26))
    assert usage[0].updated_at is not None and usage[0].total_data == 5368709120
    assert [len(r.json()["esimTranNoList"]) for r in standin.requests] == [10, 10, 5]
    # an older copy of the reference shows `obj` as the bare list
    standin.usage_as_list = True
    assert len(call(standin, lambda client: client.usage(numbers[:3]))) == 3


def test_a_right_signature_is_accepted(standin: ProviderStandin) -> None:
    standin.secret_key = "standin-secret"
    balance = call(standin, lambda client: client.balance(), secret_key="standin-secret")
    assert f"{balance.usd:.2f}" == "94.00"
    headers = standin.requests[0].headers
    assert re.fullmatch(r"[0-9a-f]{64}", headers["rt-signature"])
    assert uuid.UUID(headers["rt-requestid"]).version == 4
    assert abs(int(headers["rt-timestamp"]) - time.time() * 1000) < 60_000


def test_a_wrong_secret_is_unauthorized_and_names_the_key(standin: ProviderStandin) -> None:
    standin.secret_key = "standin-secret"
    error = failure(standin, lambda client: client.balance(), secret_key="not-the-secret")
    assert isinstance(error, Unauthorized) and error.outcome == "unauthorized"
    assert error.code == "101003" and "provider.secret_key" in str(error)
    assert len(standin.requests) == 1  # refused credentials are not asked again


@pytest.mark.parametrize("how", ["000101", "401"])
def test_a_wrong_access_code_is_unauthorized(standin: ProviderStandin, how: str) -> None:
    standin.unauthorized = how
    standin.access_code = "the-right-one"
    settings = ProviderConfig(access_code="wrong-code-1234", base_url=standin.url, max_rps=8)

    async def run() -> None:
        async with ProviderClient(settings) as client:
            await client.balance()

    with pytest.raises(Unauthorized) as caught:
        asyncio.run(run())
    assert "provider.access_code" in str(caught.value)
    # the stand-in's 000101 repeats the code it was sent; the error does not
    assert "wrong-code-1234" not in str(caught.value)


def test_an_order_is_waited_for_while_it_is_allocated(standin: ProviderStandin) -> None:
    standin.allocate("B-NEW", 3, calls=2)
    profiles = call(standin, lambda client: client.profiles_of_order("B-NEW"))
    assert len(profiles) == 3 and {p.order_no for p in profiles} == {"B-NEW"}
    assert standin.paths() == ["esim/query"] * 3  # 200010, 200010, the profiles


def test_an_order_that_stays_unallocated_is_not_ready(standin: ProviderStandin) -> None:
    standin.allocate("B-SLOW", 1, seconds=60)
    started = time.monotonic()
    error = failure(standin, lambda client: client.profiles_of_order("B-SLOW"),
                    order_wait=0.4)
    assert isinstance(error, NotReady) and error.outcome == "error"
    assert time.monotonic() - started < 2
    assert len(standin.requests) >= 3


def test_the_rate_limit_is_never_passed(standin: ProviderStandin) -> None:
    """40 calls at once from three kinds of caller, max_rps 5: never more than 5 in any
    second at the stand-in, which counts over a sliding second."""
    standin.profiles = [profile(n) for n in range(1, 11)]
    numbers = [p["esimTranNo"] for p in standin.profiles]

    async def burst(client: ProviderClient) -> None:
        calls: list[Awaitable[Any]] = [client.balance() for _ in range(20)]
        calls += [client.profiles(1, 5) for _ in range(10)]
        calls += [client.usage(numbers) for _ in range(10)]
        await asyncio.gather(*calls)

    started = time.monotonic()
    call(standin, burst, max_rps=5)
    assert len(standin.requests) == 40
    assert standin.max_per_second <= 5, standin.max_per_second
    assert time.monotonic() - started >= 39 / 5  # spread, not 5 at once and a pause


@pytest.mark.parametrize(
    "answers",
    [[Answer(429), Answer(code="900001"), Answer(503)], [Answer(502), Answer(500)]],
    ids=["429-900001-503", "5xx"],
)
def test_busy_answers_are_retried(standin: ProviderStandin, answers: list[Answer]) -> None:
    standin.script.extend(answers)
    seen: list[tuple[str, str]] = []
    balance = call(standin, lambda client: client.balance(),
                   on_call=lambda *outcome: seen.append(outcome))
    assert balance.balance == 940_000
    assert len(standin.requests) == len(answers) + 1
    assert seen == [("balance/query", "unreachable")] * len(answers) + [("balance/query", "ok")]


def test_retry_after_is_honoured(standin: ProviderStandin) -> None:
    standin.script.append(Answer(429, retry_after="0.5"))
    call(standin, lambda client: client.balance())
    first, second = standin.requests
    assert second.at - first.at >= 0.5


@pytest.mark.parametrize("over_limit", ["429", "900001"])
def test_the_providers_own_limit_is_unreachable_for_now(
    standin: ProviderStandin, over_limit: str
) -> None:
    """Another client of the same account has just sent 8: the provider refuses the 9th
    of that second, which is 'unreachable' (for now), not 'error'."""
    standin.over_limit = over_limit
    standin.crowd(8)
    error = failure(standin, lambda client: client.balance(), attempts=1)
    assert isinstance(error, Unreachable)
    assert standin.max_per_second == 9
    time.sleep(1.0)
    assert call(standin, lambda client: client.balance()).balance == 940_000


def test_busy_for_good_is_unreachable(standin: ProviderStandin) -> None:
    standin.always = Answer(503)
    error = failure(standin, lambda client: client.balance(), attempts=3)
    assert isinstance(error, Unreachable) and error.outcome == "unreachable"
    assert len(standin.requests) == 3 and "provider.base_url" in str(error)


def test_a_slow_provider_times_out_as_unreachable(standin: ProviderStandin) -> None:
    standin.delay = 3.0
    started = time.monotonic()
    error = failure(standin, lambda client: client.balance(), timeout=0.2, attempts=2)
    assert isinstance(error, Unreachable) and "no answer in time" in str(error)
    assert time.monotonic() - started < 1.5
    assert len(standin.requests) == 2


def test_a_provider_that_hangs_up_or_is_not_there_is_unreachable(
    standin: ProviderStandin
) -> None:
    standin.down = True
    error = failure(standin, lambda client: client.balance(), attempts=2)
    assert isinstance(error, Unreachable) and "no connection" in str(error)
    nobody = ProviderStandin()  # its port, never started: connections are refused
    nobody.stop()
    error = failure(nobody, lambda client: client.balance(), attempts=2)
    assert isinstance(error, Unreachable)


@pytest.mark.parametrize(
    ("answer", "kind", "outcome"),
    [
        (Answer(code="000001"), Refused, "error"),
        (Answer(code="000104"), Refused, "error"),
        (Answer(code="101002"), Refused, "error"),
        (Answer(404), Refused, "error"),
        (Answer(403), Unauthorized, "unauthorized"),
        (Answer(code="000102"), Unauthorized, "unauthorized"),
        (Answer(code=101), Unauthorized, "unauthorized"),  # a number, for 000101
        (Answer(code=900001), Unreachable, "unreachable"),
    ],
)
def test_each_refusal_has_its_outcome(
    standin: ProviderStandin, answer: Answer, kind: type[ProviderError], outcome: str
) -> None:
    standin.always = answer
    error = failure(standin, lambda client: client.balance(), attempts=2)
    assert type(error) is kind and error.outcome == outcome
    expected = 2 if outcome == "unreachable" else 1  # only the busy are asked again
    assert len(standin.requests) == expected


def test_an_unknown_order_is_an_error(standin: ProviderStandin) -> None:
    error = failure(standin, lambda client: client.profiles_of_order("B-NOPE"))
    assert isinstance(error, Refused) and not isinstance(error, NotReady)
    assert error.code == "310272" and "does not exist" in str(error)


def test_metrics_count_every_request(standin: ProviderStandin) -> None:
    metrics = Metrics()
    standin.script.append(Answer(429))

    async def use(client: ProviderClient) -> None:
        await client.balance()
        await client.profiles(1, 5)

    call(standin, use, on_call=metrics.provider_call)
    text = metrics.render().decode()
    assert 'esim_bridge_provider_calls_total{endpoint="balance/query",outcome="unreachable"} ' \
        '1.0' in text
    assert 'esim_bridge_provider_calls_total{endpoint="balance/query",outcome="ok"} 1.0' in text
    assert 'esim_bridge_provider_calls_total{endpoint="esim/query",outcome="ok"} 1.0' in text


def test_the_credentials_appear_in_no_log_line_and_no_error(
    standin: ProviderStandin, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    standin.access_code = "AC-0123456789abcdef"
    standin.secret_key = "SK-fedcba9876543210"
    standin.script.extend([Answer(429), Answer(code="900001", message="busy AC-0123456789abcdef")])
    errors: list[str] = []

    async def use(client: ProviderClient) -> None:
        errors.append(repr(client))
        await client.balance()
        standin.always = Answer(code="000001", message="echo SK-fedcba9876543210")
        for method in (client.balance, lambda: client.usage(["T1"])):
            try:
                await method()
            except ProviderError as error:
                errors.extend([str(error), repr(error), error.answer])

    call(standin, use, secret_key=standin.secret_key)
    standin.always, standin.secret_key = None, "SK-other"
    with pytest.raises(Unauthorized) as caught:
        call(standin, lambda client: client.balance(), secret_key="SK-fedcba9876543210")
    errors.append(str(caught.value))
    assert "busy ***" in caplog.text and len(errors) == 8  # the retry was logged, scrubbed
    for secret in ("AC-0123456789abcdef", "SK-fedcba9876543210"):
        assert secret not in caplog.text
        assert not any(secret in text for text in errors), errors


def test_without_an_access_code_there_is_no_client() -> None:
    with pytest.raises(ValueError, match=r"provider\.access_code"):
        ProviderClient(ProviderConfig(base_url=f"http://127.0.0.1:{free_port()}"))


def test_the_rate_limit_holds_wherever_in_its_flight_a_request_arrives() -> None:
    """A request reaches the provider somewhere between its start and its answer: the
    limit holds for the worst case, so no `per_second + 1` requests can land within one
    second (a send that went out late used to be followed too closely by the next)."""
    limit, spans = RateLimit(5), []

    async def request(n: int) -> None:
        async with limit.slot():
            start = time.monotonic()
            await asyncio.sleep(0.05 if n % 3 else 0.3)  # answers come back at their pace
            spans.append((start, time.monotonic()))

    async def burst() -> None:
        await asyncio.gather(*(request(n) for n in range(16)))

    asyncio.run(burst())
    # Six requests could land in one second iff, for the one of them that started last,
    # the other five started before it and answered less than a second before it started
    for start, _ in spans:
        near = [(s, e) for s, e in spans if s <= start and e > start - 1.0 + 1e-3]
        assert len(near) <= 5, near
    starts = sorted(start for start, _ in spans)
    assert all(b - a >= 0.2 for a, b in itertools.pairwise(starts))  # spread, not a burst
