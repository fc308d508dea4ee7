"""The mock's bytes on the wire: the per-request placeholders and how they are filled,
JSON and chunked/SSE framing, HTTP response heads, and the providers' error bodies.

Every response is built once per *shape* and cached as bytes with fixed-width placeholders
for the two per-request values, the response id and the creation time. Because the
placeholders have the same width as the real values, the chunked-encoding frame sizes
computed at build time stay right after the per-request `bytes.replace`, so serving a
request is a dict lookup plus two replaces.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final

import orjson

# Fixed-width stand-ins. The id suffix is "mock" + 20 digits (see make_id); the time is a
# 10-digit unix second (good until 2286). Neither can occur in the generated text or JSON.
ID_WIDTH: Final = 24
ID_PH: Final = b"~MOCK~ID~".ljust(ID_WIDTH, b"~")
CREATED_PH: Final = b"@CREATED@@"
ID_PH_S: Final = ID_PH.decode()
_CREATED_PH_JSON: Final = b'"' + CREATED_PH + b'"'


def make_id(n: int) -> bytes:
    """Per-request id suffix, exactly ID_WIDTH bytes ("mock" + 20 digits)."""
    return b"mock%020d" % (n % 10**20)


def fill(data: bytes, rid: bytes, created: bytes) -> bytes:
    """Put the per-request id and time into template bytes."""
    return data.replace(ID_PH, rid).replace(CREATED_PH, created)


def to_json(obj: Any) -> bytes:
    # Numbers that must be filled per request were written as placeholder *strings*; drop
    # the quotes so the filled bytes are a JSON number of the same width.
    return orjson.dumps(obj).replace(_CREATED_PH_JSON, CREATED_PH)


def chunk_frame(payload: bytes) -> bytes:
    """One HTTP/1.1 chunked-encoding frame."""
    return b"%x\r\n%s\r\n" % (len(payload), payload)


def data_event(obj: Any) -> bytes:
    return chunk_frame(b"data: " + to_json(obj) + b"\n\n")


def named_event(name: str, obj: Any) -> bytes:
    return chunk_frame(b"event: " + name.encode() + b"\ndata: " + to_json(obj) + b"\n\n")


LAST_FRAME: Final = b"0\r\n\r\n"
_REASONS: Final = {
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    413: "Payload Too Large",
    429: "Too Many Requests",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    501: "Not Implemented",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
    529: "Site Overloaded",
}

STREAM_HEAD: Final = (
    b"HTTP/1.1 200 OK\r\n"
    b"content-type: text/event-stream; charset=utf-8\r\n"
    b"transfer-encoding: chunked\r\n"
    b"cache-control: no-cache\r\n"
    b"connection: keep-alive\r\n"
    b"\r\n"
)


def http_head(status: int, headers: Sequence[tuple[str, str]], content_length: int | None) -> bytes:
    lines = [b"HTTP/1.1 %d %s" % (status, _REASONS.get(status, "Unknown").encode())]
    lines.extend(f"{k}: {v}".encode("latin-1") for k, v in headers)
    if content_length is not None:
        lines.append(b"content-length: %d" % content_length)
    lines.append(b"connection: keep-alive")
    return b"\r\n".join(lines) + b"\r\n\r\n"


def json_response(status: int, body: Any, extra: Sequence[tuple[str, str]] = ()) -> bytes:
    payload = to_json(body)
    return http_head(status, [("content-type", "application/json"), *extra], len(payload)) + payload


# --------------------------------------------------------------------------- errors


_OPENAI_ERRORS: Final[dict[int, tuple[str, str | None, str]]] = {
    400: ("invalid_request_error", None, "Invalid request (mock)."),
    401: ("invalid_request_error", "invalid_api_key", "Incorrect API key provided (mock)."),
    404: ("invalid_request_error", "not_found", "Not found (mock)."),
    429: ("requests", "rate_limit_exceeded", "Rate limit reached for requests (mock)."),
    500: ("server_error", None, "The server had an error while processing your request (mock)."),
    503: ("server_error", "service_unavailable", "The engine is currently overloaded (mock)."),
}
_ANTHROPIC_ERRORS: Final[dict[int, str]] = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    503: "overloaded_error",
    529: "overloaded_error",
}


def error_response(status: int, kind: str, retry_after: str, message: str | None = None) -> bytes:
    extra: list[tuple[str, str]] = []
    if status in (429, 503, 529):
        extra.append(("retry-after", retry_after))
    if kind == "messages":
        etype = _ANTHROPIC_ERRORS.get(status, "api_error")
        text = message or f"{etype} (mock)"
        body: Any = {"type": "error", "error": {"type": etype, "message": text}}
    else:
        etype, code, default = _OPENAI_ERRORS.get(status, ("mock_error", None, "Mock error."))
        if status == 429:
            extra.append(("x-ratelimit-remaining-requests", "0"))
        body = {
            "error": {"message": message or default, "type": etype, "param": None, "code": code}
        }
    return json_response(status, body, extra)
