"""YAML config -> frozen dataclasses.

Every default lives in this module (the dataclass field defaults below); nothing
else in the sidecar invents a limit or a timeout of its own.

Public API:

* ``load_config(path, env=None) -> Config`` raises the first ``ConfigError``.
* ``validate_config_file(path, env=None) -> list[ConfigError]`` returns every
  problem found, sorted by line (``sidecar check`` prints them all).
* ``parse_config_text(text, filename, ...)`` / ``validate_config_text(...)``:
  the same for a string (tests, stdin).

Rules the loader enforces (each violation is ``FILE:LINE: field.path: problem``):

* Line numbers come from PyYAML's node tree, never from the plain dict, so a
  problem points at the key or value that causes it.
* Unknown keys are errors at every depth; so are wrong types (the message names
  the expected type) and duplicate keys (PyYAML would silently keep the last).
* ``${VAR}`` and ``${VAR:-default}`` are expanded in string values (``:-`` uses
  the default when VAR is unset or empty, as in the shell); ``$${`` writes a
  literal ``${``. An unset variable without a default is an error naming the
  variable. A value that came from the environment is never echoed in an error,
  because it may be a secret.
* Numeric and boolean fields take native YAML values; a string only when it
  comes from ``${...}`` (``workers: ${WORKERS:-2}``), since the environment
  only holds strings.
* ``api_key`` must come from the environment (``${VAR}``); a literal key in the
  file is an error, because config files end up in repositories and tickets.
  ``${VAR:-placeholder}`` is the way to give a local server a dummy key. An
  empty value means "no key".
* Relative paths written in the file (``meter.db``, ``meter.spill``,
  ``upstreams.*.ca_bundle``, ``tokenizer.dir``) are resolved against the
  directory of the config file, and so is the default ``meter.db``: the same
  file then means the same thing whether it is run by systemd, by
  ``sidecar check`` from a repo root, or by a test from a temp dir. ``~`` is
  expanded. ``Config()`` built in code (no file) keeps the defaults as written,
  i.e. relative to the working directory.
* ``listen``: ``":8080"`` binds all IPv4 interfaces (0.0.0.0); ``8080`` or
  ``"8080"`` binds the default host 127.0.0.1; ``"HOST:PORT"`` and
  ``"[IPv6]:PORT"`` bind that address. Port 0 asks the OS for a free port.
* A route target is, in order: the name of an entry under ``upstreams:``; a URL
  (``http(s)://host[:port][/base]``); a bare ``host[:port][/base]`` (https when
  the port is absent or 443, else http). A bare host must look like a host (a
  dot, a port, ``localhost`` or an IP) so that a misspelt upstream name is an
  error rather than a DNS lookup. Inline targets become ``UpstreamConfig``
  entries in ``Config.upstreams`` named ``host[:port][/base]`` (the full URL if
  that name is taken).
* Well-known hosts: ``api.openai.com`` is format ``openai`` and
  ``api.anthropic.com`` is ``anthropic`` when no format is given (named or
  inline). An inline target on those hosts takes its key from
  ``OPENAI_API_KEY`` / ``ANTHROPIC_API_KEY`` when that variable is set; a
  named upstream states its ``api_key`` explicitly.
* A route's API format follows its path: ``/v1/messages`` is anthropic;
  ``/v1/chat/completions``, ``/v1/completions``, ``/v1/responses``,
  ``/v1/embeddings`` and any other path are openai (other paths are passed
  through as is). Every upstream of a route must speak the route's format:
  relaying bytes of one format to a client expecting the other would be wrong,
  and translation does not exist yet.
"""

from __future__ import annotations

import difflib
import math
import os
import re
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, NoReturn, TypeVar
from urllib.parse import urlsplit

import yaml
from yaml.constructor import SafeConstructor
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from sidecar.addresses import is_ip_literal
from sidecar.errors import ConfigError

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
    host: str  # lower-case; an IPv6 address without brackets
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
    """A validated middleware entry.

    ``config`` holds normalised values: token_limiter ``{"limit": int,
    "period": float seconds}``; metrics_collector ``{"provider": "prometheus"}``.
    """

    type: str
    config: dict[str, Any]


@dataclass(frozen=True, slots=True)
class RouteConfig:
    path: str
    upstreams: tuple[RouteUpstream, ...]
    middleware: tuple[MiddlewareConfig, ...] = ()

    @property
    def format(self) -> ApiFormat:
        """The API format this path serves; derived from the path, never configured."""
        return route_format(self.path)


@dataclass(frozen=True, slots=True)
class MeterConfig:
    db: str = "./meter.db"
    queue_size: int = 100_000  # records buffered between hot path and writer
    batch_rows: int = 500  # commit at most this many rows at once
    flush_ms: int = 50  # ... or at least this often
    spill: str | None = None  # overflow JSONL file; default: <db>.spill.jsonl

    @property
    def spill_path(self) -> str:
        return self.spill if self.spill is not None else self.db + ".spill.jsonl"


@dataclass(frozen=True, slots=True)
class TokenizerConfig:
    dir: str | None = None


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
    source: str = "<defaults>"
    # Derived from routes, for exact-path lookup on the hot path.
    routes_by_path: dict[str, RouteConfig] = field(
        init=False, repr=False, compare=False, default_factory=dict
    )

    def __post_init__(self) -> None:
        object.__setattr__(self, "routes_by_path", {r.path: r for r in self.routes})

    def route_for(self, path: str) -> RouteConfig | None:
        """The route whose path equals ``path`` exactly (a query string is ignored)."""
        q = path.find("?")
        return self.routes_by_path.get(path if q < 0 else path[:q])

    @property
    def listen(self) -> str:
        host = f"[{self.listen_host}]" if ":" in self.listen_host else self.listen_host
        return f"{host}:{self.listen_port}"


# API format served by each known path; any other path is openai-style passthrough.
PATH_FORMATS: dict[str, ApiFormat] = {
    "/v1/chat/completions": "openai",
    "/v1/completions": "openai",
    "/v1/responses": "openai",
    "/v1/embeddings": "openai",
    "/v1/messages": "anthropic",
}

# Hosts whose API format and key variable are known without being told.
WELL_KNOWN_HOSTS: dict[str, tuple[ApiFormat, str]] = {
    "api.openai.com": ("openai", "OPENAI_API_KEY"),
    "api.anthropic.com": ("anthropic", "ANTHROPIC_API_KEY"),
}

MIDDLEWARE_TYPES = ("metrics_collector", "token_limiter")
METRICS_PROVIDERS = ("prometheus",)
DEFAULT_METRICS_PROVIDER = "prometheus"


def route_format(path: str) -> ApiFormat:
    return PATH_FORMATS.get(path, "openai")


# --------------------------------------------------------------------------- public entry points


def load_config(path: str | os.PathLike[str], env: Mapping[str, str] | None = None) -> Config:
    """Load and validate ``path``; raise the first ``ConfigError`` (by line)."""
    cfg, errors = _load_file(os.fspath(path), env)
    if errors:
        raise errors[0]
    assert cfg is not None
    return cfg


def validate_config_file(
    path: str | os.PathLike[str], env: Mapping[str, str] | None = None
) -> list[ConfigError]:
    """Every problem in ``path``, sorted by line; empty when it loads."""
    return _load_file(os.fspath(path), env)[1]


def parse_config_text(
    text: str,
    filename: str = "<string>",
    env: Mapping[str, str] | None = None,
    base_dir: str | None = None,
) -> Config:
    """Like ``load_config`` for text already in memory.

    Relative paths resolve against ``base_dir``, by default the directory of
    ``filename`` (the working directory for ``<string>``).
    """
    cfg, errors = _build(text, filename, env, base_dir)
    if errors:
        raise errors[0]
    assert cfg is not None
    return cfg


def validate_config_text(
    text: str,
    filename: str = "<string>",
    env: Mapping[str, str] | None = None,
    base_dir: str | None = None,
) -> list[ConfigError]:
    return _build(text, filename, env, base_dir)[1]


# --------------------------------------------------------------------------- reading and parsing

_ROOT = "<root>"  # field path of problems with the document as a whole
_YAML = "<yaml>"  # field path of YAML syntax problems


def _load_file(path: str, env: Mapping[str, str] | None) -> tuple[Config | None, list[ConfigError]]:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        return None, [ConfigError(path, None, _ROOT, f"cannot read the file: {e.strerror}")]
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        return None, [ConfigError(path, line, _ROOT, "the file is not valid UTF-8")]
    return _build(text, path, env, None)


def _build(
    text: str, filename: str, env: Mapping[str, str] | None, base_dir: str | None
) -> tuple[Config | None, list[ConfigError]]:
    if base_dir is None:
        base_dir = (
            os.getcwd() if filename.startswith("<") else os.path.dirname(os.path.abspath(filename))
        )
    ctx = _Ctx(filename, base_dir, os.environ if env is None else env)
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as e:
        return None, [_yaml_error(filename, e)]
    except yaml.reader.ReaderError as e:
        line = text.count("\n", 0, e.position) + 1
        return None, [ConfigError(filename, line, _YAML, f"invalid YAML: {e.reason}")]
    except yaml.YAMLError as e:  # any other PyYAML failure still names the file
        return None, [ConfigError(filename, None, _YAML, f"invalid YAML ({type(e).__name__})")]
    if root is None:
        return None, [ConfigError(filename, 1, _ROOT, "the file is empty; expected a mapping")]
    if not isinstance(root, MappingNode):
        return None, [
            ConfigError(filename, 1, _ROOT, f"the file must be a mapping, got {_kind(root)}")
        ]
    cfg = _config(ctx, root)
    # Sort by line so output reads top to bottom; sorted() is stable within a line.
    errors = sorted(ctx.errors, key=lambda e: e.line or 0)
    return (None if errors else cfg), errors


def _yaml_error(filename: str, e: yaml.MarkedYAMLError) -> ConfigError:
    # Only problem/context are used: str(e) would quote a snippet of the file,
    # which could be a secret someone pasted in.
    mark = e.problem_mark or e.context_mark
    line = mark.line + 1 if mark is not None else None
    problem = f"invalid YAML: {e.problem or e.context or 'syntax error'}"
    if e.problem and e.context:
        where = f" at line {e.context_mark.line + 1}" if e.context_mark is not None else ""
        problem += f" ({e.context}{where})"
    return ConfigError(filename, line, _YAML, problem)


# --------------------------------------------------------------------------- walking nodes

_STR = "tag:yaml.org,2002:str"
_INT = "tag:yaml.org,2002:int"
_FLOAT = "tag:yaml.org,2002:float"
_BOOL = "tag:yaml.org,2002:bool"
_NULL = "tag:yaml.org,2002:null"
_TIMESTAMP = "tag:yaml.org,2002:timestamp"
_MERGE = "tag:yaml.org,2002:merge"

T = TypeVar("T")


class _Bad(Exception):
    """A problem with one value; the caller knows its field path and node."""

    def __init__(self, problem: str, node: Node | None = None) -> None:
        super().__init__(problem)
        self.problem = problem
        self.node = node


class _Ctx:
    def __init__(self, file: str, base_dir: str, env: Mapping[str, str]) -> None:
        self.file = file
        self.base_dir = base_dir
        self.env = env
        # One constructor per load: it caches constructed objects by node.
        self.constructor = SafeConstructor()
        self.errors: list[ConfigError] = []

    def error(self, node: Node | None, path: str, problem: str) -> None:
        self.errors.append(ConfigError(self.file, _line(node), path or _ROOT, problem))

    def resolve_path(self, value: str) -> str:
        if value == ":memory:":  # SQLite's in-memory database is not a file
            return value
        p = os.path.expanduser(value)
        return os.path.normpath(os.path.join(self.base_dir, p))


def _line(node: Node | None) -> int | None:
    if node is None or node.start_mark is None:
        return None
    return int(node.start_mark.line) + 1


_SIMPLE_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*\Z")


def _join(path: str, key: str) -> str:
    if _SIMPLE_KEY.match(key):
        return f"{path}.{key}" if path else key
    return f'{path}["{key}"]'


def _kind(node: Node) -> str:
    if isinstance(node, MappingNode):
        return "a mapping"
    if isinstance(node, SequenceNode):
        return "a list"
    return {
        _NULL: "null",
        _BOOL: "a boolean",
        _INT: "an integer",
        _FLOAT: "a number",
        _STR: "a string",
        _TIMESTAMP: "a date",
    }.get(node.tag, f"a value tagged {node.tag}")


@dataclass(frozen=True, slots=True)
class _Val:
    value: object  # None, bool, int, float or str (env-expanded)
    raw: str  # the scalar as written in the file
    from_env: bool  # value came through ${...}: never echo it


def _read(ctx: _Ctx, node: Node, expected: str) -> _Val:
    """The value of a scalar node, or _Bad naming the expected type."""
    if not isinstance(node, ScalarNode):
        raise _Bad(f"must be {expected}, got {_kind(node)}")
    raw = str(node.value)
    if node.tag == _STR:
        text, from_env = _expand(raw, ctx.env)
        return _Val(text, raw, from_env)
    if node.tag == _TIMESTAMP:
        # YAML 1.1 reads 2023-06-01 as a date; every date-like field here is a string.
        return _Val(raw, raw, False)
    if node.tag in (_NULL, _BOOL, _INT, _FLOAT):
        try:
            value = ctx.constructor.construct_object(node, deep=True)
        except yaml.YAMLError as e:  # e.g. an out-of-range float literal
            raise _Bad(f"must be {expected}, got an unreadable {_kind(node)}") from e
        return _Val(value, raw, False)
    raise _Bad(f"must be {expected}, got a value with unsupported YAML tag {node.tag!r}")


def _show(v: _Val) -> str:
    if v.from_env:
        return f"the value of {_clip(v.raw)!r} (not shown)"
    if v.value is None:
        return "null"
    if isinstance(v.value, bool):
        return "true" if v.value else "false"
    if isinstance(v.value, str):
        return repr(_clip(v.value))
    return str(v.value)


def _clip(s: str, n: int = 80) -> str:
    return s if len(s) <= n else s[: n - 3] + "..."


_ENV_REF = re.compile(r"\$\$\{|\$\{")
_ENV_BODY = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)(?::-(.*))?\Z", re.DOTALL)


def _expand(raw: str, env: Mapping[str, str]) -> tuple[str, bool]:
    """Expand ${VAR} and ${VAR:-default}; $${ is a literal ${."""
    if "${" not in raw:
        return raw, False
    out: list[str] = []
    pos = 0
    used = False
    while (m := _ENV_REF.search(raw, pos)) is not None:
        out.append(raw[pos : m.start()])
        if m.group() == "$${":
            out.append("${")
            pos = m.end()
            continue
        end = raw.find("}", m.end())
        if end < 0:
            raise _Bad(f"unterminated ${{...}} in {_clip(raw)!r}")
        body = raw[m.end() : end]
        bm = _ENV_BODY.match(body)
        if bm is None:
            raise _Bad(
                f"malformed reference ${{{_clip(body, 40)}}}; use ${{VAR}} or ${{VAR:-default}}"
            )
        name, default = bm.group(1), bm.group(2)
        value = env.get(name)
        if default is not None and not value:
            value = default
        if value is None:
            raise _Bad(f"environment variable {name} is not set (write ${{{name}:-}} if optional)")
        out.append(value)
        used = True
        pos = end + 1
    out.append(raw[pos:])
    return "".join(out), used


def _mapping(
    ctx: _Ctx, node: Node, path: str, allowed: Collection[str] | None
) -> dict[str, tuple[Node, Node]]:
    """Keys of a mapping node -> (key node, value node); problems are recorded.

    ``allowed=None`` accepts any key (maps of names). ``key: `` (null) reads as
    an empty mapping, so a section whose lines are all commented out is fine.
    """
    if _is_null(node):
        return {}
    if not isinstance(node, MappingNode):
        ctx.error(node, path, f"must be a mapping, got {_kind(node)}")
        return {}
    own = {id(k) for k, _ in node.value if k.tag != _MERGE}
    try:
        ctx.constructor.flatten_mapping(node)  # resolve YAML merge keys (<<: *base)
    except yaml.MarkedYAMLError as e:
        # e.problem only: str(e) quotes a snippet of the file.
        mark = e.problem_mark
        line = mark.line + 1 if mark is not None else _line(node)
        problem = f"bad merge key (<<): {e.problem or 'cannot merge'}"
        ctx.errors.append(ConfigError(ctx.file, line, path or _ROOT, problem))
        # Check the keys written here anyway, without the merge, so that the
        # merge problem is not followed by a "missing" error for each key.
        node.value = [(k, v) for k, v in node.value if k.tag != _MERGE]
    out: dict[str, tuple[Node, Node]] = {}
    for knode, vnode in node.value:
        if not (isinstance(knode, ScalarNode) and knode.tag == _STR):
            ctx.error(knode, path, f"keys must be strings, got {_kind(knode)}")
            continue
        key = str(knode.value)
        if allowed is not None and key not in allowed:
            ctx.error(knode, _join(path, key), _unknown_key(key, allowed))
            continue
        prev = out.get(key)
        # Keys merged in with << may be overridden; two keys written here may not.
        if prev is not None and id(prev[0]) in own and id(knode) in own:
            ctx.error(knode, _join(path, key), f"duplicate key (first at line {_line(prev[0])})")
            continue
        out[key] = (knode, vnode)
    return out


def _unknown_key(key: str, allowed: Collection[str]) -> str:
    close = difflib.get_close_matches(key, list(allowed), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"unknown key{hint}; allowed: {', '.join(sorted(allowed))}"


def _sequence(ctx: _Ctx, node: Node, path: str) -> list[Node] | None:
    if not isinstance(node, SequenceNode):
        ctx.error(node, path, f"must be a list, got {_kind(node)}")
        return None
    return list(node.value)


Conv = Callable[[_Ctx, Node], Any]


def _fields(
    ctx: _Ctx,
    node: Node,
    path: str,
    spec: Mapping[str, Conv],
    required: Collection[str] = (),
) -> tuple[dict[str, Any], dict[str, tuple[Node, Node]]]:
    """Convert each key of a mapping with its converter; return the good ones."""
    m = _mapping(ctx, node, path, spec.keys())
    out: dict[str, Any] = {}
    for key, (_, vnode) in m.items():
        try:
            out[key] = spec[key](ctx, vnode)
        except _Bad as e:
            ctx.error(e.node or vnode, _join(path, key), e.problem)
    # A node that is not a mapping at all already has its error; don't pile on.
    if isinstance(node, MappingNode) or _is_null(node):
        for key in required:
            if key not in m:
                ctx.error(node, _join(path, key), "is required")
    return out, m


def _is_null(node: Node) -> bool:
    return isinstance(node, ScalarNode) and node.tag == _NULL


def _convert(ctx: _Ctx, conv: Callable[[_Ctx, Node], T], node: Node, path: str) -> T | None:
    try:
        return conv(ctx, node)
    except _Bad as e:
        ctx.error(e.node or node, path, e.problem)
        return None


# --------------------------------------------------------------------------- value converters

_INT_TEXT = re.compile(r"[-+]?[0-9][0-9_]*\Z")
_TRUE = frozenset({"true", "yes", "on", "1"})
_FALSE = frozenset({"false", "no", "off", "0"})


def _as_int(v: _Val) -> int | None:
    if isinstance(v.value, int) and not isinstance(v.value, bool):
        return v.value
    if v.from_env and isinstance(v.value, str) and _INT_TEXT.match(v.value.strip()):
        return int(v.value.strip().replace("_", ""))
    return None


def _c_str(ctx: _Ctx, node: Node) -> str:
    v = _read(ctx, node, "a string")
    if isinstance(v.value, str):
        return v.value
    raise _Bad(f"must be a string, got {_show(v)}")


def _c_bool(ctx: _Ctx, node: Node) -> bool:
    v = _read(ctx, node, "a boolean (true or false)")
    if isinstance(v.value, bool):
        return v.value
    if v.from_env and isinstance(v.value, str):
        low = v.value.strip().lower()
        if low in _TRUE or low in _FALSE:
            return low in _TRUE
    raise _Bad(f"must be a boolean (true or false), got {_show(v)}")


def _int(lo: int) -> Conv:
    expected = f"an integer >= {lo}"

    def conv(ctx: _Ctx, node: Node) -> int:
        v = _read(ctx, node, expected)
        n = _as_int(v)
        if n is None or n < lo:
            raise _Bad(f"must be {expected}, got {_show(v)}")
        return n

    return conv


def _choice(options: Collection[str]) -> Conv:
    expected = "one of " + ", ".join(options)

    def conv(ctx: _Ctx, node: Node) -> str:
        v = _read(ctx, node, expected)
        if isinstance(v.value, str) and v.value in options:
            return v.value
        raise _Bad(f"must be {expected}, got {_show(v)}")

    return conv


_DURATION_PART = re.compile(r"([0-9]+(?:\.[0-9]+)?)(ms|s|m|h|d)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def _parse_duration(text: str, bare_scale: float) -> float | None:
    """'500ms', '30s', '5m', '1h', '1d', '1h30m'; a bare number times bare_scale."""
    s = text.strip()
    try:
        return float(s) * bare_scale
    except ValueError:
        pass
    total = 0.0
    pos = 0
    for m in _DURATION_PART.finditer(s):
        if m.start() != pos:
            return None
        total += float(m.group(1)) * _UNIT_SECONDS[m.group(2)]
        pos = m.end()
    return total if pos == len(s) and pos > 0 else None


def _duration_seconds(ctx: _Ctx, node: Node, expected: str, bare_scale: float) -> float:
    v = _read(ctx, node, expected)
    secs: float | None = None
    if isinstance(v.value, (int, float)) and not isinstance(v.value, bool):
        secs = float(v.value) * bare_scale
    elif isinstance(v.value, str):
        secs = _parse_duration(v.value, bare_scale)
    if secs is None or not math.isfinite(secs):
        raise _Bad(f"must be {expected}, got {_show(v)}")
    return secs


def _duration(allow_zero: bool = False) -> Conv:
    bound = ">= 0" if allow_zero else "> 0"
    expected = f"a duration {bound} (seconds, or a string like '500ms', '30s', '5m', '1h')"

    def conv(ctx: _Ctx, node: Node) -> float:
        secs = _duration_seconds(ctx, node, expected, 1.0)
        if secs < 0 or (secs == 0 and not allow_zero):
            raise _Bad(f"must be {expected}, got {_show(_read(ctx, node, expected))}")
        return secs

    return conv


def _c_millis(ctx: _Ctx, node: Node) -> int:
    # A field named *_ms: a bare number is milliseconds; '2s' is accepted too.
    expected = "a duration in milliseconds >= 1 (an integer, or a string like '50ms', '1s')"
    secs = _duration_seconds(ctx, node, expected, 0.001)
    ms = round(secs * 1000)
    if ms < 1:
        raise _Bad(f"must be {expected}, got {_show(_read(ctx, node, expected))}")
    return ms


_SIZE = re.compile(r"([0-9]+(?:\.[0-9]+)?)\s*([KMGT]i?B|B)?\Z", re.IGNORECASE)
_SIZE_UNITS = {
    "b": 1,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "tb": 1000**4,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
}


def _size(lo: int = 1) -> Conv:
    expected = f"a size in bytes >= {lo} (an integer, or a string like '64KiB', '8MiB', '1MB')"

    def conv(ctx: _Ctx, node: Node) -> int:
        v = _read(ctx, node, expected)
        n: int | None = None
        if isinstance(v.value, int) and not isinstance(v.value, bool):
            n = v.value
        elif isinstance(v.value, str) and (m := _SIZE.match(v.value.strip())):
            n = int(float(m.group(1)) * _SIZE_UNITS[(m.group(2) or "b").lower()])
        if n is None or n < lo:
            raise _Bad(f"must be {expected}, got {_show(v)}")
        return n

    return conv


def _path(must_be: Literal["file", "dir"] | None = None) -> Conv:
    """A path resolved against the config file's directory; null means unset."""

    def conv(ctx: _Ctx, node: Node) -> str | None:
        v = _read(ctx, node, "a path")
        if v.value is None or v.value == "":
            return None
        if not isinstance(v.value, str):
            raise _Bad(f"must be a path, got {_show(v)}")
        p = ctx.resolve_path(v.value)
        if must_be == "file" and not os.path.isfile(p):
            raise _Bad(f"file not found: {p!r}")
        if must_be == "dir" and not os.path.isdir(p):
            raise _Bad(f"directory not found: {p!r}")
        return p

    return conv


def _c_db_path(ctx: _Ctx, node: Node) -> str:
    p = _path()(ctx, node)
    if p is None:
        raise _Bad("must be a path to the SQLite file (or ':memory:'), got nothing")
    assert isinstance(p, str)
    return p


def _c_api_key(ctx: _Ctx, node: Node) -> str | None:
    # Never echo anything of this value, whatever went wrong.
    if not isinstance(node, ScalarNode):
        raise _Bad(f"must be a string from the environment, got {_kind(node)}")
    if node.tag == _NULL:
        return None
    if node.tag != _STR:
        raise _Bad(f"must be a string from the environment, got {_kind(node)} (not shown)")
    v = _read(ctx, node, "a string")
    assert isinstance(v.value, str)
    if not v.from_env and v.value:
        raise _Bad(
            "must come from the environment, e.g. ${OPENAI_API_KEY}; a literal key in the "
            "file is not allowed (the value is not shown)"
        )
    return v.value or None


# --------------------------------------------------------------------------- listen and URLs

_HOST_LABEL = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?\Z")


def _valid_host(host: str) -> bool:
    if is_ip_literal(host):
        return True
    try:
        ascii_host = host.encode("idna").decode("ascii")
    except UnicodeError:
        return False
    labels = ascii_host.rstrip(".").split(".")
    return len(ascii_host) <= 253 and all(_HOST_LABEL.match(label) for label in labels)


def _c_listen(ctx: _Ctx, node: Node) -> tuple[str, int]:
    expected = "a port or HOST:PORT (e.g. ':8080', '127.0.0.1:8080', '[::1]:8080')"
    v = _read(ctx, node, expected)

    def bad() -> NoReturn:
        raise _Bad(f"must be {expected}, got {_show(v)}")

    if isinstance(v.value, int) and not isinstance(v.value, bool):
        host, port_text = DEFAULT_LISTEN_HOST, str(v.value)
    elif isinstance(v.value, str):
        s = v.value.strip()
        if s.isdigit():
            host, port_text = DEFAULT_LISTEN_HOST, s
        elif s.startswith("["):
            close = s.find("]")
            if close < 0 or s[close + 1 : close + 2] != ":":
                bad()
            host, port_text = s[1:close], s[close + 2 :]
            if ":" not in host or not is_ip_literal(host):
                bad()
        else:
            host, sep, port_text = s.rpartition(":")
            if not sep or ":" in host:  # a bare IPv6 address needs brackets
                bad()
            host = host or ALL_INTERFACES
            if not _valid_host(host):
                bad()
    else:
        bad()
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise _Bad(f"port must be 0..65535 (0 picks a free port), got {_show(v)}")
    return host.lower(), int(port_text)


@dataclass(frozen=True, slots=True)
class _Url:
    scheme: Literal["http", "https"]
    host: str
    port: int
    base_path: str
    explicit_port: bool

    @property
    def short(self) -> str:
        """host[:port][/base]: the port only when it is not the scheme's default."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        default = 443 if self.scheme == "https" else 80
        port = "" if self.port == default else f":{self.port}"
        return f"{host}{port}{self.base_path}"

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.short}"


def _parse_url(text: str, bare: bool) -> _Url:
    """A URL with scheme, or (bare=True) host[:port][/base] with the scheme implied."""
    if bare:
        rest = text
        scheme: Literal["http", "https"] | None = None
    else:
        given, _, rest = text.partition("://")
        low = given.lower()
        if low not in ("http", "https"):
            raise _Bad(f"URL scheme must be http or https, got {_clip(given)!r}")
        scheme = "https" if low == "https" else "http"
    netloc = rest.split("/", 1)[0]
    if "@" in netloc:  # not echoed: user:password@ is a credential
        raise _Bad("credentials in the URL are not allowed; use api_key: ${VAR}")
    if "?" in rest or "#" in rest:
        raise _Bad(f"must not have a query or fragment, got {_clip(text)!r}")
    try:
        parts = urlsplit("//" + rest)
    except ValueError as e:  # e.g. an unclosed [IPv6 bracket
        raise _Bad(f"is not a valid URL or host ({e}): {_clip(text)!r}") from e
    host = (parts.hostname or "").lower()
    if not host or not _valid_host(host):
        raise _Bad(f"has no valid host: {_clip(text)!r}")
    try:
        port = parts.port
    except ValueError:
        port = -1
    if port is not None and not 1 <= port <= 65535:
        raise _Bad(f"port must be 1..65535 in {_clip(text)!r}")
    if scheme is None:
        scheme = "https" if port in (None, 443) else "http"
    explicit = port is not None
    if port is None:
        port = 443 if scheme == "https" else 80
    base = parts.path.rstrip("/")
    if base and not base.startswith("/"):
        base = "/" + base
    return _Url(scheme, host, port, base, explicit)


def _c_url(ctx: _Ctx, node: Node) -> _Url:
    text = _c_str(ctx, node).strip()
    if "://" not in text:
        raise _Bad(f"must be a URL starting with http:// or https://, got {_clip(text)!r}")
    return _parse_url(text, bare=False)


def _looks_like_host(u: _Url) -> bool:
    return u.explicit_port or "." in u.host or u.host == "localhost" or is_ip_literal(u.host)


# --------------------------------------------------------------------------- sections


def _config(ctx: _Ctx, root: MappingNode) -> Config:
    top = _mapping(
        ctx,
        root,
        "",
        ("listen", "workers", "upstreams", "routes", "meter", "limits", "timeouts", "tokenizer"),
    )
    kwargs: dict[str, Any] = {"source": ctx.file}
    if "listen" in top:
        hp = _convert(ctx, _c_listen, top["listen"][1], "listen")
        if hp is not None:
            kwargs["listen_host"], kwargs["listen_port"] = hp
    if "workers" in top:
        w = _convert(ctx, _int(1), top["workers"][1], "workers")
        if w is not None:
            kwargs["workers"] = w

    named: dict[str, UpstreamConfig | None] = {}
    if "upstreams" in top:
        for name, (knode, vnode) in _mapping(ctx, top["upstreams"][1], "upstreams", None).items():
            named[name] = _named_upstream(ctx, name, knode, vnode, _join("upstreams", name))
    reg = _Registry(ctx, named)
    if "routes" in top:
        kwargs["routes"] = _routes(ctx, top["routes"][1], reg)
    kwargs["upstreams"] = reg.all()

    meter_node = top["meter"][1] if "meter" in top else None
    kwargs["meter"] = _meter(ctx, meter_node)
    if "limits" in top:
        kwargs["limits"] = _limits(ctx, top["limits"][1])
    if "timeouts" in top:
        kwargs["timeouts"] = _timeouts(ctx, top["timeouts"][1])
    if "tokenizer" in top:
        vals, _ = _fields(ctx, top["tokenizer"][1], "tokenizer", {"dir": _path("dir")})
        kwargs["tokenizer"] = TokenizerConfig(**vals)
    return Config(**kwargs)


_UPSTREAM_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]*\Z")

_UPSTREAM_FIELDS: dict[str, Conv] = {
    "url": _c_url,
    "format": _choice(("openai", "anthropic")),
    "api_key": _c_api_key,
    "forward_client_auth": _c_bool,
    "anthropic_version": _c_str,
    "ca_bundle": _path("file"),
    "tls_verify": _c_bool,
    "pool_max_idle": _int(0),
    "pool_idle_ttl": _duration(),
}


def _named_upstream(
    ctx: _Ctx, name: str, knode: Node, node: Node, path: str
) -> UpstreamConfig | None:
    n_errors = len(ctx.errors)
    if not _UPSTREAM_NAME.match(name):
        ctx.error(
            knode,
            path,
            "upstream names use letters, digits and . _ : - (starting with a letter or digit)",
        )
    vals, nodes = _fields(ctx, node, path, _UPSTREAM_FIELDS, required=("url",))
    url: _Url | None = vals.pop("url", None)
    if url is not None:
        fmt = vals.get("format") or _known_format(url.host)
        vals["format"] = fmt
        if url.scheme == "http" and vals.get("ca_bundle"):
            ctx.error(
                nodes["ca_bundle"][1], _join(path, "ca_bundle"), "only applies to https upstreams"
            )
        if "anthropic_version" in vals and fmt != "anthropic":
            ctx.error(
                nodes["anthropic_version"][1],
                _join(path, "anthropic_version"),
                "only applies to format: anthropic",
            )
    if vals.get("forward_client_auth") and vals.get("api_key"):
        # Both would send two credentials to the provider; one must be chosen.
        ctx.error(
            nodes["forward_client_auth"][1],
            _join(path, "forward_client_auth"),
            "cannot be true when api_key is set; choose one credential",
        )
    if url is None or len(ctx.errors) != n_errors:
        return None
    return UpstreamConfig(
        name=name,
        url=url.url,
        scheme=url.scheme,
        host=url.host,
        port=url.port,
        base_path=url.base_path,
        **vals,
    )


def _known_format(host: str) -> ApiFormat:
    known = WELL_KNOWN_HOSTS.get(host)
    return known[0] if known else "openai"


class _Registry:
    """Resolves route targets: named upstreams first, then inline host/URL targets."""

    def __init__(self, ctx: _Ctx, named: dict[str, UpstreamConfig | None]) -> None:
        self.ctx = ctx
        self.named = named
        self.inline: dict[str, UpstreamConfig] = {}  # normalised URL -> config

    def resolve(self, text: str) -> UpstreamConfig | None:
        """The upstream for a target; None when it is a named upstream with errors."""
        if text in self.named:
            return self.named[text]
        bare = "://" not in text
        u = _parse_url(text, bare=bare)
        if bare and not _looks_like_host(u):
            names = sorted(self.named)
            close = difflib.get_close_matches(text, names, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            defined = f"; named upstreams: {', '.join(names)}" if names else ""
            raise _Bad(
                f"{_clip(text)!r} is not a named upstream{hint} nor a host (a bare host needs "
                f"a dot or a port, or write a URL){defined}"
            )
        existing = self.inline.get(u.url)
        if existing is not None:
            return existing
        fmt: ApiFormat = "openai"
        key: str | None = None
        known = WELL_KNOWN_HOSTS.get(u.host)
        if known is not None:
            fmt = known[0]
            key = self.ctx.env.get(known[1]) or None
        cfg = UpstreamConfig(
            name=self._name(u),
            url=u.url,
            scheme=u.scheme,
            host=u.host,
            port=u.port,
            base_path=u.base_path,
            format=fmt,
            api_key=key,
        )
        self.inline[u.url] = cfg
        return cfg

    def _name(self, u: _Url) -> str:
        taken = set(self.named) | {c.name for c in self.inline.values()}
        for candidate in (u.short, u.url):
            if candidate not in taken:
                return candidate
        i = 2
        while f"{u.url}#{i}" in taken:
            i += 1
        return f"{u.url}#{i}"

    def all(self) -> dict[str, UpstreamConfig]:
        out = {name: cfg for name, cfg in self.named.items() if cfg is not None}
        out.update((cfg.name, cfg) for cfg in self.inline.values())
        return out


def _routes(ctx: _Ctx, node: Node, reg: _Registry) -> tuple[RouteConfig, ...]:
    if _is_null(node):
        return ()
    items = _sequence(ctx, node, "routes")
    if items is None:
        return ()
    routes: list[RouteConfig] = []
    first_line: dict[str, int | None] = {}
    for i, item in enumerate(items):
        path = f"routes[{i}]"
        route = _route(ctx, item, path, reg)
        if route is None:
            continue
        if route.path in first_line:
            ctx.error(
                _mapping_value(item, "path"),
                f"{path}.path",
                f"duplicate route path {route.path!r} (first at line {first_line[route.path]})",
            )
            continue
        first_line[route.path] = _line(_mapping_value(item, "path"))
        routes.append(route)
    return tuple(routes)


def _mapping_value(node: Node, key: str) -> Node:
    if isinstance(node, MappingNode):
        for k, v in node.value:
            if isinstance(k, ScalarNode) and k.value == key and isinstance(v, Node):
                return v
    return node


def _c_route_path(ctx: _Ctx, node: Node) -> str:
    p = _c_str(ctx, node)
    if not p.startswith("/") or any(c.isspace() or c in "?#" for c in p):
        raise _Bad(f"must start with '/' and contain no spaces, '?' or '#', got {_clip(p)!r}")
    return p


def _route(ctx: _Ctx, node: Node, path: str, reg: _Registry) -> RouteConfig | None:
    n_errors = len(ctx.errors)
    m = _mapping(ctx, node, path, ("path", "upstreams", "middleware"))
    if not isinstance(node, MappingNode):
        return None
    route_path: str | None = None
    if "path" in m:
        route_path = _convert(ctx, _c_route_path, m["path"][1], f"{path}.path")
    else:
        ctx.error(node, f"{path}.path", "is required")
    fmt = route_format(route_path) if route_path is not None else None

    ups: list[RouteUpstream] = []
    if "upstreams" not in m:
        ctx.error(node, f"{path}.upstreams", "is required")
    else:
        # Whole-list problems point at the key: a block list starts on the line below it.
        ups_key, ups_node = m["upstreams"]
        items = _sequence(ctx, ups_node, f"{path}.upstreams")
        if items is not None and not items:
            ctx.error(ups_key, f"{path}.upstreams", "must be a non-empty list")
        seen: dict[str, int | None] = {}
        for j, item in enumerate(items or ()):
            ru = _route_upstream(ctx, item, f"{path}.upstreams[{j}]", reg, route_path, fmt, seen)
            if ru is not None:
                ups.append(ru)
        if ups and len(ctx.errors) == n_errors and not any(u.weight > 0 for u in ups):
            ctx.error(ups_key, f"{path}.upstreams", "at least one upstream needs a weight > 0")

    middleware: list[MiddlewareConfig] = []
    if "middleware" in m:
        mw_node = m["middleware"][1]
        if not _is_null(mw_node):
            has_metrics = False
            for k, item in enumerate(_sequence(ctx, mw_node, f"{path}.middleware") or ()):
                mw = _middleware(ctx, item, f"{path}.middleware[{k}]")
                if mw is None:
                    continue
                if mw.type == "metrics_collector":
                    if has_metrics:  # two collectors would count every request twice
                        ctx.error(item, f"{path}.middleware[{k}].type", "metrics_collector twice")
                        continue
                    has_metrics = True
                middleware.append(mw)

    if route_path is None or len(ctx.errors) != n_errors:
        return None
    return RouteConfig(route_path, tuple(ups), tuple(middleware))


_FORMAT_TITLE = {"openai": "OpenAI", "anthropic": "Anthropic"}


def _route_upstream(
    ctx: _Ctx,
    node: Node,
    path: str,
    reg: _Registry,
    route_path: str | None,
    fmt: ApiFormat | None,
    seen: dict[str, int | None],
) -> RouteUpstream | None:
    vals, nodes = _fields(
        ctx, node, path, {"target": _c_str, "weight": _int(0)}, required=("target",)
    )
    if "target" not in vals:
        return None
    tnode = nodes["target"][1]
    target = vals["target"].strip()
    try:
        up = reg.resolve(target)
    except _Bad as e:
        ctx.error(tnode, f"{path}.target", e.problem)
        return None
    if up is None:  # a named upstream whose own errors are already reported
        return None
    if up.name in seen:
        ctx.error(
            tnode,
            f"{path}.target",
            f"upstream {up.name!r} is already listed at line {seen[up.name]}",
        )
        return None
    seen[up.name] = _line(tnode)
    if fmt is not None and up.format != fmt:
        ctx.error(
            tnode,
            f"{path}.target",
            f"route path {route_path} serves {_FORMAT_TITLE[fmt]} format but upstream "
            f"{up.name!r} is {up.format}; cross-format translation is not supported yet",
        )
        return None
    if "weight" not in vals and "weight" in nodes:
        return None  # bad weight, already reported
    return RouteUpstream(up, **{k: v for k, v in vals.items() if k == "weight"})


_MIDDLEWARE_FIELDS: dict[str, dict[str, Conv]] = {
    "token_limiter": {"limit": _int(1), "period": _duration()},
    "metrics_collector": {"provider": _choice(METRICS_PROVIDERS)},
}
_MIDDLEWARE_REQUIRED: dict[str, tuple[str, ...]] = {
    "token_limiter": ("limit", "period"),
    "metrics_collector": (),
}
_MIDDLEWARE_DEFAULTS: dict[str, dict[str, Any]] = {
    "token_limiter": {},
    "metrics_collector": {"provider": DEFAULT_METRICS_PROVIDER},
}


def _c_middleware_type(ctx: _Ctx, node: Node) -> str:
    t = _c_str(ctx, node)
    if t not in _MIDDLEWARE_FIELDS:
        raise _Bad(f"unknown middleware type {_clip(t)!r}; known: {', '.join(MIDDLEWARE_TYPES)}")
    return t


def _middleware(ctx: _Ctx, node: Node, path: str) -> MiddlewareConfig | None:
    n_errors = len(ctx.errors)
    m = _mapping(ctx, node, path, ("type", "config"))
    if not isinstance(node, MappingNode):
        return None
    if "type" not in m:
        ctx.error(node, f"{path}.type", "is required")
        return None
    mtype = _convert(ctx, _c_middleware_type, m["type"][1], f"{path}.type")
    if mtype is None:
        return None
    conf_node = m["config"][1] if "config" in m else None
    values = dict(_MIDDLEWARE_DEFAULTS[mtype])
    required = _MIDDLEWARE_REQUIRED[mtype]
    if conf_node is None:
        if required:
            ctx.error(node, f"{path}.config", f"is required ({', '.join(required)})")
    else:
        vals, _ = _fields(ctx, conf_node, f"{path}.config", _MIDDLEWARE_FIELDS[mtype], required)
        values.update(vals)
    if len(ctx.errors) != n_errors:
        return None
    return MiddlewareConfig(mtype, values)


def _meter(ctx: _Ctx, node: Node | None) -> MeterConfig:
    spec: dict[str, Conv] = {
        "db": _c_db_path,
        "queue_size": _int(1),
        "batch_rows": _int(1),
        "flush_ms": _c_millis,
        "spill": _path(),
    }
    vals: dict[str, Any] = {}
    if node is not None:
        vals, _ = _fields(ctx, node, "meter", spec)
    vals.setdefault("db", ctx.resolve_path(MeterConfig().db))  # the default sits beside the file
    return MeterConfig(**vals)


def _limits(ctx: _Ctx, node: Node) -> LimitsConfig:
    spec: dict[str, Conv] = {
        "max_body_bytes": _size(),
        "max_header_bytes": _size(),
        "max_connections": _int(1),
        "max_pipelined_bytes": _size(),
        "write_high_water": _size(),
        "write_low_water": _size(0),
        "tap_body_bytes": _size(),
    }
    vals, nodes = _fields(ctx, node, "limits", spec)
    cfg = LimitsConfig(**vals)
    if cfg.write_low_water > cfg.write_high_water:
        bad = "write_low_water" if "write_low_water" in nodes else "write_high_water"
        ctx.error(
            nodes[bad][1] if bad in nodes else node,
            f"limits.{bad}",
            f"write_low_water ({cfg.write_low_water}) must not exceed write_high_water "
            f"({cfg.write_high_water})",
        )
    return cfg


def _timeouts(ctx: _Ctx, node: Node) -> TimeoutsConfig:
    spec: dict[str, Conv] = {
        "connect": _duration(),
        "first_byte": _duration(),
        "idle": _duration(),
        "total": _duration(),
        "client_idle": _duration(),
        "shutdown_grace": _duration(allow_zero=True),  # 0: stop at once on SIGTERM
    }
    vals, _ = _fields(ctx, node, "timeouts", spec)
    return TimeoutsConfig(**vals)
