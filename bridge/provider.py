"""The provider's REST API (eSIM Access "open API"): the one place that calls it.

Every request goes through `ProviderClient._call`: signed when a secret key is set,
spread so that no one second holds more than `provider.max_rps` of them, retried with
backoff while the provider is busy or away, and decoded with msgspec. Every failure
ends as one `ProviderError`, whose `outcome` is what `<base>/bridge/provider` says.
The access code and the secret key never leave this module except as headers.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import hashlib
import hmac
import logging
import math
import random
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from datetime import datetime
from decimal import Decimal
from types import TracebackType
from typing import Any, ClassVar, Literal, TypeVar

import httpx
import msgspec

from bridge import __version__
from bridge.config import ProviderConfig

log = logging.getLogger("bridge.provider")

Outcome = Literal["ok", "unauthorized", "unreachable", "error"]
T = TypeVar("T")

PATH_PREFIX = "/api/v1/open/"
PAGE_SIZE = 500  # the provider allows 5-500: a fleet of 10,000 in 20 calls, not 100
USAGE_BATCH = 10  # the provider's limit per esim/usage/query
JITTER_MARGIN = 0.05  # s per second: sends are spaced a little wider than 1/max_rps
NOT_READY = "200010"
BUSY = "900001"


class _Camel(msgspec.Struct, rename="camel", kw_only=True):
    pass


class Envelope(_Camel):
    """Every answer: `errorCode` comes as a string, a number or null."""

    success: bool = False
    error_code: str | int | None = None
    error_msg: str | None = None
    obj: msgspec.Raw = msgspec.Raw(b"null")


class Package(_Camel):
    package_name: str | None = None
    package_code: str | None = None


class Profile(_Camel):
    """One eSIM as `esim/query` lists it (the fields the bridge uses; the rest are
    ignored, activation codes and PIN/PUK among them)."""

    iccid: str | None = None
    esim_tran_no: str | None = None
    order_no: str | None = None
    transaction_id: str | None = None
    eid: str | None = None
    esim_status: str | None = None
    smdp_status: str | None = None
    activate_time: str | None = None
    expired_time: str | None = None
    total_volume: int | None = None
    total_duration: int | None = None
    duration_unit: str | None = None
    order_usage: int | None = None
    qr_code_url: str | None = None
    package_list: list[Package] = msgspec.field(default_factory=list)

    @property
    def activated_at(self) -> datetime | None:
        return moment(self.activate_time)

    @property
    def expires_at(self) -> datetime | None:
        return moment(self.expired_time)

    @property
    def package(self) -> str | None:
        """The name of the first package, as the contract's `package` key holds it."""
        return self.package_list[0].package_name if self.package_list else None


class Pager(_Camel):
    page_num: int = 1
    page_size: int = 0
    total: int = 0


class ProfilePage(_Camel):
    esim_list: list[Profile] = msgspec.field(default_factory=list)
    pager: Pager = msgspec.field(default_factory=Pager)


class Usage(_Camel):
    esim_tran_no: str
    data_usage: int | None = None
    total_data: int | None = None
    last_update_time: str | None = None

    @property
    def updated_at(self) -> datetime | None:
        """The operator's last settlement (2-3 hours behind), not the time of the call."""
        return moment(self.last_update_time)


class _UsageAnswer(_Camel):
    esim_usage_list: list[Usage] = msgspec.field(default_factory=list)


class Balance(_Camel):
    balance: int | float  # USD x 10,000

    @property
    def usd(self) -> Decimal:
        return Decimal(str(self.balance)) / 10_000


BALANCE = msgspec.json.Decoder(Balance)
PAGE = msgspec.json.Decoder(ProfilePage)
# one older copy of the reference shows usage's `obj` as the bare list
USAGE: msgspec.json.Decoder[_UsageAnswer | list[Usage] | None] = msgspec.json.Decoder(
    _UsageAnswer | list[Usage] | None
)


def moment(text: str | None) -> datetime | None:
    """A provider time (`2024-05-29T18:34:17+0000`); None when absent or not a time, so
    that one odd field does not lose the whole page it came in."""
    if not text:
        return None
    try:
        return msgspec.convert(text, datetime)
    except msgspec.ValidationError:
        return None


class ProviderError(Exception):
    """A call that did not succeed. `answer` is what the provider said (or that it said
    nothing), `meaning` what that means, `fix` what to do about it."""

    outcome: ClassVar[Outcome] = "error"

    def __init__(
        self, endpoint: str, answer: str, meaning: str, fix: str, code: str | None = None
    ) -> None:
        super().__init__(f"{endpoint}: {answer}: {meaning}. {fix}")
        self.endpoint = endpoint
        self.answer = answer
        self.meaning = meaning
        self.fix = fix
        self.code = code


class Unauthorized(ProviderError):
    """The access code or the signature was refused; retrying cannot help."""

    outcome = "unauthorized"


class Unreachable(ProviderError):
    """No answer, or busy / rate-limited / failing, after every retry."""

    outcome = "unreachable"


class Refused(ProviderError):
    """Any other refusal: a bad parameter, an unknown order, an answer not understood."""


class NotReady(Refused):
    """`200010`: the order's profiles are still being allocated; ask again shortly."""


# error code -> (meaning, fix); the codes that mean "refused credentials" are Unauthorized
UNAUTHORIZED_CODES = {
    "000101": ("the access code was refused", "Check provider.access_code."),
    "000102": ("the access code was refused", "Check provider.access_code."),
    "101003": ("the signature did not match",
               "Check provider.secret_key (or remove it to call unsigned)."),
}
KNOWN_CODES = {
    "000001": ("the provider had an internal error", "Try again later."),
    "101001": ("the request's timestamp was refused as expired",
               "Set this machine's clock right (NTP)."),
    "101002": ("the provider blocks this machine's IP address",
               "Allow it in the provider's console, or call from an allowed address."),
    "310272": ("that order does not exist", "Check the order number."),
    NOT_READY: ("the order's profiles are still being allocated", "Ask again in a few seconds."),
    BUSY: ("the provider is busy (or this account is over its rate limit)",
           "Try again later; lower provider.max_rps if it keeps happening."),
}
UNREACHABLE_FIX = ("Check provider.base_url and this machine's network; if the provider is "
                   "down, the bridge keeps trying.")


class RateLimit:
    """At most `per_second` requests within any one second at the provider's end, shared
    by every caller (`async with limit.slot(): <send>`).

    A request reaches the provider some time between when it starts and when its answer
    is back, so: a request starts only once fewer than `per_second` of the ones before it
    are still within a second of their answer (one still in flight counts as within),
    and at least 1/per_second (a little more) after the previous one started, so they
    spread instead of bursting. A task that is late (a busy event loop) goes late, not
    at once with the ones queued behind it."""

    def __init__(self, per_second: int) -> None:
        self.per_second = per_second
        self.interval = (1.0 + JITTER_MARGIN) / per_second
        self._last = -self.interval
        self._free_at: list[list[float]] = []  # per recent request: its answer + 1 s
        self._changed = asyncio.Condition()

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        mine = [math.inf]  # in flight
        async with self._changed:
            while (delay := self._delay()) > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), min(delay, 1.0))
            self._last = time.monotonic()
            self._free_at.append(mine)
        try:
            yield
        finally:
            async with self._changed:
                mine[0] = time.monotonic() + 1.0
                self._changed.notify_all()

    def _delay(self) -> float:
        """How long to wait before the next request may start; 0 or less: now."""
        now = time.monotonic()
        self._free_at = [at for at in self._free_at if at[0] > now]
        spacing = self._last + self.interval - now
        if len(self._free_at) < self.per_second:
            return spacing
        return max(spacing, min(at[0] for at in self._free_at) - now)


class ProviderClient:
    """The provider's API for the bridge: one connection pool, one rate limit.

    Use as `async with ProviderClient(settings.provider) as client:`. `on_call` is told
    (endpoint, outcome) for every request sent, retries included (`Metrics.provider_call`).
    `timeout`, `attempts`, `backoff` and `order_wait` are there for tests to shorten."""

    def __init__(
        self,
        settings: ProviderConfig,
        *,
        on_call: Callable[[str, str], None] | None = None,
        timeout: float = 10.0,
        attempts: int = 4,
        backoff: float = 1.0,
        max_delay: float = 60.0,
        order_wait: float = 60.0,
        order_poll: float = 2.0,
    ) -> None:
        if not settings.access_code:
            raise ValueError("provider.access_code is not set: the provider cannot be called")
        self._access_code = settings.access_code
        self._secret_key = settings.secret_key.encode() if settings.secret_key else None
        self.base_url = settings.base_url.rstrip("/")
        self._on_call = on_call
        self._attempts = max(1, attempts)
        self._backoff = backoff
        self._max_delay = max_delay
        self.order_wait = order_wait
        self.order_poll = order_poll
        self.rate_limit = RateLimit(settings.max_rps)
        self._http = httpx.AsyncClient(
            base_url=self.base_url + PATH_PREFIX,
            timeout=httpx.Timeout(timeout, connect=min(timeout, 5.0)),
            limits=httpx.Limits(max_connections=settings.max_rps * 2,
                                max_keepalive_connections=settings.max_rps),
            headers={"Content-Type": "application/json",
                     "User-Agent": f"esim-bridge/{__version__}"},
            follow_redirects=False,
        )

    def __repr__(self) -> str:
        return f"ProviderClient({self.base_url!r})"

    async def __aenter__(self) -> ProviderClient:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    # -- the calls ------------------------------------------------------------------

    async def balance(self) -> Balance:
        return await self._call("balance/query", {}, BALANCE)

    async def profiles(self, page: int = 1, page_size: int = PAGE_SIZE,
                       **criteria: str) -> ProfilePage:
        """One page of `esim/query`; `criteria` is at most one of orderNo, iccid,
        esimTranNo (none: every profile of the account)."""
        body: dict[str, Any] = {**criteria, "pager": {"pageNum": page, "pageSize": page_size}}
        return await self._call("esim/query", body, PAGE)

    async def all_profiles(self, page_size: int = PAGE_SIZE,
                           **criteria: str) -> AsyncIterator[Profile]:
        """Every profile, page after page, until the pager's total is reached."""
        page, seen = 1, 0
        while True:
            answer = await self.profiles(page, page_size, **criteria)
            for profile in answer.esim_list:
                yield profile
            seen += len(answer.esim_list)
            if not answer.esim_list or seen >= answer.pager.total:
                return
            page += 1

    async def profile(self, iccid: str) -> Profile | None:
        """The profile that holds `iccid` now (ICCIDs are reused: an earlier eSIM with the
        same ICCID may be listed too; the provider lists the newest first)."""
        answer = await self.profiles(1, 5, iccid=iccid)
        return answer.esim_list[0] if answer.esim_list else None

    async def profiles_of_order(self, order_no: str) -> list[Profile]:
        """An order's profiles, asking again while the provider answers `200010` (still
        allocating) for up to `order_wait` seconds; after that, NotReady."""
        deadline = time.monotonic() + self.order_wait
        while True:
            try:
                return [profile async for profile in self.all_profiles(orderNo=order_no)]
            except NotReady:
                if time.monotonic() + self.order_poll > deadline:
                    raise
            await asyncio.sleep(self.order_poll)

    async def usage(self, esim_tran_nos: Sequence[str]) -> list[Usage]:
        """Data used, for any number of eSIMs, asked 10 at a time (the provider's limit)."""
        found: list[Usage] = []
        for start in range(0, len(esim_tran_nos), USAGE_BATCH):
            batch = list(esim_tran_nos[start : start + USAGE_BATCH])
            answer = await self._call("esim/usage/query", {"esimTranNoList": batch}, USAGE)
            if isinstance(answer, _UsageAnswer):
                found.extend(answer.esim_usage_list)
            elif answer is not None:
                found.extend(answer)
        return found

    # -- one request ----------------------------------------------------------------

    async def _call(
        self, endpoint: str, body: dict[str, Any], answer: msgspec.json.Decoder[T]
    ) -> T:
        """POST `body` to `endpoint`, retried while retrying can help; its `obj` as `answer`."""
        content = msgspec.json.encode(body)
        attempt = 1
        while True:
            try:
                obj = await self._send(endpoint, content)
                break
            except _Retry as busy:
                self._count(endpoint, "unreachable")
                if attempt == self._attempts:
                    raise busy.error from None
                delay = self._delay(attempt, busy.retry_after)
                attempt += 1
                log.info("%s; trying again in %.1f s (%d of %d)", busy.error, delay,
                         attempt, self._attempts)
                await asyncio.sleep(delay)
            except ProviderError as error:
                self._count(endpoint, error.outcome)
                raise
        try:
            decoded = answer.decode(obj)
        except msgspec.ValidationError as exc:
            self._count(endpoint, "error")
            raise Refused(endpoint, "an answer this bridge does not understand",
                          f"its obj did not decode ({exc})",
                          "Report it, with the provider's answer.") from None
        self._count(endpoint, "ok")
        return decoded

    async def _send(self, endpoint: str, content: bytes) -> bytes:
        """One request; the `obj` of a successful answer, or an exception that says why not."""
        try:
            async with self.rate_limit.slot():
                response = await self._http.post(endpoint, content=content,
                                                 headers=self._headers(content))
        except httpx.TimeoutException:
            raise _Retry(Unreachable(endpoint, "no answer in time", "the provider is slow or "
                                     "away", UNREACHABLE_FIX)) from None
        except httpx.TransportError as exc:
            raise _Retry(Unreachable(endpoint, f"no connection ({type(exc).__name__})",
                                     f"{self.base_url} cannot be reached",
                                     UNREACHABLE_FIX)) from None
        status = response.status_code
        if status in (401, 403):
            raise Unauthorized(endpoint, f"HTTP {status}", "the credentials were refused",
                               "Check provider.access_code (and provider.secret_key).")
        if status == 429 or status >= 500:
            raise _Retry(Unreachable(endpoint, f"HTTP {status}", "the provider is busy, "
                                     "rate-limiting or failing", UNREACHABLE_FIX),
                         response.headers.get("Retry-After"))
        if status != 200:
            raise Refused(endpoint, f"HTTP {status}", "not an answer of the provider's API",
                          "Check provider.base_url.")
        try:
            envelope = msgspec.json.decode(response.content, type=Envelope)
        except msgspec.DecodeError:
            raise Refused(endpoint, "HTTP 200 that is not JSON", "not an answer of the "
                          "provider's API", "Check provider.base_url.") from None
        if envelope.success:
            return envelope.obj
        raise self._refusal(endpoint, envelope)

    def _refusal(self, endpoint: str, envelope: Envelope) -> ProviderError | _Retry:
        code = _code(envelope.error_code)
        said = self._scrub(envelope.error_msg or "")
        answer = f"error {code}" + (f" ({said!r})" if said else "")
        if code in UNAUTHORIZED_CODES:
            return Unauthorized(endpoint, answer, *UNAUTHORIZED_CODES[code], code=code)
        if code == BUSY:
            return _Retry(Unreachable(endpoint, answer, *KNOWN_CODES[code], code=code))
        meaning, fix = KNOWN_CODES.get(code, ("the request was refused",
                                              "See the provider's error codes."))
        kind = NotReady if code == NOT_READY else Refused
        return kind(endpoint, answer, meaning, fix, code=code)

    def _headers(self, content: bytes) -> dict[str, str]:
        headers = {"RT-AccessCode": self._access_code}
        if self._secret_key is not None:
            request_id = str(uuid.uuid4())
            timestamp = str(int(time.time() * 1000))
            signed = f"{timestamp}{request_id}{self._access_code}".encode() + content
            headers["RT-RequestID"] = request_id
            headers["RT-Timestamp"] = timestamp
            headers["RT-Signature"] = hmac.new(self._secret_key, signed,
                                               hashlib.sha256).hexdigest()
        return headers

    def _delay(self, attempt: int, retry_after: str | None) -> float:
        """Full jitter (a random wait up to the exponential bound), so that many callers
        turned away at once do not come back at once; at least what Retry-After asks."""
        delay = random.uniform(0, min(self._max_delay, self._backoff * 2 ** (attempt - 1)))
        return min(self._max_delay, max(delay, _seconds(retry_after)))

    def _scrub(self, text: str) -> str:
        """The provider's own words, without the credentials (should it ever echo them)."""
        for secret in (self._access_code, self._secret_key.decode() if self._secret_key else ""):
            if secret:
                text = text.replace(secret, "***")
        return text

    def _count(self, endpoint: str, outcome: Outcome) -> None:
        if self._on_call is not None:
            self._on_call(endpoint, outcome)


class _Retry(Exception):
    """An answer worth asking again (busy, rate-limited, failing, or none at all)."""

    def __init__(self, error: Unreachable, retry_after: str | None = None) -> None:
        super().__init__(str(error))
        self.error = error
        self.retry_after = retry_after


def _code(value: str | int | None) -> str:
    """`101003`, `"101003"` and `101` (for `000101`) alike: the six-digit code as a string."""
    text = "" if value is None else str(value).strip()
    return text.zfill(6) if text.isdigit() else text or "(none)"


def _seconds(retry_after: str | None) -> float:
    """Retry-After as seconds: a number, or an HTTP date; 0 when absent or unreadable."""
    if not retry_after:
        return 0.0
    try:
        return max(0.0, float(retry_after))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(retry_after)
    except (TypeError, ValueError):
        return 0.0
    return max(0.0, when.timestamp() - time.time())
