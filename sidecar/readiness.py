"""The ``/readyz`` answer (pure: a function of the runtime snapshot and the clock).

Ready (200, ``"status": "ok"``) when every route has at least one upstream that
can serve: *healthy*, *half_open* (its ejection ended; the next request probes it)
or *probing* (that probe is in flight). Otherwise 503, ``"status": "unready"``;
while the proxy drains, 503 with ``"status": "draining"`` whatever the upstreams.

The body names each route's upstreams and their state::

    {"status": "unready",
     "routes": {"/v1/chat/completions": {"ready": false,
                                         "upstreams": {"primary": "check_failing",
                                                       "secondary": "ejected"}}}}

States (``sidecar.health.State``): ``healthy``, ``cooling`` (the provider's
retry-after), ``ejected`` (passive outlier ejection), ``half_open``, ``probing``,
``check_failing`` (the active ``health_check`` fails; it wins over the others).

Routes are keyed by path. Several routes sharing a path (``model:`` routes) are
keyed by the path and their model patterns, ``"/v1/chat/completions [gpt-4o,o1-*]"``,
and carry ``"models"`` too; the path's catch-all route keeps the bare path. Only
upstream names and states go in the body: no URL, no key, no header.
"""

from __future__ import annotations

from typing import Final

import orjson

from sidecar.health import State
from sidecar.runtime import Runtime

STATE_NAMES: Final = {
    State.HEALTHY: "healthy",
    State.COOLING: "cooling",
    State.EJECTED: "ejected",
    State.HALF_OPEN: "half_open",
    State.PROBING: "probing",
    State.CHECK_FAILING: "check_failing",
}
# States in which an upstream still takes (or is taking) requests.
SERVING: Final = frozenset({State.HEALTHY, State.HALF_OPEN, State.PROBING})


def readiness(runtime: Runtime, now: float, draining: bool = False) -> tuple[int, bytes]:
    """The status code and JSON body of ``/readyz`` at ``now`` (the health clock)."""
    routes: dict[str, dict[str, object]] = {}
    ready = True
    for route in runtime.all_routes:
        upstreams: dict[str, str] = {}
        serving = False
        for cfg, health in zip(route.table.upstreams, route.health, strict=True):
            state = health.state(now)
            upstreams[cfg.name] = STATE_NAMES[state]
            serving = serving or state in SERVING
        ready = ready and serving
        rc = route.table.route
        entry: dict[str, object] = {"ready": serving, "upstreams": upstreams}
        key = rc.path
        if rc.models:
            key = f"{rc.path} [{','.join(rc.models)}]"
            entry["models"] = list(rc.models)
        while key in routes:  # not expected (validation), but never hide a route
            key += "'"
        routes[key] = entry
    if draining:
        status, code = "draining", 503
    else:
        status, code = ("ok", 200) if ready else ("unready", 503)
    return code, orjson.dumps({"status": status, "routes": routes})
