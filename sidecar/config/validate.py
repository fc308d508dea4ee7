"""The sections of a config file, validated and converted into the model.

Each section (upstreams, routes and their middleware, meter, limits, timeouts,
tokenizer) is read with the walk in ``yaml_lines`` and the converters in
``values``; every problem is recorded on the context rather than raised, so
one pass reports them all.

A route's API format follows its path, by ``sidecar.endpoints.path_format``:
a path ending in ``/messages`` is anthropic; ``/v1/chat/completions``,
``/v1/completions``, ``/v1/responses``, ``/v1/embeddings`` and any other path
are openai (other paths are passed through as is). An upstream of the other
format is allowed on a chat completions or messages route only: the sidecar
translates requests and answers between those two (``sidecar.translate``); other
endpoints have no counterpart, so there every upstream must speak the route's format.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
from typing import Any

from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from sidecar.config.model import (
    DEFAULT_METRICS_PROVIDER,
    DISCONNECT_POLICIES,
    IDENTITIES,
    METRICS_PROVIDERS,
    MIDDLEWARE_TYPES,
    STRATEGIES,
    ApiFormat,
    AuthConfig,
    Config,
    HealthCheckConfig,
    LimitsConfig,
    MeterConfig,
    MetricsConfig,
    MiddlewareConfig,
    Price,
    RouteConfig,
    RouteUpstream,
    TimeoutsConfig,
    TokenizerConfig,
    UpstreamConfig,
)
from sidecar.config.targets import (
    WELL_KNOWN_HOSTS,
    _c_listen,
    _c_url,
    _known_format,
    _Registry,
    _Url,
)
from sidecar.config.values import (
    _c_api_key,
    _c_bool,
    _c_db_path,
    _c_millis,
    _c_str,
    _choice,
    _duration,
    _fraction,
    _int,
    _number,
    _path,
    _size,
)
from sidecar.config.yaml_lines import (
    Conv,
    _Bad,
    _clip,
    _convert,
    _Ctx,
    _fields,
    _is_null,
    _join,
    _line,
    _mapping,
    _read,
    _sequence,
    _show,
)
from sidecar.endpoints import TRANSLATABLE_KINDS, kind_for_path, path_format
from sidecar.retry import RetryReason


def _config(ctx: _Ctx, root: MappingNode) -> Config:
    top = _mapping(
        ctx,
        root,
        "",
        ("listen", "workers", "upstreams", "routes", "meter", "limits", "timeouts", "tokenizer",
         "prices", "prices_defaults",
         "trusted_peers", "tiers", "auth", "metrics", "access_log"),
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
    for key, conv in (("trusted_peers", _c_peers), ("tiers", _c_tiers)):
        if key in top:
            value = _convert(ctx, conv, top[key][1], key)
            if value is not None:
                kwargs[key] = value
    if "metrics" in top:
        kwargs["metrics"] = _metrics(ctx, top["metrics"][1])
    if "access_log" in top:
        kwargs["access_log"] = _convert(ctx, _c_access_log, top["access_log"][1], "access_log")
    if "prices" in top:
        kwargs["prices"] = _prices(ctx, top["prices"][1])
    if "prices_defaults" in top:
        flag = _convert(ctx, _c_bool, top["prices_defaults"][1], "prices_defaults")
        if flag is not None:
            kwargs["prices_defaults"] = flag
    if "auth" in top:
        vals, _ = _fields(ctx, top["auth"][1], "auth",
                          {"keys_db": _c_db_path, "refresh": _duration()})
        kwargs["auth"] = AuthConfig(**vals)
    elif "routes" in kwargs:
        kwargs["auth"] = AuthConfig(keys_db=ctx.resolve_path(AuthConfig().keys_db))
    config = Config(**kwargs)
    _check_limits_backend(ctx, top, config)
    _check_metrics_listen(ctx, top, config)
    return config


def _check_metrics_listen(ctx: _Ctx, top: dict[str, tuple[Node, Node]], config: Config) -> None:
    m = config.metrics
    if m.listen_port is not None and m.listen_port != 0 \
            and m.listen_port == config.listen_port \
            and m.listen_host == config.listen_host:
        ctx.error(_mapping_value(top["metrics"][1], "listen"), "metrics.listen",
                  f"is the main listener's address ({config.listen}); leave it out to serve "
                  f"/metrics there (to loopback peers), or give it an address of its own")


def _check_limits_backend(ctx: _Ctx, top: dict[str, tuple[Node, Node]], config: Config) -> None:
    """Token buckets in one worker's memory would give each of N workers the whole limit."""
    limited = any(mw.type == "token_limiter" for r in config.routes for mw in r.middleware)
    if limited and config.workers > 1 and config.limits.backend == "memory":
        ctx.error(top["workers"][1], "workers",
                  f"{config.workers} workers with a token_limiter need a shared backend "
                  f"(limits.backend: redis://HOST:PORT); in-process buckets would let each "
                  f"worker spend the whole limit")


def _c_names(ctx: _Ctx, node: Node, what: str,
             allow_empty: bool = False) -> list[tuple[str, Node]]:
    """A string or a list of non-empty strings, each with its node."""
    items = node.value if isinstance(node, SequenceNode) else [node]
    if not items and not allow_empty:
        raise _Bad(f"must be {what} or a non-empty list of them")
    out: list[tuple[str, Node]] = []
    for item in items:
        v = _read(ctx, item, what)
        if not isinstance(v.value, str) or not v.value.strip():
            raise _Bad(f"must be {what}, got {_show(v)}", item)
        out.append((v.value.strip(), item))
    return out


def _c_peers(ctx: _Ctx, node: Node) -> tuple[str, ...]:
    """Addresses or CIDR networks (``127.0.0.1``, ``10.0.0.0/8``, ``::1``)."""
    out: list[str] = []
    for text, item in _c_names(ctx, node, "an IP address or CIDR network", allow_empty=True):
        try:
            out.append(str(ipaddress.ip_network(text, strict=False)))
        except ValueError:
            raise _Bad(f"must be an IP address or CIDR network, got {_clip(text)!r}",
                       item) from None
    return tuple(dict.fromkeys(out))


def _c_tiers(ctx: _Ctx, node: Node) -> tuple[str, ...]:
    """Tier names, served first to last; the last is the default tier."""
    names = _c_names(ctx, node, "a tier name")
    seen: set[str] = set()
    for name, item in names:
        if name in seen:
            raise _Bad(f"tier {_clip(name)!r} is listed twice", item)
        seen.add(name)
    return tuple(n for n, _ in names)


def _c_models(ctx: _Ctx, node: Node) -> tuple[str, ...]:
    """Model names or globs (``gpt-4o``, ``gpt-4o-*``, ``claude-?-sonnet``)."""
    return tuple(dict.fromkeys(n for n, _ in _c_names(ctx, node, "a model name or glob")))


_PRICE_FIELDS: dict[str, Conv] = dict.fromkeys(
    ("input", "output", "cached_read", "cached_write"), _number(0, "USD per million tokens"))


def _prices(ctx: _Ctx, node: Node) -> dict[str, Price]:
    """``prices:`` model name -> {input, output, cached_read?, cached_write?}: the entries
    laid over sidecar.pricing.DEFAULT_PRICES (see Config.prices)."""
    out: dict[str, Price] = {}
    for name, (knode, vnode) in _mapping(ctx, node, "prices", None).items():
        path, n_errors = _join("prices", name), len(ctx.errors)
        if not name or any(c.isspace() or c in "*?[" for c in name):
            ctx.error(knode, path, "must be a model name without spaces or globs; a name "
                      "also prices its dated variants (gpt-4o covers gpt-4o-2024-08-06)")
        vals, _ = _fields(ctx, vnode, path, _PRICE_FIELDS, required=("input", "output"))
        if len(ctx.errors) == n_errors:
            out[name] = Price(**vals)
    return out


def _health_check(ctx: _Ctx, node: Node, path: str) -> HealthCheckConfig | None:
    n_errors = len(ctx.errors)
    vals, nodes = _fields(ctx, node, path, {"path": _c_route_path, "interval": _duration(),
                                            "timeout": _duration()})
    if len(ctx.errors) != n_errors:
        return None
    cfg = HealthCheckConfig(**vals)
    if cfg.timeout >= cfg.interval:
        where = nodes["timeout"][1] if "timeout" in nodes else node
        ctx.error(where, _join(path, "timeout"), f"must be shorter than interval "
                  f"({cfg.timeout:g}s >= {cfg.interval:g}s)")
        return None
    return cfg


_UPSTREAM_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]*\Z")

_UPSTREAM_FIELDS: dict[str, Conv] = {
    "url": _c_url,
    "format": _choice(("openai", "anthropic")),
    "api_key": _c_api_key,
    "forward_client_auth": _c_bool,
    "anthropic_version": _c_str,
    "default_max_tokens": _int(1),
    "ca_bundle": _path("file"),
    "tls_verify": _c_bool,
    "pool_max_idle": _int(0),
    "pool_idle_ttl": _duration(),
    "max_concurrent": _int(1),
    "max_queue": _int(0),
    "queue_timeout": _duration(),
    "health_check": lambda ctx, node: node,  # a section: read by _health_check
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
    if "health_check" in vals:
        vals["health_check"] = _health_check(ctx, vals["health_check"],
                                             _join(path, "health_check"))
    url: _Url | None = vals.pop("url", None)
    if url is not None:
        fmt = vals.get("format") or _known_format(url.host)
        vals["format"] = fmt
        if url.scheme == "http" and vals.get("ca_bundle"):
            ctx.error(
                nodes["ca_bundle"][1], _join(path, "ca_bundle"), "only applies to https upstreams"
            )
        for key in ("anthropic_version", "default_max_tokens"):
            if key in vals and fmt != "anthropic":
                ctx.error(nodes[key][1], _join(path, key), "only applies to format: anthropic")
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


def _routes(ctx: _Ctx, node: Node, reg: _Registry) -> tuple[RouteConfig, ...]:
    if _is_null(node):
        return ()
    items = _sequence(ctx, node, "routes")
    if items is None:
        return ()
    routes: list[RouteConfig] = []
    # Routes may share a path when they match different models; a route matching every
    # model on a path (no ``model:``) must come last there, or those after it are dead.
    catch_all: dict[str, int | None] = {}
    first_line: dict[tuple[str, tuple[str, ...]], int | None] = {}
    for i, item in enumerate(items):
        path = f"routes[{i}]"
        route = _route(ctx, item, path, reg)
        if route is None:
            continue
        key = (route.path, route.models)
        where = _mapping_value(item, "path")
        if key in first_line:
            what = f"for models {', '.join(route.models)} on " if route.models else ""
            ctx.error(where, f"{path}.path",
                      f"duplicate route {what}path {route.path!r} "
                      f"(first at line {first_line[key]})")
            continue
        if route.path in catch_all:
            ctx.error(where, f"{path}.path",
                      f"unreachable: the route at line {catch_all[route.path]} serves every "
                      f"model on {route.path!r}; put model-matched routes before it")
            continue
        first_line[key] = _line(where)
        if not route.models:
            catch_all[route.path] = _line(where)
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
    m = _mapping(ctx, node, path, ("path", "model", "upstreams", "middleware", *_FAILOVER_KEYS))
    if not isinstance(node, MappingNode):
        return None
    route_path: str | None = None
    if "path" in m:
        route_path = _convert(ctx, _c_route_path, m["path"][1], f"{path}.path")
    else:
        ctx.error(node, f"{path}.path", "is required")
    fmt = path_format(route_path) if route_path is not None else None

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

    failover: dict[str, Any] = {}
    for key, conv in _FAILOVER_KEYS.items():
        if key in m:
            value = _convert(ctx, conv, m[key][1], f"{path}.{key}")
            if value is not None:
                failover[key] = value

    models = _convert(ctx, _c_models, m["model"][1], f"{path}.model") if "model" in m else None

    if failover.get("identity") == "api_key":
        for ru in ups:
            if ru.upstream.forward_client_auth:
                # The client's credential is its sidecar key: it must not reach a provider.
                ctx.error(m["identity"][1], f"{path}.identity",
                          f"api_key cannot be used with upstream {ru.upstream.name!r}, "
                          f"which has forward_client_auth: true")
    if route_path is None or len(ctx.errors) != n_errors:
        return None
    return RouteConfig(route_path, tuple(ups), models or (), tuple(middleware), **failover)


def _c_retry_on(ctx: _Ctx, node: Node) -> tuple[str, ...]:
    """A list of failure names (``connect``, ``first_byte_timeout``, ``reset``) and
    statuses (429, 500, 502, 503, 504)."""
    if not isinstance(node, SequenceNode):
        raise _Bad("must be a list of " + ", ".join(_RETRY_NAMES))
    out: list[str] = []
    for item in node.value:
        v = _read(ctx, item, "a failure name or status")
        name = str(v.value) if isinstance(v.value, int | str) and not isinstance(
            v.value, bool) else None
        if name not in _RETRY_NAMES:
            raise _Bad(f"must be one of {', '.join(_RETRY_NAMES)}, got {_show(v)}", item)
        out.append(name)
    return tuple(dict.fromkeys(out))


_RETRY_NAMES = tuple(r.value for r in RetryReason)
_FAILOVER_KEYS: dict[str, Conv] = {
    "identity": _choice(IDENTITIES),
    "strategy": _choice(STRATEGIES),
    "retry_on": _c_retry_on,
    "max_attempts": _int(1),
    "retry_budget": _fraction,
    "on_client_disconnect": _choice(DISCONNECT_POLICIES),
}


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
        ctx, node, path, {"target": _c_str, "weight": _int(0), "model": _c_model_name},
        required=("target",),
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
    if fmt is not None and up.format != fmt and route_path is not None:
        problem = None
        if kind_for_path(route_path) not in TRANSLATABLE_KINDS:
            problem = (f"route path {route_path} serves {_FORMAT_TITLE[fmt]} format but upstream "
                       f"{up.name!r} is {up.format}; only chat completions and messages "
                       f"routes translate between formats")
        elif up.name not in reg.named and up.host not in WELL_KNOWN_HOSTS:
            # An inline target's format is only assumed (openai): translating on a guess
            # would turn a mistyped route into a silently rewritten one.
            problem = (f"route path {route_path} serves {_FORMAT_TITLE[fmt]} format but inline "
                       f"target {up.name!r} is assumed {up.format}; to translate, declare it "
                       f"under upstreams: with its format")
        elif up.forward_client_auth:
            problem = (f"upstream {up.name!r} is {up.format} and forwards the client's "
                       f"credential, which is an {_FORMAT_TITLE[fmt]} one on this route; give it "
                       f"an api_key to translate")
        if problem is not None:
            ctx.error(tnode, f"{path}.target", problem)
            return None
    if any(k not in vals for k in nodes):
        return None  # a bad weight or model, already reported
    return RouteUpstream(up, **{k: v for k, v in vals.items() if k in ("weight", "model")})


def _c_model_name(ctx: _Ctx, node: Node) -> str:
    name = _c_str(ctx, node).strip()
    if not name or any(c in name for c in "*?["):
        raise _Bad(f"must be the model name sent to this upstream, got {_clip(name)!r}")
    return name


def _c_limit_key(ctx: _Ctx, node: Node) -> str:
    """Whose bucket a request draws from: api_key, route, client_ip or header:NAME."""
    key = _c_str(ctx, node).strip()
    if key in ("api_key", "route", "client_ip"):
        return key
    name = key[7:].strip().lower() if key.startswith("header:") else ""
    if name and re.fullmatch(r"[a-z0-9!#$%&'*+.^_`|~-]+", name):
        return "header:" + name
    raise _Bad(f"must be api_key, route, client_ip or header:NAME, got {_clip(key)!r}")


def _c_limit_tiers(ctx: _Ctx, node: Node) -> dict[str, dict[str, Any]]:
    """Per-tier overrides: ``{pro: {limit: 100000, requests: 600}}``."""
    if not isinstance(node, MappingNode):
        raise _Bad("must be a mapping of tier name -> {limit, requests}")
    out: dict[str, dict[str, Any]] = {}
    for knode, vnode in node.value:
        name = str(knode.value)
        n_errors = len(ctx.errors)
        vals, _ = _fields(ctx, vnode, f"tiers.{name}", {"limit": _int(1), "requests": _int(1)},
                          required=("limit",))
        if len(ctx.errors) != n_errors:
            raise _Bad(f"tier {name!r} has bad fields (see above)", vnode)
        out[name] = {"limit": vals["limit"], "requests": vals.get("requests")}
    return out


_MIDDLEWARE_FIELDS: dict[str, dict[str, Conv]] = {
    "token_limiter": {"limit": _int(1), "period": _duration(), "requests": _int(1),
                      "key": _c_limit_key, "reserve": _int(0), "tiers": _c_limit_tiers},
    "metrics_collector": {"provider": _choice(METRICS_PROVIDERS)},
}
_MIDDLEWARE_REQUIRED: dict[str, tuple[str, ...]] = {
    "token_limiter": ("limit", "period"),
    "metrics_collector": (),
}
_MIDDLEWARE_DEFAULTS: dict[str, dict[str, Any]] = {
    # key None: api_key when the route authenticates, else route. reserve: completion
    # tokens held at admission when the request names no max_tokens.
    "token_limiter": {"requests": None, "key": None, "reserve": 256, "tiers": {}},
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
        "journal": _c_bool,
        "journal_dir": _path(),
        "journal_rotate_bytes": _size(4096),
    }
    vals: dict[str, Any] = {}
    if node is not None:
        vals, _ = _fields(ctx, node, "meter", spec)
    vals.setdefault("db", ctx.resolve_path(MeterConfig().db))  # the default sits beside the file
    return MeterConfig(**vals)


def _metrics(ctx: _Ctx, node: Node) -> MetricsConfig:
    spec: dict[str, Conv] = {
        "enabled": _c_bool,
        "listen": _c_listen,
        "per_key": _c_bool,
        "max_models": _int(1),
        "max_keys": _int(1),
    }
    vals, _ = _fields(ctx, node, "metrics", spec)
    listen = vals.pop("listen", None)
    if listen is not None:
        vals["listen_host"], vals["listen_port"] = listen
    return MetricsConfig(**vals)


def _c_access_log(ctx: _Ctx, node: Node) -> str | None:
    """off (YAML also reads it as false), stdout, or a file path (its directory must
    exist: the file is created at start)."""
    v = _read(ctx, node, "off, stdout or a file path")
    if v.value is False or v.value is None or v.value == "off":
        return None
    if v.value == "stdout":
        return "stdout"
    if not isinstance(v.value, str) or not v.value.strip():
        raise _Bad(f"must be off, stdout or a file path, got {_show(v)}")
    p = ctx.resolve_path(v.value.strip())
    parent = os.path.dirname(p) or "."
    if not os.path.isdir(parent):
        raise _Bad(f"directory not found: {parent!r}")
    if os.path.isdir(p):
        raise _Bad(f"is a directory, not a file: {p!r}")
    return p


def _limits(ctx: _Ctx, node: Node) -> LimitsConfig:
    spec: dict[str, Conv] = {
        "max_body_bytes": _size(),
        "max_header_bytes": _size(),
        "max_headers": _int(1),
        "max_connections": _int(1),
        "max_pipelined_bytes": _size(),
        "write_high_water": _size(),
        "write_low_water": _size(0),
        "tap_body_bytes": _size(),
        "backend": _c_limits_backend,
        "redis_failure": _choice(("open", "closed")),
        "redis_timeout": _duration(),
        "max_drains": _int(0),
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


def _c_limits_backend(ctx: _Ctx, node: Node) -> str:
    text = _c_str(ctx, node).strip()
    if text == "memory" or text.startswith(("redis://", "rediss://", "unix://")):
        return text
    # Only what follows an '@' is echoed: a URL may carry a password.
    raise _Bad(f"must be memory or a redis:// URL, got {_clip(text.split('@')[-1])!r}")


def _timeouts(ctx: _Ctx, node: Node) -> TimeoutsConfig:
    spec: dict[str, Conv] = {
        "connect": _duration(),
        "first_byte": _duration(),
        "idle": _duration(),
        "total": _duration(),
        "client_idle": _duration(),
        "request_head": _duration(),
        "request_body": _duration(),
        "shutdown_grace": _duration(allow_zero=True),  # 0: stop at once on SIGTERM
        "drain": _duration(),
        "heartbeat": _duration(allow_zero=True),  # 0: no SSE heartbeats
    }
    vals, nodes = _fields(ctx, node, "timeouts", spec)
    cfg = TimeoutsConfig(**vals)
    if cfg.heartbeat and cfg.heartbeat >= cfg.idle:
        if "heartbeat" not in nodes:
            # The default, under an idle this short: a silence that long fails the
            # stream before any proxy in front would cut it, so no heartbeat is needed.
            return dataclasses.replace(cfg, heartbeat=0.0)
        ctx.error(
            nodes["heartbeat"][1],
            "timeouts.heartbeat",
            f"must be shorter than timeouts.idle ({cfg.idle:g}s), or 0 for none; "
            f"got {cfg.heartbeat:g}s",
        )
    return cfg
