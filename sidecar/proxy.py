"""The request handler: inspect the JSON body, admit, route, run the attempts, settle.

A request with a kept-alive provider connection free starts synchronously in the
client's read callback; only opening a new provider connection (or an admission
that must wait on a remote store) takes a task. The body relay itself runs on
protocol callbacks inside ``splice.Exchange``; the end of an attempt comes back
to the request's :class:`Flight` (``on_end``), which retries or settles.

The proxy reads one :class:`~sidecar.runtime.Runtime` snapshot per request;
:meth:`Proxy.swap` puts in a new one (a reload) without touching requests in flight.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import random
import time
from collections.abc import Awaitable, Coroutine
from typing import TYPE_CHECKING, Any, Final

import orjson

from sidecar.access_log import AccessLog
from sidecar.admission import Admission
from sidecar.config import Config, LimitsConfig, TimeoutsConfig
from sidecar.context import RequestContext
from sidecar.errors import (
    MethodNotAllowed,
    ModelNotFound,
    NotFound,
    Overloaded,
    RequestError,
    Shed,
    SidecarError,
    UpstreamError,
)
from sidecar.fdlimit import FD_RESERVE, BurstLog, client_budget, nofile_limit
from sidecar.gate import Gate, QueueFull, Waiter
from sidecar.handler import ClientConnection, ClientSide
from sidecar.health_check import HealthCheckers
from sidecar.http1 import ResponseHead
from sidecar.identity import identify
from sidecar.json_edit import JsonEditError, set_member, set_nested
from sidecar.lifecycle import (
    ADMITTED,
    AWAITING_HEAD,
    CONNECTING,
    DRAINING,
    QUEUED,
    SETTLED,
    STREAMING,
    Decision,
    Lifecycle,
    Outcome,
    Proceed,
    Retry,
)
from sidecar.meter import Meter
from sidecar.metrics import CONTENT_TYPE, Exporter, Metrics, Share
from sidecar.outcome import estimate_usage, outcome_of, take_attempt
from sidecar.pricing import PriceTable
from sidecar.ratelimit.backends import limit_backend
from sidecar.ratelimit.limiter import Limiter
from sidecar.ratelimit.spend import SpendLedger
from sidecar.readiness import readiness
from sidecar.request_reader import ParsedRequest
from sidecar.responses import error_for, stream_error_event
from sidecar.retry import STATUS_REASONS, RetryReason, parse_retry_after
from sidecar.runtime import Route, Runtime
from sidecar.scrub import SecretScrubber, mask_headers, request_secrets
from sidecar.splice import Exchange, Sweeper
from sidecar.sse import UsageChunkStripper, make_tap
from sidecar.tokenizer import Tokenizer
from sidecar.translate import (
    UPSTREAM_PATH,
    client_headers,
    request_bytes,
    response_filter,
    upstream_target,
)
from sidecar.upstream import UpstreamConnection, UpstreamPool

if TYPE_CHECKING:
    from sidecar.auth import KeyWatcher

log = logging.getLogger("sidecar.proxy")

LOCAL_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})
METRICS_PATH = "/metrics"
# Shutdown: how often to look whether in-flight requests have finished, and how
# long cut ones get to settle (meter rows, estimates) before connections are aborted.
DRAIN_POLL_S = 0.05
DRAIN_SETTLE_S = 2.0
# Coarsest resolution of the client idle timeout (the idle sweep's period).
IDLE_SWEEP_MAX_INTERVAL = 1.0
# A reused keep-alive connection that the provider closed while idle fails before
# any byte comes back; one retry on a fresh connection is safe and invisible.
MAX_STALE_RETRIES = 1

_OK: Final = Outcome.OK
_CLIENT_DISCONNECT: Final = Outcome.CLIENT_DISCONNECT
_SHUTDOWN: Final = Outcome.SHUTDOWN
_REJECTED: Final = Outcome.REJECTED
_UPSTREAM_ERROR: Final = Outcome.UPSTREAM_ERROR
_CAUSE_CONNECT: Final = RetryReason.CONNECT
_CAUSE_429: Final = RetryReason.STATUS_429
_SHED: Final = Outcome.SHED
TIER_HEADER: Final = b"x-sidecar-tier"

# A queued attempt: the flight, the upstream index it waits for, and whether it must
# run on a fresh connection (a replay).
Queued = tuple["Flight", int, bool]


def _is_loopback(ip: str | None) -> bool:
    if ip is None:
        return False
    try:
        addr = ipaddress.ip_address(ip.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return addr.is_loopback


def _client_sweep_period(t: TimeoutsConfig) -> float:
    # Fine enough that no client deadline fires later than a quarter of itself past due.
    return min(IDLE_SWEEP_MAX_INTERVAL, t.client_idle / 4, t.request_head / 4,
               t.request_body / 4)


# Nginx (and proxies that honour it) must pass an event stream on as it comes, whatever
# its proxy_buffering says: the sidecar's own promise of unbuffered streaming.
_NO_BUFFERING: Final = (b"x-accel-buffering", b"no")


def _is_event_stream(head: ResponseHead) -> bool:
    ctype = head.get(b"content-type")
    return ctype is not None and ctype.split(b";", 1)[0].strip().lower() == b"text/event-stream"


class Flight(Lifecycle):
    """One request between dispatch and its meter row.

    It is the request's lifecycle (phase), the handler its attempts report to
    (``on_head``, ``on_end``), and the listener of its client connection's events
    (``client_gone``, ``pause``, ``resume``): one object, no closure per request.
    """

    __slots__ = ("body", "client", "ctx", "drained", "ended_by", "exchange", "failed", "index",
                 "limits",
                 "payload", "pool", "prices", "proxy", "replays", "req", "route", "sse",
                 "strip", "task", "tried", "waiter", "xlate")

    def __init__(self, req: ParsedRequest, client: ClientSide, ctx: RequestContext,
                 proxy: Proxy, route: Route, limits: LimitsConfig, prices: PriceTable) -> None:
        self.phase = ADMITTED  # Lifecycle's own start, without a super() call per request
        self.proxy = proxy
        self.req = req
        self.client = client
        self.ctx = ctx
        # Of the runtime snapshot it started with, kept to its end.
        self.route = route
        self.limits = limits
        self.prices = prices
        self.pool: UpstreamPool
        self.index = 0  # of the upstream the current attempt runs on, in the route
        self.tried = 0  # bit i: the route's upstream i was tried
        self.replays = 0  # replay-safe retries on a fresh connection
        self.failed: list[tuple[str, str]] | None = None  # (upstream, cause) per failover
        # The parsed request body, kept until an attempt is committed: a failover to
        # another upstream may need it rebuilt (usage opt-in, format).
        self.body: dict[str, Any] | None = None
        self.sse = False  # the committed response is an event stream
        # The body sent upstream: req.body itself unless include_usage was injected.
        # The head is rebuilt per attempt rather than kept for the life of the stream.
        self.payload = b""
        self.strip = False  # hide the usage chunk we asked for from the client
        # The current attempt's upstream speaks the other format: its request was
        # translated (payload) and its answer is translated back (sidecar.translate).
        self.xlate = False
        self.exchange: Exchange | None = None
        self.task: asyncio.Task[None] | None = None  # connecting (or admitting)
        self.waiter: Waiter[Queued] | None = None  # queued for a slot (sidecar.gate)
        # Set when the sidecar itself ends the request (shutdown's deadline): the row's
        # outcome, whatever the attempt saw, and no further attempt.
        self.ended_by: Outcome | None = None
        self.drained = False  # its attempt is read to the end after the client left

    # -- the sweeper's question, passed to the attempt (if one is running) ------------
    def check_deadlines(self, now: float) -> None:
        ex = self.exchange
        if ex is not None:
            ex.check_deadlines(now)

    # -- AttemptHandler ------------------------------------------------------------------
    def on_head(self, head: ResponseHead) -> Decision:
        """The provider's head is in and nothing is committed: fail over on a status
        the route retries on (when it may), or commit and relay."""
        cause = STATUS_REASONS.get(head.status)
        if cause is not None:
            retry = self.proxy._head_failed(self, head, cause)
            if retry is not None:
                return retry
        self.advance(STREAMING)
        # A provider's error answer may echo this request's credentials (the upstream's
        # key, the client's): found before the head is forgotten, masked in the relayed
        # head and body (sidecar.scrub). Success answers are not scanned.
        secrets = request_secrets(self.pool.cfg.api_key, self.req.headers) \
            if head.status >= 400 else ()
        # No attempt will need the request again: let the client's headers, target and
        # the parsed body go for the rest of the stream.
        self.req.forget_head()
        body, self.body = self.body, None
        extra = self.pool.response_headers(self.ctx.attempts)
        if self.ctx.rate_headers:
            extra = (*extra, *self.ctx.rate_headers)
        if secrets:
            head.headers = mask_headers(head.headers, secrets)
        if not head.has_body:
            return None, None, extra
        sse = self.sse = _is_event_stream(head)
        if sse:
            extra = (*extra, _NO_BUFFERING)
        if self.xlate:
            tap, body_filter, extra = self._translated(head, sse, body, extra)
        else:
            tap = make_tap(self.ctx.api_format, self.ctx.path, sse,
                           body_cap=self.limits.tap_body_bytes)
            strip = self.strip and sse and head.status < 300
            body_filter = UsageChunkStripper() if strip else None
        if secrets:
            body_filter = SecretScrubber(secrets, body_filter)
        return tap, body_filter, extra

    def _translated(self, head: ResponseHead, sse: bool, body: dict[str, Any] | None,
                    extra: tuple[tuple[bytes, bytes], ...]) -> Proceed:
        """The head of an upstream of the other format: its tap reads the upstream's
        own bytes (the meter's usage), and its body goes to the client translated."""
        fmt = self.pool.cfg.format
        cap = self.limits.tap_body_bytes
        tap = make_tap(fmt, UPSTREAM_PATH[fmt], sse, body_cap=cap)
        opts = body.get("stream_options") if body is not None else None
        usage = isinstance(opts, dict) and opts.get("include_usage") is True
        return tap, response_filter(self.route.table.format, sse, head.status, usage,
                                    cap, int(time.time())), extra

    def on_end(self, ex: Exchange) -> None:
        self.proxy._attempt_ended(self, ex)

    def stream_error(self, error: SidecarError) -> bytes | None:
        if not self.sse:
            return None
        # In the format the client reads: a translated stream is in the route's.
        fmt = self.route.table.format if self.xlate else self.ctx.api_format
        return stream_error_event(fmt, error)

    def note_failure(self, upstream: str, cause: RetryReason) -> None:
        """An attempt failed over: its upstream and why, for the row."""
        if self.failed is None:
            self.failed = []
        self.failed.append((upstream, cause.value))
        self.ctx.failed_attempts = orjson.dumps(
            [{"upstream": u, "reason": r} for u, r in self.failed]).decode()

    def end_by(self, outcome: Outcome) -> None:
        """End the request from outside: cut its attempt, or stop its connect."""
        self.ended_by = outcome
        ex = self.exchange
        if ex is not None:
            ex.client_gone()  # settles through on_end
        elif self.waiter is not None:
            self.proxy._unqueue(self, outcome)
        elif self.task is not None and not self.task.done():
            self.task.cancel()

    # -- ClientEvents --------------------------------------------------------------------
    def client_gone(self) -> None:
        if self.drained:
            return  # told again (EOF, then the connection's loss): it is draining already
        ex = self.exchange
        if ex is not None:
            if self.route.table.route.on_client_disconnect == "drain" \
                    and self.proxy._start_drain(self, ex):
                return
            ex.client_gone()
        elif self.waiter is not None:
            self.proxy._unqueue(self, _CLIENT_DISCONNECT)
        elif self.task is not None and not self.task.done():
            # Still connecting: nothing upstream to abort yet, so stop the task.
            self.task.cancel()

    def pause(self) -> None:
        if self.exchange is not None:
            self.exchange.pause()

    def resume(self) -> None:
        if self.exchange is not None:
            self.exchange.resume()


class Proxy:
    def __init__(self, config: Config, meter: Meter, tokenizer: Tokenizer,
                 admission: Admission | None = None, share: Share | None = None) -> None:
        self.meter = meter
        self.tokenizer = tokenizer
        self.loop = asyncio.get_running_loop()
        self.runtime = Runtime.build(config)
        # /metrics (sidecar.metrics): counted at each row's end, read at scrape time.
        # None when metrics.enabled is false: the hot path then pays one test.
        mc = config.metrics
        self.metrics: Metrics | None = Metrics(mc.per_key, mc.max_models, mc.max_keys) \
            if mc.enabled else None
        self.access_log: AccessLog | None = AccessLog(config.access_log, self.loop) \
            if config.access_log is not None else None
        self.exporter: Exporter | None = Exporter(
            self.metrics, meter, self.access_log, share) if self.metrics is not None else None
        # Without metrics.listen the main listener answers /metrics, to loopback peers.
        self.metrics_here = self.exporter is not None and mc.listen_port is None
        # Token buckets (sidecar.ratelimit): a route without a token_limiter pays one
        # attribute test. The backend is chosen at start (limits.backend is restart-only).
        self.admission: Admission = admission if admission is not None else Limiter(
            limit_backend(config.limits), tokenizer)
        # API keys (identity: api_key routes): an index of the keys file, refreshed by a
        # task of its own when `sidecar keys` changes it; the hot path reads .current.
        self.keys: KeyWatcher | None = None
        self._keys_task: asyncio.Task[None] | None = None
        self._spend_task: asyncio.Task[None] | None = None
        self._watch_keys(config)
        # Active health checks (health_check upstreams): tasks of their own; routing
        # reads only their verdict, a flag on each pool's health.
        self.health_checks = HealthCheckers()
        self.health_checks.sync(self.runtime.upstreams)
        self.connections: set[ClientConnection] = set()
        self.tasks: set[asyncio.Task[None]] = set()
        self.flights: set[Flight] = set()
        # The sweeper walks the requests in flight, each asking its exchange.
        self.sweeper = Sweeper.for_timeouts(self.loop, config.timeouts, self.flights)
        # A plain attribute, not a property: every response head reads it.
        self.draining = False
        self.drains = 0  # responses read on after their client left (on_client_disconnect)
        self._rand = random.random
        # Idle keep-alive clients are closed, and requests read too slowly answered 408,
        # by one periodic sweep, not a timer each.
        self._idle_period = _client_sweep_period(config.timeouts)
        # Client connections the descriptor limit carries (sidecar.fdlimit); the
        # smaller of it and max_connections is the one comparison a connect pays.
        self._nofile = nofile_limit()
        self._fd_log = BurstLog(log, "out of file descriptors for client connections")
        # Other listeners' connections (metrics.listen) that the client sweep also checks
        # (idle timeout, request deadlines): one sweep for every client connection.
        self.swept: list[set[ClientConnection]] = []
        self._conn_cap = self._connection_cap(config)
        self._idle_handle: asyncio.TimerHandle | None = self.loop.call_later(
            self._idle_period, self._sweep_idle)

    @property
    def config(self) -> Config:
        return self.runtime.config

    def swap(self, config: Config) -> Runtime:
        """Serve ``config`` from now on (a reload). Requests in flight finish on the
        snapshot they started with; upstreams the new config dropped or changed are
        retired (their streaming connections close when the stream ends)."""
        old = self.runtime
        self.runtime = new = Runtime.build(config, previous=old)
        old.upstreams.retire_except(new.upstreams)
        self._watch_keys(config)
        self.health_checks.sync(new.upstreams)
        self.sweeper.interval = Sweeper.interval_for(config.timeouts)
        self._idle_period = _client_sweep_period(config.timeouts)
        self._conn_cap = self._connection_cap(config)
        return new

    def _watch_keys(self, config: Config) -> None:
        if self.keys is not None or not any(r.identity == "api_key" for r in config.routes):
            return
        from sidecar.auth import KeyWatcher

        self.keys = KeyWatcher(config.auth.keys_db, config.auth.refresh)
        self._keys_task = self.loop.create_task(self.keys.run(), name="keys-watch")
        if isinstance(self.admission, Limiter) and config.meter.db != ":memory:":
            # Key budgets: the spend per key, read from the meter (every worker's rows).
            keys = self.keys
            ledger = self.admission.spend = SpendLedger(
                config.meter.db, config.auth.refresh,
                wanted=lambda: keys.current.has_budgets)
            self._spend_task = self.loop.create_task(ledger.run(), name="spend-ledger")

    def _connection_cap(self, config: Config) -> int:
        idle = sum(u.pool_max_idle for u in config.upstreams.values())
        budget = client_budget(self._nofile, idle)
        if budget < config.limits.max_connections:
            # Info, not a warning: it only matters if that many clients come, and then
            # the burst itself is logged as an error.
            log.info("limits.max_connections is %d but RLIMIT_NOFILE %d carries about %d "
                        "client connections (each with a provider connection, %d idle pool "
                        "connections, %d reserved); connections past it get 503: raise "
                        "LimitNOFILE / ulimit -n", config.limits.max_connections,
                        self._nofile, budget, idle, FD_RESERVE)
        return min(config.limits.max_connections, budget)

    def _sweep_idle(self) -> None:
        now = self.loop.time()
        cutoff = now - self.runtime.timeouts.client_idle
        for conn in list(self.connections):
            conn.sweep(now, cutoff)
        for others in self.swept:
            for conn in list(others):
                conn.sweep(now, cutoff)
        self._fd_log.end_if_quiet(now)
        self._idle_handle = self.loop.call_later(self._idle_period, self._sweep_idle)

    # -- task tracking: every task is kept until done, none orphaned ---------------
    def spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = self.loop.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("request handler crashed", exc_info=task.exception())

    # -- RequestHandler: what the client connections see -----------------------------
    @property
    def limits(self) -> LimitsConfig:
        return self.runtime.limits

    @property
    def timeouts(self) -> TimeoutsConfig:
        return self.runtime.timeouts

    def precheck(self, req: ParsedRequest) -> SidecarError | None:
        path = req.target.split(b"?", 1)[0].decode("latin-1")
        if path in LOCAL_PATHS or path in self.runtime.routes:
            return None
        return NotFound(f"no route for {path}")

    def connection_opened(self, conn: ClientConnection) -> bool:
        self.connections.add(conn)
        n = len(self.connections)
        if n <= self._conn_cap:
            return True
        if n <= self.runtime.limits.max_connections:
            # Under max_connections but past what RLIMIT_NOFILE carries: refused now,
            # with a 503, rather than dropped unseen by libuv at EMFILE (sidecar.fdlimit).
            self._fd_log.hit(self.loop.time(), f"{n - 1} client connections open, "
                             f"RLIMIT_NOFILE {self._nofile} carries {self._conn_cap}; "
                             f"refusing new connections with 503 (raise LimitNOFILE / ulimit -n)")
        return False

    def connection_closed(self, conn: ClientConnection) -> None:
        self.connections.discard(conn)

    def trusts(self, transport: asyncio.BaseTransport) -> bool:
        runtime = self.runtime
        if not runtime.trusted:  # the default: no peer sets identity headers
            return False
        peer = transport.get_extra_info("peername")
        return isinstance(peer, tuple) and runtime.trusts(str(peer[0]))

    def handle(self, req: ParsedRequest, client: ClientSide) -> None:
        """Answer one complete request, synchronously when it can be.

        With a kept-alive provider connection free (the steady state), the request
        is written upstream right here, inside the client's read callback, and the
        relay runs on protocol callbacks: no task, no extra loop turn before the
        provider sees it. Only opening a new provider connection needs a task.
        """
        if req.path in LOCAL_PATHS:
            self._local(req, client)
            return
        runtime = self.runtime
        route = runtime.routes.get(req.path)
        if route is None:
            self._reply_error(client, NotFound(f"no route for {req.path}"))
            client.cycle_done(True)
            return
        path = route.table.route.path
        ctx = RequestContext(
            # Decoded when the row is complete (_complete): the id's bytes are on the
            # request already, and a str copy per open stream is ~70 bytes.
            request_id="",
            ts_ms=req.ts_ms,
            t_received=req.t_received,
            # The route's own string (equal to the path, or it would not have matched):
            # the one decoded from this request would stay alive with the stream.
            path=path,
            route=path,
            bytes_in=len(req.body),
            tier=self._tier(req, runtime) if client.peer_trusted else runtime.default_tier,
        )
        flight = Flight(req, client, ctx, self, route, runtime.limits, runtime.prices)
        try:
            flight.body = self._inspect(req, ctx)
            if route.table.route.models:  # this path's routes match by model
                flight.route = self._route_for_model(runtime, path, ctx.model)
            route = flight.route
            if route.identity != "none":
                identify(route.identity, req.headers, client.peer_trusted,
                         self.keys.current if self.keys is not None else None,
                         runtime, ctx)
            pending = self.admission.admit(req, flight.body, ctx, route, client)
        except SidecarError as exc:
            self._refuse(flight, exc)
            return
        client.follow(flight)
        self.flights.add(flight)
        route = flight.route
        if route.can_fail_over:  # a one-upstream route has nothing to spend a budget on
            route.budget.request(self.loop.time())
        if pending is None:
            self._attempt(flight)
        else:
            flight.task = self.spawn(self._admit_then_attempt(flight, pending))

    def _inspect(self, req: ParsedRequest, ctx: RequestContext) -> dict[str, Any]:
        """Validate the request and read what the row and admission need from its body."""
        if req.method != b"POST":
            raise MethodNotAllowed(f"{req.method.decode()} is not allowed on {req.path}; use POST")
        try:
            body = orjson.loads(req.body)
        except orjson.JSONDecodeError as exc:
            raise RequestError(f"request body is not valid JSON: {exc.msg}") from None
        if not isinstance(body, dict):
            raise RequestError("request body must be a JSON object")
        model = body.get("model")
        ctx.model = model if isinstance(model, str) else None
        ctx.stream = body.get("stream") is True
        return body

    @staticmethod
    def _tier(req: ParsedRequest, runtime: Runtime) -> str:
        """The tier a trusted peer (the Nginx in front) named; unknown or none: the last."""
        for name, value in req.headers:
            if name == TIER_HEADER:
                return runtime.tier_names.get(value, runtime.default_tier)
        return runtime.default_tier

    @staticmethod
    def _route_for_model(runtime: Runtime, path: str, model: str | None) -> Route:
        route = runtime.route_for_model(path, model)
        if route is None:
            raise ModelNotFound(f"no route for model {model!r} on {path}"
                                if model is not None else
                                f"requests to {path} must name a model")
        return route

    async def _admit_then_attempt(self, flight: Flight, pending: Awaitable[None]) -> None:
        try:
            await pending
        except SidecarError as exc:
            flight.task = None
            self._refuse(flight, exc)
            return
        except asyncio.CancelledError:
            self._cancelled(flight)
            raise
        flight.task = None
        self._attempt(flight)

    # -- attempts: the first, and failovers before the first byte -----------------------
    def _attempt(self, flight: Flight) -> None:
        """Start an attempt on the upstream the route's strategy picks."""
        route = flight.route
        now = self.loop.time()
        i = route.balancer.pick(route.health, now, flight.tried)
        if i is None:
            # Every untried upstream is ejected or cooling. A failover never gets here
            # (it asks has_candidate first); a first attempt still goes somewhere.
            i = route.balancer.pick(route.panic, now, flight.tried)
            if i is None:
                self._refuse(flight, Overloaded(
                    f"route {flight.ctx.route} has no upstream to serve it"))
                return
        gate = route.pools[i].gate
        if gate is not None and route.can_fail_over and gate.running >= gate.limit:
            # The pick is full: another available upstream with a free slot serves at once
            # rather than the request queueing (queue on the first pick when none has).
            j = route.balancer.pick(route.health, now, flight.tried | 1 << i)
            if j is not None:
                other = route.pools[j].gate
                if other is None or other.running < other.limit:
                    i = j
        self._start_attempt(flight, i, now, fresh=False)

    def _start_attempt(self, flight: Flight, i: int, now: float, fresh: bool,
                       entered: bool = False) -> None:
        """Run an attempt on the route's upstream ``i`` (``entered``: its slot is held)."""
        route, ctx = flight.route, flight.ctx
        xlate = route.table.translate[i]
        payload = b""
        if xlate:
            translated = self._translate(flight, i, entered)
            if translated is None:
                return
            payload = translated
        if not entered:
            gate = route.pools[i].gate
            if gate is not None and not gate.try_enter():
                self._queue(flight, i, fresh, gate)
                return
        flight.index = i
        flight.tried |= 1 << i
        upstream = route.table.upstreams[i]
        flight.pool = pool = route.pools[i]
        ctx.upstream = upstream.name
        ctx.api_format = upstream.format
        ctx.attempts += 1
        flight.xlate = xlate
        if xlate:
            flight.payload = payload
        else:
            flight.payload = self._payload(flight, upstream.format, route.table.renames[i])
        if not ctx.journal_seq:
            journal = self.meter.journal
            if journal is not None:
                # Before a byte goes upstream: a crash from here on leaves the request
                # open in the journal, and the next start records it (interrupted).
                ctx.journal_seq = journal.admit(ctx, flight.req.request_id.decode())
        pool.health.begin(now)
        conn = None if fresh else pool.take_idle()
        if conn is not None:
            self._launch(flight, conn)
        else:
            flight.advance(CONNECTING)
            flight.task = self.spawn(self._connect_and_launch(flight))

    def _translate(self, flight: Flight, i: int, entered: bool) -> bytes | None:
        """The request translated for the route's upstream ``i``, which speaks the other
        format; None when it cannot be (refused with 400 naming the field, and the
        slot given up if one was held)."""
        route = flight.route
        upstream = route.table.upstreams[i]
        rename = route.table.renames[i]
        flight.strip = False
        flight.ctx.upstream_model = rename
        if flight.body is None:  # never: the body is kept until an attempt commits
            return flight.req.body
        try:
            return request_bytes(flight.body, route.table.format, upstream.format,
                                 upstream.default_max_tokens, rename)
        except RequestError as exc:
            gate = route.pools[i].gate
            if entered and gate is not None:
                waiter = gate.leave()
                if waiter is not None:
                    self._dequeue(waiter)
            flight.ctx.upstream = upstream.name
            self._refuse(flight, exc)
            return None

    def _payload(self, flight: Flight, api_format: str, rename: str | None) -> bytes:
        """The body this upstream gets: the client's bytes, unless usage must be asked
        for or the route sends this upstream another model name."""
        body = flight.body
        flight.strip = False
        flight.ctx.upstream_model = rename
        raw = flight.req.body
        if body is None:
            return raw
        # Edited in the client's own bytes (sidecar.json_edit), never re-serialised:
        # big integers, 1E2, key order and escapes reach the provider as sent.
        usage = False
        if flight.ctx.stream and api_format == "openai" and flight.route.table.usage_opt_in:
            opts = body.get("stream_options")
            # Ask the provider for usage; hide the extra chunk from a client that did not.
            usage = flight.strip = not (isinstance(opts, dict)
                                        and opts.get("include_usage") is True)
        if rename is None and not usage:
            return raw
        try:
            if rename is not None:
                raw = set_member(raw, "model", orjson.dumps(rename))
            if usage:
                raw = set_nested(raw, "stream_options", "include_usage", b"true")
        except JsonEditError:
            # orjson accepted what the editor cannot walk (should not happen): the lossy
            # rewrite is still a correct request.
            log.warning("request body edited by re-serialising it (byte edit failed)")
            edited = {**body, "model": rename} if rename is not None else dict(body)
            if usage:
                opts = body.get("stream_options")
                edited["stream_options"] = {**(opts if isinstance(opts, dict) else {}),
                                            "include_usage": True}
            return bytes(memoryview(orjson.dumps(edited)))  # right-sized (see translate)
        return raw

    async def _connect_and_launch(self, flight: Flight) -> None:
        try:
            conn = await flight.pool.connect()
        except SidecarError as exc:
            flight.task = None
            if self._connect_failed(flight, exc):
                return
            self._refuse(flight, exc)
            return
        except asyncio.CancelledError:
            self._release(flight)
            self._cancelled(flight)
            raise
        flight.task = None
        if flight.client.closed:
            conn.close()
            self._release(flight)
            flight.ctx.outcome = _CLIENT_DISCONNECT
            flight.advance(DRAINING)
            self._complete(flight, reusable=False)
            return
        self._launch(flight, conn)

    def _connect_failed(self, flight: Flight, exc: SidecarError) -> bool:
        """A connect failed: count it against the upstream; True when failing over."""
        pool, now = flight.pool, self.loop.time()
        self._release(flight)
        pool.health.record_failure(now)
        if not self._may_fail_over(flight, _CAUSE_CONNECT, now):
            return False
        flight.note_failure(pool.cfg.name, _CAUSE_CONNECT)
        self._attempt(flight)
        return True

    def _cancelled(self, flight: Flight) -> None:
        # The client left, or shutdown's deadline passed, before the provider answered.
        ctx = flight.ctx
        ctx.outcome = flight.ended_by or (_SHUTDOWN if self.draining else _CLIENT_DISCONNECT)
        ctx.error = "request cancelled before the provider answered"
        flight.advance(DRAINING)
        self._complete(flight, reusable=False)

    def _launch(self, flight: Flight, conn: UpstreamConnection) -> None:
        flight.advance(AWAITING_HEAD)
        req = flight.req
        ex = Exchange(
            pool=flight.pool,
            conn=conn,
            client=flight.client,
            handler=flight,
            max_head=flight.limits.max_header_bytes,
            sweeper=self.sweeper,
        )
        flight.exchange = ex
        if flight.client.paused_writing:
            ex.pause()
        target, headers = req.target, req.headers
        if flight.xlate:
            fmt = flight.pool.cfg.format
            target = upstream_target(target, flight.route.table.format, fmt)
            headers = client_headers(headers, fmt)
        client = flight.client
        peer = client.peer_ip
        head = flight.pool.head.build(req.method, target, headers,
                                      len(flight.payload), req.request_id,
                                      peer.encode() if peer else b"", client.peer_trusted)
        ex.start(head + flight.payload)

    def _may_fail_over(self, flight: Flight, cause: RetryReason, now: float) -> bool:
        """May this request, failed before its first byte for ``cause``, try another
        upstream? The route must retry on it, the request have attempts left, some
        untried upstream be available, and the route's retry budget allow one more."""
        route = flight.route
        policy = route.policy
        return (cause in policy.retry_on
                and flight.ctx.attempts < policy.max_attempts
                and flight.ended_by is None
                and not flight.client.closed
                and route.balancer.has_candidate(route.health, now, flight.tried)
                and route.budget.try_spend(now))

    def _head_failed(self, flight: Flight, head: ResponseHead,
                     cause: RetryReason) -> Retry | None:
        """A 429/5xx head, nothing committed: cool the upstream down if it asked, and
        end the attempt for a failover when one is allowed (else the head is relayed)."""
        pool, now, status = flight.pool, self.loop.time(), head.status
        retry_after = None
        if status == 429 or status == 503:
            retry_after = parse_retry_after(head.get(b"retry-after"), time.time())
            if retry_after:
                pool.health.cool_down(now, retry_after)
        if not self._may_fail_over(flight, cause, now):
            return None
        return Retry(outcome_of(_OK, status),
                     UpstreamError(f"upstream '{pool.cfg.name}' answered {status}"),
                     retry_after, cause, granted=True)

    def _start_drain(self, flight: Flight, ex: Exchange) -> bool:
        """The client left a drain route's request: read the provider on for its usage,
        unless limits.max_drains are already draining or the sidecar is stopping."""
        if self.draining or flight.ended_by is not None:
            return False
        runtime = self.runtime
        if self.drains >= runtime.limits.max_drains:
            log.info("client left %s: %d responses already draining (limits.max_drains); "
                     "aborting this one", flight.ctx.route, self.drains)
            return False
        self.drains += 1
        flight.drained = True
        ex.drain(self.loop.time() + runtime.timeouts.drain)
        return True

    def _attempt_ended(self, flight: Flight, ex: Exchange) -> None:
        """An attempt ended (completed, failed, cut): fail over, retry, or settle."""
        flight.exchange = None
        if flight.drained:
            flight.drained = False
            self.drains -= 1
        ctx, health, now = flight.ctx, flight.pool.health, self.loop.time()
        self._release(flight)
        retry = ex.retry
        if ex.committed:
            status = ex.head.status if ex.head is not None else 0
            if ex.outcome is _OK and status < 500:
                t = ex.t_first_byte
                health.record_success(now, None if t is None else t - ctx.t_received)
            elif ex.outcome is not _CLIENT_DISCONNECT and ex.outcome is not _SHUTDOWN:
                health.record_failure(now)
        elif retry is not None and not retry.replay_safe and retry.cause is not _CAUSE_429:
            health.record_failure(now)
        if retry is not None and not ex.committed and flight.ended_by is None \
                and not flight.client.closed:
            if retry.replay_safe and flight.replays < MAX_STALE_RETRIES:
                # The provider never read it: the same request on a fresh connection.
                flight.replays += 1
                ctx.attempts -= 1  # invisible: not an attempt of its own
                self._start_attempt(flight, flight.index, now, fresh=True)
                return
            cause = retry.cause
            if cause is not None and (retry.granted or self._may_fail_over(flight, cause, now)):
                flight.note_failure(flight.pool.cfg.name, cause)
                self._attempt(flight)
                return
        if flight.xlate:  # the estimate counts the request the upstream was sent
            take_attempt(ctx, ex, flight.payload, UPSTREAM_PATH[flight.pool.cfg.format])
        else:
            take_attempt(ctx, ex, flight.req.body)
        if flight.ended_by is not None:
            ctx.outcome = flight.ended_by
        if ex.error is not None and not ex.committed and ex.outcome is not _CLIENT_DISCONNECT \
                and flight.ended_by is None:
            self._refuse(flight, ex.error)
            return
        flight.advance(DRAINING)
        self._complete(flight, reusable=ex.outcome is _OK)

    # -- max_concurrent: slots, the wait queue, shedding ---------------------------------
    def _release(self, flight: Flight) -> None:
        """The attempt on flight.pool is over: free its slot, to the next waiter if any."""
        pool = flight.pool
        pool.health.end()
        gate = pool.gate
        if gate is not None:
            waiter = gate.leave()
            if waiter is not None:
                self._dequeue(waiter)

    def _queue(self, flight: Flight, i: int, fresh: bool, gate: Gate[Queued]) -> None:
        """Upstream ``i`` is at max_concurrent: wait for a slot in tier order, or be shed."""
        rank = self.runtime.tier_rank.get(flight.ctx.tier or "", len(self.runtime.tier_rank))
        try:
            waiter = gate.wait(rank, (flight, i, fresh))
        except QueueFull:
            self._shed(flight, i, gate, f"{gate.limit} requests running and {gate.queued} "
                                        f"waiting (max_queue)")
            return
        waiter.handle = self.loop.call_later(gate.timeout, self._waited_too_long, waiter, gate)
        flight.waiter = waiter
        flight.advance(QUEUED)

    def _dequeue(self, waiter: Waiter[Queued]) -> None:
        """A slot passed to ``waiter``: its attempt runs now."""
        flight, i, fresh = waiter.item
        flight.waiter = None
        if waiter.handle is not None:
            waiter.handle.cancel()
        self._start_attempt(flight, i, self.loop.time(), fresh, entered=True)

    def _waited_too_long(self, waiter: Waiter[Queued], gate: Gate[Queued]) -> None:
        flight, i, _ = waiter.item
        gate.cancel(waiter)
        flight.waiter = None
        self._shed(flight, i, gate, f"no slot within queue_timeout ({gate.timeout:g}s)")

    def _unqueue(self, flight: Flight, outcome: Outcome) -> None:
        """A queued request ends before its turn (client gone, shutdown)."""
        waiter = flight.waiter
        assert waiter is not None
        _, i, _ = waiter.item
        gate = flight.route.pools[i].gate
        assert gate is not None
        gate.cancel(waiter)
        if waiter.handle is not None:
            waiter.handle.cancel()
        flight.waiter = None
        ctx = flight.ctx
        ctx.outcome, ctx.error = outcome, "left the queue before a slot was free"
        ctx.upstream = flight.route.table.upstreams[i].name
        flight.advance(DRAINING)
        self._complete(flight, reusable=False)

    def _shed(self, flight: Flight, i: int, gate: Gate[Queued], why: str) -> None:
        """Refuse at once with 503 + retry-after: the upstream is at capacity."""
        ctx = flight.ctx
        name = flight.route.table.upstreams[i].name
        ctx.upstream = name
        ctx.outcome = _SHED
        self._refuse(flight, Shed(f"upstream '{name}' is at capacity: {why}; retry later"),
                     ((b"retry-after", b"%d" % gate.retry_after()),))

    def _refuse(self, flight: Flight, exc: SidecarError,
                extra: tuple[tuple[bytes, bytes], ...] = ()) -> None:
        """Answer with an OpenAI-style error (nothing was sent yet) and settle the row."""
        flight.advance(DRAINING)
        ctx = flight.ctx
        ctx.status, ctx.error = exc.status, str(exc)
        if ctx.outcome == _OK:
            ctx.outcome = _REJECTED if isinstance(exc, RequestError) else _UPSTREAM_ERROR
        if ctx.attempts:
            extra = (*flight.pool.response_headers(ctx.attempts), *extra)
        ctx.bytes_out += self._reply_error(flight.client, exc, extra)
        self._complete(flight, reusable=True)

    def _complete(self, flight: Flight, reusable: bool) -> None:
        """Release the client for its next request, then settle and queue the row."""
        self.flights.discard(flight)
        ctx = flight.ctx
        ctx.request_id = flight.req.request_id.decode()
        t_end = time.perf_counter()
        flight.client.cycle_done(reusable)
        if ctx.pending_estimate is not None:
            self.spawn(self._estimate_then_submit(flight, t_end))
        else:
            self._submit(flight, t_end)

    async def _estimate_then_submit(self, flight: Flight, t_end: float) -> None:
        """Count tokens off the loop (tiktoken releases the GIL), then queue the row.

        Runs after the client's cycle is done, so an estimate never delays a response.
        """
        try:
            await self.loop.run_in_executor(None, estimate_usage, flight.ctx, self.tokenizer)
        finally:
            # Even when cancelled at the shutdown deadline, the row goes in.
            self._submit(flight, t_end)

    def _submit(self, flight: Flight, t_end: float) -> None:
        ctx = flight.ctx
        self.admission.settle(ctx)
        row = ctx.to_record(t_end)  # fills the token columns (reported or estimated)
        # Priced as the model the provider was sent (a route may rename it).
        row.cost_usd = flight.prices.cost(
            row.upstream_model or row.model, row.prompt_tokens, row.completion_tokens,
            row.cache_read_tokens, row.cache_write_tokens)
        self.meter.submit(row)
        metrics = self.metrics
        if metrics is not None:
            metrics.observe(row, flight.failed, ctx.max_gap)
        log = self.access_log
        if log is not None:
            log.write(row)
        flight.advance(SETTLED)

    # -- local answers ----------------------------------------------------------------
    def _local(self, req: ParsedRequest, client: ClientSide) -> None:
        if req.path == METRICS_PATH:
            self._metrics(req, client)
            return
        if req.path == "/readyz":
            status, body = readiness(self.runtime, self.loop.time(), self.draining)
        else:
            status, body = 200, b'{"status":"ok"}'
        client.reply(status, body)
        client.cycle_done(True)

    def _metrics(self, req: ParsedRequest, client: ClientSide) -> None:
        """``GET /metrics``: to loopback peers, unless metrics.listen serves it elsewhere
        (then, and to anyone else, this path does not exist here)."""
        if not self.metrics_here or not _is_loopback(client.peer_ip):
            self._reply_error(client, NotFound(f"no route for {req.path}"))
        else:
            self.serve_metrics(req, client)
        client.cycle_done(True)

    def serve_metrics(self, req: ParsedRequest, client: ClientSide) -> None:
        """The exposition, on whichever listener asked (the main one or metrics.listen)."""
        if req.method not in (b"GET", b"HEAD"):
            self._reply_error(client, MethodNotAllowed(
                f"{req.method.decode()} is not allowed on {req.path}; use GET"),
                ((b"allow", b"GET, HEAD"),))
        elif self.exporter is None:
            self._reply_error(client, NotFound("metrics are disabled (metrics.enabled)"))
        else:
            client.reply(200, self.exporter.render(self), content_type=CONTENT_TYPE)

    def _reply_error(self, client: ClientSide, exc: SidecarError,
                     extra: tuple[tuple[bytes, bytes], ...] = ()) -> int:
        status, body = error_for(exc)
        if exc.headers:
            extra = (*extra, *exc.headers)
        if isinstance(exc, MethodNotAllowed) and not any(n == b"allow" for n, _ in extra):
            extra = (*extra, (b"allow", b"POST"))
        return client.reply(status, body, extra)

    def rejected(self, req: ParsedRequest | None, request_id: bytes, status: int,
                 exc: SidecarError) -> None:
        """A request refused before it was complete (too large, malformed) still gets a row."""
        if req is None:
            return
        path = req.target.split(b"?", 1)[0].decode("latin-1")
        route = self.runtime.routes.get(path)
        if route is None:
            return
        ctx = RequestContext(request_id=request_id.decode(), ts_ms=int(time.time() * 1000),
                             t_received=time.perf_counter(), path=path,
                             route=route.table.route.path, status=status, outcome=_REJECTED,
                             error=str(exc))
        row = ctx.to_record(time.perf_counter())
        self.meter.submit(row)
        if self.metrics is not None:
            self.metrics.observe(row, None, None)
        if self.access_log is not None:
            self.access_log.write(row)

    # -- shutdown -------------------------------------------------------------------
    async def drain(self, grace: float) -> None:
        """Stop taking requests, let in-flight ones finish up to ``grace`` s, then cut them."""
        self.draining = True
        for conn in list(self.connections):
            conn.close_if_idle()
        await self.health_checks.close()
        for task in (self._keys_task, self._spend_task):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        spend = getattr(self.admission, "spend", None)
        if spend is not None:
            spend.close()
        deadline = self.loop.time() + grace
        while (self.flights or self.tasks) and self.loop.time() < deadline:
            await asyncio.sleep(min(DRAIN_POLL_S, max(0.0, deadline - self.loop.time())))
        for flight in list(self.flights):
            flight.end_by(_SHUTDOWN)
        for task in list(self.tasks):
            task.cancel()
        # Let the cut exchanges settle and the estimates finish (bounded).
        settle = self.loop.time() + DRAIN_SETTLE_S
        while (self.flights or self.tasks) and self.loop.time() < settle:
            await asyncio.sleep(DRAIN_POLL_S)
        for conn in list(self.connections):
            conn.abort()
        if self.access_log is not None:
            await self.access_log.close()
        self.runtime.upstreams.close()
        self.admission.close()
        self.sweeper.close()
        if self._idle_handle is not None:
            self._idle_handle.cancel()
            self._idle_handle = None
