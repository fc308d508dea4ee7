"""cost_usd end to end over real loopback sockets: client -> sidecar -> mock -> meter row."""

from __future__ import annotations

import dataclasses
import socket
from typing import Any

import openai
from test_streaming_e2e import RawStream, _post

from sidecar.config import Config
from sidecar.pricing import Price

HOUSE = Price(input=1.5, output=6.0, cached_read=0.5)


def _priced(**prices: Price) -> Any:
    def edit(cfg: Config) -> Config:
        return dataclasses.replace(cfg, prices=dict(prices))
    return edit


def test_streamed_row_costs_the_mocks_reported_usage_at_the_configured_price(
        stack_factory: Any) -> None:
    # A configured entry replaces the shipped gpt-4o-mini price.
    stack = stack_factory(_priced(**{"gpt-4o-mini": HOUSE}), chunks=12, cache_read_tokens=3)
    client = openai.OpenAI(base_url=stack.url + "/v1", api_key="sk-client-test", max_retries=0)
    stream = client.chat.completions.create(
        model="gpt-4o-mini-2024-07-18", stream=True,
        messages=[{"role": "user", "content": "Say something streamed and priced."}],
    )
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    sent = stack.mock.requests[0]
    stack.stop()
    (row,) = stack.rows()
    assert row["usage_source"] == "reported" and row["stream"] == 1
    p, c = sent.prompt_tokens, sent.completion_tokens
    assert (row["prompt_tokens"], row["completion_tokens"], row["cache_read_tokens"]) == (p, c, 3)
    # 3 of the prompt tokens were cache hits: (p - 3) x 1.5 + 3 x 0.5 + c x 6.0 per million.
    assert p > 3 and c > 0
    assert row["cost_usd"] == round(((p - 3) * 1.5 + 3 * 0.5 + c * 6.0) / 1e6, 9)


def test_a_renamed_model_is_priced_as_the_name_the_provider_was_sent(
        stack_factory: Any) -> None:
    def edit(cfg: Config) -> Config:
        routes = tuple(
            dataclasses.replace(r, upstreams=tuple(
                dataclasses.replace(u, model="house-model") for u in r.upstreams))
            if r.path == "/v1/chat/completions" else r
            for r in cfg.routes)
        return dataclasses.replace(cfg, routes=routes, prices={"house-model": HOUSE},
                                   prices_defaults=False)

    stack = stack_factory(edit, chunks=4)
    body = {"model": "gpt-4o", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    RawStream(_post(stack.port, "/v1/chat/completions", body)).read_all()
    sent = stack.mock.requests[0]
    assert sent.model == "house-model"
    stack.stop()
    (row,) = stack.rows()
    assert (row["model"], row["upstream_model"]) == ("gpt-4o", "house-model")
    p, c = sent.prompt_tokens, sent.completion_tokens
    assert row["cost_usd"] == round((p * 1.5 + c * 6.0) / 1e6, 9)


def test_an_estimated_row_is_priced_from_its_estimate(stack_factory: Any) -> None:
    stack = stack_factory(_priced(**{"gpt-4o-mini": HOUSE}), chunks=40, delay_ms=50)
    body = {"model": "gpt-4o-mini", "stream": True,
            "messages": [{"role": "user", "content": "Tell me a long story."}]}
    sock: socket.socket = _post(stack.port, "/v1/chat/completions", body)
    RawStream(sock).read_events(6)
    sock.close()
    stack.stop()  # the drain lets the estimate finish and the row go in
    (row,) = stack.rows()
    assert row["outcome"] == "client_disconnect" and row["usage_source"] == "estimated"
    assert row["prompt_tokens"] > 0 and row["completion_tokens"] > 0
    assert row["cost_usd"] == round(
        (row["prompt_tokens"] * 1.5 + row["completion_tokens"] * 6.0) / 1e6, 9)


def test_an_unpriced_model_leaves_cost_null(stack_factory: Any) -> None:
    stack = stack_factory(lambda cfg: dataclasses.replace(cfg, prices_defaults=False), chunks=3)
    body = {"model": "gpt-4o-mini", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    RawStream(_post(stack.port, "/v1/chat/completions", body)).read_all()
    stack.stop()
    (row,) = stack.rows()
    assert row["usage_source"] == "reported" and row["completion_tokens"] > 0
    assert row["cost_usd"] is None
