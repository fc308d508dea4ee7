"""What a response is built from and into: `Shape` (everything its bytes depend on but the
id and the time), `Template` (the encoded bytes, split where a paced writer may pause) and
`Builder`, the interface each wire format (`openai`, `anthropic`) implements.

`templates.build` turns a Shape into a Template; the server caches the result per shape.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Shape:
    """Everything a response's bytes depend on except the id and the time."""

    kind: str
    model: str
    stream: bool
    chunks: int
    chunk_tokens: int
    usage: bool  # send the usage (frame or object); False = the no-usage fault
    usage_nulls: bool  # OpenAI include_usage style: "usage":null on every chunk + usage chunk
    prompt_tokens: int
    cache_read: int = 0
    cache_write: int = 0
    big: bool = False  # constant delta repeated `chunks` times (x-mock-bytes)
    inputs: int = 1  # embeddings: number of vectors
    base64: bool = False  # embeddings: encoding_format=base64 (the openai SDK's default)
    dims: int = 8
    tool: str | None = None  # chat/messages: call this tool instead of answering in text


@dataclass(frozen=True, slots=True)
class Template:
    """A response split where the writer may pause: `head`+`pre` go out first, then each of
    `deltas` (one content delta each; in big mode `deltas[0]` is written `repeat` times),
    then `post` (finish, usage, terminator). `burst` is the whole thing joined, for the
    common unpaced case; empty in big mode."""

    head: bytes
    pre: bytes
    deltas: tuple[bytes, ...]
    post: bytes
    burst: bytes
    prompt_tokens: int
    completion_tokens: int
    repeat: int = 0

    @property
    def total_bytes(self) -> int:
        if self.repeat:
            return (
                len(self.head) + len(self.pre) + len(self.deltas[0]) * self.repeat + len(self.post)
            )
        return len(self.burst)


class Builder:
    """Encodes one endpoint kind: a whole JSON body, or a stream as (preamble, one frame per
    content delta, trailer)."""

    def whole(self, shape: Shape, text: str, completion: int) -> bytes:
        raise NotImplementedError

    def stream(
        self, shape: Shape, texts: list[str], text: str, completion: int
    ) -> tuple[bytes, list[bytes], bytes]:
        raise NotImplementedError
