"""YAML config -> frozen dataclasses.

Every default lives in this module (the dataclass field defaults below); nothing
else in the sidecar invents a limit or a timeout of its own.

THE LOADER IS BEING WRITTEN (see load_config). The dataclasses below are the
interface the server relies on; extend them compatibly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

ApiFormat = Literal["openai", "anthropic"]

MiB = 1024 * 1024


@dataclass(frozen=True, slots=True)
class TimeoutsConfig:
    connect: float = 10.0  # TCP+TLS connect to a provider
    first_byte: float = 300.0  # request sent -> response head (reasoning models think long)
    idle: float = 300.0  # max gap between two body reads from the provider
    total: float = 3600.0  # whole request; LLM streams can last many minutes
    client_idle: float = 75.0  # keep-alive connection with no request in flight
    shutdown_grace: float = 30.0  # SIGTERM: how long in-flight streams may finish


@dataclass(frozen=True, slots=True)
class LimitsConfig:
    max_body_bytes: int = 8 * MiB  # request JSON must be read whole to inspect it
    max_header_bytes: int = 64 * 1024  # request/response head
    max_connections: int = 10_000  # open downstream connections per worker
    max_pipelined_bytes: int = 1 * MiB  # buffered bytes of requests queued behind one in flight
    write_high_water: int = 256 * 1024  # downstream buffer that pauses upstream reads
    write_low_water: int = 64 * 1024
    tap_body_bytes: int = 4 * MiB  # non-streaming body copy kept for usage extraction


@dataclass(frozen=True, slots=True)
class UpstreamConfig:
    name: str
    url: str  # normalised: scheme://host[:port][/base]
    scheme: Literal["http", "https"]
    host: str
    port: int
    base_path: str = ""  # prefix prepended to the request path ("" or "/something")
    format: ApiFormat = "openai"
    api_key: str | None = field(default=None, repr=False)  # secret: never logged
    forward_client_auth: bool = False  # pass the client's own credential through
    anthropic_version: str = "2023-06-01"
    ca_bundle: str | None = None
    tls_verify: bool = True
    pool_max_idle: int = 64  # idle keep-alive connections kept per upstream
    pool_idle_ttl: float = 60.0  # seconds an idle connection is kept


@dataclass(frozen=True, slots=True)
class RouteUpstream:
    upstream: UpstreamConfig
    weight: int = 1


@dataclass(frozen=True, slots=True)
class MiddlewareConfig:
    type: str
    config: dict[str, Any]


@dataclass(frozen=True, slots=True)
class RouteConfig:
    path: str
    upstreams: tuple[RouteUpstream, ...]
    middleware: tuple[MiddlewareConfig, ...] = ()


@dataclass(frozen=True, slots=True)
class MeterConfig:
    db: str = "./meter.db"
    queue_size: int = 100_000  # records buffered between hot path and writer
    batch_rows: int = 500  # commit at most this many rows at once
    flush_ms: int = 50  # ... or at least this often
    spill: str | None = None  # overflow JSONL file; default: <db>.spill.jsonl


@dataclass(frozen=True, slots=True)
class TokenizerConfig:
    dir: str | None = None


@dataclass(frozen=True, slots=True)
class Config:
    listen_host: str = "127.0.0.1"
    listen_port: int = 8080
    workers: int = 1
    routes: tuple[RouteConfig, ...] = ()
    upstreams: dict[str, UpstreamConfig] = field(default_factory=dict)
    meter: MeterConfig = field(default_factory=MeterConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    timeouts: TimeoutsConfig = field(default_factory=TimeoutsConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    source: str = "<defaults>"


def load_config(path: str) -> Config:
    raise NotImplementedError
