"""The config model: the frozen dataclasses runtime code reads, with every default.

Every default lives in this module (the dataclass field defaults below); nothing
else in the sidecar invents a limit or a timeout of its own. No YAML and no
validation here: ``sidecar.config.load`` builds these from a file, and code
(tests, the demo) may build them directly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from sidecar.endpoints import ApiFormat, path_format
from sidecar.pricing import Price

__all__ = [
    "ALL_INTERFACES",
    "DEFAULT_LISTEN_HOST",
    "DEFAULT_METRICS_PROVIDER",
    "DEFAULT_TIERS",
    "IDENTITIES",
    "METRICS_PROVIDERS",
    "MIDDLEWARE_TYPES",
    "STRATEGIES",
    "ApiFormat",
    "AuthConfig",
    "Config",
    "HealthCheckConfig",
    "Identity",
    "LimitsConfig",
    "MeterConfig",
    "MetricsConfig",
    "MiB",
    "MiddlewareConfig",
    "Price",
    "RouteConfig",
    "RouteUpstream",
    "Strategy",
    "TimeoutsConfig",
    "TokenizerConfig",
    "UpstreamConfig",
]

MiB = 1024 * 1024


@dataclass(frozen=True, slots=True)
class TimeoutsConfig:
    connect: float = 10.0  # TCP+TLS connect to a provider
    first_byte: float = 300.0  # request sent -> response head (reasoning models think long)
    idle: float = 300.0  # max gap between two body reads from the provider
    total: float = 3600.0  # whole request; LLM streams can last many minutes
    client_idle: float = 75.0  # keep-alive connection with no request in flight
    # A request being read: its head must be complete this long after its first byte
    # arrived (or after its turn came, when pipelined), its body this long after its
    # head; else 408 and the connection closes (a slow or stalled client must not hold
    # a connection slot). Bodies are read whole, so this bounds the upload time.
    request_head: float = 10.0
    request_body: float = 60.0
    shutdown_grace: float = 30.0  # SIGTERM: how long in-flight streams may finish
    # on_client_disconnect: drain: how long the provider is read after the client left
    # (for its usage frame) before the request is cut and estimated as with abort.
    drain: float = 60.0
    # An SSE comment (": ping") goes to the client of an event stream once the provider
    # has been silent this long, so proxies in front (Nginx proxy_read_timeout, cloud
    # load balancers: 60 s by default) do not cut a stream whose model is thinking.
    # 0: off. Must be shorter than idle (a silence that long fails the stream anyway).
    heartbeat: float = 15.0


@dataclass(frozen=True, slots=True)
class LimitsConfig:
    max_body_bytes: int = 8 * MiB  # request JSON must be read whole to inspect it
    max_header_bytes: int = 64 * 1024  # request/response head
    max_headers: int = 100  # header lines in a request head (431 beyond)
    max_connections: int = 10_000  # open downstream connections per worker
    max_pipelined_bytes: int = 1 * MiB  # buffered bytes of requests queued behind one in flight
    write_high_water: int = 256 * 1024  # downstream buffer that pauses upstream reads
    write_low_water: int = 64 * 1024
    tap_body_bytes: int = 4 * MiB  # non-streaming body copy kept for usage extraction
    # Where token buckets live: "memory" (this process; workers: 1 only) or a
    # redis:// URL shared by every worker and host. When Redis cannot be reached,
    # "open" lets requests through uncharged, "closed" refuses them with 503.
    backend: str = "memory"
    redis_failure: Literal["open", "closed"] = "open"
    # Connect and reply deadline of one Redis call; past it the call counts as Redis
    # being unreachable (the failure mode above, then a 1 s breaker). Loopback answers in
    # ~0.2 ms; the margin is for a loaded host, not for a slow network.
    redis_timeout: float = 0.5
    # on_client_disconnect: drain: responses read to their end (for the provider's usage)
    # at once after their client left, per worker; beyond it a disconnect aborts.
    max_drains: int = 64


@dataclass(frozen=True, slots=True)
class HealthCheckConfig:
    """An active check: ``GET path`` every ``interval`` s, healthy on a 2xx within
    ``timeout`` s. Runs off the hot path (sidecar.health_check); routing reads its
    verdict as one flag."""

    path: str = "/health"
    interval: float = 10.0
    timeout: float = 2.0


@dataclass(frozen=True, slots=True)
class UpstreamConfig:
    name: str
    url: str  # normalised: scheme://host[:port][/base]
    scheme: Literal["http", "https"]
    host: str  # lower-case; an IPv6 address without brackets
    port: int
    base_path: str = ""  # prefix prepended to the request path ("" or "/something")
    format: ApiFormat = "openai"
    api_key: str | None = field(default=None, repr=False)  # secret: never logged
    forward_client_auth: bool = False  # pass the client's own credential through
    anthropic_version: str = "2023-06-01"
    # max_tokens a translated request gets when an OpenAI client named none (the
    # Messages API requires one); only read for format: anthropic (sidecar.translate).
    default_max_tokens: int = 4096
    ca_bundle: str | None = None
    tls_verify: bool = True
    pool_max_idle: int = 64  # idle keep-alive connections kept per upstream
    pool_idle_ttl: float = 60.0  # seconds an idle connection is kept
    # Avalanche protection (sidecar.gate): at most max_concurrent attempts run on this
    # upstream; more wait in a tier-ordered queue of at most max_queue for at most
    # queue_timeout s, then are shed (503 + retry-after). None: no limit, no queue.
    max_concurrent: int | None = None
    max_queue: int = 100
    queue_timeout: float = 10.0
    health_check: HealthCheckConfig | None = None


@dataclass(frozen=True, slots=True)
class RouteUpstream:
    upstream: UpstreamConfig
    weight: int = 1
    # The model name this upstream is sent instead of the one asked for (gpt-4o asked,
    # deepseek-chat sent); the meter keeps both. None: the client's model as is.
    model: str | None = None


@dataclass(frozen=True, slots=True)
class AuthConfig:
    """Sidecar API keys (``sidecar keys ...``): the file, and how often a running
    sidecar looks for keys created, revoked or rotated since it read it."""

    keys_db: str = "./keys.db"
    refresh: float = 1.0


# Who a request is, per route: nobody in particular; a sidecar API key
# (Authorization: Bearer / x-api-key, 401 without a good one); or the
# x-sidecar-user header set by a trusted peer (the Nginx in front).
Identity = Literal["none", "api_key", "header"]
IDENTITIES: tuple[Identity, ...] = ("none", "api_key", "header")


@dataclass(frozen=True, slots=True)
class MiddlewareConfig:
    """A validated middleware entry.

    ``config`` holds normalised values: token_limiter ``{"limit": int, "period":
    float seconds, "requests": int | None, "key": "api_key" | "route" | "client_ip"
    | "header:NAME" | None, "reserve": int, "tiers": {name: {"limit": int,
    "requests": int | None}}}``; metrics_collector ``{"provider": "prometheus"}``.
    """

    type: str
    config: dict[str, Any]


# How a route picks the upstream of an attempt (sidecar.router.Balancer).
Strategy = Literal["weighted", "priority", "least_inflight", "latency"]
STRATEGIES: tuple[Strategy, ...] = ("weighted", "priority", "least_inflight", "latency")
DisconnectPolicy = Literal["abort", "drain"]
DISCONNECT_POLICIES: tuple[DisconnectPolicy, ...] = ("abort", "drain")


@dataclass(frozen=True, slots=True)
class RouteConfig:
    path: str
    upstreams: tuple[RouteUpstream, ...]
    # Requested models this route serves: exact names or globs (fnmatch: * ? [..]).
    # Empty: any model. Routes sharing a path are tried in file order; the first whose
    # patterns match the body's "model" serves (a route with none is the fallback).
    models: tuple[str, ...] = ()
    middleware: tuple[MiddlewareConfig, ...] = ()
    # Failover (see sidecar.retry and sidecar.router): how the upstream of an attempt is
    # picked, which failures before the first byte try another, how many attempts a
    # request may make, and what share of the route's requests may be retried.
    strategy: Strategy = "weighted"
    retry_on: tuple[str, ...] | None = None  # None: sidecar.retry.DEFAULT_RETRY_ON
    max_attempts: int = 3
    retry_budget: float = 0.2
    identity: Identity = "none"
    # When the client hangs up mid-response: "abort" cuts the provider connection (it
    # stops generating; the row is a tiktoken estimate); "drain" keeps reading the
    # provider, discarding the bytes, until its usage frame (the row has the exact
    # usage, hidden reasoning tokens included), within timeouts.drain / limits.max_drains.
    on_client_disconnect: DisconnectPolicy = "abort"

    @property
    def format(self) -> ApiFormat:
        """The API format this path serves; derived from the path, never configured."""
        return path_format(self.path)


@dataclass(frozen=True, slots=True)
class MeterConfig:
    db: str = "./meter.db"
    queue_size: int = 100_000  # records buffered between hot path and writer
    batch_rows: int = 500  # commit at most this many rows at once
    flush_ms: int = 50  # ... or at least this often
    spill: str | None = None  # overflow JSONL file; default: <db>.spill.jsonl
    # The crash journal (sidecar.meter.journal): each request in flight is appended to
    # a per-process file when its first attempt starts and closed by its meter row, so
    # a restart after kill -9 records what was in flight as outcome 'interrupted'.
    journal: bool = True
    journal_dir: str | None = None  # default: <db>.journal
    journal_rotate_bytes: int = 4 * MiB  # a journal larger than this is compacted

    @property
    def spill_path(self) -> str:
        return self.spill if self.spill is not None else self.db + ".spill.jsonl"

    @property
    def journal_path(self) -> str | None:
        """The journal directory, or None when there is none (off, or no DB file)."""
        if not self.journal or self.db == ":memory:":
            return None
        return self.journal_dir if self.journal_dir is not None else self.db + ".journal"


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    """``/metrics`` (sidecar.metrics). Without ``listen`` it is answered on the main
    listener to loopback peers only; with it, on that address only (to any peer)."""

    enabled: bool = True
    listen_host: str | None = None
    listen_port: int | None = None
    # Tokens and cost also by key id (one series per key: off by default).
    per_key: bool = False
    # Distinct model (and key) label values before the rest count as "_other": the
    # model name comes from the client, so its series must be bounded.
    max_models: int = 200
    max_keys: int = 1000


@dataclass(frozen=True, slots=True)
class TokenizerConfig:
    dir: str | None = None


# Queue order under max_concurrent: earlier tiers are served first; the last is the
# tier of a request that names none, names an unknown one, or comes from an untrusted peer.
DEFAULT_TIERS: tuple[str, ...] = ("pro", "free")


DEFAULT_LISTEN_HOST = "127.0.0.1"  # loopback: exposing the sidecar must be a decision
ALL_INTERFACES = "0.0.0.0"  # what ":PORT" means


@dataclass(frozen=True, slots=True)
class Config:
    listen_host: str = DEFAULT_LISTEN_HOST
    listen_port: int = 8080
    workers: int = 1
    routes: tuple[RouteConfig, ...] = ()
    # Every upstream a route can use: named ones and those generated from inline targets.
    upstreams: dict[str, UpstreamConfig] = field(default_factory=dict)
    meter: MeterConfig = field(default_factory=MeterConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    timeouts: TimeoutsConfig = field(default_factory=TimeoutsConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    # The JSON access log (sidecar.access_log): None (off), "stdout", or a file path.
    access_log: str | None = None
    # Peers (the Nginx in front) whose x-sidecar-* identity headers are believed:
    # addresses or CIDR networks, as strings. Empty: the headers are ignored.
    trusted_peers: tuple[str, ...] = ()
    tiers: tuple[str, ...] = DEFAULT_TIERS
    auth: AuthConfig = field(default_factory=AuthConfig)
    # The price table (sidecar.pricing), as written: model name -> USD per million
    # tokens. These entries are laid over sidecar.pricing.DEFAULT_PRICES (an entry
    # replaces the default of its name) unless prices_defaults is false, in which case
    # they are the whole table. Runtime.build makes the PriceTable.
    prices: dict[str, Price] = field(default_factory=dict)
    prices_defaults: bool = True
    source: str = "<defaults>"
    # Derived from routes, for exact-path lookup on the hot path: the first route of
    # each path (model-matched routes sharing it are in Runtime).
    routes_by_path: dict[str, RouteConfig] = field(
        init=False, repr=False, compare=False, default_factory=dict
    )

    def __post_init__(self) -> None:
        by_path: dict[str, RouteConfig] = {}
        for r in self.routes:
            by_path.setdefault(r.path, r)
        object.__setattr__(self, "routes_by_path", by_path)

    def route_for(self, path: str) -> RouteConfig | None:
        """The first route whose path equals ``path`` exactly (a query string is ignored)."""
        q = path.find("?")
        return self.routes_by_path.get(path if q < 0 else path[:q])

    @property
    def listen(self) -> str:
        host = f"[{self.listen_host}]" if ":" in self.listen_host else self.listen_host
        return f"{host}:{self.listen_port}"


MIDDLEWARE_TYPES = ("metrics_collector", "token_limiter")
METRICS_PROVIDERS = ("prometheus",)
DEFAULT_METRICS_PROVIDER = "prometheus"
