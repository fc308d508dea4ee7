"""Who a request is (pure): a sidecar API key, or the identity header of a trusted peer.

``api_key`` routes need a key made with ``sidecar keys create`` in
``Authorization: Bearer`` or ``x-api-key``; the key's id (never its secret) and
tier go on the row. ``header`` routes take ``x-sidecar-user`` (and the tier
header) from a trusted peer only: from anyone else the header proves nothing.
Refusals are 401 with an OpenAI-style body that says which, never echoing the
credential.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

from sidecar.auth.keys import credential
from sidecar.errors import Unauthorized

if TYPE_CHECKING:
    from sidecar.auth import KeyIndex
    from sidecar.context import RequestContext
    from sidecar.runtime import Runtime

USER_HEADER: Final = b"x-sidecar-user"
# The longest identity header value kept for the row (it is a user id, not a document).
MAX_USER_ID_BYTES: Final = 256


def identify(mode: str, headers: list[tuple[bytes, bytes]], peer_trusted: bool,
             keys: KeyIndex | None, runtime: Runtime, ctx: RequestContext) -> None:
    """Fill ctx.key_id / ctx.tier / ctx.api_key, or raise Unauthorized."""
    if mode == "api_key":
        secret = credential(headers)
        if not secret:
            raise Unauthorized("this route needs a sidecar API key: send it as "
                               "'Authorization: Bearer <key>' or 'x-api-key: <key>'")
        key = keys.lookup(secret) if keys is not None else None
        if key is None:
            raise Unauthorized("the API key is not known to this sidecar")
        if key.revoked_ms is not None:
            raise Unauthorized(f"API key {key.id} has been revoked")
        ctx.api_key = key
        ctx.key_id = key.id
        if key.tier is not None:
            ctx.tier = key.tier
        return
    # mode == "header"
    if not peer_trusted:
        raise Unauthorized("this route takes its identity from x-sidecar-user, which is "
                           "only believed from trusted_peers")
    user = next((v for n, v in headers if n == USER_HEADER), b"")
    if not user:
        raise Unauthorized("this route needs the x-sidecar-user header from the proxy "
                           "in front")
    ctx.key_id = user[:MAX_USER_ID_BYTES].decode("utf-8", "replace")
    if ctx.tier is None:
        ctx.tier = runtime.default_tier
