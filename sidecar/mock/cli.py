"""`sidecar mock-upstream` / `python -m sidecar.mock`: run the fake provider until
SIGINT/SIGTERM, printing the URL it listens on."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
from typing import Any

import click

from sidecar.mock.expected import DEFAULT_CHUNKS
from sidecar.mock.faults import parse_size
from sidecar.mock.server import MockUpstream


async def _serve(mock: MockUpstream) -> None:
    # Handlers first: a supervisor may signal us while the tokenizer is still loading, and
    # a background process started by a shell ignores SIGINT until we take it over.
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):  # add_signal_handler is POSIX-only
            loop.add_signal_handler(sig, stop.set)
    await mock.start()
    print(mock.url, flush=True)
    try:
        await stop.wait()
    finally:
        await mock.stop()
        print(
            f"mock-upstream: {mock.requests_total} requests on "
            f"{mock.connections_accepted} connections",
            file=sys.stderr,
            flush=True,
        )


@click.command("mock-upstream")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=0, show_default=True, help="0 picks a free port.")
@click.option(
    "--format",
    "api_format",
    type=click.Choice(["openai", "anthropic"]),
    default="openai",
    show_default=True,
    help="Answer format for paths that do not name an endpoint.",
)
@click.option(
    "--chunks", default=DEFAULT_CHUNKS, show_default=True, help="Content deltas per stream."
)
@click.option(
    "--chunk-tokens", type=int, default=None, help="Tokens per delta [4; 128 in big mode]."
)
@click.option("--delay-ms", default=0.0, show_default=True, help="Between deltas; 0 = burst.")
@click.option("--first-byte-ms", default=0.0, show_default=True, help="Before the response head.")
@click.option(
    "--always-usage", is_flag=True, help="Send the usage chunk even without include_usage."
)
@click.option("--bytes", "bytes_total", default="0", help="Big mode: stream size, e.g. 50MB.")
@click.option("--model", default="gpt-4o-mini", show_default=True, help="When the body has none.")
@click.option("--fault", default=None, help="status:NNN|disconnect-after:N|no-usage|hang|malformed")
@click.option("--retry-after", default=1.0, show_default=True, help="retry-after on 429/503.")
def mock_upstream(bytes_total: str, **options: Any) -> None:
    """Run the fake LLM provider until SIGINT/SIGTERM; prints the URL it listens on."""
    import uvloop

    try:
        # Every other option is a MockUpstream keyword argument of the same name.
        # record=False: a long benchmark would otherwise keep every request in memory.
        mock = MockUpstream(bytes_total=parse_size(bytes_total), record=False, **options)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    uvloop.run(_serve(mock))
