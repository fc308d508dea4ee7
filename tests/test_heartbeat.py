"""SSE heartbeats and X-Accel-Buffering: the pure decisions, the config, and streams over
real loopback sockets with the mock provider pausing longer than the heartbeat."""

from __future__ import annotations

import pathlib
import re
from typing import Any

import anthropic
import openai
import pytest
from conftest import Stack
from e2e_helpers import ClientConn, Response, edit_timeouts, request_bytes
from test_config import load, problems

from sidecar import heartbeat
from sidecar.config import (
    Config,
    MeterConfig,
    RouteConfig,
    RouteUpstream,
    TimeoutsConfig,
    UpstreamConfig,
)
from sidecar.mock_shapes import count_tokens, expected_text
from sidecar.splice import Sweeper

PING_EVENT = b": ping"
HEARTBEAT = 0.15  # seconds; the mock pauses DELAY_MS between deltas, several heartbeats
DELAY_MS = 500
CHUNKS = 3


# --- pure --------------------------------------------------------------------------


def test_due_counts_from_the_last_activity_and_zero_is_off() -> None:
    assert heartbeat.due(10.0, 5.0, 5.0)
    assert not heartbeat.due(9.9, 5.0, 5.0)
    assert not heartbeat.due(1e9, 0.0, 0.0)


@pytest.mark.parametrize(("tail", "ok"), [
    (b"", True),  # nothing relayed yet
    (b'data: {"a":1}\n\n', True),
    (b"data: x\r\n\r\n", True),
    (b"data: x\r\r", True),
    (b'data: {"a":1}\n', False),  # one line of an event: a comment now would join it
    (b'data: {"a"', False),
])
def test_payload_boundary(tail: bytes, ok: bool) -> None:
    assert heartbeat.payload_at_boundary(tail) is ok


@pytest.mark.parametrize(("tail", "ok"), [
    (b"", True),
    (b'e\r\ndata: {"a":1}\n\n\r\n', True),  # a whole frame carrying a whole event
    (b"8\r\ndata: x\r\n\r\n\r\n", True),
    (b'e\r\ndata: {"a":1}\n\n', False),  # the frame's CRLF has not come
    (b"data: x\n\n\r\n1a\r\n", False),  # a chunk-size line: the frame is still to come
    (b"\r\n", False),  # a read split before the CRLF: cannot tell, so no ping
])
def test_frame_boundary(tail: bytes, ok: bool) -> None:
    assert heartbeat.frame_at_boundary(tail) is ok


def test_ping_chunk_is_one_chunk_frame_of_the_comment() -> None:
    assert heartbeat.PING_CHUNK == b"8\r\n: ping\n\n\r\n"


def test_sweeper_is_fine_enough_for_the_heartbeat() -> None:
    t = TimeoutsConfig(heartbeat=0.2)
    assert Sweeper.interval_for(t) == pytest.approx(0.05)
    assert Sweeper.interval_for(TimeoutsConfig(heartbeat=0)) == 1.0


# --- config ------------------------------------------------------------------------

BASE = "routes:\n  - path: /v1/chat/completions\n    upstreams: [{ target: http://127.0.0.1:9 }]\n"


def test_heartbeat_config(tmp_path: pathlib.Path) -> None:
    assert load(tmp_path, BASE).timeouts.heartbeat == 15.0
    assert load(tmp_path, BASE + "timeouts: { heartbeat: 20s }\n").timeouts.heartbeat == 20.0
    assert load(tmp_path, BASE + "timeouts: { heartbeat: 0 }\n").timeouts.heartbeat == 0.0
    # The default under an idle shorter than itself: off (the stream fails first).
    assert load(tmp_path, BASE + "timeouts: { idle: 10s }\n").timeouts.heartbeat == 0.0
    assert problems(tmp_path, BASE + "timeouts:\n  idle: 30s\n  heartbeat: 30s\n") == [
        "c.yaml:6: timeouts.heartbeat: must be shorter than timeouts.idle (30s), or 0 for "
        "none; got 30s"]
    assert problems(tmp_path, BASE + "timeouts: { heartbeat: -1 }\n")[0].startswith(
        "c.yaml:4: timeouts.heartbeat: must be a duration >= 0")


# --- over sockets --------------------------------------------------------------------


def _stream(port: int, body: dict[str, Any], *headers: tuple[bytes, bytes]) -> Response:
    with ClientConn(port) as c:
        c.send(request_bytes("POST", "/v1/chat/completions", body, headers=headers))
        return c.read_response()


def _blocks(resp: Response) -> list[bytes]:
    assert resp.complete and resp.framing == "chunked"
    blocks = resp.body.split(b"\n\n")
    assert blocks[-1] == b""  # the stream ends with a whole event
    return blocks[:-1]


def _norm(ev: bytes) -> bytes:
    return re.sub(rb'"created":\d+', b'"created":0', re.sub(rb"chatcmpl-\w+", b"ID", ev))


def _chat(include_usage: bool) -> dict[str, Any]:
    body: dict[str, Any] = {"model": "gpt-4o-mini", "stream": True,
                            "messages": [{"role": "user", "content": "think slowly"}]}
    if include_usage:
        body["stream_options"] = {"include_usage": True}
    return body


@pytest.mark.parametrize("include_usage", [True, False], ids=["verbatim", "usage-hidden"])
def test_silences_get_pings_between_events_and_the_meter_keeps_exact_usage(
        stack_factory: Any, include_usage: bool) -> None:
    """verbatim: the provider's chunk frames relayed as they are (pings are frames of our
    own between them); usage-hidden: the sidecar injected include_usage and reframes the
    stream to hide it (pings are payload it frames)."""
    stack = stack_factory(chunks=CHUNKS, delay_ms=DELAY_MS,
                          config_edit=edit_timeouts(heartbeat=HEARTBEAT))
    body = _chat(include_usage)
    via = _stream(stack.port, body)
    assert via.status == 200
    assert via.header_all("x-accel-buffering") == ["no"]
    blocks = _blocks(via)
    pings = [b for b in blocks if b == PING_EVENT]
    # Each of the CHUNKS pauses of DELAY_MS outlasts the heartbeat at least twice.
    assert len(pings) >= CHUNKS
    # Every other block is one of the provider's events, unchanged and in order: the
    # pings stood between events, never inside one.
    direct = _stream(stack.mock.port, body)
    assert direct.header("x-accel-buffering") is None
    want = [ev for ev in _blocks(direct)]
    if not include_usage:
        # The provider was asked for usage by the sidecar; the client never sees it.
        want = [ev for ev in want if b'"usage":{' not in ev]
        want = [ev.replace(b',"usage":null', b"") for ev in want]
    assert [_norm(b) for b in blocks if b != PING_EVENT] == [_norm(ev) for ev in want]
    sent = stack.mock.requests[0]
    stack.stop()
    rows = stack.rows()
    row = rows[0]
    # The tap never saw a ping: the usage is the provider's own, exactly.
    assert (row["usage_source"], row["outcome"]) == ("reported", "ok")
    assert (row["prompt_tokens"], row["completion_tokens"]) == (
        sent.prompt_tokens, sent.completion_tokens)
    assert row["completion_tokens"] == count_tokens(expected_text(CHUNKS), "o200k_base")
    assert row["bytes_out"] > len(via.raw_body)  # head + body, pings included


def test_openai_sdk_parses_a_stream_with_pings(stack_factory: Any) -> None:
    stack = stack_factory(chunks=CHUNKS, delay_ms=DELAY_MS,
                          config_edit=edit_timeouts(heartbeat=HEARTBEAT))
    client = openai.OpenAI(base_url=stack.url + "/v1", api_key="sk-client-test", max_retries=0)
    stream = client.chat.completions.create(
        model="gpt-4o-mini", stream=True, stream_options={"include_usage": True},
        messages=[{"role": "user", "content": "think slowly"}])
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected_text(CHUNKS)
    usage = chunks[-1].usage
    assert usage is not None
    sent = stack.mock.requests[0]
    assert usage.completion_tokens == sent.completion_tokens
    stack.stop()
    row = stack.rows()[0]
    assert (row["prompt_tokens"], row["completion_tokens"]) == (
        usage.prompt_tokens, usage.completion_tokens)


def test_no_ping_before_the_head_nor_on_json_nor_when_off(stack_factory: Any) -> None:
    stack = stack_factory(chunks=CHUNKS, config_edit=edit_timeouts(heartbeat=HEARTBEAT))
    # The provider is silent before its head: nothing is committed, nothing is sent.
    slow_head = _stream(stack.port, _chat(True), (b"x-mock-first-byte-ms", b"600"))
    assert PING_EVENT not in slow_head.body and slow_head.status == 200
    assert slow_head.header("x-accel-buffering") == "no"
    # A JSON answer (stream: false) is never given SSE comments or the header.
    plain = _stream(stack.port, {"model": "gpt-4o-mini",
                                 "messages": [{"role": "user", "content": "x"}]},
                    (b"x-mock-first-byte-ms", b"400"))
    assert plain.status == 200 and plain.json["object"] == "chat.completion"
    assert plain.header("x-accel-buffering") is None
    stack.stop()

    off = stack_factory(chunks=CHUNKS, delay_ms=DELAY_MS,
                        config_edit=edit_timeouts(heartbeat=0.0))
    resp = _stream(off.port, _chat(True))
    assert PING_EVENT not in resp.body and resp.header("x-accel-buffering") == "no"


class SlowAnthropic(Stack):
    """An Anthropic-format mock pausing DELAY_MS between deltas, behind an Anthropic
    route (relayed as it is) and an OpenAI route (translated), heartbeat HEARTBEAT."""

    async def _start_upstreams(self) -> Config:
        from sidecar.mock import MockUpstream

        self.mock = MockUpstream(api_format="anthropic", chunks=CHUNKS, delay_ms=DELAY_MS)
        await self.mock.start()
        port = self.mock.port
        up = UpstreamConfig(name="anth", url=f"http://127.0.0.1:{port}", scheme="http",
                            host="127.0.0.1", port=port, format="anthropic", api_key="sk-a")
        routes = tuple(RouteConfig(path=p, upstreams=(RouteUpstream(up),))
                       for p in ("/v1/messages", "/v1/chat/completions"))
        return Config(listen_host="127.0.0.1", listen_port=0, routes=routes,
                      meter=MeterConfig(db=self.db), source="<test>",
                      timeouts=TimeoutsConfig(heartbeat=HEARTBEAT))


def test_anthropic_stream_and_its_openai_translation_get_pings_sdks_parse_them(
        tmp_path: pathlib.Path) -> None:
    stack = SlowAnthropic(tmp_path, {}, None).start()
    try:
        raw = _stream(stack.port, {"model": "claude-x-1", "max_tokens": 50, "stream": True,
                                   "messages": [{"role": "user", "content": "hm"}]})
        assert raw.header("x-accel-buffering") == "no"
        assert raw.body.count(b"\n\n" + PING_EVENT + b"\n\n") >= CHUNKS - 1
        client = anthropic.Anthropic(base_url=stack.url, api_key="sk-c", max_retries=0)
        with client.messages.stream(model="claude-x-1", max_tokens=50,
                                    messages=[{"role": "user", "content": "hm"}]) as s:
            text = "".join(s.text_stream)
            final = s.get_final_message()
        assert text == expected_text(CHUNKS)
        anth_req = stack.mock.requests[-1]
        assert final.usage.output_tokens == anth_req.completion_tokens
        oai = openai.OpenAI(base_url=stack.url + "/v1", api_key="sk-c", max_retries=0)
        chunks = list(oai.chat.completions.create(
            model="claude-x-1", stream=True, stream_options={"include_usage": True},
            messages=[{"role": "user", "content": "hm"}]))
        assert "".join(c.choices[0].delta.content or "" for c in chunks
                       if c.choices) == expected_text(CHUNKS)
        oai_req = stack.mock.requests[-1]
        assert chunks[-1].usage is not None
        assert chunks[-1].usage.completion_tokens == oai_req.completion_tokens
    finally:
        stack.stop()
    rows = stack.rows()
    assert len(rows) == 3
    for row, req in zip(rows[1:], (anth_req, oai_req), strict=True):
        assert (row["usage_source"], row["outcome"]) == ("reported", "ok")
        assert (row["prompt_tokens"], row["completion_tokens"]) == (
            req.prompt_tokens, req.completion_tokens)
