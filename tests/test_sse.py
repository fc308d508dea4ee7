"""The SSE usage tap and the include_usage stripper, on real-looking provider streams."""

from __future__ import annotations

import tracemalloc

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sidecar import sse
from sidecar.sse import TapResult, UsageChunkStripper, make_tap

# -- fixtures: streams as providers send them -------------------------------------

# OpenAI Chat Completions, stream_options.include_usage=true: every chunk carries
# "usage":null, and a final chunk with "choices":[] carries the usage.
CHAT_STREAM = (
    b'data: {"id":"chatcmpl-B9MHDbslfkBeAs8l4bebGdFOJ6PeG","object":"chat.completion.chunk",'
    b'"created":1741570283,"model":"gpt-4o-2024-08-06","service_tier":"default",'
    b'"system_fingerprint":"fp_eb9dce56a8","choices":[{"index":0,"delta":{"role":"assistant",'
    b'"content":"","refusal":null},"logprobs":null,"finish_reason":null}],"usage":null}\n\n'
    b'data: {"id":"chatcmpl-B9MHDbslfkBeAs8l4bebGdFOJ6PeG","object":"chat.completion.chunk",'
    b'"created":1741570283,"model":"gpt-4o-2024-08-06","service_tier":"default",'
    b'"system_fingerprint":"fp_eb9dce56a8","choices":[{"index":0,"delta":{"content":"Hello"},'
    b'"logprobs":null,"finish_reason":null}],"usage":null}\n\n'
    b'data: {"id":"chatcmpl-B9MHDbslfkBeAs8l4bebGdFOJ6PeG","object":"chat.completion.chunk",'
    b'"created":1741570283,"model":"gpt-4o-2024-08-06","service_tier":"default",'
    b'"system_fingerprint":"fp_eb9dce56a8","choices":[{"index":0,"delta":{"content":'
    b'"! \\"Caf\\u00e9\\" \\ud83d\\ude00\\n"},"logprobs":null,"finish_reason":null}],'
    b'"usage":null}\n\n'
    b'data: {"id":"chatcmpl-B9MHDbslfkBeAs8l4bebGdFOJ6PeG","object":"chat.completion.chunk",'
    b'"created":1741570283,"model":"gpt-4o-2024-08-06","service_tier":"default",'
    b'"system_fingerprint":"fp_eb9dce56a8","choices":[{"index":0,"delta":{"content":'
    b'"back\\\\slash"},"logprobs":null,"finish_reason":null}],"usage":null}\n\n'
    b'data: {"id":"chatcmpl-B9MHDbslfkBeAs8l4bebGdFOJ6PeG","object":"chat.completion.chunk",'
    b'"created":1741570283,"model":"gpt-4o-2024-08-06","service_tier":"default",'
    b'"system_fingerprint":"fp_eb9dce56a8","choices":[{"index":0,"delta":{},"logprobs":null,'
    b'"finish_reason":"stop"}],"usage":null}\n\n'
    b'data: {"id":"chatcmpl-B9MHDbslfkBeAs8l4bebGdFOJ6PeG","object":"chat.completion.chunk",'
    b'"created":1741570283,"model":"gpt-4o-2024-08-06","service_tier":"default",'
    b'"system_fingerprint":"fp_eb9dce56a8","choices":[],"usage":{"prompt_tokens":19,'
    b'"completion_tokens":10,"total_tokens":29,"prompt_tokens_details":{"cached_tokens":0,'
    b'"audio_tokens":0},"completion_tokens_details":{"reasoning_tokens":0,"audio_tokens":0,'
    b'"accepted_prediction_tokens":0,"rejected_prediction_tokens":0}}}\n\n'
    b"data: [DONE]\n\n"
)
CHAT_TEXT = 'Hello! "Café" \U0001f600\nback\\slash'

# The same stream as the client gets it without include_usage: no usage anywhere.
CHAT_STREAM_STRIPPED = (
    b'data: {"id":"chatcmpl-B9MHDbslfkBeAs8l4bebGdFOJ6PeG","object":"chat.completion.chunk",'
    b'"created":1741570283,"model":"gpt-4o-2024-08-06","service_tier":"default",'
    b'"system_fingerprint":"fp_eb9dce56a8","choices":[{"index":0,"delta":{"role":"assistant",'
    b'"content":"","refusal":null},"logprobs":null,"finish_reason":null}]}\n\n'
    b'data: {"id":"chatcmpl-B9MHDbslfkBeAs8l4bebGdFOJ6PeG","object":"chat.completion.chunk",'
    b'"created":1741570283,"model":"gpt-4o-2024-08-06","service_tier":"default",'
    b'"system_fingerprint":"fp_eb9dce56a8","choices":[{"index":0,"delta":{"content":"Hello"},'
    b'"logprobs":null,"finish_reason":null}]}\n\n'
    b'data: {"id":"chatcmpl-B9MHDbslfkBeAs8l4bebGdFOJ6PeG","object":"chat.completion.chunk",'
    b'"created":1741570283,"model":"gpt-4o-2024-08-06","service_tier":"default",'
    b'"system_fingerprint":"fp_eb9dce56a8","choices":[{"index":0,"delta":{"content":'
    b'"! \\"Caf\\u00e9\\" \\ud83d\\ude00\\n"},"logprobs":null,"finish_reason":null}]}\n\n'
    b'data: {"id":"chatcmpl-B9MHDbslfkBeAs8l4bebGdFOJ6PeG","object":"chat.completion.chunk",'
    b'"created":1741570283,"model":"gpt-4o-2024-08-06","service_tier":"default",'
    b'"system_fingerprint":"fp_eb9dce56a8","choices":[{"index":0,"delta":{"content":'
    b'"back\\\\slash"},"logprobs":null,"finish_reason":null}]}\n\n'
    b'data: {"id":"chatcmpl-B9MHDbslfkBeAs8l4bebGdFOJ6PeG","object":"chat.completion.chunk",'
    b'"created":1741570283,"model":"gpt-4o-2024-08-06","service_tier":"default",'
    b'"system_fingerprint":"fp_eb9dce56a8","choices":[{"index":0,"delta":{},"logprobs":null,'
    b'"finish_reason":"stop"}]}\n\n'
    b"data: [DONE]\n\n"
)

# Legacy Completions with include_usage.
COMPLETIONS_STREAM = (
    b'data: {"id":"cmpl-AzYw5","object":"text_completion","created":1739290000,'
    b'"choices":[{"text":"This","index":0,"logprobs":null,"finish_reason":null}],'
    b'"model":"gpt-3.5-turbo-instruct","usage":null}\n\n'
    b'data: {"id":"cmpl-AzYw5","object":"text_completion","created":1739290000,'
    b'"choices":[{"text":" is a test","index":0,"logprobs":null,"finish_reason":null}],'
    b'"model":"gpt-3.5-turbo-instruct","usage":null}\n\n'
    b'data: {"id":"cmpl-AzYw5","object":"text_completion","created":1739290000,'
    b'"choices":[{"text":".","index":0,"logprobs":null,"finish_reason":"length"}],'
    b'"model":"gpt-3.5-turbo-instruct","usage":null}\n\n'
    b'data: {"id":"cmpl-AzYw5","object":"text_completion","created":1739290000,'
    b'"choices":[],"model":"gpt-3.5-turbo-instruct","usage":{"prompt_tokens":5,'
    b'"completion_tokens":7,"total_tokens":12}}\n\n'
    b"data: [DONE]\n\n"
)

_RESP = (
    b'"id":"resp_67c9fdcecf488190bdd9a0409de3a1ec07b8b0ad4e5eb654","object":"response",'
    b'"created_at":1741290958,"error":null,"incomplete_details":null,'
    b'"instructions":"You are a helpful assistant.","max_output_tokens":null,'
    b'"model":"gpt-4.1-2025-04-14","parallel_tool_calls":true,"previous_response_id":null,'
    b'"reasoning":{"effort":null,"summary":null},"store":true,"temperature":1.0,'
    b'"text":{"format":{"type":"text"}},"tool_choice":"auto","tools":[],"top_p":1.0,'
    b'"truncation":"disabled"'
)
_MSG = b"msg_67c9fdcf37fc8190ba82116e33fb28c507b8b0ad4e5eb654"
RESPONSES_STREAM = (
    b"event: response.created\n"
    b'data: {"type":"response.created","sequence_number":0,"response":{' + _RESP
    + b',"status":"in_progress","output":[],"usage":null,"user":null,"metadata":{}}}\n\n'
    b"event: response.in_progress\n"
    b'data: {"type":"response.in_progress","sequence_number":1,"response":{' + _RESP
    + b',"status":"in_progress","output":[],"usage":null,"user":null,"metadata":{}}}\n\n'
    b"event: response.output_item.added\n"
    b'data: {"type":"response.output_item.added","sequence_number":2,"output_index":0,'
    b'"item":{"id":"' + _MSG + b'","type":"message","status":"in_progress",'
    b'"role":"assistant","content":[]}}\n\n'
    b"event: response.content_part.added\n"
    b'data: {"type":"response.content_part.added","sequence_number":3,"item_id":"' + _MSG
    + b'","output_index":0,"content_index":0,"part":{"type":"output_text","text":"",'
    b'"annotations":[]}}\n\n'
    b"event: response.output_text.delta\n"
    b'data: {"type":"response.output_text.delta","sequence_number":4,"item_id":"' + _MSG
    + b'","output_index":0,"content_index":0,"delta":"Hi"}\n\n'
    b"event: response.output_text.delta\n"
    b'data: {"type":"response.output_text.delta","sequence_number":5,"item_id":"' + _MSG
    + b'","output_index":0,"content_index":0,"delta":" there! \\u2764"}\n\n'
    b"event: response.output_text.done\n"
    b'data: {"type":"response.output_text.done","sequence_number":6,"item_id":"' + _MSG
    + b'","output_index":0,"content_index":0,"text":"Hi there! \\u2764"}\n\n'
    b"event: response.content_part.done\n"
    b'data: {"type":"response.content_part.done","sequence_number":7,"item_id":"' + _MSG
    + b'","output_index":0,"content_index":0,"part":{"type":"output_text",'
    b'"text":"Hi there! \\u2764","annotations":[]}}\n\n'
    b"event: response.output_item.done\n"
    b'data: {"type":"response.output_item.done","sequence_number":8,"output_index":0,'
    b'"item":{"id":"' + _MSG + b'","type":"message","status":"completed","role":"assistant",'
    b'"content":[{"type":"output_text","text":"Hi there! \\u2764","annotations":[]}]}}\n\n'
    b"event: response.completed\n"
    b'data: {"type":"response.completed","sequence_number":9,"response":{' + _RESP
    + b',"status":"completed","output":[{"id":"' + _MSG + b'","type":"message",'
    b'"status":"completed","role":"assistant","content":[{"type":"output_text",'
    b'"text":"Hi there! \\u2764","annotations":[]}]}],"usage":{"input_tokens":37,'
    b'"input_tokens_details":{"cached_tokens":0},"output_tokens":11,'
    b'"output_tokens_details":{"reasoning_tokens":0},"total_tokens":48},"user":null,'
    b'"metadata":{}}}\n\n'
)

# Anthropic Messages: text block, then a tool_use block streamed as partial JSON.
ANTHROPIC_STREAM = (
    b"event: message_start\n"
    b'data: {"type":"message_start","message":{"id":"msg_01XFDUDYJgAACzvnptvVoYEL",'
    b'"type":"message","role":"assistant","model":"claude-sonnet-4-5-20250929","content":[],'
    b'"stop_reason":null,"stop_sequence":null,"usage":{"input_tokens":12,'
    b'"cache_creation_input_tokens":1500,"cache_read_input_tokens":3000,'
    b'"cache_creation":{"ephemeral_5m_input_tokens":1500,"ephemeral_1h_input_tokens":0},'
    b'"output_tokens":1,"service_tier":"standard"}}}\n\n'
    b"event: content_block_start\n"
    b'data: {"type":"content_block_start","index":0,"content_block":{"type":"text",'
    b'"text":""}}\n\n'
    b"event: ping\n"
    b'data: {"type": "ping"}\n\n'
    b"event: content_block_delta\n"
    b'data: {"type":"content_block_delta","index":0,"delta":{"type":"text_delta",'
    b'"text":"Okay, let\'s check"}}\n\n'
    b"event: content_block_delta\n"
    b'data: {"type":"content_block_delta","index":0,"delta":{"type":"text_delta",'
    b'"text":" the weather."}}\n\n'
    b"event: content_block_stop\n"
    b'data: {"type":"content_block_stop","index":0}\n\n'
    b"event: content_block_start\n"
    b'data: {"type":"content_block_start","index":1,"content_block":{"type":"tool_use",'
    b'"id":"toolu_01T1x1fJ34qAmk2tNTrN7Up6","name":"get_weather","input":{}}}\n\n'
    b"event: content_block_delta\n"
    b'data: {"type":"content_block_delta","index":1,"delta":{"type":"input_json_delta",'
    b'"partial_json":"{\\"location\\": \\"San Fra"}}\n\n'
    b"event: content_block_delta\n"
    b'data: {"type":"content_block_delta","index":1,"delta":{"type":"input_json_delta",'
    b'"partial_json":"ncisco\\"}"}}\n\n'
    b"event: content_block_stop\n"
    b'data: {"type":"content_block_stop","index":1}\n\n'
    b"event: message_delta\n"
    b'data: {"type":"message_delta","delta":{"stop_reason":"tool_use","stop_sequence":null},'
    b'"usage":{"output_tokens":89}}\n\n'
    b"event: message_stop\n"
    b'data: {"type":"message_stop"}\n\n'
)
ANTHROPIC_TEXT = 'Okay, let\'s check the weather.{"location": "San Francisco"}'

STREAMS = {
    "chat": ("openai", "/v1/chat/completions", CHAT_STREAM),
    "completions": ("openai", "/v1/completions", COMPLETIONS_STREAM),
    "responses": ("openai", "/v1/responses", RESPONSES_STREAM),
    "anthropic": ("anthropic", "/v1/messages", ANTHROPIC_STREAM),
}


@pytest.fixture(autouse=True, params=["deferred", "parsing"])
def tap_mode(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every test runs twice: through make_tap's DeferredTap as the proxy uses it,
    and with DEFER_BYTES=0 so each read reaches the parsing tap as it was split."""
    if request.param == "parsing":
        monkeypatch.setattr(sse.deferred, "DEFER_BYTES", 0)
    mode: str = request.param
    return mode


def crlf(stream: bytes) -> bytes:
    # JSON strings hold only escaped newlines, so every raw \n is a line ending.
    return stream.replace(b"\n", b"\r\n")


def cr_only(stream: bytes) -> bytes:
    return stream.replace(b"\n", b"\r")


def tap_whole(name: str, data: bytes) -> TapResult:
    fmt, path, _ = STREAMS[name]
    tap = make_tap(fmt, path, True)
    tap.feed(data)
    return tap.result()


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    pieces, last = [], 0
    for p in points:
        pieces.append(data[last:p])
        last = p
    pieces.append(data[last:])
    return pieces


def events_in(stream: bytes) -> int:
    return stream.count(b"\n\n")


# -- streams ---------------------------------------------------------------------


def test_chat_stream_usage_text_and_done() -> None:
    r = tap_whole("chat", CHAT_STREAM)
    assert r.usage is not None
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (19, 10, 29)
    assert r.usage.cache_read_tokens == 0
    assert r.usage.raw is not None and orjson.loads(r.usage.raw)["prompt_tokens"] == 19
    assert r.completion_text == CHAT_TEXT
    assert r.events == 7
    assert r.done


def test_usage_null_is_not_usage() -> None:
    without_usage_chunk = b"\n\n".join(
        ev for ev in CHAT_STREAM.split(b"\n\n") if b'"usage":{' not in ev
    )
    r = tap_whole("chat", without_usage_chunk)
    assert r.usage is None
    assert r.done
    assert r.completion_text == CHAT_TEXT


def test_completions_stream() -> None:
    r = tap_whole("completions", COMPLETIONS_STREAM)
    assert r.usage is not None
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (5, 7, 12)
    assert r.completion_text == "This is a test."
    assert r.events == 5 and r.done


def test_responses_stream() -> None:
    r = tap_whole("responses", RESPONSES_STREAM)
    assert r.usage is not None
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (37, 11, 48)
    assert r.usage.cache_read_tokens == 0 and r.usage.reasoning_tokens == 0
    # Only deltas count: the .done events repeat the full text and must not double it.
    assert r.completion_text == "Hi there! \u2764"
    assert r.events == 10 and r.done


def test_anthropic_stream_merges_message_start_and_message_delta() -> None:
    r = tap_whole("anthropic", ANTHROPIC_STREAM)
    u = r.usage
    assert u is not None
    assert u.prompt_tokens == 12 + 1500 + 3000
    assert (u.cache_read_tokens, u.cache_write_tokens) == (3000, 1500)
    assert u.completion_tokens == 89
    assert u.total_tokens == 12 + 1500 + 3000 + 89
    assert u.raw is not None
    raw = orjson.loads(u.raw)
    assert raw["message_start"]["cache_read_input_tokens"] == 3000
    assert raw["message_delta"] == {"output_tokens": 89}
    assert r.completion_text == ANTHROPIC_TEXT
    assert r.events == 12 and r.done


def test_anthropic_cut_after_message_start_keeps_the_exact_prompt_side() -> None:
    cut = ANTHROPIC_STREAM[: ANTHROPIC_STREAM.index(b"event: content_block_stop")]
    r = tap_whole("anthropic", cut)
    assert r.usage is not None
    assert r.usage.prompt_tokens == 4512
    assert r.usage.completion_tokens is None and not r.usage.complete
    assert r.completion_text == "Okay, let's check the weather."
    assert not r.done


@pytest.mark.parametrize("name", sorted(STREAMS))
def test_stream_cut_mid_event_reports_only_whole_deltas(name: str) -> None:
    fmt, path, stream = STREAMS[name]
    whole = make_tap(fmt, path, True)
    whole.feed(stream)
    # Cut inside each event in turn: the result equals feeding the complete events before it.
    ends = [i + 2 for i in range(len(stream)) if stream.startswith(b"\n\n", i)]
    starts = [0, *ends[:-1]]
    for start, end in zip(starts, ends, strict=True):
        cut_at = (start + end) // 2
        cut = make_tap(fmt, path, True)
        cut.feed(stream[:cut_at])
        ref = make_tap(fmt, path, True)
        ref.feed(stream[:start])
        assert cut.result() == ref.result()
    mid_usage = make_tap(fmt, path, True)
    last_usage_event = max(stream.rfind(b'"usage":{'), stream.rfind(b"message_delta"))
    mid_usage.feed(stream[:last_usage_event])
    r = mid_usage.result()
    if name == "anthropic":
        assert r.usage is not None and r.usage.completion_tokens is None
    else:
        assert r.usage is None
    assert not r.done


def test_chat_cut_mid_stream_keeps_full_deltas_only() -> None:
    cut_at = CHAT_STREAM.index(b"back\\\\sl")
    r = tap_whole("chat", CHAT_STREAM[:cut_at])
    assert r.usage is None
    assert r.completion_text == 'Hello! "Café" \U0001f600\n'
    assert r.events == 3
    assert not r.done


@pytest.mark.parametrize("name", sorted(STREAMS))
@pytest.mark.parametrize("variant", [crlf, cr_only])
def test_cr_line_endings_parse_the_same(name: str, variant: object) -> None:
    assert callable(variant)
    _, _, stream = STREAMS[name]
    assert tap_whole(name, variant(stream)) == tap_whole(name, stream)


@settings(
    max_examples=150,
    deadline=None,
    # tap_mode's monkeypatch is the same for every example, so sharing it is safe.
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(
    name=st.sampled_from(sorted(STREAMS)),
    line_end=st.sampled_from(["lf", "crlf", "cr"]),
    cuts=st.lists(st.integers(min_value=0, max_value=10_000), max_size=40),
    views=st.booleans(),
    peek=st.booleans(),
)
def test_any_split_gives_the_same_result(
    name: str, line_end: str, cuts: list[int], views: bool, peek: bool
) -> None:
    fmt, path, stream = STREAMS[name]
    if line_end == "crlf":
        stream = crlf(stream)
    elif line_end == "cr":
        stream = cr_only(stream)
    tap = make_tap(fmt, path, True)
    for piece in split(stream, cuts):
        tap.feed(memoryview(piece) if views else piece)
        if peek:  # results taken mid-stream must not change the final one
            tap.result()
    assert tap.result() == tap_whole(name, stream)


@given(cuts=st.lists(st.integers(min_value=0, max_value=3000), max_size=200))
@settings(max_examples=50, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_byte_by_byte_and_random_splits_of_chat(cuts: list[int]) -> None:
    tap = make_tap("openai", "/v1/chat/completions", True)
    for piece in split(CHAT_STREAM, cuts):
        tap.feed(piece)
    assert tap.result() == tap_whole("chat", CHAT_STREAM)


def test_byte_by_byte_feed() -> None:
    for name, (fmt, path, stream) in STREAMS.items():
        tap = make_tap(fmt, path, True)
        for i in range(len(stream)):
            tap.feed(stream[i : i + 1])
        assert tap.result() == tap_whole(name, stream)


def test_trailing_cr_is_settled_at_result_and_a_late_lf_ignored() -> None:
    tap = make_tap("openai", "/v1/chat/completions", True)
    tap.feed(b'data: {"choices":[{"delta":{"content":"a"}}]}\r\n\r')
    assert tap.result().completion_text == "a"  # the stream may have ended here
    tap.feed(b'\ndata: {"choices":[{"delta":{"content":"b"}}]}\r\n\r\n')
    r = tap.result()
    assert (r.completion_text, r.events) == ("ab", 2)


def test_usage_after_result_still_reports_the_usage() -> None:
    for name, (fmt, path, stream) in STREAMS.items():
        tap = make_tap(fmt, path, True)
        half = len(stream) // 2
        tap.feed(stream[:half])
        tap.result()  # e.g. a look taken mid-stream
        tap.feed(stream[half:])
        whole = tap_whole(name, stream)
        assert tap.usage() == whole.usage, name
        assert tap.result() == whole
        assert tap.usage() == whole.usage, name


def test_result_can_be_called_mid_stream_and_again() -> None:
    tap = make_tap("openai", "/v1/chat/completions", True)
    half = CHAT_STREAM.index(b"data: [DONE]")
    tap.feed(CHAT_STREAM[:half])
    first = tap.result()
    assert first.usage is not None and not first.done
    assert tap.result() == first
    tap.feed(CHAT_STREAM[half:])
    assert tap.result().done


@pytest.mark.parametrize("name", ["anthropic", "responses"])
def test_streams_without_event_lines_parse_the_same(name: str) -> None:
    # Some compatible servers send only data: lines; the JSON "type" says it all.
    stream = STREAMS[name][2]
    data_only = b"\n".join(
        line for line in stream.split(b"\n") if not line.startswith(b"event:")
    )
    assert tap_whole(name, data_only) == tap_whole(name, stream)


def test_comments_keepalives_and_blank_runs_are_not_events() -> None:
    stream = (
        b": OPENROUTER PROCESSING\n\n"
        b'data: {"choices":[{"delta":{"content":"a"}}]}\n\n\n\n'
        b": keep-alive\n\n"
        b'data: {"choices":[{"delta":{"content":"b"}}]}\n\n'
        b"data: [DONE]\n\n"
    )
    tap = make_tap("openai", "/v1/chat/completions", True)
    tap.feed(stream)
    r = tap.result()
    assert (r.completion_text, r.events, r.done) == ("ab", 3, True)


def test_spaced_json_from_python_servers() -> None:
    stream = (
        b'data: {"choices": [{"delta": {"content": "x \\"y\\""}}], "usage": null}\n\n'
        b'data: {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2, '
        b'"total_tokens": 5}}\n\n'
        b"data: [DONE]\n\n"
    )
    tap = make_tap("openai", "/v1/chat/completions", True)
    tap.feed(stream)
    r = tap.result()
    assert r.completion_text == 'x "y"'
    assert r.usage is not None and r.usage.total_tokens == 5


def test_reasoning_and_tool_call_deltas_count_as_completion() -> None:
    stream = (
        b'data: {"choices":[{"delta":{"content":null,"reasoning_content":"think"}}]}\n\n'
        b'data: {"choices":[{"delta":{"tool_calls":[{"index":0,"function":'
        b'{"arguments":"{\\"a\\":1}"}}]}}]}\n\n'
        b'data: {"choices":[{"delta":{"content":"done"}}]}\n\n'
    )
    tap = make_tap("openai", "/v1/chat/completions", True)
    tap.feed(stream)
    assert tap.result().completion_text == 'think{"a":1}done'


def test_groq_usage_under_x_groq() -> None:
    stream = (
        b'data: {"choices":[{"delta":{"content":"hi"},"finish_reason":"stop"}],'
        b'"x_groq":{"id":"req_01","usage":{"prompt_tokens":9,"completion_tokens":1,'
        b'"total_tokens":10}}}\n\n'
        b"data: [DONE]\n\n"
    )
    tap = make_tap("openai", "/v1/chat/completions", True)
    tap.feed(stream)
    r = tap.result()
    assert r.usage is not None and r.usage.total_tokens == 10
    assert r.completion_text == "hi"


def test_continuous_usage_keeps_the_last_frame() -> None:
    stream = b"".join(
        b'data: {"choices":[{"delta":{"content":"w"}}],"usage":{"prompt_tokens":4,'
        b'"completion_tokens":%d,"total_tokens":%d}}\n\n' % (i, 4 + i)
        for i in range(1, 6)
    )
    tap = make_tap("openai", "/v1/chat/completions", True)
    tap.feed(stream)
    r = tap.result()
    assert r.usage is not None and r.usage.completion_tokens == 5
    assert r.completion_text == "wwwww"


def test_surrogate_pair_split_across_deltas_is_rejoined() -> None:
    stream = (
        b'data: {"choices":[{"delta":{"content":"\\ud83d"}}]}\n\n'
        b'data: {"choices":[{"delta":{"content":"\\ude00!"}}]}\n\n'
        b'data: {"choices":[{"delta":{"content":"\\udc00"}}]}\n\n'
    )
    tap = make_tap("openai", "/v1/chat/completions", True)
    tap.feed(stream)
    assert tap.result().completion_text == "\U0001f600!\ufffd"


def test_responses_audio_deltas_are_not_text() -> None:
    stream = (
        b"event: response.audio.delta\n"
        b'data: {"type":"response.audio.delta","delta":"UklGRiQAAABXQVZF"}\n\n'
        b"event: response.audio.transcript.delta\n"
        b'data: {"type":"response.audio.transcript.delta","delta":"Hello"}\n\n'
    )
    tap = make_tap("openai", "/v1/responses", True)
    tap.feed(stream)
    assert tap.result().completion_text == "Hello"


# -- bounds ------------------------------------------------------------------------


def test_oversized_event_is_skipped_but_usage_is_salvaged() -> None:
    big_text = b"x" * 5000
    completed = (
        b"event: response.completed\n"
        b'data: {"type":"response.completed","response":{"output":[{"content":'
        b'[{"type":"output_text","text":"' + big_text + b'"}]}],"usage":{"input_tokens":5,'
        b'"output_tokens":1250,"total_tokens":1255},"user":null,"metadata":{}}}\n\n'
    )
    stream = (
        b"event: response.output_text.delta\n"
        b'data: {"type":"response.output_text.delta","delta":"before"}\n\n'
        + completed
        + b"event: response.output_text.delta\n"
        b'data: {"type":"response.output_text.delta","delta":" after"}\n\n'
    )
    for cuts in ([], list(range(0, len(stream), 7))):
        tap = make_tap("openai", "/v1/responses", True, body_cap=1024)
        for piece in split(stream, cuts):
            tap.feed(piece)
        r = tap.result()
        assert r.truncated and r.done
        assert r.usage is not None and r.usage.completion_tokens == 1250
        assert r.completion_text == "before after"
        assert r.events == 3


def test_big_responses_completed_event_is_not_parsed_whole() -> None:
    big = b"y" * (sse.ORJSON_PARSE_MAX + 1000)
    stream = (
        b"event: response.output_text.delta\n"
        b'data: {"type":"response.output_text.delta","delta":"y"}\n\n'
        b"event: response.completed\n"
        b'data: {"type":"response.completed","response":{"output":[{"content":'
        b'[{"type":"output_text","text":"' + big + b'"}]}],"usage":{"input_tokens":5,'
        b'"output_tokens":70000,"total_tokens":70005},"user":null,"metadata":{}}}\n\n'
    )
    tap = make_tap("openai", "/v1/responses", True)
    tap.feed(stream)
    tracemalloc.start()
    try:
        r = tap.result()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert r.usage is not None and r.usage.total_tokens == 70005 and r.done
    assert r.completion_text == "y" and not r.truncated
    assert peak < 2 * len(stream)


def test_held_bytes_stay_bounded_for_a_huge_stream(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sse.text, "COMPLETION_TEXT_CAP", 4096)
    delta = b'data: {"choices":[{"delta":{"content":"0123456789"}}],"usage":null}\n\n'
    tap = make_tap("openai", "/v1/chat/completions", True)
    for _ in range(50_000):  # ~3.5 MB
        tap.feed(delta)
    r = tap.result()
    assert len(r.completion_text) == 4090
    assert r.completion_bytes_dropped == 50_000 * 10 - 4090
    # The estimate extrapolates at the kept text's ratio (here 1 token per char).
    assert r.completion_estimate(len) == 500_000


def test_a_50_mb_stream_holds_bounded_memory() -> None:
    delta = (b'data: {"choices":[{"index":0,"delta":{"content":"'
             + b"lorem ipsum " * 85 + b'"},"finish_reason":null}],"usage":null}\n\n')
    n = 50 * 1024 * 1024 // len(delta)
    usage = (b'data: {"choices":[],"usage":{"prompt_tokens":7,"completion_tokens":1,'
             b'"total_tokens":8}}\n\ndata: [DONE]\n\n')
    tracemalloc.start()
    try:
        tap = make_tap("openai", "/v1/chat/completions", True)
        for _ in range(n):
            tap.feed(delta)
        tap.feed(usage)
        r = tap.result()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert r.usage is not None and r.usage.total_tokens == 8 and r.done
    assert len(r.completion_text) == sse.text.COMPLETION_TEXT_CAP // 1020 * 1020
    assert r.completion_bytes_dropped == n * 1020 - len(r.completion_text)
    # At result(): the kept escaped text, its quoted copy, the parser's decoded
    # input and the str it returns, ~1 MiB each; nowhere near the 50 MB fed.
    assert peak < 5 * sse.text.COMPLETION_TEXT_CAP


def test_counter_counts_and_discards_at_the_flush_size(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sse.text, "COUNT_FLUSH_BYTES", 100)
    calls: list[str] = []

    def counter(text: str) -> int:
        calls.append(text)
        return len(text)

    delta = b'data: {"choices":[{"delta":{"content":"caf\\u00e9 "}}]}\n\n'
    tap = make_tap("openai", "/v1/chat/completions", True, counter=counter)
    for _ in range(1000):
        tap.feed(delta)
    r = tap.result()
    assert r.completion_tokens_counted + len(r.completion_text) == 5000
    assert r.completion_bytes_dropped == 0
    assert all(t.startswith("café ") for t in calls)  # never cut inside an escape
    assert r.completion_estimate(len) == 5000


def test_incomplete_event_is_held_up_to_the_cap_only() -> None:
    tap = make_tap("openai", "/v1/chat/completions", True, body_cap=1000)
    tap.feed(b'data: {"choices":[{"delta":{"content":"' + b"y" * 10_000)
    assert tap.result().truncated
    tap.feed(b'"}}]}\n\ndata: {"choices":[{"delta":{"content":"z"}}]}\n\n')
    assert tap.result().completion_text == "z"


# -- non-streaming bodies ------------------------------------------------------------

CHAT_BODY = (
    b'{"id":"chatcmpl-B9MBs8CjcvOU2jLn4n570S5qMJKcT","object":"chat.completion",'
    b'"created":1741569952,"model":"gpt-4.1-2025-04-14","choices":[{"index":0,"message":'
    b'{"role":"assistant","content":"Hello! How can I assist you today?","refusal":null,'
    b'"annotations":[]},"logprobs":null,"finish_reason":"stop"}],"usage":{"prompt_tokens":19,'
    b'"completion_tokens":10,"total_tokens":29,"prompt_tokens_details":{"cached_tokens":0,'
    b'"audio_tokens":0},"completion_tokens_details":{"reasoning_tokens":0,"audio_tokens":0,'
    b'"accepted_prediction_tokens":0,"rejected_prediction_tokens":0}},'
    b'"service_tier":"default"}'
)
COMPLETIONS_BODY = (
    b'{"id":"cmpl-uqkvlQyYK7bGYrRHQ0eXlWi7","object":"text_completion","created":1589478378,'
    b'"model":"gpt-3.5-turbo-instruct","system_fingerprint":"fp_44709d6fcb","choices":'
    b'[{"text":"\\n\\nThis is indeed a test","index":0,"logprobs":null,"finish_reason":"length"}],'
    b'"usage":{"prompt_tokens":5,"completion_tokens":7,"total_tokens":12}}'
)
EMBEDDINGS_BODY = (
    b'{"object":"list","data":[{"object":"embedding","embedding":[0.0023064255,-0.009327292,'
    b'-0.0028842222],"index":0}],"model":"text-embedding-3-small",'
    b'"usage":{"prompt_tokens":8,"total_tokens":8}}'
)
RESPONSES_BODY = (
    b'{"id":"resp_67ccd2bed1ec8190b14f964abc0542670bb6a6b452d3795b","object":"response",'
    b'"created_at":1741476542,"status":"completed","error":null,"instructions":null,'
    b'"model":"gpt-4.1-2025-04-14","output":[{"type":"message",'
    b'"id":"msg_67ccd2bf17f0819081ff3bb2cf6508e60bb6a6b452d3795b","status":"completed",'
    b'"role":"assistant","content":[{"type":"output_text","text":"In a peaceful grove.",'
    b'"annotations":[]}]}],"text":{"format":{"type":"text"}},"usage":{"input_tokens":36,'
    b'"input_tokens_details":{"cached_tokens":0},"output_tokens":87,'
    b'"output_tokens_details":{"reasoning_tokens":0},"total_tokens":123},"user":null,'
    b'"metadata":{}}'
)
ANTHROPIC_BODY = (
    b'{"id":"msg_013Zva2CMHLNnXjNJJKqJ2EF","type":"message","role":"assistant",'
    b'"model":"claude-sonnet-4-5-20250929","content":[{"type":"text","text":"Hi! My name is '
    b'Claude."}],"stop_reason":"end_turn","stop_sequence":null,"usage":{"input_tokens":2095,'
    b'"cache_creation_input_tokens":0,"cache_read_input_tokens":1800,"output_tokens":503}}'
)


@pytest.mark.parametrize(
    ("fmt", "path", "body", "expected", "text"),
    [
        ("openai", "/v1/chat/completions", CHAT_BODY, (19, 10, 29),
         "Hello! How can I assist you today?"),
        ("openai", "/v1/completions", COMPLETIONS_BODY, (5, 7, 12),
         "\n\nThis is indeed a test"),
        ("openai", "/v1/embeddings", EMBEDDINGS_BODY, (8, 0, 8), ""),
        ("openai", "/v1/responses", RESPONSES_BODY, (36, 87, 123), "In a peaceful grove."),
        ("anthropic", "/v1/messages", ANTHROPIC_BODY, (3895, 503, 4398),
         "Hi! My name is Claude."),
    ],
)
def test_non_streaming_bodies(
    fmt: str, path: str, body: bytes, expected: tuple[int, int, int], text: str
) -> None:
    tap = make_tap(fmt, path, False)
    for i in range(0, len(body), 64):
        tap.feed(memoryview(body)[i : i + 64])
    r = tap.result()
    assert r.usage is not None
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == expected
    assert r.completion_text == text
    assert r.done and r.events == 0 and not r.truncated


def test_non_streaming_explicit_zero_usage_is_reported_zero() -> None:
    body = (b'{"choices":[{"message":{"role":"assistant","content":""}}],'
            b'"usage":{"prompt_tokens":0,"completion_tokens":0,"total_tokens":0}}')
    tap = make_tap("openai", "/v1/chat/completions", False)
    tap.feed(body)
    u = tap.result().usage
    assert u is not None
    assert (u.prompt_tokens, u.completion_tokens, u.total_tokens) == (0, 0, 0)


def test_streaming_explicit_zero_usage_is_reported_zero() -> None:
    tap = make_tap("openai", "/v1/chat/completions", True)
    tap.feed(b'data: {"choices":[],"usage":{"prompt_tokens":0,"completion_tokens":0,'
             b'"total_tokens":0}}\n\ndata: [DONE]\n\n')
    u = tap.result().usage
    assert u is not None and u.completion_tokens == 0 and u.total_tokens == 0


def test_non_streaming_body_cut_short_keeps_text_and_no_usage() -> None:
    tap = make_tap("openai", "/v1/chat/completions", False)
    tap.feed(CHAT_BODY[: CHAT_BODY.index(b'"usage"') + 20])
    r = tap.result()
    assert r.usage is None and not r.done
    assert r.completion_text == "Hello! How can I assist you today?"


def test_non_streaming_body_over_the_cap_salvages_usage_from_the_tail() -> None:
    body = CHAT_BODY.replace(b"How can I assist you today?", b"z" * 10_000)
    tap = make_tap("openai", "/v1/chat/completions", False, body_cap=2048)
    tap.feed(body)
    r = tap.result()
    assert r.truncated
    assert r.usage is not None and r.usage.total_tokens == 29


def test_big_non_streaming_body_takes_usage_from_the_tail_without_a_full_parse() -> None:
    # A 4 MB embeddings batch: parsing it whole would cost ~13x its size (orjson).
    body = orjson.dumps({
        "object": "list",
        "data": [{"object": "embedding", "index": i, "embedding": [0.0123456789] * 1536}
                 for i in range(150)],
        "model": "text-embedding-3-small",
        "usage": {"prompt_tokens": 1200, "total_tokens": 1200},
    })
    assert len(body) > sse.ORJSON_PARSE_MAX
    tap = make_tap("openai", "/v1/embeddings", False)
    tap.feed(body)
    tracemalloc.start()
    try:
        u = tap.usage()
        r = tap.result()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert u is not None and (u.prompt_tokens, u.completion_tokens, u.total_tokens) == (
        1200, 0, 1200)
    assert r.usage == u and r.done and not r.truncated
    assert peak < len(body) // 4
    cut = make_tap("openai", "/v1/embeddings", False)
    cut.feed(body[: len(body) // 2])
    assert cut.usage() is None and not cut.result().done


def test_non_streaming_error_body() -> None:
    tap = make_tap("openai", "/v1/chat/completions", False)
    tap.feed(b'{"error":{"message":"Rate limit reached","type":"requests","code":"429"}}')
    r = tap.result()
    assert r.usage is None and r.completion_text == "" and r.done


# -- the include_usage stripper ------------------------------------------------------


def strip_all(pieces: list[bytes]) -> bytes:
    s = UsageChunkStripper()
    return b"".join(s.feed(p) for p in pieces) + s.flush()


def test_stripper_gives_the_client_the_stream_without_usage() -> None:
    assert strip_all([CHAT_STREAM]) == CHAT_STREAM_STRIPPED


def test_stripper_on_completions_removes_usage() -> None:
    out = strip_all([COMPLETIONS_STREAM])
    assert b"usage" not in out
    assert out.count(b"\n\n") == events_in(COMPLETIONS_STREAM) - 1
    assert out.endswith(b"data: [DONE]\n\n")


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    cuts=st.lists(st.integers(min_value=0, max_value=10_000), max_size=40),
    line_end=st.sampled_from(["lf", "crlf", "cr"]),
)
def test_stripper_any_split_gives_the_same_bytes(cuts: list[int], line_end: str) -> None:
    stream, expected = CHAT_STREAM, CHAT_STREAM_STRIPPED
    if line_end == "crlf":
        stream, expected = crlf(stream), crlf(expected)
    elif line_end == "cr":
        stream, expected = cr_only(stream), cr_only(expected)
    assert strip_all(split(stream, cuts)) == expected


def test_stripper_forwards_only_complete_events() -> None:
    s = UsageChunkStripper()
    first_end = CHAT_STREAM.index(b"\n\n") + 2
    assert s.feed(CHAT_STREAM[: first_end - 1]) == b""
    out = s.feed(CHAT_STREAM[first_end - 1 : first_end + 10])
    assert out == CHAT_STREAM_STRIPPED[: CHAT_STREAM_STRIPPED.index(b"\n\n") + 2]
    assert s.flush() == CHAT_STREAM[first_end : first_end + 10]


def test_stripper_passes_a_stream_without_usage_unchanged() -> None:
    plain = CHAT_STREAM_STRIPPED
    assert strip_all(split(plain, [100, 900, 1500])) == plain
    s = UsageChunkStripper()
    assert s.feed(plain) is plain  # the fast path forwards the very same bytes
    no_usage = COMPLETIONS_STREAM.replace(b',"usage":null', b"")
    no_usage = no_usage[: no_usage.index(b'data: {"id":"cmpl-AzYw5","object":"text_completion",'
                                         b'"created":1739290000,"choices":[],')]
    assert strip_all(split(no_usage, [10, 200, 201, 202])) == no_usage


@pytest.mark.parametrize("sep", [b"\n\n", b"\r\n\r\n", b"\r\r"])
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/responses", "/v1/messages"])
def test_an_event_of_exactly_the_cap_is_not_oversized_in_any_split(sep: bytes, path: str) -> None:
    # Found by tests/fuzz_atheris.py: the first bytes of a separator still waiting for
    # the rest were counted as the held event's, so an event of exactly body_cap bytes
    # was cut as oversized (truncated, its content lost) when a read ended inside its
    # separator, and parsed whole otherwise.
    cap = 200
    fmt = "anthropic" if path == "/v1/messages" else "openai"
    text = b'data: {"choices":[{"delta":{"content":"'
    event = text + b"x" * (cap - len(text) - 5) + b'"}}]}'
    assert len(event) == cap
    stream = event + sep + b'data: {"choices":[{"delta":{"content":"y"}}]}' + sep

    def run(pieces: list[bytes]) -> TapResult:
        tap = make_tap(fmt, path, True, body_cap=cap)
        for piece in pieces:
            tap.feed(piece)
            tap.result()  # taken mid-stream: the parsing tap sees each read as it comes
        return tap.result()

    whole = run([stream])
    assert not whole.truncated and whole.events == 2
    for k in range(1, len(sep)):
        assert run([stream[:cap + k], stream[cap + k:]]) == whole, k


def test_an_oversized_events_head_ends_with_the_event() -> None:
    # Found by tests/test_fuzz.py: an event over the cap read whole had as its "head"
    # the next 512 bytes of the read, so a response.completed marker in a later event
    # made the Responses tap salvage usage from an earlier, non-terminal event (and say
    # done early), which it did not do when the same event arrived across two reads.
    chat_usage = (b'event: message_delta\ndata: {"id":"c","choices":[],"usage":'
                  b'{"prompt_tokens":11,"completion_tokens":7,"total_tokens":18}}\n\n')
    completed = (b'event: response.completed\ndata: {"type":"response.completed",'
                 b'"response":{"usage":"unreadable"}}\n\n')
    stream = chat_usage + completed
    results = []
    for pieces in ([stream], [stream[:60], stream[60:]]):
        tap = make_tap("openai", "/v1/responses", True, body_cap=64)
        for piece in pieces:
            tap.feed(piece)
            tap.result()
        results.append(tap.result())
    assert results[0] == results[1]
    assert results[0].usage is None and results[0].truncated


def test_the_last_usage_event_decides_whether_or_not_a_result_was_asked_before() -> None:
    # Found by tests/test_fuzz.py: a usage event that does not decode (here a data line
    # split inside a key) fell back to an earlier usage event only if a result() taken
    # mid-stream had decoded that one already, so peeking changed the final usage.
    good = (b'data: {"id":"c","choices":[],"usage":{"prompt_tokens":11,'
            b'"completion_tokens":7,"total_tokens":18}}\n\n')
    bad = (b'data: {"\ndata: id":"c","choices":[],"usage":{"prompt_tokens":11,'
           b'"completion_tokens":7,"total_tokens":18}}\n\n')
    for first, last, want in ((good, bad, None), (bad, good, 18), (good, good, 18)):
        results = []
        for peek in (False, True):
            tap = make_tap("openai", "/v1/chat/completions", True, body_cap=300)
            for piece in (first, last):
                tap.feed(piece)
                if peek:
                    tap.result()
            results.append(tap.result().usage)
        assert results[0] == results[1]
        assert (results[0].total_tokens if results[0] else None) == want


@pytest.mark.parametrize("tail", [b"\n\r", b"\r\r", b"\r\n\r", b"\n\n\r"])
def test_stripper_keeps_blank_lines_at_the_end_of_a_cr_stream(tail: bytes) -> None:
    # Found by tests/fuzz_atheris.py: at flush, with \r line ends, an empty event (a
    # blank line before the final \r) was taken for the dropped usage chunk and lost
    # with its separator, so a stream with no usage in it did not pass unchanged.
    stream = b'data: {"choices":[{"delta":{"content":"a"}}]}\r\n\r\n' + tail
    for pieces in ([stream], [stream[:-1], stream[-1:]], split(stream, list(range(len(stream))))):
        assert strip_all(pieces) == stream


def test_stripper_cuts_usage_riding_on_a_content_chunk() -> None:
    stream = (
        b'data: {"id":"x","choices":[{"index":0,"delta":{"content":"hi"},'
        b'"finish_reason":"stop"}],"usage":{"prompt_tokens":1,"completion_tokens":1,'
        b'"total_tokens":2}}\n\n'
        b'data: {"usage":{"prompt_tokens":1},"id":"y","choices":[{"delta":{}}]}\n\n'
    )
    assert strip_all([stream]) == (
        b'data: {"id":"x","choices":[{"index":0,"delta":{"content":"hi"},'
        b'"finish_reason":"stop"}]}\n\n'
        b'data: {"id":"y","choices":[{"delta":{}}]}\n\n'
    )


def test_stripper_drops_a_usage_chunk_without_choices() -> None:
    stream = (
        b'data: {"id":"x","choices":[{"delta":{"content":"hi"}}]}\n\n'
        b'data: {"id":"x","usage":{"prompt_tokens":1,"completion_tokens":1}}\n\n'
        b"data: [DONE]\n\n"
    )
    assert strip_all([stream]) == (
        b'data: {"id":"x","choices":[{"delta":{"content":"hi"}}]}\n\n'
        b"data: [DONE]\n\n"
    )


def test_stripper_handles_spaced_json() -> None:
    stream = (
        b'data: {"choices": [{"delta": {"content": "a"}}], "usage": null}\n\n'
        b'data: {"choices": [], "usage": {"prompt_tokens": 1}}\n\n'
        b"data: [DONE]\n\n"
    )
    assert strip_all([stream]) == (
        b'data: {"choices": [{"delta": {"content": "a"}}]}\n\n'
        b"data: [DONE]\n\n"
    )


def test_stripper_leaves_usage_text_inside_content_alone() -> None:
    stream = b'data: {"choices":[{"delta":{"content":"\\"usage\\":null, ok"}}],"usage":null}\n\n'
    assert strip_all([stream]) == (
        b'data: {"choices":[{"delta":{"content":"\\"usage\\":null, ok"}}]}\n\n'
    )


def test_stripper_forwards_an_oversized_event_without_holding_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(sse.stripper, "STRIPPER_HOLD_MAX", 1000)
    big = b'data: {"choices":[{"delta":{"content":"' + b"q" * 5000 + b'"}}],"usage":null}'
    stream = big + b"\n\n" + CHAT_STREAM
    s = UsageChunkStripper()
    out = [s.feed(p) for p in split(stream, list(range(0, len(stream), 50)))]
    assert len(out[30]) > 0  # forwarded before the event ended
    # The oversized event is forwarded verbatim; everything after it is stripped as usual.
    assert b"".join(out) + s.flush() == big + b"\n\n" + CHAT_STREAM_STRIPPED
