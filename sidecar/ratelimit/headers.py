"""OpenAI's rate-limit response headers, from a reservation's Grant (pure).

Clients and SDKs read ``x-ratelimit-{limit,remaining,reset}-{tokens,requests}``
on every response, and ``retry-after`` on a 429; the reset values use OpenAI's
duration spelling ("20ms", "1s", "6m0s").
"""

from __future__ import annotations

import math

from sidecar.ratelimit.bucket import Grant

Headers = tuple[tuple[bytes, bytes], ...]

LIMIT_TOKENS = b"x-ratelimit-limit-tokens"
REMAINING_TOKENS = b"x-ratelimit-remaining-tokens"
RESET_TOKENS = b"x-ratelimit-reset-tokens"


def duration(seconds: float) -> bytes:
    """OpenAI's spelling of a reset time: ms below a second, else [Nh][Nm]Ns."""
    if seconds < 1.0:
        return b"%dms" % math.ceil(seconds * 1000)
    total = math.ceil(seconds)
    h, rest = divmod(total, 3600)
    m, s = divmod(rest, 60)
    if h:
        return b"%dh%dm%ds" % (h, m, s)
    if m:
        return b"%dm%ds" % (m, s)
    return b"%ds" % s


def rate_headers(grant: Grant) -> Headers:
    out = [
        (LIMIT_TOKENS, b"%d" % grant.limit_tokens),
        (REMAINING_TOKENS, b"%d" % grant.remaining_tokens),
        (RESET_TOKENS, duration(grant.reset_tokens)),
    ]
    if grant.limit_requests is not None:
        out += [
            (b"x-ratelimit-limit-requests", b"%d" % grant.limit_requests),
            (b"x-ratelimit-remaining-requests", b"%d" % (grant.remaining_requests or 0)),
            (b"x-ratelimit-reset-requests", duration(grant.reset_requests or 0.0)),
        ]
    return tuple(out)


def retry_after(seconds: float) -> tuple[bytes, bytes]:
    """Whole seconds, rounded up: a client that waits this long is admitted."""
    return (b"retry-after", b"%d" % max(1, math.ceil(seconds)))
