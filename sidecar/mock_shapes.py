"""Old import path of the mock's response shapes, kept for the tests that import it;
the code lives in the `sidecar.mock` package (`expected`, `wire`, `shapes`, `templates`)."""

from sidecar.mock.expected import (
    big_chunk_text,
    count_tokens,
    encoding_name_for_model,
    expected_text,
)
from sidecar.mock.shapes import Shape, Template
from sidecar.mock.templates import build
from sidecar.mock.wire import CREATED_PH, ID_PH, ID_WIDTH, fill, make_id

__all__ = [
    "CREATED_PH",
    "ID_PH",
    "ID_WIDTH",
    "Shape",
    "Template",
    "big_chunk_text",
    "build",
    "count_tokens",
    "encoding_name_for_model",
    "expected_text",
    "fill",
    "make_id",
]
