"""YAML config -> frozen dataclasses: the names the rest of the sidecar imports.

The pieces live in submodules, each saying what it owns: ``model`` (the
dataclasses and every default), ``load`` (the entry points), ``validate`` (the
sections), ``targets`` (listen, URLs, route targets), ``values`` (scalar
converters) and ``yaml_lines`` (the line-tracking walk). This package only
re-exports, so ``from sidecar.config import Config, load_config`` works as it
did when config was one module.
"""

from sidecar.config import model
from sidecar.config.load import (
    load_config,
    parse_config_text,
    validate_config_file,
    validate_config_text,
)
from sidecar.config.model import *  # noqa: F403
from sidecar.config.targets import WELL_KNOWN_HOSTS

__all__ = [
    "WELL_KNOWN_HOSTS",
    "load_config",
    "parse_config_text",
    "validate_config_file",
    "validate_config_text",
]
# The model's public names are listed once, in model.__all__.
__all__ += model.__all__
