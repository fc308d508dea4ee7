"""The answer to ``GET /metrics``: this process's figures, the other workers', rendered.

Counters and histograms come from :class:`~sidecar.metrics.core.Metrics` (counted at
the end of each request); gauges are read here, at scrape time, from what the
process holds anyway (the requests in flight, each upstream's health, the meter's
queue), so they cost the hot path nothing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sidecar.health import State
from sidecar.metrics.core import Metrics
from sidecar.metrics.exposition import render
from sidecar.metrics.samples import Samples, from_metrics, merge, put_histogram
from sidecar.metrics.share import Share

if TYPE_CHECKING:
    from sidecar.access_log import AccessLog
    from sidecar.meter import Meter
    from sidecar.proxy import Proxy

# States in which an upstream takes requests (as /readyz counts them).
_SERVING = frozenset({State.HEALTHY, State.HALF_OPEN, State.PROBING})


class Exporter:
    def __init__(self, metrics: Metrics, meter: Meter, access_log: AccessLog | None,
                 share: Share | None = None) -> None:
        self.metrics = metrics
        self.meter = meter
        self.access_log = access_log
        self.share = share

    def local(self, proxy: Proxy) -> Samples:
        """This process's samples (with a restarted worker's predecessor's counts)."""
        out: Samples = {}
        from_metrics(self.metrics, out)
        if self.share is not None:
            merge(out, self.share.baseline, gauges=False)
        in_flight: dict[str, int] = {}
        streams: dict[str, int] = {}
        for flight in proxy.flights:
            route = flight.ctx.route
            in_flight[route] = in_flight.get(route, 0) + 1
            if flight.ctx.stream:
                streams[route] = streams.get(route, 0) + 1
        runtime = proxy.runtime
        for route in {r.table.route.path for r in runtime.all_routes}:
            labels = (("route", route),)
            out[("sidecar_requests_in_flight", labels)] = in_flight.get(route, 0)
            out[("sidecar_streams_in_flight", labels)] = streams.get(route, 0)
        now = proxy.loop.time()
        for name, pool in runtime.upstreams.pools.items():
            labels = (("upstream", name),)
            out[("sidecar_upstream_up", labels)] = int(pool.health.state(now) in _SERVING)
            out[("sidecar_upstream_in_flight", labels)] = pool.health.inflight
        for r in runtime.all_routes:
            up = sum(h.state(now) in _SERVING for h in r.health)
            key = ("sidecar_route_upstreams_up", (("route", r.table.route.path),))
            # Routes sharing a path (model routes): the path's worst.
            have = out.get(key)
            out[key] = up if not isinstance(have, int) else min(up, have)
        stats = self.meter.stats
        out[("sidecar_meter_queue_depth", ())] = stats.queued
        for name, value in (("sidecar_meter_rows_written_total", stats.written),
                            ("sidecar_meter_rows_spilled_total", stats.spilled),
                            ("sidecar_meter_queue_overflows_total", stats.overflowed),
                            ("sidecar_meter_rows_lost_total", stats.lost),
                            ("sidecar_meter_errors_total", stats.errors)):
            # Added, not set: the baseline may already hold a predecessor's count.
            out[(name, ())] = out.get((name, ()), 0) + value  # type: ignore[operator]
        batches: Samples = {}
        put_histogram(batches, "sidecar_meter_batch_seconds", (), self.meter.batch_ms)
        merge(out, batches)
        log = self.access_log
        if log is not None:
            for name, value in (("sidecar_access_log_lines_total", log.written),
                                ("sidecar_access_log_dropped_total", log.dropped)):
                out[(name, ())] = out.get((name, ()), 0) + value  # type: ignore[operator]
        out[("sidecar_metrics_workers", ())] = 1
        return out

    def render(self, proxy: Proxy) -> bytes:
        samples = self.local(proxy)
        if self.share is not None:
            for other in self.share.others():
                merge(samples, other)
        return render(samples)
