"""``sidecar keys ...``: create, list, revoke and rotate API keys in the keys database.

A secret is shown once, by ``create`` and ``rotate``: alone on its line on stdout
(``SECRET=$(sidecar keys create --name ci)``), with everything else on stderr. The
file keeps only its hash. A running sidecar picks every change up without a restart.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Final

import click
import orjson

from sidecar.auth.keys import (
    BUDGET_PERIODS,
    DEFAULT_KEYS_DB,
    KEYS_DB_ENV,
    ApiKey,
    KeyStore,
    KeyStoreError,
    check_settings,
)

_SHOWN_ONCE: Final = "store it now; it cannot be shown again:"
_TABLE_COLUMNS: Final = ("id", "name", "tier", "tpm", "rpm", "budget", "created", "revoked")

_db_option = click.option(
    "--db",
    "db_path",
    default=DEFAULT_KEYS_DB,
    envvar=KEYS_DB_ENV,
    show_default=True,
    show_envvar=True,
    type=click.Path(dir_okay=False),
    help="Keys SQLite database (the file the sidecar's auth.keys_db names).",
)


@contextmanager
def _store(db_path: str, *, create: bool) -> Iterator[KeyStore]:
    """The store, or a clean ClickException (exit 1); never creates a file unless asked."""
    if not create and not os.path.exists(db_path):
        raise click.ClickException(f"keys database not found: {db_path}")
    try:
        store = KeyStore.open(db_path)
    except KeyStoreError as exc:
        raise click.ClickException(str(exc)) from exc
    try:
        yield store
    except KeyStoreError as exc:  # KeyNotFound, KeyRevoked, a failed write
        raise click.ClickException(str(exc)) from exc
    finally:
        store.close()


def _iso_s(ts_ms: int | None) -> str:
    if ts_ms is None:
        return "-"
    return dt.datetime.fromtimestamp(ts_ms / 1000, tz=dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _budget(key: ApiKey) -> str:
    if key.budget_usd is None:
        return "-"
    return f"${key.budget_usd:,.2f}/{key.budget_period}"


def _describe(key: ApiKey) -> str:
    parts = [f"name {key.name!r}"]
    if key.tier is not None:
        parts.append(f"tier {key.tier}")
    if key.tpm is not None:
        parts.append(f"{key.tpm:,} tokens/min")
    if key.rpm is not None:
        parts.append(f"{key.rpm:,} requests/min")
    if key.budget_usd is not None:
        parts.append(f"budget {_budget(key)}")
    return ", ".join(parts)


def _show_secret(headline: str, secret: str) -> None:
    click.echo(headline, err=True)
    click.echo(_SHOWN_ONCE, err=True)
    click.echo(secret)  # the only line on stdout


def render_table(keys: Sequence[ApiKey]) -> str:
    rows = [
        [
            k.id,
            k.name,
            k.tier or "-",
            "-" if k.tpm is None else f"{k.tpm:,}",
            "-" if k.rpm is None else f"{k.rpm:,}",
            _budget(k),
            _iso_s(k.created_ms),
            _iso_s(k.revoked_ms),
        ]
        for k in keys
    ]
    widths = [max(len(r[i]) for r in (_TABLE_COLUMNS, *rows)) for i in range(len(_TABLE_COLUMNS))]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(_TABLE_COLUMNS), rule, *(line(r) for r in rows)])


@click.group()
def keys() -> None:
    """API keys (stored hashed; a secret is shown once, when created or rotated)."""


@keys.command()
@click.option("--name", required=True, help="Who or what the key is for.")
@click.option("--tier", default=None, help="Queue tier of its requests (one of config tiers).")
@click.option("--tpm", type=click.IntRange(min=1), default=None, help="Tokens per minute.")
@click.option("--rpm", type=click.IntRange(min=1), default=None, help="Requests per minute.")
@click.option(
    "--budget-usd",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="Spend limit in USD per --budget-period.",
)
@click.option("--budget-period", type=click.Choice(BUDGET_PERIODS), default=None)
@_db_option
def create(
    name: str,
    tier: str | None,
    tpm: int | None,
    rpm: int | None,
    budget_usd: float | None,
    budget_period: str | None,
    db_path: str,
) -> None:
    """Create a key; its secret goes to stdout, once."""
    if budget_usd is not None and budget_period is None:
        raise click.UsageError("--budget-usd needs --budget-period (day or month)")
    if budget_period is not None and budget_usd is None:
        raise click.UsageError("--budget-period needs --budget-usd")
    try:
        check_settings(name, tier, tpm, rpm, budget_usd, budget_period)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc
    with _store(db_path, create=True) as store:
        key, secret = store.create(
            name, tier=tier, tpm=tpm, rpm=rpm, budget_usd=budget_usd, budget_period=budget_period
        )
    _show_secret(f"created key {key.id} ({_describe(key)}) in {db_path}", secret)


@keys.command(name="list")
@_db_option
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["table", "json"]),
    default="table",
    show_default=True,
)
def list_(db_path: str, fmt: str) -> None:
    """Every key, revoked ones included (never a secret)."""
    with _store(db_path, create=False) as store:
        found = store.list()
    if fmt == "json":
        doc = [dataclasses.asdict(k) for k in found]
        click.echo(orjson.dumps(doc, option=orjson.OPT_INDENT_2).decode())
    elif not found:
        click.echo(f"no keys in {db_path}")
    else:
        click.echo(render_table(found))


@keys.command()
@click.argument("key_id", metavar="ID")
@_db_option
def revoke(key_id: str, db_path: str) -> None:
    """Revoke a key; requests presenting it are then refused.

    Running sidecars pick this up at their next check of the file, without a restart.
    """
    with _store(db_path, create=False) as store:
        before = store.get(key_id)
        key = store.revoke(key_id)
    if before.revoked:
        click.echo(f"key {key.id} was already revoked at {_iso_s(key.revoked_ms)}")
    else:
        click.echo(f"revoked key {key.id} ({_describe(key)})")


@keys.command()
@click.argument("key_id", metavar="ID")
@_db_option
def rotate(key_id: str, db_path: str) -> None:
    """Give a key a new secret; the old one stops working.

    The id and the settings stay; the new secret goes to stdout, once.
    """
    with _store(db_path, create=False) as store:
        key, secret = store.rotate(key_id)
    _show_secret(f"rotated key {key.id} ({_describe(key)}); the old secret no longer works",
                 secret)
