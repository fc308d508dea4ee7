"""Host and address checks shared by config validation and the upstream side."""

from __future__ import annotations

import ipaddress


def is_ip_literal(host: str) -> bool:
    """An IPv4 or IPv6 address (no brackets), as opposed to a name to resolve."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True
