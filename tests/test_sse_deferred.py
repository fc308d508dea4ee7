"""The deferred tap: usage() answers like a full parse, for any split, from a few events."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_sse import STREAMS, crlf, split

from sidecar import sse
from sidecar.sse import DeferredTap, make_tap


def _full_usage(name: str, data: bytes) -> object:
    fmt, path, _ = STREAMS[name]
    tap = make_tap(fmt, path, True)
    tap.feed(data)
    return tap.result().usage


@pytest.mark.parametrize("name", sorted(STREAMS))
def test_usage_probe_equals_full_parse(name: str) -> None:
    fmt, path, data = STREAMS[name]
    tap = make_tap(fmt, path, True)
    assert isinstance(tap, DeferredTap)
    tap.feed(data)
    got = tap.usage()
    assert got is not None
    assert got == tap.result().usage == _full_usage(name, data)


@pytest.mark.parametrize("name", sorted(STREAMS))
def test_usage_probe_on_crlf_and_cut_streams_falls_back_correctly(name: str) -> None:
    fmt, path, data = STREAMS[name]
    for variant in (crlf(data), data[: len(data) // 2], data[: data.rfind(b"usage") + 3]):
        tap = make_tap(fmt, path, True)
        tap.feed(variant)
        reference = make_tap(fmt, path, True)
        reference.feed(variant)
        assert tap.usage() == reference.result().usage


@settings(max_examples=150, deadline=None)
@given(name=st.sampled_from(sorted(STREAMS)),
       cuts=st.lists(st.integers(min_value=0, max_value=5000), max_size=40))
def test_usage_probe_is_split_invariant(name: str, cuts: list[int]) -> None:
    fmt, path, data = STREAMS[name]
    tap = make_tap(fmt, path, True)
    for piece in split(data, cuts):
        tap.feed(piece)
    assert tap.usage() == _full_usage(name, data)


def test_a_long_stream_spills_to_the_parsing_tap_and_stays_bounded(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sse.deferred, "DEFER_BYTES", 1024)
    fmt, path, data = STREAMS["chat"]
    delta = b'data: {"choices":[{"delta":{"content":"0123456789"}}],"usage":null}\n\n'
    tap = make_tap(fmt, path, True)
    assert isinstance(tap, DeferredTap)
    for _ in range(1000):
        tap.feed(delta)
        assert len(tap._buf) <= 1024 + len(delta)
    tap.feed(data)
    assert tap.usage() == _full_usage("chat", data)
    assert tap.result().completion_text.startswith("0123456789" * 100)


def test_no_usage_anywhere_is_none_without_a_full_parse() -> None:
    stream = b'data: {"choices":[{"delta":{"content":"x"}}]}\n\ndata: [DONE]\n\n'
    tap = make_tap("openai", "/v1/chat/completions", True)
    tap.feed(stream)
    assert tap.usage() is None
    assert tap.result().completion_text == "x"
