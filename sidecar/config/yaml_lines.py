"""Walking PyYAML's node tree with line numbers: the context, mappings, scalars, ``${VAR}``.

Rules this module enforces (each violation is ``FILE:LINE: field.path: problem``):

* Line numbers come from PyYAML's node tree, never from the plain dict, so a
  problem points at the key or value that causes it.
* Unknown keys are errors at every depth; so are wrong types (the message names
  the expected type) and duplicate keys (PyYAML would silently keep the last).
* ``${VAR}`` and ``${VAR:-default}`` are expanded in string values (``:-`` uses
  the default when VAR is unset or empty, as in the shell); ``$${`` writes a
  literal ``${``. An unset variable without a default is an error naming the
  variable. A value that came from the environment is never echoed in an error,
  because it may be a secret.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import yaml
from yaml.constructor import SafeConstructor
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from sidecar.errors import ConfigError

_ROOT = "<root>"  # field path of problems with the document as a whole
_YAML = "<yaml>"  # field path of YAML syntax problems

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
