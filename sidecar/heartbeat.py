"""SSE heartbeats: when a ``: ping`` comment may go to an event-stream client (pure).

A reasoning model can think for minutes before its next event; proxies in front of
the sidecar (Nginx's ``proxy_read_timeout``, cloud load balancers, 60 s by default)
cut a connection that long silent. An SSE comment line keeps bytes flowing: the SSE
spec has clients ignore lines that start with ``:`` (the openai and anthropic SDKs
skip them), and the sidecar writes it to the client only, never to the usage tap.

The relay asks these questions once per sweep of a silent stream (``Exchange.
check_deadlines``), never per chunk: nothing here runs while the provider talks.
A comment may only go between two events (a line inserted inside an event would
change it) and, when the provider's chunk frames are relayed as they are, between
two frames; what was last relayed tells which.
"""

from __future__ import annotations

from typing import Final

from sidecar.http1 import frame_chunk

PING: Final = b": ping\n\n"
PING_CHUNK: Final = frame_chunk(PING)  # the same, as one HTTP/1.1 chunk frame

# An event ends with a blank line: "\n\n", "\r\n\r\n" or "\r\r" (the SSE line ends).
_EVENT_ENDS: Final = (b"\n\n", b"\r\n\r\n", b"\r\r")
# ... and a chunk frame ends with CRLF after its payload.
_FRAME_EVENT_ENDS: Final = tuple(end + b"\r\n" for end in _EVENT_ENDS)


def due(now: float, last_activity: float, every: float) -> bool:
    """Has the stream been silent for ``every`` seconds (0: heartbeats off)?"""
    return every > 0 and now - last_activity >= every


def payload_at_boundary(tail: bytes) -> bool:
    """``tail``: the last payload bytes sent to the client (b"": none yet). True when
    they end an event, so a comment written now stands on its own."""
    return not tail or tail.endswith(_EVENT_ENDS)


def frame_at_boundary(tail: bytes) -> bool:
    """``tail``: the last provider read relayed as it was, chunk frames included (b"":
    none yet). True when it ended an event and the chunk frame carrying it, so a frame
    of our own may follow.

    A read that ends with a frame's CRLF after a blank line is at both boundaries; one
    ending after a chunk-size line ends in a hex digit before its CRLF, and one that
    stopped inside a frame's payload lacks the CRLF. (A payload that itself ended in
    "\\n\\n\\r\\n" mid-frame, mixing line endings, would be mistaken: no provider
    writes that.) A read split just before the CRLF says no: no ping that time.
    """
    return not tail or tail.endswith(_FRAME_EVENT_ENDS)
