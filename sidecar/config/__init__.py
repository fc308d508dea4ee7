"""YAML config -> frozen dataclasses: the names the rest of the sidecar imports.

The pieces live in submodules; this package only re-exports them so that
``from sidecar.config import Config, load_config`` keeps working everywhere.
"""

from sidecar.config.validate import (
    ALL_INTERFACES,
    DEFAULT_LISTEN_HOST,
    DEFAULT_METRICS_PROVIDER,
    METRICS_PROVIDERS,
    MIDDLEWARE_TYPES,
    PATH_FORMATS,
    WELL_KNOWN_HOSTS,
    ApiFormat,
    Config,
    LimitsConfig,
    MeterConfig,
    MiB,
    MiddlewareConfig,
    RouteConfig,
    RouteUpstream,
    TimeoutsConfig,
    TokenizerConfig,
    UpstreamConfig,
    load_config,
    parse_config_text,
    route_format,
    validate_config_file,
    validate_config_text,
)

__all__ = [
    "ALL_INTERFACES",
    "DEFAULT_LISTEN_HOST",
    "DEFAULT_METRICS_PROVIDER",
    "METRICS_PROVIDERS",
    "MIDDLEWARE_TYPES",
    "PATH_FORMATS",
    "WELL_KNOWN_HOSTS",
    "ApiFormat",
    "Config",
    "LimitsConfig",
    "MeterConfig",
    "MiB",
    "MiddlewareConfig",
    "RouteConfig",
    "RouteUpstream",
    "TimeoutsConfig",
    "TokenizerConfig",
    "UpstreamConfig",
    "load_config",
    "parse_config_text",
    "route_format",
    "validate_config_file",
    "validate_config_text",
]
