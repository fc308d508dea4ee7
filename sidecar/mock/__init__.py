"""The embedded fake LLM provider (`sidecar demo`, the tests, the bench): the names other code
imports from `sidecar.mock`, re-exported from the modules that own them."""

from sidecar.mock.cli import mock_upstream
from sidecar.mock.expected import (
    DEFAULT_BIG_CHUNK_TOKENS,
    DEFAULT_CHUNK_TOKENS,
    DEFAULT_CHUNKS,
    WORDS,
    big_chunk_text,
    big_completion_tokens,
    chunk_texts,
    count_tokens,
    encoding_name_for_model,
    expected_completion_tokens,
    expected_text,
    expected_tool_arguments,
    expected_usage,
    prompt_tokens,
    tool_argument_fragments,
    tool_to_call,
)
from sidecar.mock.faults import parse_size
from sidecar.mock.openai import embedding_vector
from sidecar.mock.plan import kind_for_path
from sidecar.mock.records import MockConnection, MockRequest
from sidecar.mock.server import MockUpstream

__all__ = [
    "DEFAULT_BIG_CHUNK_TOKENS",
    "DEFAULT_CHUNKS",
    "DEFAULT_CHUNK_TOKENS",
    "WORDS",
    "MockConnection",
    "MockRequest",
    "MockUpstream",
    "big_chunk_text",
    "big_completion_tokens",
    "chunk_texts",
    "count_tokens",
    "embedding_vector",
    "encoding_name_for_model",
    "expected_completion_tokens",
    "expected_text",
    "expected_tool_arguments",
    "expected_usage",
    "kind_for_path",
    "mock_upstream",
    "parse_size",
    "prompt_tokens",
    "tool_argument_fragments",
    "tool_to_call",
]
