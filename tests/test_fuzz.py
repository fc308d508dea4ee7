"""Property-based fuzzing of every parser a hostile client or provider can reach.

The targets and what they check are in tests/fuzz_targets.py; this file generates
their inputs with hypothesis: HTTP requests and responses, SSE streams and JSON
bodies built from a grammar that favours the hostile cases (duplicate and conflicting
framing headers, bad chunk sizes, bare CR/LF line ends, obs-fold, NULs, huge numbers,
escapes, interim responses, oversize events), then mutated byte-wise (flips, inserted
tokens, cuts), and raw bytes too. Each input is fed whole and in a random split.

The last test does the same over a real socket: random request bytes to a running
sidecar (with the mock provider behind it) always get well-formed HTTP responses or a
clean close, never a hang, and the sidecar serves a normal request afterwards.

Budget: the ``fuzz-ci`` profile (the default) keeps this file to about 30 s on a
loaded 2-core box; ``SIDECAR_FUZZ_PROFILE=fuzz-long`` runs 75x as many examples, e.g.
``SIDECAR_FUZZ_PROFILE=fuzz-long python -m pytest tests/test_fuzz.py -q``.
"""

from __future__ import annotations

import os
import socket
import time
from typing import Any

import httptools
import pytest
from fuzz_targets import (
    FUZZ_MAX_BODY,
    TAP_ENDPOINTS,
    client_side_target,
    json_edit_target,
    parse_responses,
    request_reader_target,
    response_body_start,
    response_parser_target,
    scrub_target,
    stripper_target,
    tap_target,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

settings.register_profile(
    "fuzz-ci", max_examples=150, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                           HealthCheck.filter_too_much],
)
settings.register_profile(
    "fuzz-long", max_examples=15_000, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                           HealthCheck.filter_too_much],
)
PROFILE_NAME = os.environ.get("SIDECAR_FUZZ_PROFILE", "fuzz-ci")
PROFILE = settings.get_profile(PROFILE_NAME)
# The suite's 120 s per test holds for fuzz-ci; a long run gets an hour per test.
pytestmark = pytest.mark.timeout(120 if PROFILE_NAME == "fuzz-ci" else 3600)
# The socket test costs a round trip per example: a tenth of the examples.
SOCKET_PROFILE = settings(PROFILE, max_examples=max(30, PROFILE.max_examples // 10),
                          suppress_health_check=[*PROFILE.suppress_health_check,
                                                 HealthCheck.function_scoped_fixture])

# Generating nested JSON costs hypothesis more than the edit costs us: half the examples.
JSON_PROFILE = settings(PROFILE, max_examples=max(50, PROFILE.max_examples // 2))

CUTS = st.lists(st.integers(0, 1 << 16), max_size=24)

# ---------------------------------------------------------------------------- mutation
# Tokens a mutation inserts: what parsers trip over.
TOKENS = [b"\r\n", b"\n", b"\r", b"\r\n\r\n", b"\x00", b" ", b"\t", b":", b";", b",", b'"',
          b"\\", b"{", b"}", b"[", b"]", b"0\r\n\r\n", b"\xff", b"\xc3", b"\r\n ",
          b"Transfer-Encoding: chunked\r\n", b"Content-Length: 5\r\n",
          b"Content-Length: 99999999999999999999999\r\n", b"Connection: close\r\n",
          b"Host: x\r\n", b"HTTP/1.1 200 OK\r\n", b"data: ", b"\n\n", b'"usage":{',
          b'"usage":null', b"[DONE]", b"\\u0000", b"\\ud83d", b"1e999", b"-0", b"ffffffff\r\n"]


@st.composite
def mutated(draw: Any, base: st.SearchStrategy[bytes]) -> bytes:
    data = bytearray(draw(base))
    for _ in range(draw(st.integers(0, 4))):
        op = draw(st.integers(0, 4))
        pos = draw(st.integers(0, len(data)))
        if op == 0 and data:  # flip a byte
            pos = min(pos, len(data) - 1)
            data[pos] = draw(st.integers(0, 255))
        elif op == 1:
            data[pos:pos] = draw(st.sampled_from(TOKENS))
        elif op == 2:  # delete a stretch
            data[pos:pos + draw(st.integers(1, 8))] = b""
        elif op == 3:  # duplicate a stretch
            data[pos:pos] = data[pos:pos + draw(st.integers(1, 40))]
        else:  # truncate
            del data[pos:]
    return bytes(data)


def eol() -> st.SearchStrategy[bytes]:
    return st.sampled_from([b"\r\n"] * 6 + [b"\n", b"\r", b"\n\r"])


# ---------------------------------------------------------------------------- HTTP requests
@st.composite
def framing_headers(draw: Any, body: bytes) -> tuple[list[bytes], bytes]:
    """Framing header lines and the body bytes as framed (often mismatched on purpose)."""
    kind = draw(st.sampled_from(["length", "length", "chunked", "chunked", "none", "both",
                                 "dup-length", "bad-length", "te-other"]))
    lines: list[bytes] = []
    framed = body
    if kind in ("length", "both"):
        n = len(body) + draw(st.sampled_from([0, 0, 0, -1, 1, 100]))
        lines.append(b"Content-Length: %d" % n)
    if kind in ("chunked", "both", "te-other"):
        lines.append(b"Transfer-Encoding: " + (draw(st.sampled_from(
            [b"chunked", b"Chunked", b" chunked ", b"gzip, chunked", b"chunked, chunked",
             b"identity", b"chunked;x"])) if kind == "te-other" else b"chunked"))
        step = draw(st.integers(1, max(1, len(body))))
        framed = b""
        for i in range(0, len(body), step):
            part = body[i:i + step]
            size = draw(st.sampled_from([b"%x" % len(part)] * 4 + [
                b"%X" % len(part), b"%x;ext=1" % len(part), b"%x " % len(part),
                b"0%x" % len(part), b"-%x" % len(part), b"fffffffffffffffff"]))
            framed += size + b"\r\n" + part + b"\r\n"
        framed += draw(st.sampled_from([b"0\r\n\r\n"] * 4 + [b"0\r\nX-T: 1\r\n\r\n", b"0\r\n",
                                                               b"", b"0\n\n"]))
    if kind == "dup-length":
        lines += [b"Content-Length: %d" % len(body), b"Content-Length: %d" % (len(body) + 1)]
    if kind == "bad-length":
        lines.append(b"Content-Length: " + draw(st.sampled_from(
            [b"-1", b"+5", b"0x10", b"1 2", b"", b"99999999999999999999999", b"5,5", b"1e3"])))
    return lines, framed


@st.composite
def http_request(draw: Any) -> bytes:
    nl = draw(eol())
    method = draw(st.sampled_from([b"POST"] * 4 + [b"GET", b"HEAD", b"PUT", b"CONNECT",
                                                   b"OPTIONS", b"PRI", b"post", b"G ET", b""]))
    target = draw(st.sampled_from([b"/v1/chat/completions"] * 3 + [
        b"/", b"*", b"http://h/v1/chat/completions", b"/a?b=%00", b"/\xff", b"",
        b"/" + b"a" * 600, b"localhost:443"]))
    version = draw(st.sampled_from([b" HTTP/1.1"] * 5 + [
        b" HTTP/1.0", b"", b" HTTP/0.9", b" HTTP/2.0", b" HTTP/1.1 ", b" http/1.1", b" HTTP/1.10"]))
    lines = [method + b" " + target + version]
    hosts = draw(st.sampled_from([1, 1, 1, 0, 2]))
    lines += [b"Host: h%d" % i for i in range(hosts)]
    body = draw(st.binary(max_size=64) | st.sampled_from(
        [b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}', b"{}"]))
    if draw(st.booleans()) or method == b"POST":
        fl, framed = draw(framing_headers(body))
        lines += fl
    else:
        framed = b""
    extra = draw(st.lists(st.sampled_from([
        b"Connection: close", b"Connection: keep-alive", b"Connection: upgrade",
        b"Upgrade: h2c", b"Expect: 100-continue", b"Expect: 100-continue, x",
        b"X-Request-Id: abc", b"X-Request-Id: a\x01b", b"X-Request-Id: " + b"i" * 300,
        b"X-Folded: a" + nl + b" b", b"NoColon", b"Space : x", b": empty-name",
        b"X-Nul: a\x00b", b"X-Long: " + b"v" * 400, b"x-mock-delay-ms: 0",
        b"Authorization: Bearer sk-test", b"Content-Type: application/json",
    ]), max_size=4))
    lines += extra
    return nl.join(lines) + nl + nl + framed


REQUESTS = st.one_of(
    st.lists(http_request(), min_size=1, max_size=3).map(b"".join),
    mutated(st.lists(http_request(), min_size=1, max_size=3).map(b"".join)),
    st.binary(max_size=300),
)


@PROFILE
@given(data=REQUESTS, cuts=CUTS, small=st.booleans())
def test_request_reader_never_crashes_and_any_split_reads_the_same(
    data: bytes, cuts: list[int], small: bool
) -> None:
    if small:
        request_reader_target(data, cuts)
    else:
        request_reader_target(data, cuts, max_head=64 * 1024, max_body=1 << 20, max_headers=100)


@PROFILE
@given(data=REQUESTS, cuts=CUTS)
def test_client_connection_answers_every_request_or_refuses_with_4xx(
    data: bytes, cuts: list[int]
) -> None:
    client_side_target(data, cuts)


def test_request_reader_regressions() -> None:
    # Inputs the fuzzer found or that pin a hostile case, kept so they run every time.
    for data in (
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\nabc",
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nfffffffffffffffff\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: h2c\r\n"
        b"Content-Length: 2\r\n\r\nabGET / HTTP/1.1\r\nHost: b\r\n\r\n",
        b"CONNECT h:443 HTTP/1.1\r\nHost: h\r\n\r\n",
        b"\r\n\r\n\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n",
    ):
        for cuts in ([], [1], [5, 17, 30], list(range(len(data)))):
            request_reader_target(data, cuts)
            client_side_target(data, cuts)


# ---------------------------------------------------------------------------- HTTP responses
@st.composite
def http_response(draw: Any) -> bytes:
    nl = draw(st.sampled_from([b"\r\n"] * 8 + [b"\n"]))
    interim = draw(st.lists(st.sampled_from([b"HTTP/1.1 100 Continue\r\n\r\n",
                                             b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n"]),
                            max_size=2))
    status = draw(st.sampled_from([b"200 OK"] * 5 + [
        b"204 No Content", b"304 Not Modified", b"429 Too Many Requests", b"502 Bad Gateway",
        b"101 Switching Protocols", b"200", b"999 X", b"20 OK", b"2000 OK", b"200 \xff"]))
    version = draw(st.sampled_from([b"HTTP/1.1"] * 5 + [b"HTTP/1.0", b"HTTP/2.0", b"HTTP/1.1 "]))
    lines = [version + b" " + status]
    body = draw(st.binary(max_size=80) | st.sampled_from([
        b'data: {"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":4}}\n\n'
        b"data: [DONE]\n\n"]))
    if draw(st.integers(0, 5)):
        fl, framed = draw(framing_headers(body))
        lines += fl
    else:
        framed = body  # read until close
    lines += draw(st.lists(st.sampled_from([
        b"Connection: close", b"Connection: keep-alive", b"Content-Type: text/event-stream",
        b"X-Request-Id: up-1", b"Upgrade: h2c", b"X-Folded: a" + nl + b" b", b"Bad Header",
        b"Content-Encoding: gzip", b"Set-Cookie: k=v"]), max_size=3))
    trailer = draw(st.sampled_from([b""] * 4 + [
        b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\nSMUGGLED", b"garbage", b"\r\n"]))
    return b"".join(interim) + nl.join(lines) + nl + nl + framed + trailer


RESPONSES = st.one_of(http_response(), mutated(http_response()), st.binary(max_size=300))


@PROFILE
@given(data=RESPONSES, cuts=CUTS, small=st.booleans())
def test_response_parser_never_crashes_and_any_split_parses_the_same(
    data: bytes, cuts: list[int], small: bool
) -> None:
    response_parser_target(data, cuts, max_head=256 if small else 64 * 1024)
    response_body_start(data)


def test_response_parser_regressions() -> None:
    for data in (
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"3\r\nabc\r\n0\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\nSMUGGLED",
        b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\n\r\n",
        b"HTTP/1.1 200 OK\r\n\r\nclose-delimited body",
        b"HTTP/1.1 100\r\n\r\nHTTP/1.1 200\r\nTransfer-Encoding:chunked\t\r\n\r\n2",
        b"\r\n\r\nHTTP/1.0 200\r\n\r\n",
    ):
        for cuts in ([], [1], [20, 40], list(range(len(data)))):
            response_parser_target(data, cuts)
            response_body_start(data)


# ---------------------------------------------------------------------------- SSE streams
USAGE_OBJECTS = st.sampled_from([
    b'{"prompt_tokens":11,"completion_tokens":7,"total_tokens":18}',
    b'{"prompt_tokens": 11, "completion_tokens": 7}',
    b'{"input_tokens":5,"output_tokens":9,"cache_read_input_tokens":2}',
    b'{"prompt_tokens":-1,"completion_tokens":1e400}',
    b'{"prompt_tokens":"11"}', b"null", b"{}", b'{"prompt_tokens":1',
    b'{"prompt_tokens":99999999999999999999999,"completion_tokens":0}',
    b'{"nested":{"usage":{"prompt_tokens":1}},"prompt_tokens":2,"completion_tokens":3}',
])
TEXTS = st.sampled_from([b"hello", b'say \\"usage\\":{}', b"\\ud83d\\ude00", b"\\ud83d",
                         b"\\u0000", b"caf\xc3\xa9", b"\xff\xfe", b"\\n\\n", b"x" * 300])


@st.composite
def sse_event(draw: Any) -> bytes:
    usage = draw(USAGE_OBJECTS)
    text = draw(TEXTS)
    payload = draw(st.sampled_from([
        b'{"id":"c","choices":[{"index":0,"delta":{"content":"%b"}}],"usage":null}' % text,
        b'{"id":"c","choices":[],"usage":%b}' % usage,
        b'{"id":"c","choices":[{"delta":{"content":"%b"}}],"usage":%b}' % (text, usage),
        b'{"choices":[{"text":"%b"}]}' % text,
        b'{"type":"message_start","message":{"usage":%b}}' % usage,
        b'{"type":"content_block_delta","delta":{"type":"text_delta","text":"%b"}}' % text,
        b'{"type":"message_delta","usage":%b}' % usage,
        b'{"type":"message_stop"}',
        b'{"type":"response.output_text.delta","delta":"%b"}' % text,
        b'{"type":"response.completed","response":{"usage":%b}}' % usage,
        b"[DONE]", b"", b"not json", b'{"usage":', b"{" * 50,
    ]))
    nl = draw(st.sampled_from([b"\n"] * 6 + [b"\r\n", b"\r"]))
    lines = []
    if draw(st.integers(0, 4)) == 0:
        lines.append(draw(st.sampled_from([b"event: message_delta", b": keep-alive",
                                           b"id: 7", b"retry: 10", b"database: x"])))
    prefix = draw(st.sampled_from([b"data: "] * 6 + [b"data:", b"data:  ", b"Data: "]))
    if draw(st.integers(0, 6)) == 0 and len(payload) > 4:  # split over two data lines
        k = draw(st.integers(1, len(payload) - 1))
        lines += [prefix + payload[:k], prefix + payload[k:]]
    else:
        lines.append(prefix + payload)
    return nl.join(lines) + nl + nl


SSE = st.one_of(
    st.lists(sse_event(), max_size=12).map(b"".join),
    mutated(st.lists(sse_event(), max_size=12).map(b"".join)),
    st.binary(max_size=300),
)


@PROFILE
@given(data=SSE, cuts=CUTS, endpoint=st.integers(0, len(TAP_ENDPOINTS) - 1),
       stream=st.booleans(), body_cap=st.sampled_from([64, 300, 4096, 1 << 20]),
       counter=st.booleans(), peek=st.booleans(), views=st.booleans())
def test_taps_never_crash_and_any_split_gives_the_same_usage_and_events(
    data: bytes, cuts: list[int], endpoint: int, stream: bool, body_cap: int, counter: bool,
    peek: bool, views: bool,
) -> None:
    tap_target(data, cuts, endpoint, stream, body_cap, counter, peek, views)


@PROFILE
@given(data=SSE, cuts=CUTS)
def test_usage_stripper_never_crashes_and_any_split_strips_the_same(
    data: bytes, cuts: list[int]
) -> None:
    stripper_target(data, cuts)


def test_tap_regressions() -> None:
    for data in (
        b'data: {"choices":[],"usage":{"prompt_tokens":1',
        b'data: {"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":4}}\r',
        b"data: " + b"{" * 5000 + b"\n\n",
        b'data: {"type":"message_delta","usage":{"output_tokens":3}}\n\n' * 3,
    ):
        for endpoint in range(len(TAP_ENDPOINTS)):
            for cuts in ([], [1], list(range(0, len(data), 7))):
                tap_target(data, cuts, endpoint, True, 64, True, True, True)
                tap_target(data, cuts, endpoint, False, 64)
        stripper_target(data, list(range(len(data))))


# ---------------------------------------------------------------------------- error scrubber
# Secrets over a small alphabet, so that they overlap each other and the body often.
SECRET_ALPHABET = b"ab-k"
SECRETS = st.lists(st.binary(min_size=1, max_size=10).map(
    lambda b: bytes(SECRET_ALPHABET[c % len(SECRET_ALPHABET)] for c in b)), max_size=3)


@st.composite
def error_bodies(draw: Any) -> tuple[bytes, list[bytes]]:
    secrets = draw(SECRETS)
    parts = draw(st.lists(st.one_of(st.sampled_from(secrets) if secrets else st.just(b"x"),
                                    st.binary(max_size=12).map(
                                        lambda b: bytes(SECRET_ALPHABET[c % 4] for c in b)),
                                    st.sampled_from([b'{"error":{"message":"', b'"}}', b"*"])),
                          max_size=12))
    return b"".join(parts), secrets


@PROFILE
@given(case=error_bodies(), cuts=CUTS)
def test_scrubber_masks_every_secret_in_any_split(case: tuple[bytes, list[bytes]],
                                                   cuts: list[int]) -> None:
    data, secrets = case
    scrub_target(data, secrets, cuts)


# ---------------------------------------------------------------------------- JSON bodies
JSON_NUMBERS = st.sampled_from([b"0", b"-0", b"1", b"1E2", b"1e-7", b"-12.50", b"3.0e+10",
                                b"18446744073709551616", b"-99999999999999999999999999",
                                b"1.5e308", b"123456789012345678901234567890.5"])
JSON_STRINGS = st.sampled_from([b'""', b'"a"', b'"\\""', b'"\\\\"', b'"\\\\\\""', b'"\\u0022"',
                                b'"caf\xc3\xa9"', b'"\\ud83d\\ude00"', b'"}{]["', b'"a\\/b"',
                                b'"' + b'x\\"' * 40 + b'"', b'"' + b"y" * 200 + b'"'])
JSON_KEYS = st.sampled_from([b'"model"', b'"stream"', b'"stream_options"', b'"stre\\u0061m"',
                             b'"include_usage"', b'"messages"', b'"a"', b'""', b'"stream "'])
WS = st.sampled_from([b"", b"", b" ", b"\n  ", b"\t", b"\r\n"])


def json_values(depth: int = 3) -> st.SearchStrategy[bytes]:
    leaf = st.one_of(JSON_NUMBERS, JSON_STRINGS, st.sampled_from([b"true", b"false", b"null"]))
    if depth == 0:
        return leaf
    inner = json_values(depth - 1)

    @st.composite
    def array(draw: Any) -> bytes:
        items = draw(st.lists(inner, max_size=4))
        w = draw(WS)
        return b"[" + w + (b"," + w).join(items) + w + b"]"

    return st.one_of(leaf, array(), json_objects(depth - 1))


def json_objects(depth: int = 3) -> st.SearchStrategy[bytes]:
    @st.composite
    def obj(draw: Any) -> bytes:
        members = draw(st.lists(st.tuples(JSON_KEYS, json_values(depth) if depth else
                                          JSON_NUMBERS), max_size=5))
        w = draw(WS)
        return (b"{" + w + (b"," + w).join(k + w + b":" + w + v for k, v in members)
                + w + b"}" + draw(WS))

    return obj()


JSON_BODIES = st.one_of(
    json_objects(3),
    mutated(json_objects(3)),
    st.integers(1, 3000).map(lambda n: b'{"a":' + b"[" * n + b"]" * n + b"}"),
    st.integers(1, 3000).map(lambda n: b'{"a":' + b"[" * n + b"}"),
    st.binary(max_size=200),
)


@JSON_PROFILE
@given(data=JSON_BODIES, value=st.sampled_from([b"true", b'{"x":[1,2]}', b'"s"', b"null"]))
def test_json_editor_never_crashes_and_edits_any_object_exactly(data: bytes, value: bytes) -> None:
    json_edit_target(data, value)


# ---------------------------------------------------------------------------- over a socket
SOCKET_DEADLINE_S = 15.0  # the longest a case may take before it counts as a hang


def _exchange(port: int, data: bytes, cuts: list[int]) -> tuple[bytes, bool]:
    """Send ``data`` in pieces, half-close, read until the sidecar closes. (bytes, clean)."""
    from fuzz_targets import split

    with socket.create_connection(("127.0.0.1", port), timeout=SOCKET_DEADLINE_S) as s:
        try:
            for piece in split(data, cuts):
                s.sendall(piece)
            s.shutdown(socket.SHUT_WR)  # the sidecar sees EOF: it must answer or close
        except OSError:
            pass  # it refused and closed while we were still sending (EPIPE, ENOTCONN...)
        got = bytearray()
        end = time.monotonic() + SOCKET_DEADLINE_S
        while True:
            if time.monotonic() > end:
                raise AssertionError(f"no close within {SOCKET_DEADLINE_S} s: {bytes(got)!r}")
            try:
                chunk = s.recv(65536)
            except ConnectionResetError:
                return bytes(got), False
            except TimeoutError as exc:
                raise AssertionError(
                    f"sidecar hung ({SOCKET_DEADLINE_S} s) after {data!r}: {bytes(got)!r}"
                ) from exc
            if not chunk:
                return bytes(got), True
            got += chunk


def _check_responses(raw: bytes) -> list[int]:
    """The statuses of the well-formed responses in ``raw``; a cut last one is allowed
    only when it is a streamed (chunked) one the sidecar was still writing."""
    log_statuses: list[int] = []
    try:
        log = parse_responses(raw)
        log_statuses = log.statuses
    except AssertionError:
        # A response the half-close cut short: the ones before it must be whole.
        log = parse_responses(raw[: raw.rfind(b"HTTP/1.1 ")])
        log_statuses = log.statuses
    except httptools.HttpParserError as exc:
        raise AssertionError(f"malformed response bytes: {raw[:600]!r}") from exc
    return log_statuses


def _healthy(port: int) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=SOCKET_DEADLINE_S) as s:
        body = b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}'
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                  b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%b"
                  % (len(body), body))
        got = b""
        while chunk := s.recv(65536):
            got += chunk
    assert parse_responses(got).statuses == [200], got[:300]


@pytest.fixture(scope="module")
def fuzz_stack(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from conftest import Stack

    s = Stack(tmp_path_factory.mktemp("fuzz"), {}, None).start()
    yield s
    s.stop()


@SOCKET_PROFILE
@given(data=st.one_of(REQUESTS, mutated(http_request())), cuts=st.lists(
    st.integers(0, 1 << 16), max_size=4))
def test_random_request_bytes_over_a_socket_get_http_answers_and_the_sidecar_lives(
    fuzz_stack: Any, data: bytes, cuts: list[int]
) -> None:
    # llhttp cannot be told that an answer was to HEAD (no body follows its length).
    data = data.replace(b"HEAD ", b"GET ")
    raw, _clean = _exchange(fuzz_stack.port, data, cuts)
    for status in _check_responses(raw):
        if status == 100:
            continue  # an interim "100 Continue" (expect: 100-continue)
        # A proxied answer from the mock (2xx) or the sidecar's refusal (4xx). A 5xx
        # would mean the sidecar broke on a request it should have refused.
        assert 200 <= status < 500, (status, data, raw[:600])
    _healthy(fuzz_stack.port)


def test_socket_fuzz_stack_meters_what_it_proxied(fuzz_stack: Any) -> None:
    # After the random requests (this test runs after them in file order), the sidecar
    # still answers and meters a normal request.
    _healthy(fuzz_stack.port)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not fuzz_stack.rows("status = 200"):
        time.sleep(0.05)
    assert fuzz_stack.rows("status = 200")


assert FUZZ_MAX_BODY > 64  # the grammar's bodies fit the small limit
