"""The ``sidecar`` command line (click)."""

from __future__ import annotations

import logging
import sys
from typing import ClassVar

import click

from sidecar import __version__
from sidecar.errors import ConfigError


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


class _LazyGroup(click.Group):
    """Imports the mock, the meter, the keys and the shadow CLI only when they are the command
    being run.

    A serving worker never needs them; importing them anyway cost ~2 MB of RSS
    in every worker process.
    """

    _lazy: ClassVar[dict[str, tuple[str, str]]] = {
        "keys": ("sidecar.auth.cli", "keys"),
        "meter": ("sidecar.meter_cli", "meter"),
        "mock-upstream": ("sidecar.mock", "mock_upstream"),
        "shadow": ("sidecar.shadow_cli", "shadow_group"),
    }

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted([*super().list_commands(ctx), *self._lazy])

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in self._lazy:
            import importlib

            module, attr = self._lazy[cmd_name]
            command = getattr(importlib.import_module(module), attr)
            assert isinstance(command, click.Command)
            return command
        return super().get_command(ctx, cmd_name)


@click.group(cls=_LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="sidecar")
def cli() -> None:
    """LLM gateway sidecar: stream, meter and route OpenAI/Anthropic-style traffic."""


@cli.command()
@click.option("-c", "--config", "config_path", required=True, type=click.Path(dir_okay=False),
              help="YAML config file.")
@click.option("--log-level", default="info", show_default=True,
              type=click.Choice(["debug", "info", "warning", "error"]))
def run(config_path: str, log_level: str) -> None:
    """Serve with the given config until SIGTERM/SIGINT (then drain and flush the meter)."""
    from sidecar.config import load_config
    from sidecar.server import run as run_server

    _setup_logging(log_level)
    try:
        config = load_config(config_path)
    except ConfigError as exc:
        click.echo(exc.render(), err=True)
        sys.exit(2)
    sys.exit(run_server(config, config_path))


@cli.command()
@click.option("-c", "--config", "config_path", required=True, type=click.Path(dir_okay=False),
              help="YAML config file.")
def check(config_path: str) -> None:
    """Validate a config: exit 0, or exit 2 printing FILE:LINE: field.path: problem."""
    from sidecar import config as config_mod

    errors: list[ConfigError]
    validate = getattr(config_mod, "validate_config_file", None)
    if validate is not None:
        errors = list(validate(config_path))
    else:
        try:
            config_mod.load_config(config_path)
            errors = []
        except ConfigError as exc:
            errors = [exc]
    if errors:
        for err in errors:
            click.echo(err.render(), err=True)
        sys.exit(2)
    config = config_mod.load_config(config_path)
    click.echo(
        f"{config_path}: ok ({len(config.routes)} routes, "
        f"{len({u.upstream.name for r in config.routes for u in r.upstreams})} upstreams)"
    )


@cli.command()
@click.option("--requests", "n_requests", default=6, show_default=True,
              help="How many requests the demo streams through the sidecar.")
@click.option("--db", default=None, help="Meter DB path (default: a new temporary file).")
@click.option("--delay-ms", default=40.0, show_default=True,
              help="Mock provider's pause between chunks, so streaming is visible.")
def demo(n_requests: int, db: str | None, delay_ms: float) -> None:
    """Run the mock provider and the sidecar on loopback, stream requests, show the meter."""
    from sidecar.demo import run_demo

    sys.exit(run_demo(n_requests=n_requests, db=db, delay_ms=delay_ms))


def main() -> None:
    cli()
