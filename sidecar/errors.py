"""One exception hierarchy; each class maps to one HTTP status and one error type.

Library errors (httptools, ssl, OSError, sqlite) are caught at the module boundary that
talks to the library and re-raised as one of these, so callers never need to know
which library sat underneath.
"""

from __future__ import annotations


class SidecarError(Exception):
    """Base of every error the sidecar raises on purpose."""

    status: int = 500
    type: str = "server_error"
    code: str = "internal_error"
    # Response headers the error's answer carries (retry-after, x-ratelimit-*).
    headers: tuple[tuple[bytes, bytes], ...] = ()


class ConfigError(SidecarError):
    """A config file problem, rendered as ``FILE:LINE: field.path: problem``."""

    def __init__(self, file: str, line: int | None, field: str, problem: str) -> None:
        self.file = file
        self.line = line
        self.field = field
        self.problem = problem
        super().__init__(self.render())

    def render(self) -> str:
        where = f"{self.file}:{self.line}" if self.line is not None else self.file
        return f"{where}: {self.field}: {self.problem}"


class RequestError(SidecarError):
    """The client sent something we cannot proxy."""

    status = 400
    type = "invalid_request_error"
    code = "invalid_request"


class BodyTooLarge(RequestError):
    status = 413
    code = "request_too_large"


class RequestTimeout(RequestError):
    """The request's head or body did not arrive within its deadline."""

    status = 408
    code = "request_timeout"


class TooManyHeaders(RequestError):
    status = 431
    code = "request_header_fields_too_large"


class NotFound(RequestError):
    status = 404
    code = "not_found"


class ModelNotFound(NotFound):
    """No route on the path serves the requested model (OpenAI's code for it)."""

    code = "model_not_found"


class MethodNotAllowed(RequestError):
    status = 405
    code = "method_not_allowed"


class Unauthorized(RequestError):
    """No sidecar API key, or an unknown or revoked one, on a route that needs one."""

    status = 401
    type = "invalid_request_error"
    code = "invalid_api_key"


class RateLimited(SidecarError):
    """A token or request bucket of this identity is empty: retry after ``headers``."""

    status = 429
    type = "tokens"
    code = "rate_limit_exceeded"

    def __init__(self, message: str, headers: tuple[tuple[bytes, bytes], ...]) -> None:
        super().__init__(message)
        self.headers = headers


class QuotaExceeded(RateLimited):
    """The key's money budget for the day or month is spent."""

    type = "insufficient_quota"
    code = "insufficient_quota"


class UpstreamError(SidecarError):
    """The provider could not be reached or answered with broken HTTP."""

    status = 502
    type = "upstream_error"
    code = "bad_gateway"


class UpstreamTimeout(UpstreamError):
    status = 504
    code = "upstream_timeout"


class UpstreamProtocolError(UpstreamError):
    """The provider's HTTP/1.1 response could not be parsed."""

    code = "upstream_protocol_error"


class Overloaded(SidecarError):
    status = 503
    type = "overloaded_error"
    code = "overloaded"


class Shed(Overloaded):
    """An upstream at max_concurrent with a full queue, or a wait past queue_timeout."""

    code = "upstream_overloaded"


class ShuttingDown(Overloaded):
    code = "shutting_down"
