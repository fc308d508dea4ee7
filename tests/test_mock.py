"""The mock provider, over real loopback sockets: SDKs, raw HTTP, pacing, faults, big mode."""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import anthropic
import openai
import orjson
import pytest

from sidecar import mock_shapes
from sidecar.mock import (
    WORDS,
    MockUpstream,
    big_completion_tokens,
    chunk_texts,
    count_tokens,
    embedding_vector,
    expected_completion_tokens,
    expected_text,
    expected_usage,
    mock_upstream,
    parse_size,
    prompt_tokens,
)

CHAT_BODY: dict[str, Any] = {
    "model": "gpt-4o-mini",
    "messages": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Say something about foxes."},
    ],
}


def run(factory: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(factory(), 20))


# --------------------------------------------------------------------------- raw HTTP client


@dataclass
class Raw:
    status: int
    head: bytes
    frames: list[tuple[float, bytes]] = field(default_factory=list)  # (arrival, chunk payload)
    body: bytes = b""
    complete: bool = False  # terminator (chunked) or full content-length seen

    @property
    def events(self) -> list[bytes]:
        """SSE data payloads in order."""
        out = []
        for block in self.body.split(b"\n\n"):
            for line in block.split(b"\n"):
                if line.startswith(b"data: "):
                    out.append(line[6:])
        return out

    @property
    def event_names(self) -> list[bytes]:
        return [line[7:] for line in self.body.split(b"\n") if line.startswith(b"event: ")]

    @property
    def headers(self) -> dict[str, str]:
        out = {}
        for line in self.head.decode("latin-1").split("\r\n")[1:]:
            name, _, value = line.partition(":")
            out[name.strip().lower()] = value.strip()
        return out


def request_bytes(
    path: str, body: dict[str, Any] | bytes, headers: dict[str, str] | None = None
) -> bytes:
    data = body if isinstance(body, bytes) else orjson.dumps(body)
    lines = [f"POST {path} HTTP/1.1", "host: mock", "content-type: application/json"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    lines.append(f"content-length: {len(data)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + data


async def read_response(reader: asyncio.StreamReader) -> Raw:
    """One HTTP/1.1 response; stops quietly at EOF (complete stays False)."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as exc:
        return Raw(0, exc.partial)
    status = head[9:12]
    resp = Raw(int(status) if status.isdigit() else -1, head)
    headers = resp.headers
    try:
        if headers.get("transfer-encoding") == "chunked":
            while True:
                size = int((await reader.readuntil(b"\r\n"))[:-2], 16)
                payload = await reader.readexactly(size + 2)
                if size == 0:
                    resp.complete = True
                    break
                resp.frames.append((time.monotonic(), payload[:-2]))
                resp.body += payload[:-2]
        else:
            resp.body = await reader.readexactly(int(headers.get("content-length", "0")))
            resp.complete = True
    except asyncio.IncompleteReadError as exc:
        resp.body += exc.partial
    return resp


async def post(
    mock: MockUpstream,
    path: str,
    body: dict[str, Any] | bytes,
    headers: dict[str, str] | None = None,
) -> Raw:
    reader, writer = await asyncio.open_connection(mock.host, mock.port)
    try:
        writer.write(request_bytes(path, body, headers))
        return await read_response(reader)
    finally:
        writer.close()


def chat_deltas(resp: Raw) -> str:
    text = []
    for data in resp.events:
        if data == b"[DONE]":
            continue
        for choice in orjson.loads(data)["choices"]:
            text.append(choice["delta"].get("content") or "")
    return "".join(text)


# --------------------------------------------------------------------------- text and counts


def test_every_word_is_one_token_in_both_encodings() -> None:
    for enc in ("o200k_base", "cl100k_base"):
        assert count_tokens("The", enc) == 1
        for word in WORDS:
            assert count_tokens(" " + word, enc) == 1, (enc, word)


@pytest.mark.parametrize("model", ["gpt-4o-mini", "gpt-4", "claude-sonnet-4", "unknown"])
@pytest.mark.parametrize(("chunks", "tokens"), [(20, 4), (7, 1), (3, 45), (1, 1)])
def test_completion_count_is_exact_tiktoken_count_of_the_text(
    model: str, chunks: int, tokens: int
) -> None:
    text = expected_text(chunks, tokens)
    assert text == "".join(chunk_texts(chunks, tokens))
    assert text.startswith("The")
    enc = mock_shapes.encoding_name_for_model(model)
    assert expected_completion_tokens(chunks, tokens, model) == count_tokens(text, enc)
    assert count_tokens(text, enc) == chunks * tokens


def test_encodings_follow_the_model_family() -> None:
    pick = mock_shapes.encoding_name_for_model
    assert pick("gpt-4o-mini") == pick("gpt-4.1") == pick("o3-mini") == "o200k_base"
    assert pick("gpt-4") == pick("gpt-4-turbo") == pick("gpt-3.5-turbo") == "cl100k_base"
    assert pick("claude-3-5-haiku") == pick("llama3") == "o200k_base"


def test_big_mode_count_matches_tokenizing_the_repeated_text() -> None:
    text = mock_shapes.big_chunk_text(37) * 9
    for model in ("gpt-4o", "gpt-4"):
        enc = mock_shapes.encoding_name_for_model(model)
        assert big_completion_tokens(9, 37, model) == count_tokens(text, enc)


def test_prompt_counts_follow_the_documented_rules() -> None:
    enc = "o200k_base"
    sys_n = count_tokens("You are terse.", enc)
    user_n = count_tokens("Say something about foxes.", enc)
    assert prompt_tokens("chat", CHAT_BODY) == sys_n + user_n + 3 * 2 + 3
    parts = {"role": "user", "content": [{"type": "text", "text": "Say something about foxes."}]}
    assert prompt_tokens("chat", {"model": "gpt-4o", "messages": [parts]}) == user_n + 6
    anth = {"system": "You are terse.", "messages": [{"role": "user", "content": "hi there"}]}
    assert prompt_tokens("messages", anth, "claude") == sys_n + count_tokens("hi there", enc)
    resp = {"instructions": "You are terse.", "input": "hi there"}
    assert prompt_tokens("responses", resp, "gpt-4o") == sys_n + count_tokens("hi there", enc)
    assert prompt_tokens("completions", {"prompt": ["a b", "c"]}, "gpt-4o") == 3
    assert prompt_tokens("embeddings", {"input": [[1, 2, 3], [4]]}, "gpt-4o") == 4


def test_parse_size() -> None:
    assert parse_size("52428800") == 50 << 20
    assert parse_size("50MB") == parse_size("50 MiB") == parse_size("50m") == 50 << 20
    assert parse_size("64k") == 65536
    assert parse_size("1GiB") == 1 << 30


def test_fill_keeps_frame_lengths() -> None:
    assert len(mock_shapes.make_id(7)) == len(mock_shapes.ID_PH) == mock_shapes.ID_WIDTH
    assert len(b"%d" % int(time.time())) == len(mock_shapes.CREATED_PH)


def split_frames(data: bytes) -> list[bytes]:
    """Chunked body -> payloads; fails on any size that does not match its payload."""
    frames, pos = [], 0
    while True:
        eol = data.index(b"\r\n", pos)
        size = int(data[pos:eol], 16)
        assert data[eol + 2 + size : eol + 4 + size] == b"\r\n"
        if size == 0:
            assert eol + 4 == len(data)
            return frames
        frames.append(data[eol + 2 : eol + 2 + size])
        pos = eol + 4 + size


@pytest.mark.parametrize("kind", ["chat", "completions", "responses", "messages"])
@pytest.mark.parametrize(
    ("usage", "nulls", "big"),
    [(True, True, False), (True, False, False), (False, True, False), (True, True, True)],
)
def test_stream_templates_frame_one_whole_event_per_chunk(
    kind: str, usage: bool, nulls: bool, big: bool
) -> None:
    shape = mock_shapes.Shape(
        kind=kind,
        model="gpt-4o",
        stream=True,
        chunks=3,
        chunk_tokens=2,
        usage=usage,
        usage_nulls=nulls and kind in ("chat", "completions"),
        prompt_tokens=5,
        big=big,
    )
    t = mock_shapes.build(shape)
    body = t.pre + t.deltas[0] * 3 + t.post if big else t.burst[len(t.head) :]
    filled = mock_shapes.fill(body, mock_shapes.make_id(12), b"1700000000")
    assert len(filled) == len(body)
    assert b"mock00000000000000000012" in filled
    assert b"1700000000" in filled or kind == "messages"  # Anthropic has no timestamp
    for frame in split_frames(filled):
        # One complete SSE event per chunk frame, its data a JSON object (or [DONE]).
        assert frame.endswith(b"\n\n") and frame.count(b"\n\n") == 1
        data = frame.split(b"data: ", 1)[1][:-2]
        assert data == b"[DONE]" or isinstance(orjson.loads(data), dict)
    assert t.completion_tokens == (big_completion_tokens(3, 2, "gpt-4o") if big else 6)
    openai_stream = kind in ("chat", "completions")
    assert (b'"usage":{' in filled) == (usage and (nulls or not openai_stream))


# --------------------------------------------------------------------------- SDKs


def test_openai_sdk_stream_gets_expected_text_and_usage() -> None:
    async def main() -> None:
        async with MockUpstream() as mock:
            client = openai.AsyncOpenAI(base_url=mock.url + "/v1", api_key="sk-test", max_retries=0)
            async with client:
                stream = await client.chat.completions.create(
                    stream=True, stream_options={"include_usage": True}, **CHAT_BODY
                )
                chunks = [c async for c in stream]
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            assert text == expected_text()
            assert chunks[0].choices[0].delta.role == "assistant"
            assert chunks[-2].choices[0].finish_reason == "stop"
            assert all(c.usage is None for c in chunks[:-1])
            assert chunks[-1].choices == []
            assert chunks[-1].usage is not None
            usage = chunks[-1].usage.model_dump(
                include={"prompt_tokens", "completion_tokens", "total_tokens"}
            )
            assert usage == expected_usage("chat", CHAT_BODY)
            assert usage["completion_tokens"] == 80
            req = mock.last
            assert (req.kind, req.stream, req.completed, req.usage_sent) == (
                "chat",
                True,
                True,
                True,
            )
            assert req.chunks_sent == 20
            assert req.completion_tokens == 80
            assert req.headers["authorization"] == "Bearer sk-test"
            assert req.json["stream_options"] == {"include_usage": True}
            assert chunks[0].id == req.response_id

    run(main)


def test_openai_sdk_non_stream_chat_with_cl100k_model() -> None:
    body = {**CHAT_BODY, "model": "gpt-4"}

    async def main() -> None:
        async with MockUpstream(chunks=5) as mock:
            client = openai.AsyncOpenAI(base_url=mock.url + "/v1", api_key="sk-test", max_retries=0)
            async with client:
                done = await client.chat.completions.create(**body)
            assert done.choices[0].message.content == expected_text(5)
            assert done.choices[0].finish_reason == "stop"
            assert done.model == "gpt-4"
            assert done.usage is not None
            got = done.usage.model_dump(
                include={"prompt_tokens", "completion_tokens", "total_tokens"}
            )
            assert got == expected_usage("chat", body, chunks=5)
            enc = "cl100k_base"
            assert got["prompt_tokens"] == 9 + sum(
                count_tokens(m["content"], enc) for m in body["messages"]
            )

    run(main)


def test_openai_sdk_legacy_completions_and_embeddings() -> None:
    async def main() -> None:
        async with MockUpstream() as mock:
            client = openai.AsyncOpenAI(base_url=mock.url + "/v1", api_key="sk-test", max_retries=0)
            async with client:
                stream = await client.completions.create(
                    model="gpt-3.5-turbo-instruct",
                    prompt="Once upon a time",
                    stream=True,
                    stream_options={"include_usage": True},
                    extra_headers={"x-mock-chunks": "6"},
                )
                parts = [c async for c in stream]
                whole = await client.completions.create(model="gpt-4o", prompt="Once upon a time")
                emb = await client.embeddings.create(
                    model="text-embedding-3-small", input=["a", "b c"]
                )
                emb_f = await client.embeddings.create(
                    model="text-embedding-3-small", input="a", encoding_format="float"
                )
            assert "".join(c.choices[0].text for c in parts if c.choices) == expected_text(6)
            assert parts[-1].usage is not None
            assert parts[-1].usage.completion_tokens == 24
            assert parts[-1].usage.prompt_tokens == count_tokens("Once upon a time", "cl100k_base")
            assert whole.choices[0].text == expected_text()
            assert whole.usage is not None and whole.usage.completion_tokens == 80
            assert [d.embedding for d in emb.data] == [embedding_vector(0), embedding_vector(1)]
            assert emb.usage.prompt_tokens == 3
            assert emb_f.data[0].embedding == embedding_vector(0)
            assert mock.requests[2].json["encoding_format"] == "base64"  # the SDK's default

    run(main)


def test_openai_sdk_responses_stream() -> None:
    body = {"model": "gpt-4o", "instructions": "Be brief.", "input": "Tell me about foxes."}

    async def main() -> None:
        async with MockUpstream() as mock:
            client = openai.AsyncOpenAI(base_url=mock.url + "/v1", api_key="sk-test", max_retries=0)
            async with client:
                stream = await client.responses.create(stream=True, **body)
                events = [e async for e in stream]
                whole = await client.responses.create(**body)
            deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
            assert "".join(deltas) == expected_text()
            assert [e.sequence_number for e in events] == list(range(len(events)))
            done = events[-1]
            assert done.type == "response.completed"
            usage = done.response.usage
            assert usage is not None
            truth = expected_usage("responses", body)
            assert (usage.input_tokens, usage.output_tokens, usage.total_tokens) == (
                truth["prompt_tokens"],
                truth["completion_tokens"],
                truth["total_tokens"],
            )
            assert done.response.output_text == expected_text()
            assert whole.output_text == expected_text()
            assert whole.usage is not None and whole.usage.output_tokens == 80
            assert mock.requests[0].response_id == done.response.id

    run(main)


def test_anthropic_sdk_stream_final_usage_matches_mock_count() -> None:
    body: dict[str, Any] = {
        "model": "claude-mock-1",
        "max_tokens": 100,
        "system": "You are terse.",
        "messages": [{"role": "user", "content": "Say something about foxes."}],
    }

    async def main() -> None:
        async with MockUpstream(api_format="anthropic") as mock:
            client = anthropic.AsyncAnthropic(
                base_url=mock.url, api_key="sk-ant-test", max_retries=0
            )
            async with client:
                async with client.messages.stream(**body) as stream:
                    text = "".join([t async for t in stream.text_stream])
                    final = await stream.get_final_message()
                whole = await client.messages.create(
                    **body, extra_headers={"x-mock-cache-read-tokens": "4"}
                )
            truth = expected_usage("messages", body)
            assert text == expected_text()
            assert (
                final.usage.output_tokens
                == truth["completion_tokens"]
                == mock.requests[0].completion_tokens
            )
            assert final.usage.input_tokens == truth["prompt_tokens"]
            assert final.stop_reason == "end_turn"
            # The credential arrives as sent (this SDK version uses a bearer token).
            sent = mock.requests[0].headers
            assert "sk-ant-test" in (sent.get("x-api-key") or sent.get("authorization") or "")
            # Cached tokens are reported beside, not inside, input_tokens (as Anthropic does).
            assert whole.usage.cache_read_input_tokens == 4
            assert whole.usage.input_tokens == truth["prompt_tokens"] - 4
            assert whole.content[0].type == "text" and whole.content[0].text == expected_text()

    run(main)


def test_anthropic_stream_event_sequence() -> None:
    async def main() -> None:
        async with MockUpstream(api_format="anthropic", chunks=2) as mock:
            # An unknown path answers in the instance's format.
            resp = await post(mock, "/generate", {"stream": True, "messages": []})
        assert resp.headers["content-type"].startswith("text/event-stream")
        assert resp.event_names == [
            b"message_start",
            b"content_block_start",
            b"ping",
            b"content_block_delta",
            b"content_block_delta",
            b"content_block_stop",
            b"message_delta",
            b"message_stop",
        ]
        start = orjson.loads(resp.events[0])["message"]["usage"]
        assert start == {
            "input_tokens": 0,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 0,
            "output_tokens": 1,
        }
        assert orjson.loads(resp.events[-2])["usage"] == {"output_tokens": 8}
        # Paced or not, every event travels in its own chunk frame.
        assert len(resp.frames) == 8

    run(main)


# --------------------------------------------------------------------------- OpenAI wire shape


def test_usage_chunk_only_when_asked_or_always_usage() -> None:
    async def main() -> None:
        async with MockUpstream(chunks=3) as mock:
            plain = await post(mock, "/v1/chat/completions", {**CHAT_BODY, "stream": True})
            forced = await post(
                mock,
                "/v1/chat/completions",
                {**CHAT_BODY, "stream": True},
                {"x-mock-always-usage": "1"},
            )
        for resp in (plain, forced):
            assert resp.complete
            assert resp.events[-1] == b"[DONE]"
            assert chat_deltas(resp) == expected_text(3)
        assert all(b'"usage"' not in e for e in plain.events)
        assert mock.requests[0].usage_sent is False
        last = orjson.loads(forced.events[-2])
        assert last["choices"] == []
        assert last["usage"]["completion_tokens"] == 12
        assert all(orjson.loads(e)["usage"] is None for e in forced.events[:-2])

    run(main)


def test_ids_are_unique_and_constant_within_a_stream() -> None:
    async def main() -> None:
        async with MockUpstream(chunks=2) as mock:
            a = await post(mock, "/v1/chat/completions", {**CHAT_BODY, "stream": True})
            b = await post(mock, "/v1/chat/completions", {**CHAT_BODY, "stream": True})
        ids_a = {orjson.loads(e)["id"] for e in a.events[:-1]}
        ids_b = {orjson.loads(e)["id"] for e in b.events[:-1]}
        assert len(ids_a) == len(ids_b) == 1
        assert ids_a != ids_b
        assert ids_a == {mock.requests[0].response_id}
        created = orjson.loads(a.events[0])["created"]
        assert abs(created - time.time()) < 5

    run(main)


# --------------------------------------------------------------------------- pacing


def test_paced_delay_spaces_chunks() -> None:
    async def main() -> None:
        async with MockUpstream(chunks=5) as mock:
            t0 = time.monotonic()
            resp = await post(
                mock,
                "/v1/chat/completions",
                {**CHAT_BODY, "stream": True},
                {"x-mock-delay-ms": "40"},
            )
        assert resp.complete and chat_deltas(resp) == expected_text(5)
        # frames: role chunk, 5 deltas, finish chunk, [DONE]
        times = [t for t, _ in resp.frames]
        gaps = [b - a for a, b in itertools.pairwise(times[1:6])]
        assert all(g > 0.030 for g in gaps), gaps
        assert times[5] - times[1] >= 0.155
        assert times[5] - t0 < 1.0

    run(main)


def test_first_byte_delay_holds_the_head() -> None:
    async def main() -> None:
        async with MockUpstream(first_byte_ms=150) as mock:
            t0 = time.monotonic()
            resp = await post(mock, "/v1/chat/completions", {**CHAT_BODY, "stream": True})
            took = time.monotonic() - t0
            quick = await post(
                mock, "/v1/chat/completions", CHAT_BODY, {"x-mock-first-byte-ms": "0"}
            )
        assert resp.complete and took >= 0.14
        assert mock.requests[0].first_byte_at is not None
        assert mock.requests[0].first_byte_at - mock.requests[0].received_at >= 0.14
        assert quick.status == 200 and quick.complete

    run(main)


# --------------------------------------------------------------------------- faults


@pytest.mark.parametrize("status", [429, 500, 503])
def test_status_faults_answer_openai_errors(status: int) -> None:
    async def main() -> None:
        async with MockUpstream() as mock:
            client = openai.AsyncOpenAI(base_url=mock.url + "/v1", api_key="sk-test", max_retries=0)
            async with client:
                with pytest.raises(openai.APIStatusError) as info:
                    await client.chat.completions.create(
                        **CHAT_BODY, extra_headers={"x-mock-fault": f"status:{status}"}
                    )
                # The connection survives an error answer: the next request reuses it.
                ok = await client.chat.completions.create(**CHAT_BODY)
            err = info.value
            assert err.status_code == status
            assert isinstance(err.body, dict) and "type" in err.body
            if status in (429, 503):
                assert err.response.headers["retry-after"] == "1"
            if status == 429:
                assert isinstance(err, openai.RateLimitError)
                assert err.code == "rate_limit_exceeded"
            assert ok.choices[0].message.content == expected_text()
            assert mock.connections_accepted == 1
            assert [r.status for r in mock.requests] == [status, 200]

    run(main)


def test_status_fault_on_messages_is_anthropic_shaped() -> None:
    async def main() -> None:
        async with MockUpstream(fault="status:429", retry_after=7) as mock:
            resp = await post(mock, "/v1/messages", {"messages": []})
        assert resp.status == 429
        assert resp.headers["retry-after"] == "7"
        assert orjson.loads(resp.body)["error"]["type"] == "rate_limit_error"

    run(main)


def test_disconnect_after_n_chunks_closes_without_terminator() -> None:
    async def main() -> None:
        async with MockUpstream() as mock:
            for delay in ("0", "5"):
                resp = await post(
                    mock,
                    "/v1/chat/completions",
                    {**CHAT_BODY, "stream": True, "stream_options": {"include_usage": True}},
                    {"x-mock-fault": "disconnect-after:3", "x-mock-delay-ms": delay},
                )
                assert resp.status == 200 and not resp.complete
                assert len(resp.frames) == 4  # role chunk + 3 deltas
                assert chat_deltas(resp) == expected_text(3, 4)
                assert b'"usage":{' not in resp.body and b"[DONE]" not in resp.body
            for req in mock.requests:
                assert req.chunks_sent == 3 and not req.completed
                await req.wait_closed()
                assert req.connection.closed_by_peer is False

    run(main)


def test_no_usage_fault_streams_without_usage_frame() -> None:
    async def main() -> None:
        async with MockUpstream(always_usage=True) as mock:
            resp = await post(
                mock,
                "/v1/chat/completions",
                {**CHAT_BODY, "stream": True, "stream_options": {"include_usage": True}},
                {"x-mock-fault": "no-usage"},
            )
            anth = await post(
                mock, "/v1/messages", {"stream": True, "messages": []}, {"x-mock-fault": "no-usage"}
            )
        assert resp.complete and resp.events[-1] == b"[DONE]"
        assert chat_deltas(resp) == expected_text()
        assert all(orjson.loads(e).get("usage") is None for e in resp.events[:-1])
        assert anth.complete and b'"usage"' not in anth.body
        assert mock.requests[0].usage_sent is False

    run(main)


def test_hang_fault_never_answers_and_sees_client_close() -> None:
    async def main() -> None:
        async with MockUpstream() as mock:
            reader, writer = await asyncio.open_connection(mock.host, mock.port)
            writer.write(request_bytes("/v1/chat/completions", CHAT_BODY, {"x-mock-fault": "hang"}))
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(reader.read(1), 0.1)
            (req,) = await mock.wait_for_requests(1)
            assert req.status == 0 and req.bytes_sent == 0
            writer.close()
            closed_at = time.monotonic()
            when = await req.wait_closed()
            assert when - closed_at < 0.1
            assert req.connection.closed_by_peer

    run(main)


def test_malformed_fault_sends_garbage_head() -> None:
    async def main() -> None:
        async with MockUpstream() as mock:
            resp = await post(
                mock, "/v1/chat/completions", CHAT_BODY, {"x-mock-fault": "malformed"}
            )
            client = openai.AsyncOpenAI(base_url=mock.url + "/v1", api_key="sk-test", max_retries=0)
            async with client:
                with pytest.raises(openai.APIConnectionError):
                    await client.chat.completions.create(
                        **CHAT_BODY, extra_headers={"x-mock-fault": "malformed"}
                    )
        assert resp.status == -1  # no parseable status code
        assert resp.head.startswith(b"HTTP/1.1 2x0")
        for req in mock.requests:
            assert req.connection.closed_at is not None and not req.connection.closed_by_peer

    run(main)


def test_bad_requests_get_400() -> None:
    async def main() -> None:
        async with MockUpstream() as mock:
            not_json = await post(mock, "/v1/chat/completions", b"{nope")
            bad_knob = await post(mock, "/v1/chat/completions", CHAT_BODY, {"x-mock-chunks": "x"})
            bad_fault = await post(mock, "/v1/chat/completions", CHAT_BODY, {"x-mock-fault": "zap"})
            reader, writer = await asyncio.open_connection(mock.host, mock.port)
            writer.write(b"NONSENSE\r\n\r\n")
            garbage = await read_response(reader)
            writer.close()
        assert not_json.status == bad_knob.status == bad_fault.status == garbage.status == 400
        assert orjson.loads(not_json.body)["error"]["type"] == "invalid_request_error"

    run(main)


# --------------------------------------------------------------------------- connections


def test_keep_alive_and_pipelining_reuse_one_connection() -> None:
    async def main() -> None:
        async with MockUpstream(chunks=2) as mock:
            reader, writer = await asyncio.open_connection(mock.host, mock.port)
            stream = {**CHAT_BODY, "stream": True}
            writer.write(request_bytes("/v1/chat/completions", stream))
            first = await read_response(reader)
            writer.write(request_bytes("/v1/chat/completions", CHAT_BODY))
            second = await read_response(reader)
            # Pipelined: three requests in one write, one of them paced; answers stay in order.
            writer.write(
                request_bytes("/v1/chat/completions", stream, {"x-mock-delay-ms": "20"})
                + request_bytes("/v1/embeddings", {"input": "x"})
                + request_bytes("/v1/chat/completions", stream, {"connection": "close"})
            )
            third, fourth, fifth = [await read_response(reader) for _ in range(3)]
            assert await reader.read() == b""  # closed after "connection: close"
            writer.close()
            assert all(r.complete for r in (first, second, third, fourth, fifth))
            assert (
                chat_deltas(first) == chat_deltas(third) == chat_deltas(fifth) == expected_text(2)
            )
            assert orjson.loads(second.body)["object"] == "chat.completion"
            assert orjson.loads(fourth.body)["object"] == "list"
            assert fifth.headers["connection"] == "close"
            assert mock.connections_accepted == 1
            assert {r.connection_id for r in mock.requests} == {1}
            assert [r.kind for r in mock.requests] == ["chat", "chat", "chat", "embeddings", "chat"]

    run(main)


def test_sdk_reuses_its_connection() -> None:
    async def main() -> None:
        async with MockUpstream() as mock:
            client = openai.AsyncOpenAI(base_url=mock.url + "/v1", api_key="sk-test", max_retries=0)
            async with client:
                for _ in range(3):
                    stream = await client.chat.completions.create(stream=True, **CHAT_BODY)
                    async for _chunk in stream:
                        pass
            assert mock.connections_accepted == 1
            assert len(mock.requests) == 3

    run(main)


def test_client_disconnect_mid_stream_is_seen_within_100ms() -> None:
    async def main() -> None:
        async with MockUpstream(chunks=50, delay_ms=20) as mock:
            reader, writer = await asyncio.open_connection(mock.host, mock.port)
            writer.write(request_bytes("/v1/chat/completions", {**CHAT_BODY, "stream": True}))
            await reader.readuntil(b"\r\n\r\n")
            await asyncio.sleep(0.05)
            writer.close()
            gone = time.monotonic()
            (req,) = await mock.wait_for_requests(1)
            closed = await req.wait_closed()
            assert closed - gone < 0.1
            assert req.connection.closed_by_peer
            assert not req.completed and 0 < req.chunks_sent < 50
            assert mock.open_connections == 0

    run(main)


def test_chunked_request_body_and_expect_continue() -> None:
    async def main() -> None:
        async with MockUpstream(chunks=1) as mock:
            reader, writer = await asyncio.open_connection(mock.host, mock.port)
            body = orjson.dumps(CHAT_BODY)
            writer.write(
                b"POST /v1/chat/completions HTTP/1.1\r\nhost: m\r\ntransfer-encoding: chunked\r\n"
                b"expect: 100-continue\r\n\r\n"
            )
            assert await reader.readuntil(b"\r\n\r\n") == b"HTTP/1.1 100 Continue\r\n\r\n"
            half = len(body) // 2
            writer.write(b"%x\r\n%s\r\n" % (half, body[:half]))
            await asyncio.sleep(0.01)
            writer.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(body) - half, body[half:]))
            resp = await read_response(reader)
            writer.close()
        assert resp.status == 200
        assert mock.last.json == CHAT_BODY
        assert mock.last.prompt_tokens == expected_usage("chat", CHAT_BODY)["prompt_tokens"]

    run(main)


def test_healthz_and_stop_closes_connections() -> None:
    async def main() -> None:
        mock = MockUpstream(fault="hang")
        await mock.start()
        reader, writer = await asyncio.open_connection(mock.host, mock.port)
        writer.write(b"GET /healthz HTTP/1.1\r\nhost: m\r\n\r\n")
        health = await read_response(reader)
        assert health.status == 200 and orjson.loads(health.body) == {"status": "ok"}
        writer.write(request_bytes("/v1/chat/completions", CHAT_BODY))
        await mock.wait_for_requests(2)
        await mock.stop()
        assert await asyncio.wait_for(reader.read(), 1) == b""
        assert mock.requests[1].closed_at is not None
        assert mock.requests[1].connection.closed_by_peer is False
        writer.close()
        with pytest.raises(OSError):
            await asyncio.open_connection(mock.host, mock.port)

    run(main)


# --------------------------------------------------------------------------- big mode


def test_big_mode_streams_50mb_exactly_and_counts_usage() -> None:
    size = 50 << 20

    async def main() -> None:
        async with MockUpstream(always_usage=True) as mock:
            loop = asyncio.get_running_loop()
            sock = socket.create_connection((mock.host, mock.port))
            sock.setblocking(False)
            req_bytes = request_bytes(
                "/v1/chat/completions", {**CHAT_BODY, "stream": True}, {"x-mock-bytes": "50MB"}
            )
            await loop.sock_sendall(sock, req_bytes)
            total = 0
            tail = b""
            while not tail.endswith(b"\r\n0\r\n\r\n"):
                data = await loop.sock_recv(sock, 1 << 20)
                assert data, "mock closed early"
                total += len(data)
                tail = (tail + data)[-4096:]
            sock.close()
            (req,) = mock.requests
            assert req.completed
            assert total == req.bytes_sent
            frame = len(mock_shapes.big_chunk_text()) + 200
            assert size <= total < size + frame
            usage_line = [ln for ln in tail.split(b"\n") if b'"usage":{' in ln][-1]
            usage = orjson.loads(usage_line[6:])["usage"]
            expect = big_completion_tokens(req.chunks_sent, 128, "gpt-4o-mini")
            assert usage["completion_tokens"] == req.completion_tokens == expect
            assert req.chunks_sent > size // 1000  # ~930-byte frames

    run(main)


def test_big_mode_honours_flow_control_when_client_does_not_read() -> None:
    async def main() -> None:
        async with MockUpstream() as mock:
            _reader, writer = await asyncio.open_connection(mock.host, mock.port, limit=1 << 16)
            # Stop reading: the reader's transport pauses once its small buffer is full.
            writer.write(
                request_bytes(
                    "/v1/chat/completions", {**CHAT_BODY, "stream": True}, {"x-mock-bytes": "200MB"}
                )
            )
            (req,) = await mock.wait_for_requests(1)
            await asyncio.sleep(0.3)
            sent_while_stalled = req.bytes_sent
            # Kernel socket buffers plus the transport's high-water mark, not 200 MB.
            assert sent_while_stalled < 32 << 20, sent_while_stalled
            writer.close()
            await req.wait_closed()
            assert not req.completed

    run(main)


# --------------------------------------------------------------------------- CLI


def test_cli_serves_until_sigterm() -> None:
    assert mock_upstream.name == "mock-upstream"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "sidecar.mock", "--port", "0", "--chunks", "3", "--always-usage"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline().decode().strip()
        assert url.startswith("http://127.0.0.1:")
        host, port = url[7:].split(":")

        async def main() -> None:
            reader, writer = await asyncio.open_connection(host, int(port))
            writer.write(request_bytes("/v1/chat/completions", {**CHAT_BODY, "stream": True}))
            resp = await read_response(reader)
            writer.close()
            assert chat_deltas(resp) == expected_text(3)
            assert orjson.loads(resp.events[-2])["usage"]["completion_tokens"] == 12

        run(main)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(5) == 0
        assert proc.stderr is not None
        assert b"1 requests on 1 connections" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()


# --------------------------------------------------------------------------- tool calls

WEATHER_OAI = [{"type": "function", "function": {
    "name": "get_weather", "parameters": {"type": "object",
                                          "properties": {"query": {"type": "string"}}}}}]
WEATHER_ANTH = [{"name": "get_weather", "input_schema": {
    "type": "object", "properties": {"query": {"type": "string"}}}}]


def test_openai_sdk_tool_call_stream_and_whole() -> None:
    from sidecar.mock import expected_tool_arguments

    args = expected_tool_arguments(3)
    body = {**CHAT_BODY, "tools": WEATHER_OAI}

    async def main() -> None:
        async with MockUpstream(chunks=3) as mock:
            client = openai.AsyncOpenAI(base_url=mock.url + "/v1", api_key="sk-test", max_retries=0)
            async with client:
                stream = await client.chat.completions.create(
                    stream=True, stream_options={"include_usage": True}, **body)
                chunks = [c async for c in stream]
                whole = await client.chat.completions.create(**body)
                answered = await client.chat.completions.create(**{**body, "messages": [
                    *body["messages"],
                    {"role": "assistant", "content": None, "tool_calls": [
                        {"id": "call_1", "type": "function",
                         "function": {"name": "get_weather", "arguments": args}}]},
                    {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]})
            calls = [tc for c in chunks if c.choices for tc in c.choices[0].delta.tool_calls or ()]
            assert calls[0].id == "call_" + mock.requests[0].response_id.split("-", 1)[1] \
                and calls[0].function is not None and calls[0].function.name == "get_weather"
            assert "".join(tc.function.arguments or "" for tc in calls if tc.function) == args
            assert {tc.index for tc in calls} == {0}
            assert all(c.choices[0].delta.content is None for c in chunks if c.choices)
            assert chunks[-2].choices[0].finish_reason == "tool_calls"
            usage = chunks[-1].usage
            assert usage is not None and usage.completion_tokens == count_tokens(args, "o200k_base")
            msg = whole.choices[0].message
            assert whole.choices[0].finish_reason == "tool_calls" and msg.content is None
            assert msg.tool_calls is not None and msg.tool_calls[0].function.arguments == args
            # The tool's result is in: the model answers in text.
            assert answered.choices[0].finish_reason == "stop"
            assert answered.choices[0].message.content == expected_text(3)

    run(main)


def test_anthropic_sdk_tool_use_stream_and_whole() -> None:
    from sidecar.mock import expected_tool_arguments

    args = expected_tool_arguments(3)
    body: dict[str, Any] = {"model": "claude-mock-1", "max_tokens": 100, "tools": WEATHER_ANTH,
                            "messages": [{"role": "user", "content": "Weather?"}]}

    async def main() -> None:
        async with MockUpstream(api_format="anthropic", chunks=3) as mock:
            client = anthropic.AsyncAnthropic(base_url=mock.url, api_key="sk-ant-test",
                                              max_retries=0)
            async with client:
                async with client.messages.stream(**body) as stream:
                    partial = [e.delta.partial_json async for e in stream
                               if e.type == "content_block_delta"
                               and e.delta.type == "input_json_delta"]
                    final = await stream.get_final_message()
                whole = await client.messages.create(**body)
                answered = await client.messages.create(**{**body, "messages": [
                    *body["messages"],
                    {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1",
                                                       "name": "get_weather",
                                                       "input": orjson.loads(args)}]},
                    {"role": "user", "content": [{"type": "tool_result",
                                                  "tool_use_id": "toolu_1",
                                                  "content": "sunny"}]}]})
            assert "".join(partial) == args
            block = final.content[0]
            assert block.type == "tool_use" and block.name == "get_weather"
            assert block.input == orjson.loads(args) and final.stop_reason == "tool_use"
            assert final.usage.output_tokens == mock.requests[0].completion_tokens \
                == count_tokens(args, "o200k_base")
            assert whole.stop_reason == "tool_use" and whole.content[0].type == "tool_use"
            assert whole.content[0].input == orjson.loads(args)
            assert answered.stop_reason == "end_turn"
            assert answered.content[0].type == "text" and \
                answered.content[0].text == expected_text(3)

    run(main)
