"""Listeners, workers, signals and drain.

``workers: 1`` serves in this process. ``workers: N`` makes this process a small
supervisor of N worker processes that each bind the same port with SO_REUSEPORT
(the kernel spreads connections), each with its own meter writer into the one
WAL database. SIGTERM/SIGINT drains: stop accepting, let streams finish up to
``timeouts.shutdown_grace``, flush the meter, exit 0.

SIGUSR1 reopens the access log file (after logrotate moved it); the supervisor
forwards it to every worker. ``/metrics`` sees the whole process: the supervisor
gives each worker a slot in a private directory where it publishes its figures
(sidecar.metrics.share), and the worker that answers a scrape adds the others'.

SIGHUP reloads the config file: a valid one serves new requests while streams in
flight finish on the old one (see ``Proxy.swap``); an invalid one is refused with
the ``sidecar check`` message in the log, and the old one stays. The supervisor
forwards SIGHUP to every worker, and each reloads the file itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import cast

from sidecar import debug_stats, sd_notify
from sidecar.config import Config, load_config
from sidecar.downstream import DownstreamProtocol
from sidecar.errors import ConfigError
from sidecar.fdlimit import raise_nofile_limit
from sidecar.meter import Meter
from sidecar.metrics.listener import MetricsEndpoint
from sidecar.metrics.share import ENV_METRICS_DIR, ENV_WORKER_SLOT, ENV_WORKERS, Share
from sidecar.pricing import PriceTable
from sidecar.proxy import Proxy
from sidecar.tokenizer import Tokenizer

log = logging.getLogger("sidecar.server")

# Kernel accept queue; bursts of new streams should queue, not be refused.
LISTEN_BACKLOG = 4096
# Allocations between young-generation collections (CPython default 700).
GC_GEN0_THRESHOLD = 20_000
# A worker that dies sooner than this after start is crash-looping: wait before restarting.
WORKER_MIN_UPTIME = 2.0
WORKER_RESTART_DELAY = 1.0
# Extra time the supervisor gives workers beyond their own drain deadline.
WORKER_EXIT_SLACK = 10.0
ENV_WORKER_PORT = "SIDECAR_WORKER_PORT"
# The metrics.listen port the supervisor reserved (port 0 made concrete), for workers.
ENV_WORKER_METRICS_PORT = "SIDECAR_WORKER_METRICS_PORT"
# A worker writes one byte to this fd once it is listening, so the supervisor
# announces the port only when connections will be accepted, not refused.
ENV_READY_FD = "SIDECAR_READY_FD"
WORKER_START_TIMEOUT = 60.0
_PR_SET_PDEATHSIG = 1
# What a reload cannot change in a running process: the socket, the process count,
# the meter's database and the tokenizer files. A changed value is kept as it was,
# with a warning, until the next restart.
RESTART_ONLY = ("listen_host", "listen_port", "workers", "meter", "tokenizer", "metrics",
                "access_log")


def _die_with_parent() -> None:
    """In a worker (Linux): get SIGTERM if the supervisor dies, so no worker is orphaned."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):  # not Linux: the supervisor's own SIGTERM still reaches us
        pass


class Server:
    """One serving process: meter writer, proxy and listener on the running loop."""

    def __init__(self, config: Config, config_path: str | None = None) -> None:
        self.config = config
        self.config_path = config_path  # reloaded on SIGHUP, when given
        self.meter = Meter(config.meter)
        # Rows recovered from a dead process's journal are priced like estimated rows.
        prices = PriceTable.of(config.prices, defaults=config.prices_defaults)
        self.meter.price = lambda r: prices.cost(
            r.upstream_model or r.model, r.prompt_tokens, r.completion_tokens,
            r.cache_read_tokens, r.cache_write_tokens)
        self.tokenizer = Tokenizer.load(config.tokenizer.dir)
        self._server: asyncio.AbstractServer | None = None
        self._metrics_server: asyncio.AbstractServer | None = None
        self._metrics_endpoint: MetricsEndpoint | None = None
        self.proxy: Proxy | None = None
        self._stopping = False
        self._stop_event: asyncio.Event | None = None  # set by install_signals()
        # A worker of `workers: N`: where it publishes its figures for the others.
        self.share = Share.from_env() if config.metrics.enabled else None
        if self.share is not None:
            self.share.load_baseline()

    async def start(self, port: int | None = None, reuse_port: bool = False) -> None:
        if not self.tokenizer.available():
            log.warning(
                "tiktoken encodings not found (set SIDECAR_TOKENIZER_DIR or tokenizer.dir); "
                "token estimates will use the byte approximation and be marked approximate"
            )
        _warn_unenforced(self.config)
        # Descriptors: the soft limit raised to the hard one, before anything is opened
        # (the proxy sizes its client connections from it: sidecar.fdlimit).
        raise_nofile_limit()
        await self.meter.start()
        loop = asyncio.get_running_loop()
        self.proxy = proxy = Proxy(self.config, self.meter, self.tokenizer, share=self.share)
        self._server = await loop.create_server(
            lambda: DownstreamProtocol(proxy),
            self.config.listen_host,
            self.config.listen_port if port is None else port,
            reuse_port=reuse_port or None,
            backlog=LISTEN_BACKLOG,
        )
        mc = self.config.metrics
        if mc.enabled and mc.listen_host is not None and mc.listen_port is not None:
            endpoint = self._metrics_endpoint = MetricsEndpoint(proxy)
            env_port = os.environ.get(ENV_WORKER_METRICS_PORT)
            self._metrics_server = await loop.create_server(
                lambda: DownstreamProtocol(endpoint),
                mc.listen_host,
                int(env_port) if env_port is not None else mc.listen_port,
                reuse_port=reuse_port or None,
            )
        exporter = proxy.exporter
        if self.share is not None and exporter is not None:
            self.share.start(loop, lambda: exporter.local(proxy))

    @property
    def port(self) -> int:
        # uvloop's Server has .sockets like asyncio.Server, without subclassing it.
        server = cast(asyncio.Server, self._server)
        return int(server.sockets[0].getsockname()[1])

    @property
    def metrics_port(self) -> int | None:
        """The metrics.listen port (None: /metrics is on the main listener)."""
        if self._metrics_server is None:
            return None
        server = cast(asyncio.Server, self._metrics_server)
        return int(server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        """Drain and flush. Safe to call twice."""
        if self._stopping:
            return
        self._stopping = True
        if self._server is not None:
            self._server.close()
        try:
            if self.proxy is not None:
                await self.proxy.drain(self.config.timeouts.shutdown_grace)
        finally:
            try:
                await self.meter.close()
            finally:
                # Scrapes are answered through the drain; the last published figures
                # (share) include the meter's final counts.
                if self._metrics_server is not None:
                    self._metrics_server.close()
                if self._metrics_endpoint is not None:
                    self._metrics_endpoint.close()
                if self.share is not None:
                    self.share.close()

    def reload(self) -> bool:
        """Load the config file again and serve it; False (old config kept) if invalid."""
        if self.config_path is None or self.proxy is None:
            return False
        try:
            new = load_config(self.config_path)
        except ConfigError as exc:
            log.error("reload refused, still serving the previous config: %s", exc)
            return False
        except OSError as exc:
            log.error("reload refused, still serving the previous config: %s: %s",
                      self.config_path, exc.strerror or exc)
            return False
        kept = {name: getattr(self.config, name) for name in RESTART_ONLY
                if getattr(new, name) != getattr(self.config, name)}
        if kept:
            log.warning("reload: %s change only on restart; the running values are kept",
                        ", ".join(kept))
            new = dataclasses.replace(new, **kept)
        old_lim, new_lim = self.config.limits, new.limits
        if (new_lim.backend, new_lim.redis_failure, new_lim.redis_timeout) != (
                old_lim.backend, old_lim.redis_failure, old_lim.redis_timeout):
            # The bucket store is built once, at start: keep what the running proxy uses.
            log.warning("reload: limits.backend, limits.redis_failure and "
                        "limits.redis_timeout change only on restart; the running values "
                        "are kept")
            new = dataclasses.replace(new, limits=dataclasses.replace(
                new_lim, backend=old_lim.backend, redis_failure=old_lim.redis_failure,
                redis_timeout=old_lim.redis_timeout))
        _warn_unenforced(new)
        self.proxy.swap(new)
        self.config = new
        log.info("reloaded %s: %d routes", self.config_path, len(new.routes))
        return True

    def _on_hup(self) -> None:
        # systemd (Type=notify) shows the unit as reloading until READY=1 comes back.
        sd_notify.reloading()
        try:
            self.reload()
        finally:
            sd_notify.ready(f"listening on port {self.port}")

    def reopen_logs(self) -> None:
        """SIGUSR1: reopen the access log file (logrotate moved it)."""
        log_ = self.proxy.access_log if self.proxy is not None else None
        if log_ is not None:
            log_.reopen()

    def install_signals(self) -> asyncio.Event:
        """Handle SIGTERM/SIGINT (set the returned event), SIGHUP and SIGUSR1. Called
        before the process says it is ready: a worker that told its supervisor so
        before it handled SIGHUP was killed by a reload sent at once (SIGHUP's default
        action), and the supervisor then exited 255."""
        if self._stop_event is not None:
            return self._stop_event
        loop = asyncio.get_running_loop()
        stop = self._stop_event = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        if self.config_path is not None:
            loop.add_signal_handler(signal.SIGHUP, self._on_hup)
        # Always handled: SIGUSR1's default action would end the process.
        loop.add_signal_handler(signal.SIGUSR1, self.reopen_logs)
        return stop

    async def serve_until_signal(self, announce: bool = True) -> None:
        stop = self.install_signals()
        _tune_gc()
        if announce:
            _announce(self.config, self.port, self.metrics_port)
            # Workers are started with announce=False and no NOTIFY_SOCKET: only the
            # process systemd started speaks to it (NotifyAccess=main).
            sd_notify.ready(f"listening on port {self.port}")
        period = debug_stats.period_from_env()
        reporter = (None if period is None
                    else asyncio.create_task(debug_stats.report_forever(period, self._counters)))
        await stop.wait()
        if reporter is not None:
            reporter.cancel()
        sd_notify.stopping()
        log.info("draining (up to %.0fs)", self.config.timeouts.shutdown_grace)
        await self.stop()
        stats = self.meter.stats
        log.info("meter flushed: %s rows written, %s spilled", stats.written, stats.spilled)

    def _counters(self) -> dict[str, int]:
        """What ``SIDECAR_DEBUG_STATS`` reports besides the task count (sidecar/debug_stats.py)."""
        stats = self.meter.stats
        return {
            "conns": 0 if self.proxy is None else len(self.proxy.connections),
            "meter_written": stats.written,
            "meter_spilled": stats.spilled,
            "meter_queued": stats.queued,
            "meter_errors": stats.errors,
            "meter_lost": stats.lost,
        }


def _warn_unenforced(config: Config) -> None:
    for route in config.routes:
        for mw in route.middleware:
            if mw.type in ("token_limiter", "metrics_collector"):
                # Enforced (sidecar.ratelimit); every route is measured for /metrics
                # (sidecar.metrics), so a metrics_collector entry adds nothing.
                continue
            log.warning("route %s: middleware %r is accepted but not enforced yet",
                        route.path, mw.type)


def _tune_gc() -> None:
    # Everything built at start (config, modules, pools) lives for the whole process:
    # freezing it keeps the collector from walking it again on every full pass, and a
    # larger first generation means fewer passes over the per-request objects, which
    # are acyclic and freed by reference counting anyway.
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_GEN0_THRESHOLD, *gc.get_threshold()[1:])


def _announce(config: Config, port: int, metrics_port: int | None = None) -> None:
    def url(host: str, p: int) -> str:
        return f"http://[{host}]:{p}" if ":" in host else f"http://{host}:{p}"

    print(
        f"sidecar: listening on {url(config.listen_host, port)} "
        f"(workers={config.workers}, meter={config.meter.db})",
        file=sys.stderr,
        flush=True,
    )
    mc = config.metrics
    if metrics_port is not None and mc.listen_host is not None:
        print(f"sidecar: metrics on {url(mc.listen_host, metrics_port)}/metrics",
              file=sys.stderr, flush=True)


def _install_uvloop() -> None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a hard dependency; stay usable anyway
        log.warning("uvloop is not installed; running on the default asyncio loop")
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def run_single(config: Config, port: int | None = None, announce: bool = True,
               config_path: str | None = None) -> int:
    _install_uvloop()

    async def main() -> None:
        server = Server(config, config_path)
        await server.start(port=port, reuse_port=port is not None)
        server.install_signals()  # before anyone is told this worker is ready
        ready_fd = os.environ.get(ENV_READY_FD)
        if ready_fd is not None:
            # A restarted worker's supervisor no longer listens: a closed pipe is fine.
            with contextlib.suppress(OSError):
                os.write(int(ready_fd), b"1")
            os.close(int(ready_fd))
        await server.serve_until_signal(announce=announce)

    asyncio.run(main())
    return 0


def run(config: Config, config_path: str) -> int:
    """Entry point of ``sidecar run``: one process, or a supervisor of N workers."""
    worker_port = os.environ.get(ENV_WORKER_PORT)
    if worker_port is not None:
        return run_single(config, port=int(worker_port), announce=False,
                          config_path=config_path)
    if config.workers <= 1:
        return run_single(config, config_path=config_path)
    return supervise(config, config_path)


def _reserve_port(host: str, port: int) -> socket.socket:
    """Bind (without listening) so port 0 becomes one concrete port all workers share."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    return sock


def _wait_ready(fd: int, timeout: float) -> bool:
    import select

    try:
        readable, _, _ = select.select([fd], [], [], timeout)
        return bool(readable) and os.read(fd, 1) == b"1"
    finally:
        os.close(fd)


def supervise(config: Config, config_path: str) -> int:
    holders = [_reserve_port(config.listen_host, config.listen_port)]
    port = holders[0].getsockname()[1]
    shared = {ENV_WORKER_PORT: str(port), ENV_WORKERS: str(config.workers)}
    mc = config.metrics
    metrics_dir = None
    if mc.enabled:
        # Each worker publishes its figures here for the others' scrapes (private: 0700).
        metrics_dir = tempfile.mkdtemp(prefix="sidecar-metrics-")
        shared[ENV_METRICS_DIR] = metrics_dir
        if mc.listen_host is not None and mc.listen_port is not None:
            holders.append(_reserve_port(mc.listen_host, mc.listen_port))
            shared[ENV_WORKER_METRICS_PORT] = str(holders[-1].getsockname()[1])
    cmd = [sys.executable, "-m", "sidecar", "run", "-c", config_path]
    stopping = False

    def spawn(slot: int) -> tuple[subprocess.Popen[bytes], int]:
        read_fd, write_fd = os.pipe()
        env = dict(os.environ, **shared, **{ENV_READY_FD: str(write_fd),
                                            ENV_WORKER_SLOT: str(slot)})
        env.pop(sd_notify.NOTIFY_SOCKET_ENV, None)  # systemd hears from the supervisor only
        proc = subprocess.Popen(cmd, env=env, pass_fds=(write_fd,), preexec_fn=_die_with_parent)
        os.close(write_fd)
        return proc, read_fd

    def on_signal(signum: int, _frame: object) -> None:
        nonlocal stopping
        if not stopping:
            sd_notify.stopping()
        stopping = True
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)

    def on_hup(_signum: int, _frame: object) -> None:
        # Each worker reloads the file itself; the supervisor has nothing to wait for.
        sd_notify.reloading()
        forward(signal.SIGHUP, None)
        sd_notify.ready(f"listening on port {port} ({len(procs)} workers)")

    def forward(signum: int, _frame: object) -> None:  # SIGHUP (reload), SIGUSR1 (reopen)
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signum)

    procs: list[subprocess.Popen[bytes]] = []
    started: list[float] = []
    signal.signal(signal.SIGHUP, on_hup)
    signal.signal(signal.SIGUSR1, forward)
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    ready_fds = []
    for slot in range(config.workers):
        proc, fd = spawn(slot)
        procs.append(proc)
        ready_fds.append(fd)
        started.append(time.monotonic())
    failed = False
    for fd in ready_fds:
        if not _wait_ready(fd, WORKER_START_TIMEOUT) and not stopping:
            log.error("a worker failed to start (see its errors above)")
            failed = True
            on_signal(signal.SIGTERM, None)
    if not stopping:
        _announce(config, port, int(shared[ENV_WORKER_METRICS_PORT])
                  if ENV_WORKER_METRICS_PORT in shared else None)
        sd_notify.ready(f"listening on port {port} ({len(procs)} workers)")
    try:
        while not stopping:
            time.sleep(0.2)
            for i, proc in enumerate(procs):
                code = proc.poll()
                if code is None or stopping:
                    continue
                log.error("worker pid %d exited with %s; restarting", proc.pid, code)
                if time.monotonic() - started[i] < WORKER_MIN_UPTIME:
                    time.sleep(WORKER_RESTART_DELAY)
                procs[i], fd = spawn(i)
                started[i] = time.monotonic()
                os.close(fd)  # the surviving workers serve meanwhile; no need to wait
        deadline = time.monotonic() + config.timeouts.shutdown_grace + WORKER_EXIT_SLACK
        worst = 1 if failed else 0
        for proc in procs:
            try:
                code = proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                code = proc.wait()
            worst = worst or (code if code not in (0, -signal.SIGTERM) else 0)
        return worst
    finally:
        for holder in holders:
            holder.close()
        if metrics_dir is not None:
            shutil.rmtree(metrics_dir, ignore_errors=True)
