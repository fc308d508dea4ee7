"""The shadow-split report's core: Nginx access-log lines -> per-path figures -> verdict.

The log lines are the ``llm_shadow`` format of ``conf/nginx/llm-split.conf``:
tab-separated ``key=value`` fields, one of them ``via`` (``sidecar`` or
``direct``, set by ``split_clients``). The verdict is the migration guide's
cutover criterion: the sidecar's error rate below 0.1 % and no latency
regression beyond a stated tolerance, on enough requests to mean something.

Pure: no files, no database, no clock. ``sidecar/shadow_cli.py`` reads the logs
and the meter DB and feeds them in; the tests call these functions directly.
"""

from __future__ import annotations

import bisect
import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

PATHS: Final = ("direct", "sidecar")
REQUIRED_FIELDS: Final = ("request_id", "via", "status", "request_time")

# Latency buckets (upper bounds, seconds), in the spirit of the Prometheus buckets
# (~0.5 ms ... 120 s); Nginx times have 1 ms resolution, so nothing below 1 ms.
BUCKETS_S: Final = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                    5.0, 10.0, 30.0, 60.0, 120.0)
PERCENTILES: Final = (50, 90, 95, 99)
# The percentiles the verdict compares. p99 is shown but not judged: on the few
# hundred sidecar calls of a 5% split it is one or two calls, i.e. noise.
JUDGED_PERCENTILES: Final = (50, 95)
LATENCY_METRICS: Final = ("ttfb", "total")

# Criterion defaults (the CLI options override each; see `sidecar shadow report -h`).
DEFAULT_MAX_ERROR_RATE: Final = 0.001  # the guide: cut over below 0.1% errors
DEFAULT_TOLERANCE: Final = 0.10  # sidecar percentile may exceed direct's by 10% ...
DEFAULT_TOLERANCE_MS: Final = 5.0  # ... plus 5 ms (1 ms log resolution, one extra hop)
DEFAULT_MIN_REQUESTS: Final = 1000  # sidecar calls before a pass means anything
WILSON_Z: Final = 1.96  # 95% confidence for the error rate's upper bound


class BadLine(ValueError):
    """A log line the report cannot use; the message is the reason (grouped in the report)."""


@dataclass(frozen=True, slots=True)
class LogEntry:
    via: str
    request_id: str
    status: int
    request_time: float  # seconds, client's first byte in -> last byte out
    header_time: float | None  # seconds to the upstream's response head; None: no upstream
    msec: float | None  # epoch seconds when the log line was written (the call's end)


def upstream_seconds(text: str) -> float | None:
    """``$upstream_header_time`` -> seconds. Nginx lists one value per upstream tried
    (``"0.002, 0.130"``, or ``" : "`` across internal redirects); they ran one after the
    other, so the client waited for their sum. ``-``: no response from that one."""
    total = 0.0
    seen = False
    for part in text.replace(":", ",").split(","):
        part = part.strip()
        if not part or part == "-":
            continue
        try:
            value = float(part)
        except ValueError:
            raise BadLine("upstream_header_time is not a number") from None
        if not math.isfinite(value) or value < 0:
            raise BadLine("upstream_header_time is not a number")
        total += value
        seen = True
    return total if seen else None


def _seconds(text: str, name: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise BadLine(f"{name} is not a number") from None
    if not math.isfinite(value) or value < 0:
        raise BadLine(f"{name} is not a number")
    return value


def parse_line(line: str) -> LogEntry:
    """One ``llm_shadow`` line -> a LogEntry; BadLine(reason) when it cannot be used.
    Extra fields (a user's own additions) are ignored, so the format can grow."""
    fields: dict[str, str] = {}
    for part in line.rstrip("\r\n").split("\t"):
        key, sep, value = part.partition("=")
        if sep:
            fields[key.strip()] = value
    if not fields:
        raise BadLine("not the llm_shadow log format (no key=value fields)")
    for name in REQUIRED_FIELDS:
        if name not in fields:
            raise BadLine(f"no {name} field")
    via = fields["via"]
    if via not in PATHS:
        raise BadLine("via is neither sidecar nor direct")
    try:
        status = int(fields["status"])
    except ValueError:
        raise BadLine("status is not a number") from None
    msec_text = fields.get("msec")
    return LogEntry(
        via=via,
        request_id=fields["request_id"],
        status=status,
        request_time=_seconds(fields["request_time"], "request_time"),
        header_time=upstream_seconds(fields.get("upstream_header_time", "-")),
        msec=_seconds(msec_text, "msec") if msec_text not in (None, "", "-") else None,
    )


def is_error(status: int) -> bool:
    """A failed call, for the error rate: a 5xx (the path's own fault, or the provider's).
    4xx are the client's (the same on either path) and 499 is the client hanging up."""
    return status >= 500


@dataclass(slots=True)
class PathStats:
    """What one path's log lines add up to. Latency samples are successful calls only
    (status < 400): a fast rejection would otherwise look like a fast answer."""

    requests: int = 0
    errors: int = 0  # 5xx
    client_errors: int = 0  # 4xx other than 499
    client_closed: int = 0  # 499
    ttfb: list[float] = field(default_factory=list)  # seconds
    total: list[float] = field(default_factory=list)  # seconds
    request_ids: list[str] = field(default_factory=list)

    def add(self, entry: LogEntry) -> None:
        self.requests += 1
        self.request_ids.append(entry.request_id)
        if is_error(entry.status):
            self.errors += 1
        elif entry.status == 499:
            self.client_closed += 1
        elif entry.status >= 400:
            self.client_errors += 1
        else:
            self.total.append(entry.request_time)
            if entry.header_time is not None:
                self.ttfb.append(entry.header_time)

    @property
    def error_rate(self) -> float | None:
        return self.errors / self.requests if self.requests else None


@dataclass(slots=True)
class ShadowLog:
    """Accumulates log lines (any number of files, in any order) into per-path stats."""

    paths: dict[str, PathStats] = field(default_factory=lambda: {p: PathStats() for p in PATHS})
    lines: int = 0
    bad: Counter[str] = field(default_factory=Counter)
    first_bad: dict[str, str] = field(default_factory=dict)  # reason -> "FILE:LINE"
    first_start: float | None = None  # epoch seconds: earliest call start seen
    last_end: float | None = None  # epoch seconds: latest call end seen

    def add_line(self, line: str, where: str) -> None:
        """Feed one line; ``where`` ("FILE:LINE") is kept for the first bad line of each kind."""
        if not line.strip():
            return  # a blank line (e.g. a trailing newline) is not a call
        self.lines += 1
        try:
            entry = parse_line(line)
        except BadLine as exc:
            reason = str(exc)
            self.bad[reason] += 1
            self.first_bad.setdefault(reason, where)
            return
        self.paths[entry.via].add(entry)
        if entry.msec is not None:
            start = entry.msec - entry.request_time
            if self.first_start is None or start < self.first_start:
                self.first_start = start
            if self.last_end is None or entry.msec > self.last_end:
                self.last_end = entry.msec


# --- figures ----------------------------------------------------------------------------


def percentile(sorted_values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile of an ascending sequence (None when empty): a value that
    was actually observed, as Nginx's own 1 ms-rounded times are."""
    if not sorted_values:
        return None
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def cumulative_buckets(sorted_values: Sequence[float],
                       bounds: Sequence[float] = BUCKETS_S) -> list[int]:
    """How many values are <= each bound (Prometheus ``le`` semantics), then the total
    (the +Inf bucket)."""
    return [bisect.bisect_right(sorted_values, b) for b in bounds] + [len(sorted_values)]


def wilson_upper(errors: int, n: int, z: float = WILSON_Z) -> float | None:
    """Upper end of the Wilson score interval for an error rate: what ``errors`` in ``n``
    still allows. 0 errors in 1,000 calls allows up to ~0.38%."""
    if n <= 0:
        return None
    p = errors / n
    z2 = z * z
    centre = p + z2 / (2 * n)
    spread = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    return min(1.0, (centre + spread) / (1 + z2 / n))


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 3)


def path_figures(stats: PathStats, total_requests: int) -> dict[str, Any]:
    """One path's figures, JSON-ready (times in ms, buckets as cumulative counts)."""
    out: dict[str, Any] = {
        "requests": stats.requests,
        "share": stats.requests / total_requests if total_requests else None,
        "errors": stats.errors,
        "error_rate": stats.error_rate,
        "error_rate_upper95": wilson_upper(stats.errors, stats.requests),
        "client_errors": stats.client_errors,
        "client_closed": stats.client_closed,
    }
    for metric, values in (("ttfb", stats.ttfb), ("total", stats.total)):
        ordered = sorted(values)
        out[f"{metric}_samples"] = len(ordered)
        out[f"{metric}_ms"] = {f"p{q}": _ms(percentile(ordered, q)) for q in PERCENTILES}
        counts = cumulative_buckets(ordered)
        out[f"{metric}_buckets"] = [
            {"le_ms": _ms(b) if b != math.inf else None, "count": c}
            for b, c in zip((*BUCKETS_S, math.inf), counts, strict=True)
        ]
    return out


# --- the meter join ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MeterRow:
    request_id: str
    prompt_tokens: int | None
    completion_tokens: int | None
    total_tokens: int | None
    usage_source: str | None
    outcome: str | None
    cost_usd: float | None


def join_meter(sidecar_ids: Iterable[str], rows: Iterable[MeterRow]) -> dict[str, Any]:
    """Match the sidecar path's log lines to meter rows by request id (Nginx sends its
    ``$request_id`` as ``x-request-id``; the sidecar keeps it as the row's id).

    ``rows`` are the meter rows in the log's time span; those no log line names are
    counted apart (calls that reached the sidecar without this Nginx)."""
    wanted = Counter(sidecar_ids)
    matched = 0
    seen: set[str] = set()
    not_in_log = 0
    tokens = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
    sources: Counter[str] = Counter()
    outcomes: Counter[str] = Counter()
    cost: float | None = None
    for row in rows:
        if row.request_id not in wanted:
            not_in_log += 1
            continue
        matched += 1
        seen.add(row.request_id)
        tokens["prompt_tokens"] += row.prompt_tokens or 0
        tokens["completion_tokens"] += row.completion_tokens or 0
        tokens["total_tokens"] += row.total_tokens or 0
        sources[row.usage_source or "none"] += 1
        outcomes[row.outcome or "unknown"] += 1
        if row.cost_usd is not None:
            cost = (cost or 0.0) + row.cost_usd
    unmatched = sum(n for rid, n in wanted.items() if rid not in seen)
    return {
        "rows_matched": matched,
        "log_lines_without_row": unmatched,
        "rows_not_in_log": not_in_log,
        **tokens,
        "usage_source": dict(sorted(sources.items())),
        "outcome": dict(sorted(outcomes.items())),
        "cost_usd": None if cost is None else round(cost, 9),
    }


# --- the verdict ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Criteria:
    max_error_rate: float = DEFAULT_MAX_ERROR_RATE
    tolerance: float = DEFAULT_TOLERANCE  # relative, 0.10 = 10%
    tolerance_ms: float = DEFAULT_TOLERANCE_MS
    min_requests: int = DEFAULT_MIN_REQUESTS

    def allowed_ms(self, direct_ms: float) -> float:
        return round(direct_ms * (1 + self.tolerance) + self.tolerance_ms, 3)


PASS: Final = "pass"
FAIL: Final = "fail"
INSUFFICIENT: Final = "insufficient"


def judge(direct: dict[str, Any], sidecar: dict[str, Any], criteria: Criteria) -> dict[str, Any]:
    """The verdict from two ``path_figures`` results.

    ``fail`` when any check fails (errors already seen are real, whatever the sample);
    otherwise ``insufficient`` while the sidecar has fewer than ``min_requests`` calls or
    either path has no latency samples; otherwise ``pass``."""
    checks: list[dict[str, Any]] = []
    reasons: list[str] = []
    n = sidecar["requests"]
    if n:
        rate = sidecar["error_rate"]
        ok = rate < criteria.max_error_rate
        checks.append({"check": "sidecar error rate", "value": rate,
                       "limit": criteria.max_error_rate, "samples": n, "ok": ok})
        if not ok:
            reasons.append(f"sidecar error rate {rate:.3%} ({sidecar['errors']} of {n}) "
                           f"is not below {criteria.max_error_rate:.3%}")
    for metric in LATENCY_METRICS:
        d_n, s_n = direct[f"{metric}_samples"], sidecar[f"{metric}_samples"]
        if not d_n or not s_n:
            continue
        for q in JUDGED_PERCENTILES:
            d_ms, s_ms = direct[f"{metric}_ms"][f"p{q}"], sidecar[f"{metric}_ms"][f"p{q}"]
            allowed = criteria.allowed_ms(d_ms)
            ok = s_ms <= allowed
            checks.append({"check": f"{metric} p{q}", "direct_ms": d_ms, "sidecar_ms": s_ms,
                           "allowed_ms": allowed, "samples": {"direct": d_n, "sidecar": s_n},
                           "ok": ok})
            if not ok:
                reasons.append(f"{metric} p{q}: sidecar {s_ms:g} ms > allowed {allowed:g} ms "
                               f"(direct {d_ms:g} ms)")
    if reasons:
        result = FAIL
    else:
        if n < criteria.min_requests:
            reasons.append(f"only {n} sidecar requests; at least {criteria.min_requests} "
                           "needed for a verdict")
        for path, figures in (("direct", direct), ("sidecar", sidecar)):
            if not figures["total_samples"]:
                reasons.append(f"no successful {path} requests to compare latency with")
        result = INSUFFICIENT if reasons else PASS
    return {"result": result, "reasons": reasons, "checks": checks}


def build_report(log: ShadowLog, criteria: Criteria,
                 meter: dict[str, Any] | None = None) -> dict[str, Any]:
    """Everything ``sidecar shadow report`` prints, JSON-ready."""
    total = sum(s.requests for s in log.paths.values())
    paths = {p: path_figures(log.paths[p], total) for p in PATHS}
    return {
        "log": {
            "lines": log.lines,
            "requests": total,
            "bad_lines": sum(log.bad.values()),
            "bad_reasons": {reason: {"count": n, "first": log.first_bad[reason]}
                            for reason, n in log.bad.most_common()},
            "first_start": log.first_start,
            "last_end": log.last_end,
        },
        "paths": paths,
        "meter": meter,
        "criteria": {
            "max_error_rate": criteria.max_error_rate,
            "tolerance": criteria.tolerance,
            "tolerance_ms": criteria.tolerance_ms,
            "min_requests": criteria.min_requests,
            "judged_percentiles": list(JUDGED_PERCENTILES),
        },
        "verdict": judge(paths["direct"], paths["sidecar"], criteria),
    }
