"""The metric families ``/metrics`` exposes: name, type, help and how workers combine.

This table is the contract the Grafana dashboard (conf/grafana/sidecar.json) and the
alert rules (conf/prometheus/) are written against; tests check that every metric
they query is one of these names. Names follow Prometheus conventions: base units
(seconds, USD), ``_total`` on counters.

With ``workers: N`` a scrape sums every worker's counters and histograms. Gauges say
how they combine: ``sum`` (requests in flight, queue depth) or ``min`` (upstream
health: the most pessimistic worker's view, so "no healthy upstream" fires when any
worker has none).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Literal

Kind = Literal["counter", "gauge", "histogram"]
Merge = Literal["sum", "min"]


@dataclass(frozen=True, slots=True)
class Family:
    name: str
    kind: Kind
    help: str
    merge: Merge = "sum"


_FAMILIES: Final = (
    # -- requests (sidecar.metrics.core, counted once per meter row) --------------------
    Family("sidecar_requests_total", "counter",
           "Requests finished, by route, serving upstream, HTTP status sent and outcome "
           "(the meter's outcome column)."),
    Family("sidecar_ttft_seconds", "histogram",
           "Time to first byte: request received to the first response byte written to "
           "the client."),
    Family("sidecar_request_duration_seconds", "histogram",
           "Request received to response complete."),
    Family("sidecar_stream_max_gap_seconds", "histogram",
           "Longest pause between two provider body reads within one response (one "
           "observation per response with at least two reads)."),
    Family("sidecar_tokens_total", "counter",
           "Tokens metered (reported by the provider or estimated), by model sent, "
           "upstream and type (prompt, completion)."),
    Family("sidecar_cost_usd_total", "counter",
           "Cost in USD by the price table, by model sent and upstream (unpriced rows "
           "add nothing)."),
    Family("sidecar_failovers_total", "counter",
           "Attempts that failed before the first byte and were retried on another "
           "upstream, by route, the upstream that failed and why."),
    # -- in flight and upstreams (read at scrape time) ---------------------------------
    Family("sidecar_requests_in_flight", "gauge", "Requests admitted and not yet finished."),
    Family("sidecar_streams_in_flight", "gauge",
           "Streamed requests (\"stream\": true) admitted and not yet finished."),
    Family("sidecar_upstream_in_flight", "gauge", "Attempts running on each upstream."),
    Family("sidecar_upstream_up", "gauge",
           "1 when the upstream takes requests (healthy, half-open or probing), 0 when "
           "ejected, cooling down or failing its health check.", merge="min"),
    Family("sidecar_route_upstreams_up", "gauge",
           "Upstreams of each route that take requests; 0 means no healthy upstream.",
           merge="min"),
    # -- the meter (sidecar.meter) --------------------------------------------------------
    Family("sidecar_meter_queue_depth", "gauge",
           "Meter rows queued between the hot path and the database writer."),
    Family("sidecar_meter_rows_written_total", "counter", "Meter rows committed to SQLite."),
    Family("sidecar_meter_rows_spilled_total", "counter",
           "Meter rows appended to the spill file (queue full, failed batch, closing); "
           "replayed into the database at the next start."),
    Family("sidecar_meter_queue_overflows_total", "counter",
           "Meter rows that found the queue full (spilled, not lost)."),
    Family("sidecar_meter_rows_lost_total", "counter",
           "Meter rows neither written nor spilled (both failed)."),
    Family("sidecar_meter_errors_total", "counter",
           "Failed meter batch writes, spill appends and replays."),
    Family("sidecar_meter_batch_seconds", "histogram",
           "Time to write one batch of meter rows (one multi-row INSERT)."),
    # -- access log and the exposition itself -------------------------------------------
    Family("sidecar_access_log_lines_total", "counter", "Access log lines written."),
    Family("sidecar_access_log_dropped_total", "counter",
           "Access log lines dropped because the log could not keep up or failed."),
    Family("sidecar_metrics_workers", "gauge",
           "Sidecar processes whose figures this scrape includes."),
)

FAMILIES: Final[dict[str, Family]] = {f.name: f for f in _FAMILIES}
