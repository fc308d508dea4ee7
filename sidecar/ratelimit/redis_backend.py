"""The Redis bucket store (``limits.backend: redis://...``): one budget for a fleet.

Every worker of every host that points at the same Redis draws from the same
buckets. A reservation is one round trip: a Lua script (loaded once, run by its
SHA) that does ``bucket.py``'s arithmetic atomically on one hash per bucket
(``tokens`` and ``requests`` levels and the ``stamp`` they were computed at), on
the Redis server's clock (``TIME``), so hosts whose clocks disagree still agree
on the refill. A settlement never makes the request wait: it is queued as a
background task running a second script (refill, then charge or refund).

Keys are ``sidecar:rl:`` + the bucket's name. The name may hold a client's header
value: it is only ever a key (KEYS[1]), never part of a script's source. A hash
expires once its buckets would be full again (an expired bucket reads as full),
so identities that went quiet cost no memory.

When Redis cannot be reached (refused, timed out after ``SOCKET_TIMEOUT_S``, any
Redis error) the request gets the failure mode: ``fail_open`` lets it in holding
nothing (its usage is still charged at settlement if Redis is back by then),
otherwise it is refused with 503. After a failure Redis is left alone for
``BREAKER_S`` (the failure mode applies at once, no socket timeout per request),
then one request probes it again; redis-py reconnects by itself. The first
failure and the recovery are logged once each, with the URL's password left out.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from typing import Any, Final
from urllib.parse import urlsplit

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from sidecar.config import LimitsConfig
from sidecar.errors import Overloaded
from sidecar.ratelimit.bucket import Grant
from sidecar.ratelimit.policy import Limits

log = logging.getLogger("sidecar.ratelimit")

KEY_PREFIX: Final = "sidecar:rl:"
# A reservation waits at most this long on a connect or a reply before the failure
# mode applies. Redis on the same network answers in well under a millisecond, but a
# loaded 2-core host stalled replies past 0.25 s (a spurious fail-closed 503 in tests).
SOCKET_TIMEOUT_S: Final = LimitsConfig().redis_timeout
# Connections per worker; a reservation waits this long for a free one.
MAX_CONNECTIONS: Final = 64
POOL_WAIT_S: Final = 0.25
# After a failure, Redis is skipped this long (the failure mode applies directly).
BREAKER_S: Final = 1.0
# Settlements in flight at once; past it they are dropped (counted, logged once).
MAX_PENDING_SETTLEMENTS: Final = 1024
# A hash outlives the moment its buckets are full again by this margin (ms).
TTL_MARGIN_MS: Final = 1000
# close(): how long queued settlements may take to land before the pool closes.
CLOSE_FLUSH_S: Final = 1.0

# -- the scripts ------------------------------------------------------------------------
# KEYS[1] the bucket's hash. ARGV[1] token capacity, ARGV[2] period (s), ARGV[3]
# request capacity ('' for none), ARGV[4] cost (reserve) or delta (settle). The
# clock line is separate so the unit tests can drive the same arithmetic on a clock
# of their own (ARGV[5]); the backend always uses the server's TIME.
SERVER_CLOCK: Final = (
    "local t = redis.call('TIME')\n"
    "local now = tonumber(t[1]) + tonumber(t[2]) / 1000000\n"
)
ARGV_CLOCK: Final = "local now = tonumber(ARGV[5])\n"

# Bucket.refill / wait_for / take / adjust, one stamp for both buckets (refilling is
# the same whether done in one step or several). A clock that went back (a failover
# to a server whose clock is behind) refills nothing and restamps, instead of
# freezing the bucket until the old stamp comes round again.
_COMMON: Final = """
local key = KEYS[1]
local tcap = tonumber(ARGV[1])
local period = tonumber(ARGV[2])
local rcap = tonumber(ARGV[3])
local trate = tcap / period
local rrate = rcap and rcap / period
local h = redis.call('HMGET', key, 'tokens', 'requests', 'stamp')
local stamp = tonumber(h[3]) or now
local function refill(level, cap, rate)
  if level == nil then return cap end
  if now > stamp then level = level + (now - stamp) * rate end
  return math.min(cap, level)
end
local tokens = refill(tonumber(h[1]), tcap, trate)
local requests = rcap and refill(tonumber(h[2]), rcap, rrate)
local function fmt(x) return string.format('%.17g', x) end
local function store()
  local full = (tcap - tokens) / trate
  if requests then
    full = math.max(full, (rcap - requests) / rrate)
    redis.call('HSET', key, 'tokens', fmt(tokens), 'requests', fmt(requests),
               'stamp', fmt(now))
  else
    redis.call('HSET', key, 'tokens', fmt(tokens), 'stamp', fmt(now))
    redis.call('HDEL', key, 'requests')
  end
  redis.call('PEXPIRE', key, math.ceil(math.max(0, full) * 1000) + MARGIN_MS)
end
""".replace("MARGIN_MS", str(TTL_MARGIN_MS))

_RESERVE: Final = _COMMON + """
local cost = tonumber(ARGV[4])
local function wait_for(level, cap, rate, c)
  local need = math.min(c, cap) - level
  if need <= 0 then return 0 end
  return need / rate
end
local wait = wait_for(tokens, tcap, trate, cost)
if requests then wait = math.max(wait, wait_for(requests, rcap, rrate, 1)) end
local ok = 0
if wait == 0 then
  ok = 1
  tokens = tokens - math.min(cost, tcap)
  if requests then requests = requests - math.min(1, rcap) end
  store()
end
return {ok, fmt(wait), fmt(tokens), requests and fmt(requests) or ''}
"""

_SETTLE: Final = _COMMON + """
local delta = tonumber(ARGV[4])
if h[1] == false and delta <= 0 then return 0 end
tokens = math.min(tcap, tokens - delta)
store()
return 1
"""


def reserve_source(clock: str = SERVER_CLOCK) -> str:
    return clock + _RESERVE


def settle_source(clock: str = SERVER_CLOCK) -> str:
    return clock + _SETTLE


def grant_of(reply: Any, limits: Limits) -> Grant:
    """The script's reply ``{ok, wait, tokens level, requests level or ''}`` as a Grant,
    its figures computed as ``bucket.reserve`` computes them."""
    ok, wait, t_level, r_level = reply
    tokens = float(t_level)
    t_rate = limits.tokens / limits.period
    out = Grant(ok=bool(ok), retry_after=float(wait), limit_tokens=limits.tokens,
                remaining_tokens=max(0, int(tokens)),
                reset_tokens=max(0.0, (limits.tokens - tokens) / t_rate))
    if limits.requests is None or not r_level:
        return out
    requests = float(r_level)
    r_rate = limits.requests / limits.period
    return Grant(ok=out.ok, retry_after=out.retry_after, limit_tokens=out.limit_tokens,
                 remaining_tokens=out.remaining_tokens, reset_tokens=out.reset_tokens,
                 limit_requests=limits.requests, remaining_requests=max(0, int(requests)),
                 reset_requests=max(0.0, (limits.requests - requests) / r_rate))


def script_args(limits: Limits, amount: int) -> list[Any]:
    return [limits.tokens, repr(float(limits.period)),
            "" if limits.requests is None else limits.requests, amount]


def redacted(url: str) -> str:
    """The URL as logs may show it: scheme, host, port and path; no user or password."""
    try:
        u = urlsplit(url)
        host = u.hostname or ""
        if ":" in host:
            host = f"[{host}]"
        port = f":{u.port}" if u.port else ""
    except ValueError:
        return "redis (unparsable URL)"
    return f"{u.scheme}://{host}{port}{u.path}"


class RedisBackend:
    """Token buckets in Redis: ``reserve`` returns an awaitable, ``settle`` queues."""

    def __init__(self, url: str, fail_open: bool = True, *,
                 socket_timeout: float = SOCKET_TIMEOUT_S,
                 max_pending_settlements: int = MAX_PENDING_SETTLEMENTS) -> None:
        self.where = redacted(url)
        self.fail_open = fail_open
        self.max_pending = max_pending_settlements
        self._pool = BlockingConnectionPool.from_url(
            url, max_connections=MAX_CONNECTIONS, timeout=POOL_WAIT_S,
            socket_timeout=socket_timeout, socket_connect_timeout=socket_timeout,
            retry=Retry(NoBackoff(), 0), decode_responses=False)
        self._redis = Redis(connection_pool=self._pool)
        self._reserve = self._redis.register_script(reserve_source())
        self._settle = self._redis.register_script(settle_source())
        self._tasks: set[asyncio.Task[None]] = set()
        self._down = False  # since the first failure, until a call succeeds again
        self._skip_until = 0.0  # loop time before which Redis is not tried
        self._dropping = False
        self._closed = False
        # Counters, read by tests (and metrics, when they land).
        self.errors = 0  # Redis calls (reserve or settle) that failed
        self.fallbacks = 0  # reservations answered by the failure mode
        self.dropped = 0  # settlements not applied (queue full, Redis down, error)

    # -- Backend ------------------------------------------------------------------------
    def reserve(self, name: str, limits: Limits, cost: int,
                now: float) -> Grant | Awaitable[Grant]:
        if self._down and asyncio.get_running_loop().time() < self._skip_until:
            return self._fallback(limits)  # synchronous: no task, no timeout to wait
        if self._down:  # this request probes; the others keep the failure mode meanwhile
            self._skip_until = asyncio.get_running_loop().time() + BREAKER_S
        return self._reserve_remote(name, limits, cost)

    async def _reserve_remote(self, name: str, limits: Limits, cost: int) -> Grant:
        try:
            reply = await self._reserve(keys=[KEY_PREFIX + name],
                                        args=script_args(limits, cost))
        except (RedisError, OSError) as exc:
            self._failed(exc)
            return self._fallback(limits)
        self._recovered()
        return grant_of(reply, limits)

    def settle(self, name: str, limits: Limits, delta: int, now: float) -> None:
        if not delta:
            return
        if self._closed or (self._down and
                            asyncio.get_running_loop().time() < self._skip_until):
            self.dropped += 1
            return
        if len(self._tasks) >= self.max_pending:
            self.dropped += 1
            if not self._dropping:
                self._dropping = True
                log.warning("token limits: more than %d settlements waiting on %s; "
                            "dropping settlements until it catches up", self.max_pending,
                            self.where)
            return
        if self._dropping and len(self._tasks) < self.max_pending // 2:
            self._dropping = False
            log.info("token limits: settlements on %s caught up (%d dropped so far)",
                     self.where, self.dropped)
        task = asyncio.get_running_loop().create_task(self._settle_remote(name, limits, delta))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _settle_remote(self, name: str, limits: Limits, delta: int) -> None:
        try:
            await self._settle(keys=[KEY_PREFIX + name], args=script_args(limits, delta))
        except (RedisError, OSError) as exc:
            self.dropped += 1
            self._failed(exc)
        except asyncio.CancelledError:
            self.dropped += 1
            raise
        except Exception:
            self.dropped += 1
            log.exception("token limits: settlement on %s failed", self.where)
        else:
            self._recovered()

    def close(self) -> None:
        """Let queued settlements land (briefly), then close the pool. Callable from
        sync code: with a loop running, the work is a task; without one, nothing is
        left to await and the sockets go with the process."""
        if self._closed:
            return
        self._closed = True
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        task = loop.create_task(self.aclose())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def aclose(self) -> None:
        self._closed = True
        pending = [t for t in self._tasks if t is not asyncio.current_task()]
        if pending:
            await asyncio.wait(pending, timeout=CLOSE_FLUSH_S)
        await self._pool.disconnect()

    @property
    def pending_settlements(self) -> int:
        return len(self._tasks)

    # -- failure mode -------------------------------------------------------------------
    def _fallback(self, limits: Limits) -> Grant:
        self.fallbacks += 1
        if not self.fail_open:
            exc = Overloaded("token limits cannot be checked: the limits backend (Redis) "
                             "is unreachable and limits.redis_failure is closed; retry "
                             "later")
            exc.headers = ((b"retry-after", b"1"),)
            raise exc
        return Grant(ok=True, retry_after=0.0, limit_tokens=limits.tokens,
                     remaining_tokens=limits.tokens, reset_tokens=0.0, held=False)

    def _failed(self, exc: BaseException) -> None:
        self.errors += 1
        self._skip_until = asyncio.get_running_loop().time() + BREAKER_S
        if not self._down:
            self._down = True
            mode = ("letting requests through without a reservation" if self.fail_open
                    else "refusing limited requests with 503")
            log.warning("token limits: Redis at %s unreachable or failing (%s: %s); %s "
                        "(limits.redis_failure: %s) until it answers again", self.where,
                        type(exc).__name__, _reason(exc), mode,
                        "open" if self.fail_open else "closed")

    def _recovered(self) -> None:
        if self._down:
            self._down = False
            self._skip_until = 0.0
            log.warning("token limits: Redis at %s answers again; limits enforced "
                        "(%d failed calls, %d requests under the failure mode)",
                        self.where, self.errors, self.fallbacks)


def _reason(exc: BaseException) -> str:
    """The error's text, short, without anything after an '@' (a URL's credentials)."""
    text = str(exc) or "no detail"
    if "@" in text:
        text = text.rsplit("@", 1)[-1]
    return text[:200]
