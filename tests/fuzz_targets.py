"""Fuzz targets: one function per parser, bytes (and where to cut them) in, checks inside.

Shared by the hypothesis tests (tests/test_fuzz.py, which generate structured and
mutated inputs) and the atheris harness (tests/fuzz_atheris.py, coverage-guided raw
bytes). Each target feeds one module the input in the given split and in one piece and
asserts what must hold for every input, hostile ones included:

* no exception but the module's own declared error types (a crash is a bug);
* bounded work: each call's CPU time stays under ``HANG_CPU_S`` (a hang guard with a
  thousandfold margin for inputs this size, not a performance figure), and what a
  parser holds stays within its documented caps;
* every input is either parsed or refused with the status the sidecar answers it with
  (4xx for a client's bytes, 502 for a provider's);
* split invariance: any chunking of the same bytes gives the same requests, head,
  payload, events and usage as the whole.

No sockets here: the socket-level fuzzing is in tests/test_fuzz.py.
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import httptools
import orjson

from sidecar.config import LimitsConfig, TimeoutsConfig
from sidecar.downstream import DownstreamProtocol
from sidecar.endpoints import endpoint_kind
from sidecar.errors import RequestError, SidecarError, UpstreamProtocolError
from sidecar.http1 import LAST_CHUNK, ResponseParser
from sidecar.json_edit import JsonEditError, set_member, set_nested
from sidecar.request_reader import ParsedRequest, RequestReader
from sidecar.responses import error_for
from sidecar.scrub import MASK, SecretScrubber
from sidecar.sse import COMPLETION_TEXT_CAP, TapResult, UsageChunkStripper, make_tap
from sidecar.sse.streams import _stream_tap

# A hang guard, not a benchmark: inputs are at most tens of KiB and every parser is
# linear, so a call that needs this much CPU is stuck or quadratic.
HANG_CPU_S = 3.0
# Small limits, so that the fuzzer reaches every cap with small inputs.
FUZZ_MAX_HEAD = 512
FUZZ_MAX_BODY = 2048
FUZZ_MAX_HEADERS = 8


class Hang(AssertionError):
    pass


@contextmanager
def bounded(what: str) -> Iterator[None]:
    # This thread's CPU time: neither the box's load nor another thread of the test
    # process (a stack left running by an earlier test) counts against the input.
    t0 = time.thread_time()
    yield
    spent = time.thread_time() - t0
    if spent > HANG_CPU_S:
        raise Hang(f"{what}: {spent:.1f} s of CPU for one input")


def split(data: bytes, cuts: Sequence[int]) -> list[bytes]:
    """``data`` cut at the given offsets (taken modulo its length, sorted, deduplicated)."""
    if not data:
        return [b""]
    points = sorted({c % (len(data) + 1) for c in cuts})
    bounds = [0, *points, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds) if b > a] or [b""]


# ============================================================================ request reader
def _request_fields(r: ParsedRequest) -> tuple[Any, ...]:
    return (r.method, r.target, tuple(r.headers), r.body, r.http11, r.keep_alive,
            r.expect_continue)


def _reader_outcome(reader: RequestReader) -> tuple[Any, ...]:
    err = reader.error
    head = reader.error_head
    return (
        [_request_fields(r) for r in reader.ready],
        None if err is None else (type(err), err.status),
        None if head is None else (head.method, head.target, tuple(head.headers)),
        reader.done,
        reader.current is None,
    )


def read_all(pieces: Sequence[bytes], max_head: int, max_body: int,
             max_headers: int = FUZZ_MAX_HEADERS) -> RequestReader:
    reader = RequestReader(max_head, max_body, max_headers)
    for piece in pieces:
        reader.feed(piece)
        if reader.error is not None:
            assert reader.done, "an error must stop the reader"
    return reader


def request_reader_target(data: bytes, cuts: Sequence[int] = (),
                          max_head: int = FUZZ_MAX_HEAD, max_body: int = FUZZ_MAX_BODY,
                          max_headers: int = FUZZ_MAX_HEADERS) -> None:
    """The client's bytes: requests out, or one 4xx error, the same in any split."""
    with bounded("RequestReader"):
        whole = read_all([data], max_head, max_body, max_headers)
        cut = read_all(split(data, cuts), max_head, max_body, max_headers)
    for reader in (whole, cut):
        err = reader.error
        if err is not None:
            assert isinstance(err, RequestError), repr(err)
            status, body = error_for(err)
            assert 400 <= status < 500, status
            assert orjson.loads(body)["error"]["type"] == "invalid_request_error"
        for req in reader.ready:
            assert req.method, req
            assert req.target, req  # no HTTP/0.9-style request line gets through
            assert len(req.body) <= max_body
            assert all(name == name.lower() for name, _ in req.headers)
            assert len(req.headers) <= max_headers
            # The head's accounting never lets more than max_head of it through.
            assert len(req.target) + sum(len(n) + len(v) for n, v in req.headers) <= max_head
            assert not (req.expect_continue and not req.http11)
        # Bytes held for requests not taken: queued ones plus one within its limits.
        assert reader.pending_bytes <= sum(r.size for r in reader.ready) + max_head + max_body
    assert _reader_outcome(whole) == _reader_outcome(cut), (
        f"split changed the outcome: {split(data, cuts)!r}")


# ============================================================================ client side
class _Clock:
    @staticmethod
    def time() -> float:
        return 0.0


class _Transport:
    """What DownstreamProtocol writes, and whether it closed the connection."""

    def __init__(self) -> None:
        self.out = bytearray()
        self.closed = False
        self.reading = True

    def write(self, data: bytes) -> None:
        assert not self.closed, "a write after close"
        self.out += data

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def set_write_buffer_limits(self, high: int, low: int) -> None:
        pass

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 1) if name == "peername" else default


class _EchoHandler:
    """Answers every complete request at once with 200 and the request's body length;
    counts the refusals the connection reports."""

    draining = False

    def __init__(self, limits: LimitsConfig) -> None:
        self.loop = _Clock()
        self._limits = limits
        self.handled = 0
        self.methods: list[bytes] = []
        self.refused: list[int] = []

    @property
    def limits(self) -> LimitsConfig:
        return self._limits

    @property
    def timeouts(self) -> TimeoutsConfig:
        return TimeoutsConfig()

    def precheck(self, req: ParsedRequest) -> SidecarError | None:
        return None  # every path is served: 100 Continue is always deserved

    def connection_opened(self, conn: Any) -> bool:
        return True

    def connection_closed(self, conn: Any) -> None:
        pass

    def trusts(self, transport: Any) -> bool:
        return False

    def handle(self, req: ParsedRequest, client: Any) -> None:
        self.handled += 1
        self.methods.append(req.method)
        client.reply(200, b'{"n":%d}' % len(req.body))
        client.cycle_done(True)

    def rejected(self, req: Any, request_id: bytes, status: int, exc: SidecarError) -> None:
        self.refused.append(status)


class _ResponseLog:
    """httptools callbacks that collect the responses the client would read."""

    def __init__(self) -> None:
        self.statuses: list[int] = []
        self.headers: list[list[tuple[bytes, bytes]]] = []
        self._cur: list[tuple[bytes, bytes]] = []
        self.complete = 0
        self.parser: httptools.HttpResponseParser | None = None

    def on_message_begin(self) -> None:
        self._cur = []

    def on_header(self, name: bytes, value: bytes) -> None:
        self._cur.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        assert self.parser is not None
        self.statuses.append(self.parser.get_status_code())
        self.headers.append(self._cur)

    def on_message_complete(self) -> None:
        self.complete += 1


def parse_responses(raw: bytes) -> _ResponseLog:
    """Every response in ``raw``; fails when the bytes are not well-formed HTTP/1.1."""
    log = _ResponseLog()
    log.parser = httptools.HttpResponseParser(log)
    log.parser.feed_data(raw)
    assert log.complete == len(log.statuses), f"an unfinished response in {raw[-200:]!r}"
    return log


Answer = tuple[int, list[tuple[bytes, bytes]]]  # status, headers


def split_rendered(raw: bytes, methods: Sequence[bytes]) -> list[Answer]:
    """The sidecar's own answers (content-length framed) in ``raw``, each head checked
    by llhttp: (status, headers) each. ``methods`` are the requests' methods in order (an
    answer to HEAD has no body); answers beyond them (a refusal) are taken as not HEAD."""
    out: list[Answer] = []
    at = 0
    while at < len(raw):
        end = raw.find(b"\r\n\r\n", at)
        assert end >= 0, f"an unfinished head: {raw[at:at + 300]!r}"
        head = raw[at:end + 4]
        log = _ResponseLog()
        log.parser = httptools.HttpResponseParser(log)
        log.parser.feed_data(head)
        assert len(log.statuses) == 1, head
        headers = log.headers[0]
        if log.statuses[0] == 100:  # "100 Continue" before a request's body: no answer yet
            assert head == b"HTTP/1.1 100 Continue\r\n\r\n", head
            at = end + 4
            continue
        lengths = [int(v) for n, v in headers if n == b"content-length"]
        assert len(lengths) == 1, head
        is_head = len(out) < len(methods) and methods[len(out)] == b"HEAD"
        at = end + 4 + (0 if is_head else lengths[0])
        assert at <= len(raw), f"a body cut short: {raw[end:]!r}"
        out.append((log.statuses[0], headers))
    return out


def client_side_target(data: bytes, cuts: Sequence[int] = ()) -> None:
    """A client connection fed ``data``: every request is answered, in order, with a
    well-formed response; the first bad one is answered 4xx and the connection closes."""
    limits = LimitsConfig(max_header_bytes=FUZZ_MAX_HEAD, max_body_bytes=FUZZ_MAX_BODY,
                          max_headers=FUZZ_MAX_HEADERS, max_pipelined_bytes=4 * FUZZ_MAX_BODY)
    handler = _EchoHandler(limits)
    conn = DownstreamProtocol(handler)  # type: ignore[arg-type]
    transport = _Transport()
    with bounded("DownstreamProtocol"):
        conn.connection_made(transport)  # type: ignore[arg-type]
        for piece in split(data, cuts):
            if transport.closed:
                break
            conn.data_received(piece)
            if not transport.reading:
                # Pipelined bytes over the bound: the protocol stopped reading. A real
                # socket would hold the rest in the kernel; this client just stops.
                break
        conn.eof_received()
        answers = split_rendered(bytes(transport.out), handler.methods)
    statuses = [status for status, _ in answers]
    answered = handler.handled + len(handler.refused)
    assert len(statuses) == answered, (statuses, handler.handled, handler.refused)
    assert statuses[: handler.handled] == [200] * handler.handled
    for status in handler.refused:
        assert 400 <= status < 500, status
    if handler.refused:
        assert len(handler.refused) == 1 and transport.closed
        assert statuses[-1] == handler.refused[0]
        assert (b"connection", b"close") in answers[-1][1]
    for _, headers in answers:
        # Our id on every answer, whatever the client sent as its own.
        ids = [v for n, v in headers if n == b"x-request-id"]
        assert len(ids) == 1 and ids[0] and all(33 <= c < 127 for c in ids[0]), ids


# ============================================================================ response parser
def _parse_response(pieces: Sequence[bytes], max_head: int) -> tuple[Any, ...]:
    parser = ResponseParser(max_head)
    payload = bytearray()
    error: str | None = None
    starts: list[tuple[int, int]] = []
    for piece in pieces:
        had_head = parser.head is not None
        try:
            parser.feed(piece)
        except UpstreamProtocolError as exc:
            error = type(exc).__name__
            break
        if not had_head and parser.head is not None:
            assert 0 <= parser.body_start <= len(piece), (parser.body_start, len(piece))
            starts.append((parser.body_start, len(piece)))
        for p in parser.take():
            payload += p
    head = parser.head
    shown = None
    if head is not None:
        assert 200 <= head.status <= 999, head.status
        assert head.content_length is None or head.content_length >= 0
        assert not (head.chunked and head.content_length is not None)
        assert not head.keep_alive or head.chunked or head.content_length is not None
        if head.content_length is not None and head.has_body and error is None:
            assert len(payload) <= head.content_length
        shown = (head.status, head.reason, tuple(head.headers), head.content_length,
                 head.chunked, head.keep_alive)
    if error is None and head is not None and head.chunked and not parser.done:
        # The probe a cut stream gets (splice._tell_client) must not raise anything else.
        parser.ends_cleanly_here()
    return (error, shown, bytes(payload) if error is None else None,
            parser.done if error is None else None)


def response_parser_target(data: bytes, cuts: Sequence[int] = (),
                           max_head: int = FUZZ_MAX_HEAD) -> None:
    """A provider's bytes: a head and a payload, or UpstreamProtocolError (a 502), the
    same in any split."""
    with bounded("ResponseParser"):
        whole = _parse_response([data], max_head)
        cut = _parse_response(split(data, cuts), max_head)
    if whole[0] is not None:
        assert UpstreamProtocolError.status == 502
    assert whole == cut, f"split changed the outcome: {split(data, cuts)!r}"


def response_body_start(data: bytes, max_head: int = FUZZ_MAX_HEAD) -> None:
    """What the relay forwards after the head (``data[body_start:]``) reparses, under a
    plain head, to the same payload: the head and the body are told apart exactly."""
    parser = ResponseParser(max_head)
    try:
        parser.feed(data)
    except UpstreamProtocolError:
        return
    head = parser.head
    if head is None or not head.chunked or parser.extra:
        return
    payload = b"".join(parser.take())
    again = ResponseParser(max_head)
    again.feed(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n" + data[parser.body_start:])
    assert b"".join(again.take()) == payload
    assert again.done == parser.done


# ============================================================================ SSE taps
TAP_ENDPOINTS = (
    ("openai", "/v1/chat/completions"),
    ("openai", "/v1/completions"),
    ("openai", "/v1/responses"),
    ("openai", "/v1/embeddings"),
    ("openai", "/v1/other"),
    ("anthropic", "/v1/messages"),
)


def _count(text: str) -> int:
    return len(text) // 4 + 1


def _run_tap(fmt: str, path: str, stream: bool, pieces: Sequence[bytes], body_cap: int,
             counter: bool, peek: bool, views: bool) -> tuple[TapResult, Any]:
    tap = make_tap(fmt, path, stream, body_cap=body_cap, counter=_count if counter else None)
    for piece in pieces:
        tap.feed(memoryview(piece) if views else piece)
        if peek:  # asked mid-stream (a client gone, a deadline): must change nothing
            tap.usage()
            tap.result()
    return tap.result(), tap.usage()


def tap_target(data: bytes, cuts: Sequence[int] = (), endpoint: int = 0, stream: bool = True,
               body_cap: int = 4096, counter: bool = False, peek: bool = False,
               views: bool = False) -> None:
    """A provider body through the usage tap: never raises, the same usage, text and
    event count in any split, usage() agrees with result(), and memory stays capped."""
    fmt, path = TAP_ENDPOINTS[endpoint % len(TAP_ENDPOINTS)]
    with bounded("Tap"):
        whole, whole_usage = _run_tap(fmt, path, stream, [data], body_cap, counter, False, False)
        cut, cut_usage = _run_tap(fmt, path, stream, split(data, cuts), body_cap, counter,
                                  peek, views)
    assert whole == cut, (f"split changed the tap result ({fmt} {path} stream={stream} "
                          f"cap={body_cap} counter={counter} peek={peek}): "
                          f"{split(data, cuts)!r}: {whole} != {cut}")
    assert whole_usage == cut_usage == whole.usage, (whole_usage, cut_usage, whole.usage)
    # The kept text is capped (its escaped form is what the cap counts).
    assert len(whole.completion_text) <= COMPLETION_TEXT_CAP
    if stream:
        # The deferred tap answers as the parsing tap would.
        direct = _stream_tap(endpoint_kind(fmt, path), body_cap, _count if counter else None)
        for piece in split(data, cuts):
            direct.feed(piece)
        assert direct.result() == whole


def stripper_target(data: bytes, cuts: Sequence[int] = ()) -> None:
    """The include_usage stripper: never raises, never adds bytes, passes a stream with
    no usage untouched, and strips the same in any split."""
    def run(pieces: Sequence[bytes]) -> bytes:
        s = UsageChunkStripper()
        out = [s.feed(p) for p in pieces]
        out.append(s.flush())
        return b"".join(out)

    with bounded("UsageChunkStripper"):
        whole = run([data])
        cut = run(split(data, cuts))
    assert len(whole) <= len(data), (data, whole)
    if b'"usage"' not in data:
        assert whole == data, (data, whole)
    assert whole == cut, f"split changed the stripped stream: {split(data, cuts)!r}"


# ============================================================================ error scrubber
def _overlap(a: bytes, b: bytes) -> bool:
    """Can an occurrence of ``a`` share bytes with one of ``b`` (one inside the other,
    or a suffix of one the prefix of the other)?"""
    if a in b or b in a:
        return True
    return any(a.endswith(b[:k]) or b.endswith(a[:k]) for k in range(1, min(len(a), len(b))))


def scrub_target(data: bytes, secrets: Sequence[bytes], cuts: Sequence[int] = ()) -> None:
    """A provider's error body through the credential scrubber: no secret survives in
    any split, nothing but secrets changes (same length, same bytes elsewhere), and with
    secrets that cannot overlap, any split masks the same bytes."""
    secrets = tuple(sorted({s for s in secrets if len(s) >= 1 and MASK not in s},
                           key=len, reverse=True))

    def run(pieces: Sequence[bytes]) -> bytes:
        f = SecretScrubber(secrets)
        return b"".join([f.feed(p) for p in pieces] + [f.flush()])

    with bounded("SecretScrubber"):
        whole = run([data])
        cut = run(split(data, cuts))
    for out in (whole, cut):
        assert len(out) == len(data), (data, out)
        for secret in secrets:
            assert secret not in out, (secret, data, out)
        assert all(o == d or o == MASK[0] for o, d in zip(out, data, strict=True)), (data, out)
    if not any(_overlap(a, b) for a in secrets for b in secrets if a is not b):
        assert whole == cut, (secrets, split(data, cuts), whole, cut)


# ============================================================================ JSON editor
def _strict_json(raw: bytes) -> Any:
    """Python's json, with what RFC 8259 forbids refused (NaN, Infinity)."""
    def refuse(name: str) -> Any:
        raise ValueError(name)

    return json.loads(raw, parse_constant=refuse)


def json_edit_target(data: bytes, value: bytes = b"true") -> None:
    """The byte editor: JsonEditError or an edit; on any JSON object (as Python's json
    reads it: big integers, duplicate keys) the edit succeeds and reads back as the same
    object with just that member changed."""
    try:
        # The proxy edits only bodies orjson accepted (it parses each body once with it):
        # orjson refuses lone surrogates and numbers beyond a double, which Python takes.
        orjson.loads(data)
        parsed = _strict_json(data)
    except (ValueError, RecursionError):
        parsed = None
    if not isinstance(parsed, dict):
        parsed = None
    with bounded("json_edit"):
        try:
            top = set_member(data, "stream", value)
        except JsonEditError:
            top = None
        try:
            nested = set_nested(data, "stream_options", "include_usage", value)
        except JsonEditError:
            nested = None
    if parsed is None:
        return
    assert top is not None and nested is not None, f"valid object refused: {data!r}"
    new = _strict_json(value)
    want_top = dict(parsed, stream=new)
    assert _strict_json(top) == want_top
    old = parsed.get("stream_options")
    want_nested = dict(parsed, stream_options=(
        dict(old, include_usage=new) if isinstance(old, dict) else {"include_usage": new}))
    assert _strict_json(nested) == want_nested


def _secrets_from(head: bytes) -> list[bytes]:
    out, at = [], 0
    while at < len(head) and len(out) < 3:
        n = 1 + head[at] % 12
        out.append(head[at + 1:at + 1 + n])
        at += 1 + n
    return out


TARGETS = {
    "request_reader": request_reader_target,
    "client_side": client_side_target,
    "response_parser": response_parser_target,
    "tap": tap_target,
    "stripper": stripper_target,
    # Secrets from the input's first bytes: up to three, 1-12 bytes each.
    "scrub": lambda data, cuts=(): scrub_target(data[36:], _secrets_from(data[:36]), cuts),
    # One signature for all, (data, cuts): the editor has no reads to split.
    "json_edit": lambda data, cuts=(): json_edit_target(data),
}

__all__ = ["LAST_CHUNK", "TARGETS", "parse_responses", "split"]
