"""Secrets out of provider error answers before they reach the client.

A provider that refuses a request may echo what it was sent: ``invalid api key
sk-...`` in a 401 body, or a header. The credentials the sidecar knows for the
request (the upstream's configured key, the client's own key from its headers) are
masked in the head and body of every provider answer of status >= 400, byte for
byte with ``*`` (same length: JSON stays valid, nothing else moves). Success bodies
are not scanned: they carry generated text, on the hot path.

Pure: no I/O. The body side is a ``BodyFilter`` (``feed``/``flush``), so it sits in
the relay's filter slot, around any other filter (a translator) already there.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Final

from sidecar.lifecycle import BodyFilter

# Shorter credentials are not masked: a real key is far longer, and masking a short
# value everywhere it appears would mangle the body (a 1-byte "key" would hit JSON).
MIN_SECRET_BYTES: Final = 8
MASK: Final = b"*"
# Client headers that carry a credential (the value, or "Bearer <value>").
CREDENTIAL_HEADERS: Final = frozenset({b"authorization", b"x-api-key", b"api-key",
                                       b"proxy-authorization"})
_SCHEMES: Final = (b"bearer ", b"basic ")


def request_secrets(api_key: str | None, headers: Iterable[tuple[bytes, bytes]]) -> tuple[
        bytes, ...]:
    """The credentials one request's answer must not echo: the upstream's key and the
    client's (both the bare token and the whole header value), longest first."""
    found: set[bytes] = set()
    if api_key:
        found.add(api_key.encode())
    for name, value in headers:
        if name in CREDENTIAL_HEADERS:
            found.add(value)
            low = value[:7].lower()
            for scheme in _SCHEMES:
                if low.startswith(scheme):
                    found.add(value[len(scheme):].strip())
    return tuple(sorted((s for s in found if len(s) >= MIN_SECRET_BYTES),
                        key=len, reverse=True))


def mask(data: bytes, secrets: Sequence[bytes]) -> bytes:
    """``data`` with every occurrence of each secret replaced by as many ``*``."""
    for secret in secrets:
        if secret in data:
            data = data.replace(secret, MASK * len(secret))
    return data


def mask_headers(headers: Sequence[tuple[bytes, bytes]],
                 secrets: Sequence[bytes]) -> list[tuple[bytes, bytes]]:
    return [(name, mask(value, secrets)) for name, value in headers]


class SecretScrubber:
    """A BodyFilter that masks ``secrets`` in a body split across reads any way: the
    last ``len(longest) - 1`` bytes are held back until the next piece (or ``flush``),
    since a secret may start in one piece and end in the next."""

    __slots__ = ("_held", "_hold", "_inner", "_secrets")

    def __init__(self, secrets: Sequence[bytes], inner: BodyFilter | None = None) -> None:
        self._secrets = secrets
        self._hold = max(len(s) for s in secrets) - 1 if secrets else 0
        self._held = b""
        self._inner = inner  # applied first: the client gets what it outputs, masked

    def feed(self, data: bytes) -> bytes:
        if self._inner is not None:
            data = self._inner.feed(data)
        buf = mask(self._held + data, self._secrets)
        cut = max(0, len(buf) - self._hold)
        self._held = buf[cut:]
        return buf[:cut]

    def flush(self) -> bytes:
        rest = self._inner.flush() if self._inner is not None else b""
        out = mask(self._held + rest, self._secrets)
        self._held = b""
        return out
