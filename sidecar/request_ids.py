"""Request ids: the client's own when it is sane (Nginx's $request_id ties logs
together), otherwise ours: a random per-process prefix and a counter."""

from __future__ import annotations

import itertools
import os

# A client-supplied x-request-id is kept (Nginx's $request_id ties logs together)
# only when it is short and plain; anything else is replaced with our own.
MAX_REQUEST_ID = 128
_ID_CHARS = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.:")


def request_id_from(headers: list[tuple[bytes, bytes]]) -> bytes:
    for name, value in headers:
        if name == b"x-request-id":
            if 0 < len(value) <= MAX_REQUEST_ID and _ID_CHARS.issuperset(value):
                return value
            break
    return new_id()


# Request ids: a random per-process prefix and a counter. Unique without a
# getrandom() system call per request, and distinct across processes.
_ID_PREFIX = b""
_id_counter = itertools.count(1)


def _reseed_ids() -> None:
    global _ID_PREFIX, _id_counter
    _ID_PREFIX = os.urandom(8).hex().encode()
    _id_counter = itertools.count(1)


_reseed_ids()
os.register_at_fork(after_in_child=_reseed_ids)  # a forked child must not repeat ids


def new_id() -> bytes:
    return b"%b%08x" % (_ID_PREFIX, next(_id_counter))
