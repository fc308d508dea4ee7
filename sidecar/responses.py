"""Responses the sidecar writes itself: OpenAI-style errors and small JSON bodies."""

from __future__ import annotations

from http import HTTPStatus

import orjson

from sidecar.errors import SidecarError


def _reason(status: int) -> bytes:
    try:
        return HTTPStatus(status).phrase.encode()
    except ValueError:
        return b"Unknown"


def error_body(message: str, type_: str, code: str) -> bytes:
    return orjson.dumps({"error": {"message": message, "type": type_, "code": code}})


def stream_error_event(api_format: str, exc: SidecarError) -> bytes:
    """The last event of an event stream that failed after its head, in the stream's
    own format: OpenAI's streams carry ``{"error": ...}`` in a data line, Anthropic's an
    ``event: error``. It starts with a blank line, so that an event the provider left
    half-written is ended first instead of swallowing this one."""
    message = str(exc) or exc.code
    if api_format == "anthropic":
        data = orjson.dumps({"type": "error", "error": {"type": "api_error",
                                                       "message": message}})
        return b"\n\nevent: error\ndata: " + data + b"\n\n"
    return b"\n\ndata: " + error_body(message, exc.type, exc.code) + b"\n\n"


def error_for(exc: SidecarError) -> tuple[int, bytes]:
    """Status and OpenAI-style JSON body for one of our errors (never carries secrets)."""
    return exc.status, error_body(str(exc) or exc.code, exc.type, exc.code)


def render(
    status: int,
    body: bytes,
    *,
    request_id: bytes,
    keep_alive: bool,
    content_type: bytes = b"application/json",
    extra: tuple[tuple[bytes, bytes], ...] = (),
    head_only: bool = False,
) -> bytes:
    parts = [
        b"HTTP/1.1 %d %b\r\ncontent-type: %b\r\ncontent-length: %d\r\nx-request-id: %b\r\n"
        % (status, _reason(status), content_type, len(body), request_id)
    ]
    for name, value in extra:
        parts += (name, b": ", value, b"\r\n")
    if not keep_alive:
        parts.append(b"connection: close\r\n")
    parts.append(b"\r\n")
    if not head_only:
        parts.append(body)
    return b"".join(parts)
