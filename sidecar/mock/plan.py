"""How the mock answers a request: a `Plan` per (path, body, x-mock-* headers), worked out
once by the `Planner` (endpoint kind, knobs, faults, the response template) and cached, so
the per-request work in the protocol is a lookup plus filling in the id and the clock."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Final

import orjson

from sidecar import endpoints
from sidecar.mock.expected import (
    DEFAULT_BIG_CHUNK_TOKENS,
    DEFAULT_CHUNK_TOKENS,
    input_count,
    prompt_tokens,
    tool_to_call,
)
from sidecar.mock.faults import Faults, Knobs
from sidecar.mock.shapes import Shape, Template
from sidecar.mock.templates import build, build_big
from sidecar.mock.wire import CREATED_PH, ID_PH, error_response

# Bounded caches: the bench repeats a handful of bodies; a fuzzing test must not grow memory.
_CACHE_MAX: Final = 4096
_BIG_CACHE_MAX: Final = 64

PlanKey = tuple[str, bytes, tuple[tuple[bytes, bytes], ...]]


class _BadRequest(Exception):
    pass


def kind_for_path(path: str, api_format: str = "openai") -> str:
    """Endpoint kind from the request path (the sidecar's one endpoint table); a path that
    names no endpoint answers in the instance's api_format: Messages for an Anthropic
    instance, chat otherwise."""
    kind = endpoints.kind_for_path(path)
    if kind == "unknown":
        return "messages" if api_format == "anthropic" else "chat"
    return kind


@dataclass(slots=True, eq=False)
class Plan:
    """How to answer one (path, body, x-mock-* headers) combination: everything that does not
    change from one identical request to the next, worked out once and cached. The bench sends
    the same body thousands of times; per request only the id and the clock are new."""

    kind: str
    knobs: Knobs
    reply: bytes | None = None  # a fixed answer (status fault, bad request)
    status: int = 200
    tmpl: Template | None = None
    model: str = ""
    stream: bool = False
    prompt_tokens: int = 0
    completion_tokens: int = 0
    usage_sent: bool = False
    direct: bool = True  # answer in one write from data_received (no pacing, no big mode)
    # Offsets in the burst bytes where a paced writer may stop: after head+preamble,
    # then after each content delta (what follows the last cut is the trailer).
    cuts: list[int] = field(default_factory=list)
    faults: Faults = field(init=False)
    id_prefix: str = field(init=False)
    _second: int = field(default=-1, init=False)
    _parts: list[bytes] = field(default_factory=list, init=False)

    def __post_init__(self) -> None:
        self.faults = self.knobs.faults
        self.id_prefix = ID_PREFIX[self.kind]

    def burst(self, rid: bytes) -> bytes:
        """The whole response with this request's id. The clock is filled in once a second
        and the template pre-split at the id, so a request costs one join."""
        assert self.tmpl is not None
        now = int(time.time())
        if now != self._second:
            filled = self.tmpl.burst.replace(CREATED_PH, b"%d" % now)
            self._parts = filled.split(ID_PH)
            self._second = now
        return rid.join(self._parts)


ID_PREFIX: Final = {
    "chat": "chatcmpl-",
    "completions": "cmpl-",
    "responses": "resp_",
    "messages": "msg_",
    "embeddings": "",
}


class Planner:
    """Works out and caches the Plan for each request key, and the templates behind them."""

    def __init__(self, knobs: Knobs, api_format: str, model: str) -> None:
        self._knobs = knobs
        self.api_format = api_format
        self.model = model  # for bodies that name none
        self.plans: dict[PlanKey, Plan] = {}
        self._templates: dict[Shape, Template] = {}
        self._big: dict[tuple[Shape, int], Template] = {}

    def plan(self, key: PlanKey) -> Plan:
        """Work out (slowly, once) how to answer this path + body + x-mock-* headers."""
        path, body, mock = key
        kind = kind_for_path(path, self.api_format)
        try:
            knobs = self._knobs.with_headers(mock) if mock else self._knobs
        except ValueError as exc:
            plan = Plan(kind, self._knobs)
            plan.status = 400
            plan.reply = error_response(400, kind, "1", f"bad x-mock header: {exc}")
            return plan  # not cached: a broken test header is not worth remembering
        plan = Plan(kind, knobs)
        faults = knobs.faults
        if faults.status is not None:
            plan.status = faults.status
            plan.reply = error_response(faults.status, kind, knobs.retry_after)
        elif not (faults.hang or faults.malformed):
            try:
                self._plan_response(plan, kind, body)
            except _BadRequest as exc:
                plan.status = 400
                plan.reply = error_response(400, kind, "1", str(exc))
        if len(self.plans) >= _CACHE_MAX:
            self.plans.clear()
        self.plans[key] = plan
        return plan

    def _plan_response(self, plan: Plan, kind: str, body: bytes) -> None:
        try:
            obj = orjson.loads(body) if body else {}
        except orjson.JSONDecodeError as exc:
            raise _BadRequest(f"body is not JSON: {exc}") from None
        if not isinstance(obj, dict):
            raise _BadRequest("body must be a JSON object")
        model = obj.get("model")
        if not isinstance(model, str) or not model:
            model = self.model
        knobs = plan.knobs
        options = obj.get("stream_options")
        include_usage = isinstance(options, dict) and options.get("include_usage") is True
        stream = obj.get("stream") is True and kind != "embeddings"
        big = stream and knobs.bytes_total > 0
        openai_stream = stream and kind in ("chat", "completions")
        shape = Shape(
            kind=kind,
            model=model,
            stream=stream,
            chunks=knobs.chunks,
            chunk_tokens=knobs.chunk_tokens
            or (DEFAULT_BIG_CHUNK_TOKENS if big else DEFAULT_CHUNK_TOKENS),
            usage=not knobs.faults.no_usage,
            usage_nulls=openai_stream and (include_usage or knobs.always_usage),
            prompt_tokens=prompt_tokens(kind, obj, model),
            cache_read=knobs.cache_read,
            cache_write=knobs.cache_write,
            inputs=input_count(obj) if kind == "embeddings" else 1,
            base64=obj.get("encoding_format") == "base64",
            tool=None if big else tool_to_call(kind, obj),
        )
        tmpl = self._big_template(shape, knobs.bytes_total) if big else self._template(shape)
        plan.tmpl = tmpl
        if stream and not big:
            cut = len(tmpl.head) + len(tmpl.pre)
            plan.cuts = [cut]
            for delta in tmpl.deltas:
                cut += len(delta)
                plan.cuts.append(cut)
        plan.model = model
        plan.stream = stream
        plan.prompt_tokens = shape.prompt_tokens
        plan.completion_tokens = tmpl.completion_tokens
        # An OpenAI stream only carries usage when asked (include_usage / always_usage).
        plan.usage_sent = shape.usage and (shape.usage_nulls or not openai_stream)
        plan.direct = not (knobs.first_byte_ms > 0 or (stream and (knobs.delay_ms > 0 or big)))

    def _template(self, shape: Shape) -> Template:
        tmpl = self._templates.get(shape)
        if tmpl is None:
            if len(self._templates) >= _CACHE_MAX:
                self._templates.clear()
            tmpl = self._templates[shape] = build(shape)
        return tmpl

    def _big_template(self, shape: Shape, nbytes: int) -> Template:
        key = (shape, nbytes)
        tmpl = self._big.get(key)
        if tmpl is None:
            if len(self._big) >= _BIG_CACHE_MAX:
                self._big.clear()
            tmpl = self._big[key] = build_big(shape, nbytes)
        return tmpl
