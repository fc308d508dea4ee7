"""``sidecar shadow report``: the I/O around ``sidecar.shadow`` (read the Nginx logs and
the meter DB, print a table or JSON). The figures and the verdict are worked out there."""

from __future__ import annotations

import gzip
import math
import os
from collections.abc import Iterator
from typing import IO, Any, Final

import click
import orjson

from sidecar import shadow
from sidecar.meter import TABLE

# Meter rows are looked up in the log's time span widened by this much on each side:
# a row's ts_ms is when the sidecar started the call, a little after Nginx did, and
# the two clocks may be on different hosts.
METER_WINDOW_MARGIN_S: Final = 5.0


class _Fraction(click.ParamType[float]):
    """A rate or tolerance: ``0.1%`` or ``0.001``."""

    name = "fraction"

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> float:
        if isinstance(value, float):
            return value
        text = str(value).strip()
        try:
            number = float(text[:-1]) / 100 if text.endswith("%") else float(text)
        except ValueError:
            self.fail(f"{value!r} is not a fraction like 0.1% or 0.001", param, ctx)
        if not math.isfinite(number) or number < 0:
            self.fail(f"{value!r} must be zero or more", param, ctx)
        return number


def _open_log(path: str) -> IO[str]:
    if not os.path.exists(path):
        raise click.ClickException(f"nginx log not found: {path}")
    try:
        if path.endswith(".gz"):
            return gzip.open(path, "rt", encoding="utf-8", errors="replace")
        return open(path, encoding="utf-8", errors="replace")
    except OSError as exc:
        raise click.ClickException(f"cannot read nginx log {path}: {exc.strerror}") from exc


def read_logs(paths: tuple[str, ...]) -> shadow.ShadowLog:
    log = shadow.ShadowLog()
    for path in paths:
        with _open_log(path) as fh:
            try:
                for number, line in enumerate(fh, 1):
                    log.add_line(line, f"{path}:{number}")
            except (OSError, EOFError) as exc:  # e.g. a truncated .gz
                raise click.ClickException(f"cannot read nginx log {path}: {exc}") from exc
    return log


def _meter_rows(db: str, log: shadow.ShadowLog) -> Iterator[shadow.MeterRow]:
    from sidecar.meter_cli import _query, _rows, open_ro

    conn = open_ro(db)
    try:
        sql = (f"SELECT request_id, prompt_tokens, completion_tokens, total_tokens, "
               f"usage_source, outcome, cost_usd FROM {TABLE}")
        params: tuple[Any, ...] = ()
        if log.first_start is not None and log.last_end is not None:
            sql += " WHERE ts_ms BETWEEN ? AND ?"
            params = (int((log.first_start - METER_WINDOW_MARGIN_S) * 1000),
                      int((log.last_end + METER_WINDOW_MARGIN_S) * 1000))
        for row in _rows(_query(conn, sql, params)):
            yield shadow.MeterRow(*row)
    finally:
        conn.close()


# --- the table ------------------------------------------------------------------------


def _n(value: int | None) -> str:
    return "-" if value is None else f"{value:,}"


def _pct(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value * 100:.{digits}f}%"


def _msf(value: float | None) -> str:
    return "-" if value is None else f"{value:,.1f}"


def _bucket_lines(direct: dict[str, Any], sidecar: dict[str, Any], metric: str,
                  line: Any) -> list[str]:
    d_n, s_n = direct[f"{metric}_samples"], sidecar[f"{metric}_samples"]
    out = []
    for d_b, s_b in zip(direct[f"{metric}_buckets"], sidecar[f"{metric}_buckets"], strict=True):
        if d_b["le_ms"] is None:
            break
        d_share = d_b["count"] / d_n if d_n else None
        s_share = s_b["count"] / s_n if s_n else None
        if not d_b["count"] and not s_b["count"]:
            continue  # below the fastest call on both paths
        out.append(line(f"  <= {d_b['le_ms']:g} ms", _pct(d_share, 1), _pct(s_share, 1)))
        if (d_share in (None, 1.0)) and (s_share in (None, 1.0)):
            break  # everything is in: the rest are all 100%
    return out


def render_table(report: dict[str, Any], files: tuple[str, ...]) -> str:
    d, s = report["paths"]["direct"], report["paths"]["sidecar"]
    meter = report["meter"]

    def line(label: str, left: str, right: str) -> str:
        return f"{label:<28}{left:>14}{right:>14}"

    log = report["log"]
    out = [f"nginx log: {', '.join(files)}: {_n(log['requests'])} requests "
           f"({_n(log['lines'])} lines, {_n(log['bad_lines'])} unusable)"]
    for reason, info in log["bad_reasons"].items():
        out.append(f"  unusable: {_n(info['count'])} x {reason} (first at {info['first']})")
    out += ["", line("", "direct", "sidecar"),
            line("requests", _n(d["requests"]), _n(s["requests"])),
            line("share", _pct(d["share"]), _pct(s["share"])),
            line("errors (5xx)", _n(d["errors"]), _n(s["errors"])),
            line("error rate", _pct(d["error_rate"], 3), _pct(s["error_rate"], 3)),
            line("  95% upper bound", _pct(d["error_rate_upper95"], 3),
                 _pct(s["error_rate_upper95"], 3)),
            line("4xx / client closed (499)",
                 f"{_n(d['client_errors'])} / {_n(d['client_closed'])}",
                 f"{_n(s['client_errors'])} / {_n(s['client_closed'])}")]
    for metric, title in (("ttfb", "ttfb"), ("total", "total time")):
        out.append(line(f"{title} samples", _n(d[f"{metric}_samples"]),
                        _n(s[f"{metric}_samples"])))
        for q in shadow.PERCENTILES:
            out.append(line(f"  p{q} ms", _msf(d[f"{metric}_ms"][f"p{q}"]),
                            _msf(s[f"{metric}_ms"][f"p{q}"])))
    if meter is None:
        out.append(line("tokens metered", "-", "(no --db)"))
    else:
        out += [line("tokens metered", "-", _n(meter["total_tokens"])),
                line("  prompt / completion", "-",
                     f"{_n(meter['prompt_tokens'])} / {_n(meter['completion_tokens'])}"),
                line("  meter rows matched", "-", _n(meter["rows_matched"])),
                line("  log lines without a row", "-", _n(meter["log_lines_without_row"])),
                line("  rows not in the log", "-", _n(meter["rows_not_in_log"]))]
        if meter["cost_usd"] is not None:
            out.append(line("  cost usd", "-", f"{meter['cost_usd']:.6f}"))
    for metric, title in (("ttfb", "ttfb"), ("total", "total time")):
        out += ["", line(f"{title}: share <= bucket", "direct", "sidecar")]
        out += _bucket_lines(d, s, metric, line)

    crit = report["criteria"]
    verdict = report["verdict"]
    judged = "/".join(f"p{q}" for q in crit["judged_percentiles"])
    out += ["", f"verdict: {verdict['result'].upper()}",
            f"  criterion: sidecar error rate < {_pct(crit['max_error_rate'], 3)}; sidecar "
            f"{judged} of ttfb and total time <= direct x {1 + crit['tolerance']:g} + "
            f"{crit['tolerance_ms']:g} ms; at least {_n(crit['min_requests'])} sidecar requests"]
    for check in verdict["checks"]:
        mark = "ok  " if check["ok"] else "FAIL"
        if "value" in check:
            out.append(f"  {mark} sidecar error rate {_pct(check['value'], 3)} "
                       f"({_n(s['errors'])} of {_n(check['samples'])} requests)")
        else:
            n = check["samples"]
            out.append(f"  {mark} {check['check']}: sidecar {check['sidecar_ms']:g} ms, allowed "
                       f"{check['allowed_ms']:g} ms (direct {check['direct_ms']:g} ms; samples "
                       f"{_n(n['direct'])} / {_n(n['sidecar'])})")
    out += [f"  - {reason}" for reason in verdict["reasons"]]
    return "\n".join(out)


# --- commands -------------------------------------------------------------------------


@click.group("shadow")
def shadow_group() -> None:
    """Compare the direct and the sidecar path of an Nginx split (conf/nginx/)."""


@shadow_group.command()
@click.option("--nginx-log", "logs", multiple=True, required=True,
              help="Access log in the llm_shadow format (conf/nginx/llm-split.conf). "
                   "Repeat for rotated files; .gz files are read too.")
@click.option("--db", default=None,
              help="Meter DB: adds the tokens metered, matched to log lines by request id.")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table",
              show_default=True)
@click.option("--max-error-rate", type=_Fraction(),
              default=f"{shadow.DEFAULT_MAX_ERROR_RATE * 100:g}%", show_default=True,
              help="The sidecar's error rate (5xx share) must be below this.")
@click.option("--tolerance", type=_Fraction(), default=f"{shadow.DEFAULT_TOLERANCE * 100:g}%",
              show_default=True,
              help="Latency: a sidecar percentile may exceed direct's by this share ...")
@click.option("--tolerance-ms", type=click.FloatRange(min=0),
              default=shadow.DEFAULT_TOLERANCE_MS, show_default=True,
              help="... plus this many milliseconds.")
@click.option("--min-requests", type=click.IntRange(min=0),
              default=shadow.DEFAULT_MIN_REQUESTS, show_default=True,
              help="Fewer sidecar requests than this: the verdict is 'insufficient'.")
def report(logs: tuple[str, ...], db: str | None, fmt: str, max_error_rate: float,
           tolerance: float, tolerance_ms: float, min_requests: int) -> None:
    """Side by side: requests, errors, TTFB and total-time percentiles and buckets of the
    direct and sidecar paths, tokens metered, and the cutover verdict."""
    log = read_logs(logs)
    meter = None
    if db is not None:
        meter = shadow.join_meter(log.paths["sidecar"].request_ids, _meter_rows(db, log))
    criteria = shadow.Criteria(max_error_rate=max_error_rate, tolerance=tolerance,
                               tolerance_ms=tolerance_ms, min_requests=min_requests)
    result = shadow.build_report(log, criteria, meter)
    if fmt == "json":
        click.echo(orjson.dumps({"files": list(logs), **result}, option=orjson.OPT_INDENT_2))
    else:
        click.echo(render_table(result, logs))
