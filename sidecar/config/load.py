"""Loading a config: the public entry points, reading the file, composing the YAML.

Public API:

* ``load_config(path, env=None) -> Config`` raises the first ``ConfigError``.
* ``validate_config_file(path, env=None) -> list[ConfigError]`` returns every
  problem found, sorted by line (``sidecar check`` prints them all).
* ``parse_config_text(text, filename, ...)`` / ``validate_config_text(...)``:
  the same for a string (tests, stdin).
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import yaml
from yaml.nodes import MappingNode

from sidecar.config.model import Config
from sidecar.config.validate import _config
from sidecar.config.yaml_lines import _ROOT, _YAML, _Ctx, _kind
from sidecar.errors import ConfigError


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
