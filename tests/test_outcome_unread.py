"""read_nothing: when an estimate must say it could not read the body (pure)."""

from __future__ import annotations

from sidecar.outcome import read_nothing
from sidecar.sse.tap import TapResult


def test_a_body_with_no_text_no_event_and_no_end_was_read_as_nothing() -> None:
    assert read_nothing(TapResult(None, "", 0, False))
    # One event outgrew the body cap and took everything with it (gzip with no blank line).
    assert read_nothing(TapResult(None, "", 1, False, truncated=True))


def test_anything_readable_is_not_flagged() -> None:
    assert not read_nothing(TapResult(None, "hi", 1, False))  # text
    assert not read_nothing(TapResult(None, "", 0, False, completion_tokens_counted=5))
    assert not read_nothing(TapResult(None, "", 3, False))  # events, empty deltas: a real 0
    assert not read_nothing(TapResult(None, "", 0, True))  # a parsed JSON body with no text
