"""``sidecar demo``: mock provider + sidecar on loopback, a few streams, the meter summary.

Everything runs in one process on free ports, offline, with no config file, so a
newcomer sees in seconds what the sidecar does: tokens streaming through as they
are generated, and one meter row per request, including one for a client that
hung up mid-stream.
"""

from __future__ import annotations

import asyncio
import os
import sys
import tempfile
import time
from typing import Any

import click
import orjson

from sidecar.config import Config, MeterConfig, RouteConfig, RouteUpstream, UpstreamConfig
from sidecar.http1 import ResponseParser

DEMO_PROMPTS = [
    "Explain what an LLM gateway sidecar does.",
    "Why does buffering hurt time to first token?",
    "How are streamed tokens metered?",
]


def _demo_config(mock_port: int, db: str) -> Config:
    openai_up = UpstreamConfig(name="mock-openai", url=f"http://127.0.0.1:{mock_port}",
                               scheme="http", host="127.0.0.1", port=mock_port)
    anthropic_up = UpstreamConfig(name="mock-anthropic", url=f"http://127.0.0.1:{mock_port}",
                                  scheme="http", host="127.0.0.1", port=mock_port,
                                  format="anthropic")
    openai_paths = ("/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/embeddings")
    routes = (
        *(RouteConfig(path=p, upstreams=(RouteUpstream(openai_up, 1),)) for p in openai_paths),
        RouteConfig(path="/v1/messages", upstreams=(RouteUpstream(anthropic_up, 1),)),
    )
    return Config(listen_host="127.0.0.1", listen_port=0, routes=routes,
                  upstreams={"mock-openai": openai_up, "mock-anthropic": anthropic_up},
                  meter=MeterConfig(db=db), source="<demo>")


async def _stream(port: int, path: str, body: dict[str, Any], *, cut_after: int | None = None,
                  show: bool = True) -> tuple[int, str]:
    """POST and print streamed text as it arrives; optionally hang up after N events."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    payload = orjson.dumps(body)
    writer.write(b"POST %b HTTP/1.1\r\nhost: demo\r\ncontent-type: application/json\r\n"
                 b"content-length: %d\r\n\r\n%b" % (path.encode(), len(payload), payload))
    parser = ResponseParser(65536)
    while parser.head is None:
        data = await reader.read(65536)
        if not data:
            raise ConnectionError("sidecar closed the connection")
        parser.feed(data)
    head = parser.head
    text: list[str] = []
    events = 0
    sse = bytearray()
    while True:
        for piece in parser.take():
            sse += piece
        while (end := sse.find(b"\n\n")) >= 0:
            event, sse[:] = bytes(sse[:end]), sse[end + 2:]
            events += 1
            delta = _delta_text(event)
            if delta:
                text.append(delta)
                if show:
                    click.echo(delta, nl=False)
            if cut_after is not None and events >= cut_after:
                writer.close()
                if show:
                    click.echo(click.style("  [client hung up]", fg="yellow"))
                return head.status, "".join(text)
        if parser.done or not (data := await reader.read(65536)):
            break
        parser.feed(data)
    writer.close()
    if show:
        click.echo()
    if not head.chunked:
        return head.status, bytes(sse).decode(errors="replace")
    return head.status, "".join(text)


def _delta_text(event: bytes) -> str:
    for line in event.split(b"\n"):
        if not line.startswith(b"data:") or line[5:].strip() == b"[DONE]":
            continue
        try:
            obj = orjson.loads(line[5:])
        except orjson.JSONDecodeError:
            continue
        if obj.get("type") == "content_block_delta":
            return str(obj.get("delta", {}).get("text", ""))
        for choice in obj.get("choices") or ():
            delta = choice.get("delta") or {}
            return str(delta.get("content") or choice.get("text") or "")
    return ""


async def _demo(n_requests: int, db: str, delay_ms: float) -> None:
    from sidecar.mock import MockUpstream
    from sidecar.server import Server

    mock = MockUpstream(host="127.0.0.1", port=0, chunks=24, delay_ms=delay_ms)
    await mock.start()
    server = Server(_demo_config(mock.port, db))
    await server.start()
    try:
        click.echo(click.style(f"mock provider  http://127.0.0.1:{mock.port}", fg="cyan"))
        click.echo(click.style(f"sidecar        http://127.0.0.1:{server.port}", fg="cyan"))
        click.echo(click.style(f"meter DB       {db}\n", fg="cyan"))
        for i in range(n_requests):
            prompt = DEMO_PROMPTS[i % len(DEMO_PROMPTS)]
            if i % 3 == 1:
                label, path = "anthropic /v1/messages", "/v1/messages"
                body: dict[str, Any] = {"model": "claude-sonnet-4-5", "max_tokens": 256,
                                        "stream": True,
                                        "messages": [{"role": "user", "content": prompt}]}
            else:
                label, path = "openai /v1/chat/completions", "/v1/chat/completions"
                body = {"model": "gpt-4o-mini", "stream": True,
                        "messages": [{"role": "user", "content": prompt}]}
            cut = 6 if i == n_requests - 1 and n_requests > 1 else None
            click.echo(click.style(f"[{i + 1}/{n_requests}] {label}: ", bold=True), nl=False)
            t0 = time.perf_counter()
            status, _ = await _stream(server.port, path, body, cut_after=cut)
            ms = 1000 * (time.perf_counter() - t0)
            click.echo(click.style(f"    status {status}, {ms:.0f} ms", dim=True))
        await asyncio.sleep(0.1)  # let the hung-up stream's row be queued
    finally:
        await server.stop()
        await mock.stop()


def run_demo(n_requests: int, db: str | None, delay_ms: float) -> int:
    from sidecar.meter_cli import meter as meter_group

    if db is None:
        db = os.path.join(tempfile.mkdtemp(prefix="sidecar-demo-"), "meter.db")
    bundled = _bundled_tokenizer_dir()
    if bundled is not None:
        os.environ.setdefault("SIDECAR_TOKENIZER_DIR", bundled)
    try:
        import uvloop

        uvloop.run(_demo(n_requests, db, delay_ms))
    except OSError as exc:
        click.echo(f"demo failed: {exc}", err=True)
        return 1
    click.echo(click.style("\nMeter summary (one row per request):", bold=True))
    meter_group.main(["summary", "--db", db, "--by", "outcome"], standalone_mode=False)
    click.echo(f"\nInspect it yourself:  sidecar meter tail --db {db}")
    sys.stdout.flush()
    return 0


def _bundled_tokenizer_dir() -> str | None:
    """The offline encodings beside a source checkout (``../shared/tiktoken``), if present.

    Looked for next to the package (editable installs) and next to the working
    directory (a newcomer running the demo from the checkout after ``pip install .``).
    """
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for base in (here, os.getcwd()):
        for cand in (os.path.join(base, "..", "shared", "tiktoken"),
                     os.path.join(base, "shared", "tiktoken")):
            if os.path.isfile(os.path.join(cand, "o200k_base.tiktoken")):
                return os.path.abspath(cand)
    return None
