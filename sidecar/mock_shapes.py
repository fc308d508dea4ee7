"""Old import path of the mock's response shapes, kept for the tests that import it;
the code lives in `sidecar.mock.shapes`."""

from sidecar.mock.shapes import (
    CREATED_PH,
    ID_PH,
    ID_WIDTH,
    Shape,
    Template,
    big_chunk_text,
    build,
    count_tokens,
    encoding_name_for_model,
    expected_text,
    fill,
    make_id,
)

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
