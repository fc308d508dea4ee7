"""``python -m sidecar.healthcheck [URL]``: exit 0 when the sidecar answers /healthz with 200.

The container's HEALTHCHECK: slim images have no curl, and this imports only the
standard library (not the server), so a probe costs a few milliseconds of CPU.
Without a URL it probes ``$SIDECAR_LISTEN`` (the address the example config
listens on), an all-interfaces host asked on loopback.
"""

from __future__ import annotations

import http.client
import os
import sys
import urllib.parse
from typing import Final

# Longer than any healthy /healthz answer (it never touches a provider), shorter
# than the HEALTHCHECK --timeout in the Dockerfile so this reports, not Docker.
TIMEOUT_S: Final = 2.0
LISTEN_ENV: Final = "SIDECAR_LISTEN"
DEFAULT_LISTEN: Final = "127.0.0.1:8080"
PATH: Final = "/healthz"


def url_for_listen(listen: str) -> str:
    """``0.0.0.0:8080`` / ``:8080`` / ``[::]:8080`` / ``10.0.0.5:8080`` -> the URL to probe."""
    host, _, port = listen.strip().rpartition(":")
    host = host.strip("[]")
    if host in ("", "0.0.0.0", "*"):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{int(port)}{PATH}"


def probe(url: str, timeout: float = TIMEOUT_S) -> tuple[bool, str]:
    """GET ``url``; (healthy, what to print)."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "http" or parts.hostname is None:
        return False, f"not an http:// URL: {url}"
    conn = http.client.HTTPConnection(parts.hostname, parts.port or 80, timeout=timeout)
    try:
        conn.request("GET", parts.path or PATH, headers={"connection": "close"})
        resp = conn.getresponse()
        resp.read()
    except OSError as exc:
        return False, f"{url}: {exc}"
    except http.client.HTTPException as exc:
        return False, f"{url}: bad response: {exc!r}"
    finally:
        conn.close()
    return resp.status == 200, f"{url}: {resp.status} {resp.reason}"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    try:
        url = args[0] if args else url_for_listen(os.environ.get(LISTEN_ENV, DEFAULT_LISTEN))
    except ValueError:
        print(f"healthcheck: cannot read {LISTEN_ENV}={os.environ.get(LISTEN_ENV)!r}",
              file=sys.stderr)
        return 1  # docker: 0 healthy, 1 unhealthy (2 is reserved)
    ok, text = probe(url)
    print(("healthy: " if ok else "unhealthy: ") + text, file=sys.stdout if ok else sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
