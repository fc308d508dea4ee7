"""Value converters: one YAML scalar node -> one typed config value, or ``_Bad``.

Rules:

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
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Collection
from typing import Literal

from yaml.nodes import Node, ScalarNode

from sidecar.config.yaml_lines import (
    _NULL,
    _STR,
    Conv,
    _Bad,
    _Ctx,
    _kind,
    _read,
    _show,
    _Val,
)
from sidecar.durations import parse_seconds

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


def _fraction(ctx: _Ctx, node: Node) -> float:
    """A number from 0 to 1 (a share of requests)."""
    v = _read(ctx, node, "a number from 0 to 1")
    x = v.value
    if isinstance(x, str) and v.from_env:
        try:
            x = float(x)
        except ValueError:
            pass
    if isinstance(x, int | float) and not isinstance(x, bool) and 0.0 <= x <= 1.0:
        return float(x)
    raise _Bad(f"must be a number from 0 to 1, got {_show(v)}")


def _number(lo: float = 0.0, what: str = "") -> Conv:
    """A finite number >= ``lo`` (an integer or a float); ``what`` names its unit."""
    expected = f"a number >= {lo:g}" + (f" ({what})" if what else "")

    def conv(ctx: _Ctx, node: Node) -> float:
        v = _read(ctx, node, expected)
        x = v.value
        if isinstance(x, str) and v.from_env:
            try:
                x = float(x)
            except ValueError:
                pass
        if isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x) \
                and x >= lo:
            return float(x)
        raise _Bad(f"must be {expected}, got {_show(v)}")

    return conv


def _choice(options: Collection[str]) -> Conv:
    expected = "one of " + ", ".join(options)

    def conv(ctx: _Ctx, node: Node) -> str:
        v = _read(ctx, node, expected)
        if isinstance(v.value, str) and v.value in options:
            return v.value
        raise _Bad(f"must be {expected}, got {_show(v)}")

    return conv


def _duration_seconds(ctx: _Ctx, node: Node, expected: str, bare_scale: float) -> float:
    v = _read(ctx, node, expected)
    secs: float | None = None
    if isinstance(v.value, (int, float)) and not isinstance(v.value, bool):
        secs = float(v.value) * bare_scale
    elif isinstance(v.value, str):
        try:
            secs = parse_seconds(v.value, bare_unit=bare_scale)
        except ValueError:
            secs = None  # reported below with what this field expects
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
