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


class NotFound(RequestError):
    status = 404
    code = "not_found"


class ModelNotFound(NotFound):
    """No route on the path serves the requested model (OpenAI's code for it)."""

    code = "model_not_found"


class MethodNotAllowed(RequestError):
    status = 405
    code = "method_not_allowed"


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
