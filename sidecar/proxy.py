"""The request handler: route, inspect the JSON body, run the exchange, meter.

A request with a kept-alive provider connection free starts synchronously in the
client's read callback; only opening a new provider connection takes a task.
The body relay itself runs on protocol callbacks inside ``splice.Exchange``, and
the end of an exchange settles the request through a done-callback (``_landed``).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any

import orjson

from sidecar.config import Config
from sidecar.context import RequestContext
from sidecar.errors import (
    MethodNotAllowed,
    NotFound,
    RequestError,
    SidecarError,
)
from sidecar.http1 import NO_HEADERS, ResponseHead
from sidecar.meter import Meter
from sidecar.responses import error_for, render
from sidecar.router import RouteTable
from sidecar.splice import Exchange, Sweeper
from sidecar.sse import Tap, UsageChunkStripper, make_tap
from sidecar.tokenizer import Tokenizer
from sidecar.upstream import UpstreamConnection, UpstreamPool
from sidecar.usage import Usage

if TYPE_CHECKING:
    from sidecar.downstream import DownstreamProtocol, ParsedRequest

log = logging.getLogger("sidecar.proxy")

# OpenAI paths whose streams report usage only when asked (stream_options.include_usage).
USAGE_OPT_IN_PATHS = frozenset({"/v1/chat/completions", "/v1/completions"})
LOCAL_PATHS = frozenset({"/healthz", "/readyz"})
# Shutdown: how often to look whether in-flight requests have finished, and how
# long cut ones get to settle (meter rows, estimates) before connections are aborted.
DRAIN_POLL_S = 0.05
DRAIN_SETTLE_S = 2.0
# Coarsest resolution of the client idle timeout (the idle sweep's period).
IDLE_SWEEP_MAX_INTERVAL = 1.0
# A reused keep-alive connection that the provider closed while idle fails before
# any byte comes back; one retry on a fresh connection is safe and invisible.
MAX_STALE_RETRIES = 1


def _outcome(exchange_outcome: str, status: int) -> str:
    """Meter outcome: a provider's refusal is not 'ok' even when relayed cleanly."""
    if exchange_outcome != "ok":
        return exchange_outcome
    if status == 429:
        return "rate_limited"
    if status >= 500:
        return "upstream_error"
    if status >= 400:
        return "rejected"
    return "ok"


def _may_have_billed(status: int, exchange_outcome: str) -> bool:
    """Did the provider accept work we have no usage for?

    A 2xx answer did; a refusal (4xx/5xx) did not. With no answer at all, only a
    request the client abandoned (or shutdown cut) may have been generating: a
    timeout or a connection failure means the provider never got going.
    """
    if status:
        return status < 300
    return exchange_outcome in ("client_disconnect", "shutdown")


def _is_event_stream(head: ResponseHead) -> bool:
    ctype = head.get(b"content-type")
    return ctype is not None and ctype.split(b";", 1)[0].strip().lower() == b"text/event-stream"


class Flight:
    """One request between dispatch and its meter row: what the callbacks share."""

    __slots__ = ("client", "ctx", "cut", "exchange", "payload", "pool", "proxy", "req", "strip")

    def __init__(self, req: ParsedRequest, client: DownstreamProtocol,
                 ctx: RequestContext, proxy: Proxy) -> None:
        self.proxy = proxy
        self.req = req
        self.client = client
        self.ctx = ctx
        self.pool: UpstreamPool
        # The body sent upstream: req.body itself unless include_usage was injected.
        # The head is rebuilt per attempt rather than kept for the life of the stream.
        self.payload = b""
        self.strip = False  # hide the usage chunk we asked for from the client
        self.exchange: Exchange | None = None
        self.cut = False  # shutdown's deadline passed while it was in flight

    def check_deadlines(self, now: float) -> None:
        """The sweeper's question, passed to the exchange (if one is running)."""
        ex = self.exchange
        if ex is not None:
            ex.check_deadlines(now)

    def __call__(self, ex: Exchange) -> None:
        """The exchange's on_end (the flight itself, not a closure per request)."""
        self.proxy._landed(self, ex)

    def filters(self, head: ResponseHead) -> tuple[Tap, UsageChunkStripper | None]:
        """The exchange's body filters, chosen once the provider's head is in."""
        # The provider answered: no retry will need the request head again, so let the
        # client's headers and target go for the rest of the stream.
        self.req.headers = NO_HEADERS
        self.req.target = b""
        sse = _is_event_stream(head)
        tap = make_tap(self.ctx.api_format, self.req.path, sse,
                       body_cap=self.proxy.config.limits.tap_body_bytes)
        strip = self.strip and sse and head.status < 300
        return tap, (UsageChunkStripper() if strip else None)


class Proxy:
    def __init__(self, config: Config, meter: Meter, tokenizer: Tokenizer) -> None:
        self.config = config
        self.meter = meter
        self.tokenizer = tokenizer
        self.loop = asyncio.get_running_loop()
        self.routes = {r.path: RouteTable.build(r) for r in config.routes}
        self.pools: dict[str, UpstreamPool] = {}
        for table in self.routes.values():
            for up in table.upstreams:
                if up.name not in self.pools:
                    self.pools[up.name] = UpstreamPool(up, config.timeouts)
        self.connections: set[DownstreamProtocol] = set()
        self.tasks: set[asyncio.Task[None]] = set()
        self.flights: set[Flight] = set()
        # The sweeper walks the requests in flight, each asking its exchange.
        self.sweeper = Sweeper.for_timeouts(self.loop, config.timeouts, self.flights)
        self.draining = False
        self._rand = random.random
        # Idle keep-alive clients are closed by one periodic sweep, not a timer each.
        self._idle_period = min(IDLE_SWEEP_MAX_INTERVAL, config.timeouts.client_idle / 4)
        self._idle_handle: asyncio.TimerHandle | None = self.loop.call_later(
            self._idle_period, self._sweep_idle)

    def _sweep_idle(self) -> None:
        deadline = self.loop.time() - self.config.timeouts.client_idle
        for conn in list(self.connections):
            conn.close_if_idle_since(deadline)
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

    # -- the request --------------------------------------------------------------
    def dispatch(self, req: ParsedRequest, client: DownstreamProtocol) -> None:
        """Answer one complete request, synchronously when it can be.

        With a kept-alive provider connection free (the steady state), the request
        is written upstream right here, inside the client's read callback, and the
        relay runs on protocol callbacks: no task, no extra loop turn before the
        provider sees it. Only opening a new provider connection needs a task.
        """
        if req.path in LOCAL_PATHS:
            self._local(req, client)
            return
        table = self.routes.get(req.path)
        if table is None:
            self._reply_error(client, req, NotFound(f"no route for {req.path}"))
            client.cycle_done(req.keep_alive)
            return
        # The route's own string (equal to the path, or it would not have matched):
        # the one decoded from this request would stay alive with the stream.
        req.path = table.route.path
        ctx = RequestContext(
            # Decoded when the row is complete (_complete): the id's bytes are on the
            # request already, and a str copy per open stream is ~70 bytes.
            request_id="",
            ts_ms=req.ts_ms,
            t_received=req.t_received,
            path=req.path,
            route=table.route.path,
            bytes_in=len(req.body),
        )
        try:
            flight = self._prepare(req, client, table, ctx)
        except SidecarError as exc:
            self._refuse(Flight(req, client, ctx, self), exc)
            return
        self.flights.add(flight)
        conn = flight.pool.take_idle()
        if conn is not None:
            self._launch(flight, conn)
        else:
            client.task = self.spawn(self._connect_and_launch(flight))

    def _prepare(
        self, req: ParsedRequest, client: DownstreamProtocol, table: RouteTable,
        ctx: RequestContext,
    ) -> Flight:
        """Validate and inspect the request; choose the upstream; build its bytes."""
        if req.method != b"POST":
            raise MethodNotAllowed(f"{req.method.decode()} is not allowed on {req.path}; use POST")
        try:
            body = orjson.loads(req.body)
        except orjson.JSONDecodeError as exc:
            raise RequestError(f"request body is not valid JSON: {exc.msg}") from None
        if not isinstance(body, dict):
            raise RequestError("request body must be a JSON object")
        upstream = table.choose(self._rand())
        ctx.upstream = upstream.name
        ctx.api_format = upstream.format
        model = body.get("model")
        ctx.model = model if isinstance(model, str) else None
        ctx.stream = stream = body.get("stream") is True
        payload = req.body
        strip = False
        if stream and upstream.format == "openai" and req.path in USAGE_OPT_IN_PATHS:
            opts = body.get("stream_options")
            if not (isinstance(opts, dict) and opts.get("include_usage") is True):
                # Ask the provider for usage; hide the extra chunk from a client that did not.
                body["stream_options"] = {**(opts if isinstance(opts, dict) else {}),
                                          "include_usage": True}
                payload = orjson.dumps(body)
                strip = True
        flight = Flight(req, client, ctx, self)
        flight.pool = self.pools[upstream.name]
        flight.payload = payload
        flight.strip = strip
        return flight

    async def _connect_and_launch(self, flight: Flight) -> None:
        try:
            conn = await flight.pool.connect()
        except SidecarError as exc:
            flight.client.task = None
            self._refuse(flight, exc)
            return
        except asyncio.CancelledError:
            # The client left, or shutdown's deadline passed, before the provider answered.
            ctx = flight.ctx
            ctx.outcome = "shutdown" if self.draining else "client_disconnect"
            ctx.error = "request cancelled before the provider answered"
            self._complete(flight, keep_alive=False)
            raise
        flight.client.task = None
        if flight.client.closed:
            conn.close()
            flight.ctx.outcome = "client_disconnect"
            self._complete(flight, keep_alive=False)
            return
        self._launch(flight, conn)

    def _launch(self, flight: Flight, conn: UpstreamConnection) -> None:
        req, client, ctx = flight.req, flight.client, flight.ctx
        ctx.attempts += 1
        limits = self.config.limits
        ex = Exchange(
            pool=flight.pool,
            conn=conn,
            client=client,
            client_http11=req.http11,
            client_keep_alive=req.keep_alive and not self.draining,
            request_id=req.request_id,
            filters=flight.filters,
            max_head=limits.max_header_bytes,
            sweeper=self.sweeper,
        )
        flight.exchange = ex
        client.exchange = ex
        if client.paused_writing:
            ex.pause()
        ex.on_end = flight
        head = flight.pool.head.build(req.method, req.target, req.headers,
                                      len(flight.payload), req.request_id)
        ex.start(head + flight.payload)

    def _landed(self, flight: Flight, ex: Exchange) -> None:
        """The exchange ended (completed, failed, cut): retry a stale connection or settle."""
        client, ctx = flight.client, flight.ctx
        client.exchange = None
        flight.exchange = None
        if ex.stale and ctx.attempts <= MAX_STALE_RETRIES and not client.closed \
                and not flight.cut:
            client.task = self.spawn(self._connect_and_launch(flight))
            return
        self._finish(ctx, ex, flight.req.body, flight.req.path)
        if flight.cut:
            ctx.outcome = "shutdown"
        if ex.error is not None and not ex.head_sent and ex.outcome != "client_disconnect" \
                and not flight.cut:
            self._refuse(flight, ex.error)
            return
        self._complete(flight, keep_alive=ex.client_keep_alive and ex.outcome == "ok")

    def _refuse(self, flight: Flight, exc: SidecarError) -> None:
        """Answer with an OpenAI-style error (nothing was sent yet) and settle the row."""
        ctx = flight.ctx
        ctx.status, ctx.error = exc.status, str(exc)
        if ctx.outcome == "ok":
            ctx.outcome = "rejected" if isinstance(exc, RequestError) else "upstream_error"
        ctx.bytes_out += self._reply_error(flight.client, flight.req, exc)
        self._complete(flight, keep_alive=flight.req.keep_alive)

    def _complete(self, flight: Flight, keep_alive: bool) -> None:
        """Release the client for its next request, then queue the meter row."""
        self.flights.discard(flight)
        ctx = flight.ctx
        ctx.request_id = flight.req.request_id.decode()
        t_end = time.perf_counter()
        flight.client.cycle_done(keep_alive)
        if ctx.pending_estimate is not None:
            self.spawn(self._estimate_then_submit(ctx, t_end))
        else:
            self.meter.submit(ctx.to_record(t_end))

    async def _estimate_then_submit(self, ctx: RequestContext, t_end: float) -> None:
        """Count tokens off the loop (tiktoken releases the GIL), then queue the row.

        Runs after the client's cycle is done, so an estimate never delays a response.
        """
        try:
            await self.loop.run_in_executor(None, self._estimate, ctx)
        finally:
            # Even when cancelled at the shutdown deadline, the row goes in.
            self.meter.submit(ctx.to_record(t_end))

    def _finish(self, ctx: RequestContext, ex: Exchange, body: bytes, path: str) -> None:
        ctx.bytes_out = ex.bytes_out
        ctx.t_first_byte = ex.t_first_byte
        status = ctx.status = ex.head.status if ex.head is not None else 0
        ctx.outcome = _outcome(ex.outcome, status)
        if ex.error is not None:
            ctx.error = str(ex.error)
        # The cheap question first: most responses end with their usage frame.
        usage = ex.tap.usage() if ex.tap is not None else None
        if usage is not None and usage.prompt_tokens is not None \
                and usage.completion_tokens is not None:
            ctx.usage, ctx.usage_source = usage, "reported"
        elif _may_have_billed(status, ex.outcome):
            # No (complete) usage came: estimate what the provider most likely billed,
            # keeping any part it did report (Anthropic's message_start input tokens).
            # The full parse of the stream happens with the count, off the loop.
            ctx.pending_estimate = (body, ex.tap, path)

    def _estimate(self, ctx: RequestContext) -> None:
        assert ctx.pending_estimate is not None
        body, tap, path = ctx.pending_estimate
        result = tap.result() if tap is not None else None
        partial = result.usage if result is not None else None
        if partial is not None and partial.prompt_tokens is not None:
            prompt, approx_p = partial.prompt_tokens, False
        else:
            # The request JSON is parsed again here, off the loop, rather than kept
            # parsed for the whole stream: that would cost memory on every stream.
            prompt, approx_p = self.tokenizer.count_prompt(
                orjson.loads(body), ctx.api_format, path, ctx.model
            )
        count, approx_c = self.tokenizer.counter(ctx.model)
        completion = 0
        if result is not None:
            completion = result.completion_estimate(count)
            # Beyond the tap's text cap the rest is extrapolated, which makes it approximate.
            approx_c = approx_c or result.completion_bytes_dropped > 0
        ctx.usage = Usage(
            prompt_tokens=prompt,
            completion_tokens=completion,
            total_tokens=prompt + completion,
            cache_read_tokens=partial.cache_read_tokens if partial is not None else None,
            cache_write_tokens=partial.cache_write_tokens if partial is not None else None,
            raw=partial.raw if partial is not None else None,
        )
        ctx.usage_source = "estimated"
        ctx.usage_approx = approx_p or approx_c

    # -- local answers ----------------------------------------------------------------
    def _local(self, req: ParsedRequest, client: DownstreamProtocol) -> None:
        if req.path == "/readyz" and self.draining:
            status, body = 503, b'{"status":"draining"}'
        else:
            status, body = 200, b'{"status":"ok"}'
        client.write(render(status, body, request_id=req.request_id, keep_alive=req.keep_alive,
                            head_only=req.method == b"HEAD"))
        client.cycle_done(req.keep_alive)

    def _reply_error(self, client: DownstreamProtocol, req: ParsedRequest,
                     exc: SidecarError) -> int:
        status, body = error_for(exc)
        extra: tuple[tuple[bytes, bytes], ...] = ()
        if isinstance(exc, MethodNotAllowed):
            extra = ((b"allow", b"POST"),)
        data = render(status, body, request_id=req.request_id, keep_alive=req.keep_alive,
                      extra=extra, head_only=req.method == b"HEAD")
        client.write(data)
        return len(data)

    def note_rejected(self, request: ParsedRequest | None, request_id: bytes, status: int,
                      exc: SidecarError) -> None:
        """A request refused before it was complete (too large, malformed) still gets a row."""
        if request is None:
            return
        path = request.target.split(b"?", 1)[0].decode("latin-1")
        table = self.routes.get(path)
        if table is None:
            return
        ctx = RequestContext(request_id=request_id.decode(), ts_ms=int(time.time() * 1000),
                             t_received=time.perf_counter(), path=path,
                             route=table.route.path, status=status, outcome="rejected",
                             error=str(exc))
        self.meter.submit(ctx.to_record(time.perf_counter()))

    # -- shutdown -------------------------------------------------------------------
    async def drain(self, grace: float) -> None:
        """Stop taking requests, let in-flight ones finish up to ``grace`` s, then cut them."""
        self.draining = True
        for conn in list(self.connections):
            conn.close_if_idle()
        deadline = self.loop.time() + grace
        while (self.flights or self.tasks) and self.loop.time() < deadline:
            await asyncio.sleep(min(DRAIN_POLL_S, max(0.0, deadline - self.loop.time())))
        for flight in list(self.flights):
            flight.cut = True
            if flight.exchange is not None:
                flight.exchange.client_gone()  # settles through _landed, as "shutdown"
        for task in list(self.tasks):
            task.cancel()
        # Let the cut exchanges settle and the estimates finish (bounded).
        settle = self.loop.time() + DRAIN_SETTLE_S
        while (self.flights or self.tasks) and self.loop.time() < settle:
            await asyncio.sleep(DRAIN_POLL_S)
        for conn in list(self.connections):
            conn.abort()
        for pool in self.pools.values():
            pool.close()
        self.sweeper.close()
        if self._idle_handle is not None:
            self._idle_handle.cancel()
            self._idle_handle = None

