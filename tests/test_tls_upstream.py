"""https:// upstreams: verified TLS with SNI, a configurable CA bundle, clear failures."""

from __future__ import annotations

import asyncio
import dataclasses
import pathlib
import shutil
import socket
import ssl
import subprocess
import threading
from collections.abc import Iterator
from typing import Any

import openai
import pytest

from sidecar.config import Config, RouteConfig, RouteUpstream, UpstreamConfig

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl CLI not installed")

SSE = (
    b'data: {"id":"c1","object":"chat.completion.chunk","created":1,"model":"m",'
    b'"choices":[{"index":0,"delta":{"content":"secure hello"},"finish_reason":null}]}\n\n'
    b'data: {"id":"c1","object":"chat.completion.chunk","created":1,"model":"m","choices":[],'
    b'"usage":{"prompt_tokens":5,"completion_tokens":2,"total_tokens":7}}\n\n'
    b"data: [DONE]\n\n"
)


def _openssl(*args: str, cwd: pathlib.Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=30)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    d = tmp_path_factory.mktemp("certs")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out",
             "ca.pem", "-days", "2", "-subj", "/CN=sidecar test CA", cwd=d)
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "srv.key", "-out", "srv.csr",
             "-subj", "/CN=localhost", cwd=d)
    (d / "ext.cnf").write_text("subjectAltName=DNS:localhost\n")
    _openssl("x509", "-req", "-in", "srv.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
             "-CAcreateserial", "-out", "srv.pem", "-days", "2", "-extfile", "ext.cnf", cwd=d)
    return d


class TlsProvider:
    """A minimal TLS provider answering one canned SSE stream per request; records SNI."""

    def __init__(self, certs: pathlib.Path) -> None:
        self.ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.ctx.load_cert_chain(certs / "srv.pem", certs / "srv.key")
        self.sni: list[str | None] = []
        self.ctx.sni_callback = lambda _s, name, _c: self.sni.append(name)  # type: ignore[func-returns-value]
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":", 1)[1])
            await reader.readexactly(length)
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                         b"transfer-encoding: chunked\r\n\r\n%x\r\n%b\r\n0\r\n\r\n" % (len(SSE), SSE))
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
            pass
        finally:
            writer.close()

    def start(self) -> None:
        async def serve() -> asyncio.AbstractServer:
            return await asyncio.start_server(self._handle, sock=self.sock, ssl=self.ctx)

        self.thread.start()
        self.server = asyncio.run_coroutine_threadsafe(serve(), self.loop).result(10)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.server.close)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture
def provider(certs: pathlib.Path) -> Iterator[TlsProvider]:
    p = TlsProvider(certs)
    p.start()
    yield p
    p.stop()


def _route_to(port: int, ca: str | None) -> Any:
    up = UpstreamConfig(name="tls", url=f"https://localhost:{port}", scheme="https",
                        host="localhost", port=port, api_key="sk-provider-secret", ca_bundle=ca)

    def edit(cfg: Config) -> Config:
        route = RouteConfig(path="/v1/chat/completions", upstreams=(RouteUpstream(up, 1),))
        return dataclasses.replace(cfg, routes=(route,), upstreams={"tls": up})

    return edit


def test_https_upstream_verified_with_ca_bundle_and_sni(
        stack_factory: Any, provider: TlsProvider, certs: pathlib.Path) -> None:
    stack = stack_factory(config_edit=_route_to(provider.port, str(certs / "ca.pem")))
    client = openai.OpenAI(base_url=stack.url + "/v1", api_key="sk-client", max_retries=0)
    stream = client.chat.completions.create(
        model="m", stream=True, stream_options={"include_usage": True},
        messages=[{"role": "user", "content": "hi"}])
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == "secure hello"
    assert provider.sni == ["localhost"]
    stack.stop()
    (row,) = stack.rows()
    assert row["usage_source"] == "reported" and row["total_tokens"] == 7


def test_https_upstream_with_unknown_ca_fails_closed_with_clear_502(
        stack_factory: Any, provider: TlsProvider) -> None:
    stack = stack_factory(config_edit=_route_to(provider.port, None))
    client = openai.OpenAI(base_url=stack.url + "/v1", api_key="sk-client", max_retries=0)
    with pytest.raises(openai.APIStatusError) as info:
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
    assert info.value.status_code == 502
    body = info.value.body
    assert isinstance(body, dict)
    err = body.get("error", body)  # the SDK unwraps {"error": ...}
    assert "TLS" in err["message"] and "CERTIFICATE_VERIFY_FAILED" in err["message"]
    assert "sk-provider-secret" not in str(info.value.body)
    stack.stop()
    (row,) = stack.rows()
    assert row["outcome"] == "upstream_error" and row["status"] == 502
    assert row["usage_source"] == "none"


def test_an_active_check_uses_the_pools_tls_context(
        provider: TlsProvider, certs: pathlib.Path) -> None:
    import uvloop

    from sidecar.config import HealthCheckConfig, TimeoutsConfig
    from sidecar.health_check import probe
    from sidecar.upstream import UpstreamPool

    check = HealthCheckConfig(path="/health", interval=5.0, timeout=3.0)

    def pool(ca: str | None) -> UpstreamPool:
        up = UpstreamConfig(name="tls", url=f"https://localhost:{provider.port}",
                            scheme="https", host="localhost", port=provider.port,
                            ca_bundle=ca, health_check=check)
        return UpstreamPool(up, TimeoutsConfig())

    async def main() -> tuple[str | None, str | None]:
        good, bad = pool(str(certs / "ca.pem")), pool(None)
        return (await probe(good.cfg, check, good.ssl_context),
                await probe(bad.cfg, check, bad.ssl_context))

    verified, unknown_ca = uvloop.run(main())
    assert verified is None and provider.sni[0] == "localhost"
    assert unknown_ca is not None and "CERTIFICATE_VERIFY_FAILED" in unknown_ca
