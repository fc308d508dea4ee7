"""The systems under test: how each one is found, configured, started and stopped.

Every contender writes its exact configuration into the run's work folder and
returns it as text, so the results carry it. Everything listens on 127.0.0.1.
A contender that is not installed is *missing* (with the reason), never faked.
"""

from __future__ import annotations

import compileall
import contextlib
import os
import re
import secrets
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
BENCH_VENVS = Path(os.environ.get("BENCH_VENVS", "/work/bench-venvs"))
LITELLM_BIN = BENCH_VENVS / "litellm" / "bin" / "litellm"
PORTKEY_DIR = BENCH_VENVS / "portkey"
PORTKEY_ENTRY = (
    PORTKEY_DIR / "node_modules" / "@portkey-ai" / "gateway" / "build" / "start-server.js"
)
NGINX_MODULES = Path("/usr/lib/nginx/modules")

# Mock knobs per load pattern (sent as x-mock-delay-ms; LiteLLM gets them per model).
PATTERN_DELAY_MS = {"paced": 1, "paced10": 10, "burst": 0, "slow": 10000}
PROMPT = "Write a haiku about load balancers, then explain it in twenty words."


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pin_preexec(cpus: set[int] | None):  # type: ignore[no-untyped-def]
    def fn() -> None:
        os.setsid()
        if cpus:
            os.sched_setaffinity(0, cpus)

    return fn


def tail(path: Path, n: int = 1500) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""


@dataclass
class Proc:
    popen: subprocess.Popen[bytes]
    log: Path

    def stop(self, sig: int = signal.SIGTERM, grace: float = 10.0) -> None:
        p = self.popen
        if p.poll() is None:
            try:
                p.send_signal(sig)
                p.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                pass
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGKILL)  # the group this harness created
            except (ProcessLookupError, PermissionError):
                pass
            p.wait(timeout=5)
        else:
            try:  # leftover children of a multi-process server
                os.killpg(p.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


# Prepended to every command spawn() runs while set (see command_prefix): how
# ``bench instructions`` runs a contender under valgrind with its usual start().
_PREFIX: list[str] = []


@contextlib.contextmanager
def command_prefix(prefix: Sequence[str]) -> Iterator[None]:
    _PREFIX[:] = prefix
    try:
        yield
    finally:
        _PREFIX.clear()


def spawn(
    cmd: list[str],
    log: Path,
    cpus: set[int] | None,
    env: Mapping[str, str | None] | None = None,
    cwd: Path | None = None,
    prefixed: bool = True,
) -> Proc:
    """Start ``cmd`` in its own session; ``prefixed=False`` ignores command_prefix (a
    helper process a contender starts for itself, such as a second mock, is not measured)."""
    f = open(log, "ab")
    full_env = dict(os.environ)
    for k, v in (env or {}).items():
        if v is None:
            full_env.pop(k, None)  # e.g. a DATABASE_URL the peer must not see
        else:
            full_env[k] = v
    p = subprocess.Popen(
        (_PREFIX if prefixed else []) + cmd,
        stdout=f,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        preexec_fn=pin_preexec(cpus),
        env=full_env,
        cwd=str(cwd) if cwd else None,
    )
    f.close()
    return Proc(p, log)


# A second checkout to measure against this one in the same run (contender
# `sidecar-ref`), e.g. `git worktree add /tmp/ref <commit>`: an A/B of two commits.
ENV_REF = "BENCH_SIDECAR_REF"


def sidecar_env(src: Path = REPO) -> dict[str, str]:
    """Import path for the checkout and the offline tokenizer files (no network here)."""
    env = {"PYTHONPATH": str(src)}
    tok = REPO.parent / "shared" / "tiktoken"
    if tok.is_dir() and "SIDECAR_TOKENIZER_DIR" not in os.environ:
        env["SIDECAR_TOKENIZER_DIR"] = str(tok)
    return env


def request_body(model: str) -> str:
    import json

    return json.dumps(
        {
            "model": model,
            "stream": True,
            "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": PROMPT}],
        },
        separators=(",", ":"),
    )


def probe(port: int, headers: dict[str, str], body: str, timeout: float = 5.0) -> tuple[int, bytes]:
    """One streamed request, Connection: close; (status, raw response) or (0, error)."""
    head = [
        "POST /v1/chat/completions HTTP/1.1",
        f"host: 127.0.0.1:{port}",
        "content-type: application/json",
        f"content-length: {len(body.encode())}",
        "connection: close",
    ] + [f"{k}: {v}" for k, v in headers.items()]
    data = ("\r\n".join(head) + "\r\n\r\n").encode() + body.encode()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.sendall(data)
            chunks = []
            while True:
                b = s.recv(65536)
                if not b:
                    break
                chunks.append(b)
                if b"[DONE]" in b or b"\r\n0\r\n\r\n" in b:
                    break
        raw = b"".join(chunks)
        m = re.match(rb"HTTP/1\.[01] (\d{3})", raw)
        return (int(m.group(1)) if m else 0), raw
    except OSError as e:
        return 0, str(e).encode()


_USAGE_RE = re.compile(rb'"prompt_tokens"\s*:\s*(\d+).*?"completion_tokens"\s*:\s*(\d+)', re.S)


def usage_of(raw: bytes) -> str:
    m = _USAGE_RE.search(raw)
    return f"{int(m.group(1))},{int(m.group(2))}" if m else "none"


def mock_command(port: int) -> list[str]:
    """The project's own mock provider (sidecar.mock), paced 1 ms by default."""
    return [
        sys.executable, "-m", "sidecar.mock", "--port", str(port),
        "--chunks", "20", "--delay-ms", "1", "--always-usage",
    ]


def wait_mock(
    proc: Proc, port: int, timeout: float = 20.0, headers: Mapping[str, str] | None = None
) -> str | None:
    """None once the mock answers a burst stream, else why it did not. ``headers``
    override the instance's knobs for the probe (e.g. its first-byte delay)."""
    deadline = time.monotonic() + timeout
    hdrs = {"x-mock-delay-ms": "0", **(headers or {})}
    while time.monotonic() < deadline:
        if proc.popen.poll() is not None:
            return f"mock exited: {tail(proc.log)}"
        st, raw = probe(port, hdrs, request_body("gpt-4o-mini"), 2)
        if st == 200 and b"[DONE]" in raw:
            return None
        time.sleep(0.1)
    return f"mock not ready: {tail(proc.log)}"


@dataclass
class Running:
    name: str
    port: int
    root_pid: int | None  # process tree whose CPU/memory is measured
    procs: list[Proc]
    workdir: Path
    config: dict[str, str] = field(default_factory=dict)  # file name -> exact text
    cmdline: list[str] = field(default_factory=list)
    meters: bool = False
    pinned: str = "no"

    def headers(self, pattern: str) -> dict[str, str]:
        return {"x-mock-delay-ms": str(PATTERN_DELAY_MS[pattern])}

    def body(self, pattern: str) -> str:
        return request_body("gpt-4o-mini")

    def meter_tally(self) -> dict[str, Any] | None:
        return None

    def stop(self, grace: float = 10.0) -> None:
        for p in reversed(self.procs):
            p.stop(grace=grace)


class Contender:
    name = "?"
    workers = 1
    meters = False
    start_timeout = 20.0

    def available(self) -> str | None:
        """None when it can run here, else why not."""
        return None

    def start(self, mock_port: int, workdir: Path, cpus: set[int] | None) -> Running:
        raise NotImplementedError

    def install_hint(self) -> str:
        return ""


# --------------------------------------------------------------------------- direct
class Direct(Contender):
    name = "direct"

    def start(self, mock_port: int, workdir: Path, cpus: set[int] | None) -> Running:
        return Running(
            self.name,
            mock_port,
            None,
            [],
            workdir,
            config={"(none)": "requests go straight to the mock provider"},
        )


# --------------------------------------------------------------------------- sidecar
class Sidecar(Contender):
    meters = True
    meter_extra = ""  # more meter: keys for a variant (indented two spaces)

    def __init__(self, workers: int, ref: bool = False) -> None:
        self.workers = workers
        self.ref = ref  # run the checkout named by $BENCH_SIDECAR_REF instead of this one
        self.name = "sidecar" if workers == 1 else f"sidecar-w{workers}"
        if ref:
            self.name += "-ref"

    @property
    def src(self) -> Path:
        return Path(os.environ.get(ENV_REF, "")) if self.ref else REPO

    def available(self) -> str | None:
        if self.ref and not os.environ.get(ENV_REF):
            return f"set {ENV_REF} to another checkout (e.g. a git worktree) to compare with"
        if not (self.src / "sidecar" / "server.py").exists():
            return f"sidecar/server.py not present in {self.src}"
        return None

    def routing(
        self, mock_port: int, workdir: Path, cpus: set[int] | None
    ) -> tuple[str, list[Proc]]:
        """The config's upstreams: and routes: sections, and any helper process they need."""
        return (
            "upstreams:\n"
            "  mock:\n"
            f"    url: http://127.0.0.1:{mock_port}\n"
            "    pool_max_idle: 1024  # as nginx's `keepalive 1024` (the default is 64)\n"
            "routes:\n"
            "  - path: /v1/chat/completions\n"
            "    upstreams:\n"
            "      - target: mock\n"
        ), []

    def start(self, mock_port: int, workdir: Path, cpus: set[int] | None) -> Running:
        # A pip install ships compiled bytecode; a checkout run with PYTHONDONTWRITEBYTECODE
        # (set on these machines) would compile ~9,000 lines at every start, which costs
        # time and leaves ~1.6 MB of compiler garbage in the measured RSS. Compile once here.
        compileall.compile_dir(str(self.src / "sidecar"), quiet=1)
        port = free_port()
        db = workdir / f"{self.name}-meter.db"
        for suffix in ("", "-wal", "-shm"):
            Path(str(db) + suffix).unlink(missing_ok=True)
        routing, helpers = self.routing(mock_port, workdir, cpus)
        cfg = (
            f"# {self.name}: metering on, default limits; logging at warning\n"
            f"listen: 127.0.0.1:{port}\n"
            f"workers: {self.workers}\n"
            + routing
            + "meter:\n"
            f"  db: {db}\n"
            + self.meter_extra
        )
        path = workdir / f"{self.name}.yaml"
        path.write_text(cfg)
        cmd = [sys.executable, "-m", "sidecar", "run", "-c", str(path), "--log-level", "warning"]
        try:
            proc = spawn(cmd, workdir / f"{self.name}.log", cpus, sidecar_env(self.src),
                         cwd=workdir)
        except BaseException:
            for h in helpers:
                h.stop()
            raise
        run = SidecarRunning(
            self.name,
            port,
            proc.popen.pid,
            [proc, *helpers],
            workdir,
            config={path.name: cfg, "(source)": str(self.src)},
            cmdline=cmd,
            meters=True,
        )
        run.db = db
        return run


class Sidecar2Up(Sidecar):
    """The sidecar with a two-upstream weighted route and failover configured: the
    second upstream is a mock of its own (started here, outside any command prefix, so
    ``bench instructions`` counts the sidecar only). No request fails, so no failover
    happens: what is measured is what having it configured costs per request."""

    def __init__(self) -> None:
        super().__init__(1)
        self.name = "sidecar-2up"

    def routing(
        self, mock_port: int, workdir: Path, cpus: set[int] | None
    ) -> tuple[str, list[Proc]]:
        port_b = free_port()
        # The proxy's CPUs are not the mock's: a pinned run puts it with the other mock.
        aux = set(range(os.cpu_count() or 1)) - cpus if cpus else None
        mock_b = spawn(mock_command(port_b), workdir / f"{self.name}-mock-b.log", aux or None,
                       sidecar_env(), cwd=REPO, prefixed=False)
        err = wait_mock(mock_b, port_b)
        if err:
            mock_b.stop()
            raise RuntimeError(f"second mock: {err}")
        return (
            "upstreams:\n"
            "  mock-a:\n"
            f"    url: http://127.0.0.1:{mock_port}\n"
            "    pool_max_idle: 1024  # as nginx's `keepalive 1024` (the default is 64)\n"
            "  mock-b:  # a second mock process\n"
            f"    url: http://127.0.0.1:{port_b}\n"
            "    pool_max_idle: 1024\n"
            "routes:\n"
            "  - path: /v1/chat/completions\n"
            "    upstreams:\n"
            "      - target: mock-a\n"
            "        weight: 50\n"
            "      - target: mock-b\n"
            "        weight: 50\n"
            "    strategy: weighted\n"
            "    max_attempts: 2  # failover to the other one; retry_on: the default\n"
        ), [mock_b]


class SidecarNoJournal(Sidecar):
    """The sidecar with its crash journal off (``meter.journal: false``): read against
    ``sidecar`` (journal on, the default), what journalling each request costs."""

    meter_extra = "  journal: false  # the crash journal off\n"

    def __init__(self) -> None:
        super().__init__(1)
        self.name = "sidecar-nojournal"


class SidecarLimited(Sidecar):
    """The sidecar with an authenticated route (identity: api_key, a key made in a keys
    file of its own) and the in-process token limiter: what identity, the estimate
    (tiktoken on the prompt), the reservation, the x-ratelimit-* headers and the
    settlement cost per request. The limit is far above the load, so nothing is refused."""

    def __init__(self) -> None:
        super().__init__(1)
        self.name = "sidecar-limited"
        self.secret = ""

    def routing(
        self, mock_port: int, workdir: Path, cpus: set[int] | None
    ) -> tuple[str, list[Proc]]:
        from sidecar.auth import KeyStore

        db = workdir / f"{self.name}-keys.db"
        for suffix in ("", "-wal", "-shm"):
            Path(str(db) + suffix).unlink(missing_ok=True)
        with KeyStore.open(str(db)) as store:
            _, self.secret = store.create("bench")
        return (
            f"auth: {{ keys_db: {db} }}\n"
            "upstreams:\n"
            "  mock:\n"
            f"    url: http://127.0.0.1:{mock_port}\n"
            "    pool_max_idle: 1024  # as nginx's `keepalive 1024` (the default is 64)\n"
            "routes:\n"
            "  - path: /v1/chat/completions\n"
            "    identity: api_key\n"
            "    upstreams:\n"
            "      - target: mock\n"
            "    middleware:\n"
            "      - type: token_limiter\n"
            "        config: { limit: 1000000000, period: 1m }\n"
        ), []

    def start(self, mock_port: int, workdir: Path, cpus: set[int] | None) -> Running:
        run = super().start(mock_port, workdir, cpus)
        assert isinstance(run, SidecarRunning)
        run.auth = {"authorization": f"Bearer {self.secret}"}
        return run


class SidecarObserved(Sidecar):
    """The sidecar with everything issue 13 adds to a request switched on: /metrics
    counting (on by default), per-key token/cost series, and the JSON access log
    written to a file in the work folder. Scraped by nobody during the run: the scrape
    itself is not per-request work. ``metrics: false`` instead switches /metrics
    counting off (and no access log): what counting costs, against plain ``sidecar``."""

    def __init__(self, metrics: bool = True) -> None:
        super().__init__(1)
        self.metrics = metrics
        self.name = "sidecar-observed" if metrics else "sidecar-metrics-off"

    def routing(
        self, mock_port: int, workdir: Path, cpus: set[int] | None
    ) -> tuple[str, list[Proc]]:
        routing, helpers = super().routing(mock_port, workdir, cpus)
        if not self.metrics:
            return "metrics: { enabled: false }\n" + routing, helpers
        log = workdir / f"{self.name}-access.jsonl"
        log.unlink(missing_ok=True)
        return ("metrics: { per_key: true }\n"
                f"access_log: {log}\n" + routing), helpers


class SidecarTranslated(Sidecar):
    """The sidecar translating every request: the OpenAI-format clients of the load
    reach the mock as an Anthropic-format upstream (the same mock process answers
    /v1/messages in Anthropic's format), so each request is translated to a Messages
    request and each Anthropic stream event back to a chat.completion.chunk. Against
    ``sidecar`` (passthrough) this is the cost of translation per request."""

    def __init__(self) -> None:
        super().__init__(1)
        self.name = "sidecar-translated"

    def routing(
        self, mock_port: int, workdir: Path, cpus: set[int] | None
    ) -> tuple[str, list[Proc]]:
        return (
            "upstreams:\n"
            "  mock:\n"
            f"    url: http://127.0.0.1:{mock_port}\n"
            "    format: anthropic  # OpenAI clients, Anthropic upstream: translated\n"
            "    pool_max_idle: 1024  # as nginx's `keepalive 1024` (the default is 64)\n"
            "routes:\n"
            "  - path: /v1/chat/completions\n"
            "    upstreams:\n"
            "      - target: mock\n"
        ), []


class SidecarLimitedRedis(SidecarLimited):
    """``sidecar-limited`` with its buckets in Redis (``limits.backend: redis://``): a
    redis-server of its own (not measured, like a second mock), so each admission is one
    EVALSHA round trip on loopback and each settlement a queued one. What ``compare``
    shows is the added time to first token of that round trip."""

    def __init__(self) -> None:
        super().__init__()
        self.name = "sidecar-limited-redis"

    def available(self) -> str | None:
        if shutil.which("redis-server") is None:
            return "redis-server (apt-get install redis-server)"
        return super().available()

    def routing(
        self, mock_port: int, workdir: Path, cpus: set[int] | None
    ) -> tuple[str, list[Proc]]:
        cfg, helpers = super().routing(mock_port, workdir, cpus)
        port = free_port()
        aux = set(range(os.cpu_count() or 1)) - cpus if cpus else None
        redis = spawn(["redis-server", "--port", str(port), "--bind", "127.0.0.1",
                       "--save", "", "--appendonly", "no"],
                      workdir / f"{self.name}-redis.log", aux or None, cwd=workdir,
                      prefixed=False)
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or redis.popen.poll() is not None:
                    redis.stop()
                    raise RuntimeError(
                        f"redis-server did not start: {tail(redis.log)}") from None
                time.sleep(0.05)
        return cfg + f"limits:\n  backend: redis://127.0.0.1:{port}/0\n", [*helpers, redis]


class Floor(Contender):
    """A uvloop byte pump with no HTTP (bench/floor_proxy.py): the Python floor."""

    name = "uvloop-floor"

    def start(self, mock_port: int, workdir: Path, cpus: set[int] | None) -> Running:
        port = free_port()
        cmd = [sys.executable, "-m", "bench.floor_proxy", str(port), str(mock_port)]
        proc = spawn(cmd, workdir / f"{self.name}.log", cpus, sidecar_env(), cwd=REPO)
        return Running(
            self.name,
            port,
            proc.popen.pid,
            [proc],
            workdir,
            config={"(code)": "bench/floor_proxy.py: one provider connection per client "
                    "connection, bytes copied as they arrive, no parsing or metering"},
            cmdline=cmd,
        )


class SidecarRunning(Running):
    db: Path
    auth: dict[str, str] = {}  # noqa: RUF012 -- replaced per instance, never mutated

    def headers(self, pattern: str) -> dict[str, str]:
        return {**super().headers(pattern), **self.auth}

    def stop(self, grace: float = 10.0) -> None:
        for p in self.procs:  # the sidecar first, then the helper mocks it talks to
            p.stop(grace=grace)

    def meter_tally(self) -> dict[str, Any] | None:
        if not self.db.exists():
            return {"rows": 0, "tally": {}, "note": "meter DB not created"}
        try:
            con = sqlite3.connect(f"file:{self.db}?mode=ro", uri=True, timeout=5)
            try:
                rows = con.execute(
                    "SELECT prompt_tokens, completion_tokens, usage_source, outcome, COUNT(*) "
                    "FROM requests GROUP BY 1, 2, 3, 4"
                ).fetchall()
            finally:
                con.close()
        except sqlite3.Error as e:
            return {"rows": 0, "tally": {}, "note": f"sqlite: {e}"}
        tally: Counter[str] = Counter()
        sources: Counter[str] = Counter()
        for p, c, src, outcome, n in rows:
            key = f"{p},{c}" if p is not None and c is not None else "none"
            tally[key] += n
            sources[f"{src}/{outcome}"] += n
        return {
            "rows": sum(tally.values()),
            "tally": dict(tally),
            "by_source_outcome": dict(sources),
        }


# --------------------------------------------------------------------------- nginx
NGINX_BASE = """\
# {name}: Debian nginx, proxy_buffering off, HTTP/1.1 keep-alive upstream
{load_modules}worker_processes {workers};
daemon off;
master_process {master};
pid {dir}/{name}.pid;
error_log {dir}/{name}-error.log error;
# worker_connections is set above the fd limit (20000 here, hard) on purpose: nginx starts
# closing fresh idle connections once fewer than 1/16 of worker_connections are free, which
# at 19900 would cap it at ~9330 proxied streams; this way the fd limit is the cap.
events {{
    worker_connections 21500;
    use epoll;
}}
http {{
    access_log off;
    client_body_temp_path {dir}/{name}-tmp/body;
    proxy_temp_path {dir}/{name}-tmp/proxy;
    fastcgi_temp_path {dir}/{name}-tmp/fastcgi;
    uwsgi_temp_path {dir}/{name}-tmp/uwsgi;
    scgi_temp_path {dir}/{name}-tmp/scgi;
    client_body_buffer_size 64k;
    keepalive_timeout 75s;
    keepalive_requests 1000000;
{http_extra}
    upstream mock {{
        server 127.0.0.1:{mock_port};
        keepalive 1024;
        keepalive_requests 1000000;
        keepalive_timeout 60s;
    }}
    server {{
        listen 127.0.0.1:{port} reuseport backlog=4096;
        location / {{
{location_extra}
            proxy_pass http://mock;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_read_timeout 300s;
        }}
    }}
}}
"""

# The Lua meter: find the usage event with a plain (non-pattern) search, carry a
# partial event over to the next chunk only when the chunk does not end on an
# event boundary, decode only the usage event with cjson, and hand the numbers to
# a buffered access_log line. Nothing is done per chunk beyond one string.find.
LUA_FILTER = r"""
            set $bench_usage "-";
            body_filter_by_lua_block {
                local ctx = ngx.ctx
                if ctx.metered then return end
                local chunk = ngx.arg[1]
                local carry = ctx.carry
                if carry then chunk = carry .. chunk; ctx.carry = nil end
                local find, sub, byte = string.find, string.sub, string.byte
                local s = find(chunk, '"prompt_tokens"', 1, true)
                if not s then
                    local n = #chunk
                    if n > 0 and not (byte(chunk, n) == 10 and byte(chunk, n - 1) == 10) then
                        -- keep the unfinished last event (rare: events are written whole)
                        local last, pos = 0, 1
                        while true do
                            local e = find(chunk, "\n\n", pos, true)
                            if not e then break end
                            last = e + 1; pos = e + 2
                        end
                        ctx.carry = sub(chunk, last + 1)
                    end
                    return
                end
                local pos = 1
                while true do
                    local e = find(chunk, "\n\n", pos, true)
                    if not e then ctx.carry = sub(chunk, pos); return end
                    if e > s then
                        local d = find(chunk, "data:", pos, true)
                        local ok, obj = pcall(require("cjson.safe").decode, sub(chunk, d + 5, e - 1))
                        local u = ok and obj and obj.usage
                        if u then
                            ngx.var.bench_usage = (u.prompt_tokens or "-") .. " " .. (u.completion_tokens or "-")
                            ctx.metered = true
                        end
                        return
                    end
                    pos = e + 2
                end
            }
            access_log {dir}/{name}-usage.log bench_usage buffer=64k flush=1s;
"""


class Nginx(Contender):
    def __init__(self, workers: int, lua: bool = False, single_process: bool = False) -> None:
        self.workers = workers
        self.lua = lua
        # No master: the one process does what a worker does (``bench instructions``,
        # where callgrind_control cannot reach a forked worker).
        self.single_process = single_process
        self.meters = lua
        base = "nginx-lua" if lua else "nginx"
        self.name = base if workers == 1 else f"{base}-w{workers}"

    def available(self) -> str | None:
        if not shutil.which("nginx") and not Path("/usr/sbin/nginx").exists():
            return "nginx not installed (apt-get install nginx-light)"
        if self.lua and not (NGINX_MODULES / "ngx_http_lua_module.so").exists():
            return "lua module not installed (apt-get install libnginx-mod-http-lua)"
        return None

    def start(self, mock_port: int, workdir: Path, cpus: set[int] | None) -> Running:
        port = free_port()
        for sub in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
            (workdir / f"{self.name}-tmp" / sub).mkdir(parents=True, exist_ok=True)
        usage_log = workdir / f"{self.name}-usage.log"
        usage_log.unlink(missing_ok=True)
        if self.lua:
            load = (
                f"load_module {NGINX_MODULES}/ndk_http_module.so;\n"
                f"load_module {NGINX_MODULES}/ngx_http_lua_module.so;\n"
            )
            http_extra = (
                '    lua_package_path "/usr/share/lua/5.1/?.lua;;";\n'
                "    log_format bench_usage '$bench_usage';"
            )
            loc = LUA_FILTER.replace("{dir}", str(workdir)).replace("{name}", self.name)
        else:
            load, http_extra, loc = "", "", ""
        cfg = NGINX_BASE.format(
            name=self.name,
            master="off" if self.single_process else "on",
            load_modules=load,
            workers=self.workers,
            dir=workdir,
            http_extra=http_extra,
            mock_port=mock_port,
            port=port,
            location_extra=loc,
        )
        path = workdir / f"{self.name}.conf"
        path.write_text(cfg)
        nginx = shutil.which("nginx") or "/usr/sbin/nginx"
        cmd = [nginx, "-p", str(workdir), "-c", str(path)]
        proc = spawn(cmd, workdir / f"{self.name}.log", cpus)
        run = NginxRunning(
            self.name,
            port,
            proc.popen.pid,
            [proc],
            workdir,
            config={path.name: cfg},
            cmdline=cmd,
            meters=self.lua,
        )
        run.usage_log = usage_log
        return run


class NginxRunning(Running):
    usage_log: Path

    def meter_tally(self) -> dict[str, Any] | None:
        if not self.meters:
            return None
        tally: Counter[str] = Counter()
        try:
            for line in self.usage_log.read_text().splitlines():
                parts = line.split()
                tally[f"{parts[0]},{parts[1]}" if len(parts) == 2 else "none"] += 1
        except OSError as e:
            return {"rows": 0, "tally": {}, "note": str(e)}
        return {"rows": sum(tally.values()), "tally": dict(tally)}

    def stop(self, grace: float = 10.0) -> None:
        for p in self.procs:
            p.stop(signal.SIGQUIT, grace)  # graceful: flushes the buffered usage log


# --------------------------------------------------------------------------- litellm
class LiteLLM(Contender):
    name = "litellm"
    start_timeout = 120.0

    def available(self) -> str | None:
        if not LITELLM_BIN.exists():
            return f"{LITELLM_BIN} missing (python -m bench setup --litellm)"
        return None

    def start(self, mock_port: int, workdir: Path, cpus: set[int] | None) -> Running:
        port = free_port()
        models = []
        for pattern, delay in PATTERN_DELAY_MS.items():
            models.append(
                f"  - model_name: bench-{pattern}\n"
                "    litellm_params:\n"
                "      model: openai/gpt-4o-mini\n"
                f"      api_base: http://127.0.0.1:{mock_port}/v1\n"
                "      api_key: sk-bench-upstream-placeholder\n"
                f'      extra_headers: {{x-mock-delay-ms: "{delay}"}}\n'
            )
        cfg = (
            "# litellm: offline (LITELLM_LOCAL_MODEL_COST_MAP=True), no DB, master key from env,\n"
            "# one uvicorn worker, logging off; one model per load pattern (the pattern rides in\n"
            "# extra_headers because LiteLLM does not forward client headers to the provider)\n"
            "model_list:\n" + "".join(models) + "litellm_settings:\n"
            "  drop_params: true\n"
            "  set_verbose: false\n"
            "  turn_off_message_logging: true\n"
            "  telemetry: false\n"
            "  callbacks: []\n"
            "general_settings:\n"
            "  disable_spend_logs: true\n"
            "  disable_error_logs: true\n"
            "  disable_adding_master_key_hash_to_db: true\n"
        )
        path = workdir / "litellm.yaml"
        path.write_text(cfg)
        key = "sk-" + secrets.token_hex(16)
        cmd = [
            str(LITELLM_BIN),
            "--config",
            str(path),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--num_workers",
            "1",
        ]
        env: dict[str, str | None] = {
            "LITELLM_LOCAL_MODEL_COST_MAP": "True",
            "LITELLM_MASTER_KEY": key,
            "LITELLM_LOG": "ERROR",
            "LITELLM_MODE": "PRODUCTION",
            "DISABLE_ADMIN_UI": "True",
            "NO_DOCS": "True",
            "DATABASE_URL": None,
        }
        env_shown = {
            k: ("<random per run>" if k == "LITELLM_MASTER_KEY" else "<unset>" if v is None else v)
            for k, v in env.items()
        }
        proc = spawn(cmd, workdir / "litellm.log", cpus, env, cwd=workdir)
        run = LiteLLMRunning(
            self.name,
            port,
            proc.popen.pid,
            [proc],
            workdir,
            config={path.name: cfg, "env": repr(env_shown)},
            cmdline=cmd,
        )
        run.key = key
        return run


class LiteLLMRunning(Running):
    key: str

    def headers(self, pattern: str) -> dict[str, str]:
        return {"authorization": f"Bearer {self.key}"}

    def body(self, pattern: str) -> str:
        return request_body(f"bench-{pattern}")


# --------------------------------------------------------------------------- portkey
LOOPBACK_CJS = """\
// Portkey's start-server.js calls serve({port}) with no hostname (all interfaces);
// this preload forces every numeric-port listen() onto 127.0.0.1.
const net = require('net');
const orig = net.Server.prototype.listen;
net.Server.prototype.listen = function (...args) {
  if (typeof args[0] === 'number' || (typeof args[0] === 'string' && /^\\d+$/.test(args[0]))) {
    if (typeof args[1] === 'string') args[1] = '127.0.0.1'; else args.splice(1, 0, '127.0.0.1');
  } else if (args[0] && typeof args[0] === 'object' && 'port' in args[0]) {
    args[0] = Object.assign({}, args[0], { host: '127.0.0.1' });
  }
  return orig.apply(this, args);
};
"""


class Portkey(Contender):
    name = "portkey"
    start_timeout = 30.0

    def available(self) -> str | None:
        if not shutil.which("node"):
            return "node not installed"
        if not PORTKEY_ENTRY.exists():
            return f"{PORTKEY_ENTRY} missing (python -m bench setup --portkey)"
        return None

    def start(self, mock_port: int, workdir: Path, cpus: set[int] | None) -> Running:
        port = free_port()
        pre = workdir / "portkey-loopback.cjs"
        pre.write_text(LOOPBACK_CJS)
        cmd = ["node", "--require", str(pre), str(PORTKEY_ENTRY), f"--port={port}", "--headless"]
        env = {"NODE_ENV": "production"}
        proc = spawn(cmd, workdir / "portkey.log", cpus, env, cwd=workdir)
        pkg = (
            (PORTKEY_DIR / "package.json").read_text()
            if (PORTKEY_DIR / "package.json").exists()
            else ""
        )
        run = PortkeyRunning(
            self.name,
            port,
            proc.popen.pid,
            [proc],
            workdir,
            config={
                "package.json": pkg,
                pre.name: LOOPBACK_CJS,
                "request headers": "x-portkey-provider: openai; x-portkey-custom-host: "
                f"http://127.0.0.1:{mock_port}/v1; x-portkey-forward-headers: x-mock-delay-ms",
            },
            cmdline=cmd,
        )
        run.mock_port = mock_port
        return run


class PortkeyRunning(Running):
    mock_port: int

    def headers(self, pattern: str) -> dict[str, str]:
        return {
            "x-portkey-provider": "openai",
            "x-portkey-custom-host": f"http://127.0.0.1:{self.mock_port}/v1",
            "x-portkey-forward-headers": "x-mock-delay-ms",
            "authorization": "Bearer sk-bench-upstream-placeholder",
            "x-mock-delay-ms": str(PATTERN_DELAY_MS[pattern]),
        }


ALL: dict[str, Contender] = {
    c.name: c
    for c in [
        Direct(),
        Sidecar(1),
        Sidecar(2),
        Sidecar(1, ref=True),
        Sidecar2Up(),
        SidecarLimited(),
        SidecarLimitedRedis(),
        SidecarNoJournal(),
        SidecarObserved(),
        SidecarObserved(metrics=False),
        SidecarTranslated(),
        Floor(),
        Nginx(1),
        Nginx(2),
        Nginx(1, lua=True),
        Nginx(2, lua=True),
        LiteLLM(),
        Portkey(),
    ]
}
DEFAULT_FULL = [
    "direct",
    "uvloop-floor",
    "sidecar",
    "sidecar-w2",
    "nginx",
    "nginx-w2",
    "nginx-lua",
    "litellm",
    "portkey",
]
DEFAULT_QUICK = ["direct", "sidecar", "nginx"]


def wait_ready(run: Running, timeout: float) -> tuple[str | None, str]:
    """Poll with real streamed requests until one succeeds.

    Returns (None, usage seen by the client) or (the reason it never did, "").
    """
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        for p in run.procs:
            if p.popen.poll() is not None:
                return f"exited with {p.popen.returncode}: {tail(p.log)}", ""
        status, raw = probe(run.port, run.headers("burst"), run.body("burst"), timeout=5)
        if status == 200 and b"[DONE]" in raw:
            return None, usage_of(raw)
        last = f"status {status}: {raw[-300:]!r}"
        time.sleep(0.25)
    return (
        f"not ready after {timeout:.0f}s ({last}); log: {tail(run.procs[0].log) if run.procs else ''}",
        "",
    )
