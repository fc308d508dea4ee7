"""Where to listen and where to send: ``listen``, upstream URLs and route targets.

Rules:

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
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from typing import Literal, NoReturn
from urllib.parse import urlsplit

from yaml.nodes import Node

from sidecar.addresses import is_ip_literal
from sidecar.config.model import ALL_INTERFACES, DEFAULT_LISTEN_HOST, ApiFormat, UpstreamConfig
from sidecar.config.values import _c_str
from sidecar.config.yaml_lines import _Bad, _clip, _Ctx, _read, _show

# Hosts whose API format and key variable are known without being told.
WELL_KNOWN_HOSTS: dict[str, tuple[ApiFormat, str]] = {
    "api.openai.com": ("openai", "OPENAI_API_KEY"),
    "api.anthropic.com": ("anthropic", "ANTHROPIC_API_KEY"),
}


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
