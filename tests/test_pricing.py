"""The price table: prefix matching, the cost of normalised usage in both formats, the
None cases, and the config's prices section (merge, validation errors by FILE:LINE)."""

from __future__ import annotations

import pathlib
import textwrap

import pytest

from sidecar import pricing
from sidecar.config import Config, load_config, parse_config_text, validate_config_file
from sidecar.pricing import DEFAULT_PRICES, Price, PriceTable
from sidecar.runtime import Runtime
from sidecar.usage import usage_from_anthropic, usage_from_anthropic_stream, usage_from_openai

GPT_4O = Price(2.50, 10.00, cached_read=1.25)
GPT_4O_MINI = Price(0.15, 0.60, cached_read=0.075)
SONNET = Price(3.00, 15.00, cached_read=0.30, cached_write=3.75)


def table() -> PriceTable:
    return PriceTable({"gpt-4o": GPT_4O, "gpt-4o-mini": GPT_4O_MINI,
                       "claude-sonnet-4": SONNET})


# --------------------------------------------------------------------------- matching


@pytest.mark.parametrize(("model", "want"), [
    ("gpt-4o", GPT_4O),
    ("gpt-4o-2024-08-06", GPT_4O),
    ("gpt-4o-mini", GPT_4O_MINI),
    ("gpt-4o-mini-2024-07-18", GPT_4O_MINI),  # the longer prefix wins
    ("gpt-4o-mini-", GPT_4O_MINI),
    ("claude-sonnet-4-20250514", SONNET),
    ("gpt-4omni", None),  # a prefix must be followed by '-' or the end
    ("gpt-4o.1", None),
    ("gpt-4", None),  # shorter than any entry
    ("gpt", None),
    ("GPT-4O", None),  # case-sensitive, as providers spell them
    ("openai/gpt-4o", None),
    ("", None),
    ("-", None),
    (None, None),
])
def test_price_for_exact_then_longest_dash_prefix(model: str | None, want: Price | None) -> None:
    assert table().price_for(model) == want


def test_price_for_caches_each_model_string_and_stays_bounded(
        monkeypatch: pytest.MonkeyPatch) -> None:
    t = table()
    calls: list[str] = []
    match = PriceTable._match

    def counted(self: PriceTable, model: str) -> Price | None:
        calls.append(model)
        return match(self, model)

    monkeypatch.setattr(PriceTable, "_match", counted)
    assert t.price_for("gpt-4o-2024-08-06") is GPT_4O
    assert t.price_for("gpt-4o-2024-08-06") is GPT_4O
    assert t.price_for("nope") is None
    assert t.price_for("nope") is None  # a miss is cached too
    assert calls == ["gpt-4o-2024-08-06", "nope"]
    monkeypatch.setattr(pricing, "CACHE_MAX", 8)
    for i in range(20):  # client-chosen names cannot grow the cache without bound
        t.price_for(f"junk-{i}")
    assert len(t._cache) <= 8


def test_default_prices_resolve_dated_provider_names() -> None:
    t = PriceTable(DEFAULT_PRICES)

    def price(model: str) -> tuple[float, float, float | None, float | None]:
        p = t.price_for(model)
        assert p is not None, model
        return p.input, p.output, p.cached_read, p.cached_write

    assert price("gpt-4o-2024-08-06") == (2.50, 10.00, 1.25, None)
    assert price("gpt-4o-2024-05-13") == (5.00, 15.00, None, None)  # its own entry
    assert price("gpt-4o-mini-2024-07-18") == (0.15, 0.60, 0.075, None)
    assert price("gpt-4.1-2025-04-14") == (2.00, 8.00, 0.50, None)
    assert price("gpt-4.1-mini-2025-04-14") == (0.40, 1.60, 0.10, None)
    assert price("gpt-4.1-nano-2025-04-14") == (0.10, 0.40, 0.025, None)
    assert price("o1-2024-12-17") == (15.00, 60.00, 7.50, None)
    assert price("o1-mini-2024-09-12") == (1.10, 4.40, 0.55, None)
    assert price("o3-2025-04-16") == (2.00, 8.00, 0.50, None)
    assert price("o3-mini-2025-01-31") == (1.10, 4.40, 0.55, None)
    assert price("o4-mini-2025-04-16") == (1.10, 4.40, 0.275, None)
    assert price("gpt-3.5-turbo-0125") == (0.50, 1.50, None, None)
    assert price("text-embedding-3-small") == (0.02, 0.0, None, None)
    assert price("text-embedding-3-large") == (0.13, 0.0, None, None)
    # Anthropic: cache write 1.25x input, cache read 0.1x.
    assert price("claude-3-haiku-20240307") == (0.25, 1.25, 0.025, 0.3125)
    assert price("claude-3-5-haiku-20241022") == (0.80, 4.00, 0.08, 1.00)
    assert price("claude-3-5-sonnet-20241022") == (3.00, 15.00, 0.30, 3.75)
    assert price("claude-3-5-sonnet-latest") == (3.00, 15.00, 0.30, 3.75)
    assert price("claude-3-7-sonnet-20250219") == (3.00, 15.00, 0.30, 3.75)
    assert price("claude-sonnet-4-20250514") == (3.00, 15.00, 0.30, 3.75)
    assert price("claude-opus-4-20250514") == (15.00, 75.00, 1.50, 18.75)
    assert price("claude-opus-4-5-20251101") == (5.00, 25.00, 0.50, 6.25)  # not opus-4's
    assert price("claude-3-opus-20240229") == (15.00, 75.00, 1.50, 18.75)


def test_default_prices_follow_each_providers_cache_rule() -> None:
    for name, p in DEFAULT_PRICES.items():
        assert p.input >= 0 and p.output >= 0, name
        if name.startswith("claude-"):
            assert p.cached_read == pytest.approx(p.input * 0.1), name
            assert p.cached_write == pytest.approx(p.input * 1.25), name
        else:
            assert p.cached_write is None, name  # OpenAI bills no cache writes
            if p.cached_read is not None:
                assert p.cached_read < p.input, name


# --------------------------------------------------------------------------- cost


def test_openai_cost_bills_cached_tokens_at_the_cached_rate() -> None:
    # OpenAI's cached_tokens is a subset of prompt_tokens already.
    u = usage_from_openai({"prompt_tokens": 1000, "completion_tokens": 200,
                           "prompt_tokens_details": {"cached_tokens": 400}})
    cost = table().cost("gpt-4o-2024-08-06", u.prompt_tokens, u.completion_tokens,
                        u.cache_read_tokens, u.cache_write_tokens)
    # 600 uncached x 2.50 + 400 cached x 1.25 + 200 out x 10.00, per million.
    assert cost == 0.004


def test_openai_responses_cost_with_reasoning_billed_as_output() -> None:
    u = usage_from_openai({"input_tokens": 328, "input_tokens_details": {"cached_tokens": 128},
                           "output_tokens": 52, "output_tokens_details": {"reasoning_tokens": 32},
                           "total_tokens": 380})
    cost = table().cost("gpt-4o-mini", u.prompt_tokens, u.completion_tokens,
                        u.cache_read_tokens, u.cache_write_tokens)
    # 200 x 0.15 + 128 x 0.075 + 52 x 0.60 = 30 + 9.6 + 31.2 = 70.8 per million.
    assert cost == 0.0000708


def test_anthropic_cost_of_normalised_usage_counts_each_part_once() -> None:
    # Anthropic's input_tokens is only the uncached part; usage.py adds the cache parts
    # into prompt_tokens, and the cost takes them out again.
    u = usage_from_anthropic({"input_tokens": 100, "cache_read_input_tokens": 2000,
                              "cache_creation_input_tokens": 500, "output_tokens": 300})
    assert u.prompt_tokens == 2600
    cost = table().cost("claude-sonnet-4-20250514", u.prompt_tokens, u.completion_tokens,
                        u.cache_read_tokens, u.cache_write_tokens)
    # 100 x 3.00 + 2000 x 0.30 + 500 x 3.75 + 300 x 15.00 = 300 + 600 + 1875 + 4500.
    assert cost == 0.007275


def test_anthropic_stream_usage_prices_the_same_as_the_whole_body() -> None:
    start = {"input_tokens": 100, "cache_read_input_tokens": 2000,
             "cache_creation_input_tokens": 500, "output_tokens": 1}
    u = usage_from_anthropic_stream(start, {"output_tokens": 300})
    t = table()
    assert t.cost("claude-sonnet-4", u.prompt_tokens, u.completion_tokens,
                  u.cache_read_tokens, u.cache_write_tokens) == 0.007275
    # Cut after message_start: the prompt side alone is priced (output unknown).
    cut = usage_from_anthropic_stream(start, None)
    assert cut.completion_tokens is None
    assert t.cost("claude-sonnet-4", cut.prompt_tokens, cut.completion_tokens,
                  cut.cache_read_tokens, cut.cache_write_tokens) == 0.002775


def test_a_cache_rate_of_none_is_billed_as_input() -> None:
    t = PriceTable({"m": Price(2.0, 8.0)})
    assert t.cost("m", 1000, 100, 400, 100) == t.cost("m", 1000, 100, None, None) == 0.0028


def test_uncached_prompt_never_goes_below_zero() -> None:
    # Inconsistent counts (cache parts above the prompt): the cache parts are billed,
    # the uncached part is 0, not negative.
    assert table().cost("claude-sonnet-4", 10, 0, 20, 5) == round(
        (20 * 0.30 + 5 * 3.75) / 1e6, 9)
    assert table().cost("claude-sonnet-4", None, 10, 20, None) == round(
        (20 * 0.30 + 10 * 15.0) / 1e6, 9)


@pytest.mark.parametrize(("model", "tokens"), [
    ("unpriced-model", (10, 5, None, None)),
    (None, (10, 5, None, None)),
    ("gpt-4o", (None, None, None, None)),  # nothing known: no cost, not a zero cost
])
def test_cost_is_none_without_a_price_or_without_tokens(
        model: str | None, tokens: tuple[int | None, ...]) -> None:
    assert table().cost(model, *tokens) is None


def test_known_zero_tokens_cost_zero_and_partial_counts_are_priced() -> None:
    t = table()
    assert t.cost("gpt-4o", 0, 0, None, None) == 0.0
    assert t.cost("gpt-4o", 1000, None, None, None) == 0.0025
    assert t.cost("gpt-4o", None, 1000, None, None) == 0.01


def test_cost_is_rounded_to_a_billionth_of_a_dollar() -> None:
    t = PriceTable({"m": Price(0.1, 0.3), "tiny": Price(0.0001, 0.0)})
    assert t.cost("m", 3, 7, None, None) == 0.0000024  # 0.3 + 2.1 = 2.4000000000000004e-6
    assert t.cost("tiny", 1, 0, None, None) == 0.0  # 1e-10 rounds away
    assert t.cost("m", 12_345_678, 0, None, None) == 1.2345678


# --------------------------------------------------------------------------- merge


def test_price_table_of_merges_over_the_defaults_or_replaces_them() -> None:
    mine = {"gpt-4o": Price(1.0, 2.0), "house-model": Price(0.5, 0.5)}
    merged = PriceTable.of(mine)
    assert merged.price_for("gpt-4o-2024-08-06") == Price(1.0, 2.0)  # replaced
    assert merged.price_for("house-model-v2") == Price(0.5, 0.5)  # added
    assert merged.price_for("gpt-4o-mini") == DEFAULT_PRICES["gpt-4o-mini"]  # kept
    assert len(merged) == len(DEFAULT_PRICES) + 1
    alone = PriceTable.of(mine, defaults=False)
    assert alone.prices == mine
    assert alone.price_for("claude-sonnet-4") is None
    # Without its own entry a variant takes its family's price: gpt-4o-mini is a
    # gpt-4o prefix match here (the defaults have an entry for it).
    assert alone.price_for("gpt-4o-mini") == Price(1.0, 2.0)
    assert PriceTable.of({}, defaults=False).cost("gpt-4o", 10, 10, None, None) is None


def test_default_prices_cannot_be_changed_in_place() -> None:
    with pytest.raises(TypeError):
        DEFAULT_PRICES["gpt-4o"] = Price(0, 0)  # type: ignore[index]


# --------------------------------------------------------------------------- config


def write(tmp_path: pathlib.Path, text: str) -> str:
    p = tmp_path / "c.yaml"
    p.write_text(textwrap.dedent(text))
    return str(p)


def problems(tmp_path: pathlib.Path, text: str, env: dict[str, str] | None = None) -> list[str]:
    path = write(tmp_path, text)
    return [str(e).replace(str(tmp_path) + "/", "")
            for e in validate_config_file(path, env=env or {})]


def test_config_without_prices_uses_the_defaults() -> None:
    cfg = parse_config_text("listen: :8080\n")
    assert cfg.prices == {} and cfg.prices_defaults is True
    assert Runtime.build(cfg).prices.prices == dict(DEFAULT_PRICES)
    assert Runtime.build(Config()).prices.price_for("gpt-4o") == DEFAULT_PRICES["gpt-4o"]


def test_config_prices_merge_over_the_defaults(tmp_path: pathlib.Path) -> None:
    cfg = load_config(write(tmp_path, """\
        prices:
          gpt-4o: { input: 2, output: 8.5, cached_read: 1 }
          house-model:
            input: ${HOUSE_IN}
            output: 0
            cached_write: 0.25
          "gpt-4.1": { input: 0, output: 0 }
        """), env={"HOUSE_IN": "0.75"})
    assert cfg.prices == {
        "gpt-4o": Price(2.0, 8.5, cached_read=1.0),
        "house-model": Price(0.75, 0.0, cached_write=0.25),
        "gpt-4.1": Price(0.0, 0.0),
    }
    assert all(type(v) is float for p in cfg.prices.values() for v in (p.input, p.output))
    prices = Runtime.build(cfg).prices
    assert prices.price_for("gpt-4o-2024-08-06") == Price(2.0, 8.5, cached_read=1.0)
    assert prices.price_for("gpt-4o-mini") == DEFAULT_PRICES["gpt-4o-mini"]
    assert prices.cost("house-model", 1_000_000, 5, None, 200_000) == 0.65


def test_prices_defaults_false_keeps_only_the_configured_table(tmp_path: pathlib.Path) -> None:
    cfg = load_config(write(tmp_path, """\
        prices_defaults: false
        prices:
          house-model: { input: 1, output: 2 }
        """), env={})
    assert cfg.prices_defaults is False
    prices = Runtime.build(cfg).prices
    assert prices.prices == {"house-model": Price(1.0, 2.0)}
    assert prices.price_for("gpt-4o") is None
    # An empty section with the defaults off: nothing is priced.
    empty = load_config(write(tmp_path, "prices_defaults: false\nprices:\n"), env={})
    assert len(Runtime.build(empty).prices) == 0


def test_prices_errors_name_file_line_and_field(tmp_path: pathlib.Path) -> None:
    text = """\
        prices:
          gpt-4o: { input: 2.5 }
          "gpt-4o-*": { input: 1, output: 2 }
          my-model:
            input: -1
            output: cheap
            cached: 0.5
          gpt-4.1: 2.0
          o3:
            input: true
            output: .inf
            cached_read: ${NOPE_PRICE}
          "two words": { input: 1, output: 1 }
        prices_defaults: "no"
        """
    assert problems(tmp_path, text, env={"NOPE_PRICE": "lots"}) == [
        "c.yaml:2: prices.gpt-4o.output: is required",
        'c.yaml:3: prices["gpt-4o-*"]: must be a model name without spaces or globs; a name '
        "also prices its dated variants (gpt-4o covers gpt-4o-2024-08-06)",
        "c.yaml:5: prices.my-model.input: must be a number >= 0 (USD per million tokens), "
        "got -1",
        "c.yaml:6: prices.my-model.output: must be a number >= 0 (USD per million tokens), "
        "got 'cheap'",
        "c.yaml:7: prices.my-model.cached: unknown key (did you mean 'cached_read'?); "
        "allowed: cached_read, cached_write, input, output",
        'c.yaml:8: prices["gpt-4.1"]: must be a mapping, got a number',
        "c.yaml:10: prices.o3.input: must be a number >= 0 (USD per million tokens), got true",
        "c.yaml:11: prices.o3.output: must be a number >= 0 (USD per million tokens), got inf",
        "c.yaml:12: prices.o3.cached_read: must be a number >= 0 (USD per million tokens), "
        "got the value of '${NOPE_PRICE}' (not shown)",
        'c.yaml:13: prices["two words"]: must be a model name without spaces or globs; a '
        "name also prices its dated variants (gpt-4o covers gpt-4o-2024-08-06)",
        "c.yaml:14: prices_defaults: must be a boolean (true or false), got 'no'",
    ]


def test_prices_section_must_be_a_mapping_and_keys_unique(tmp_path: pathlib.Path) -> None:
    assert problems(tmp_path, "prices: [gpt-4o]\n") == [
        "c.yaml:1: prices: must be a mapping, got a list"]
    assert problems(tmp_path, """\
        prices:
          gpt-4o: { input: 1, output: 1 }
          gpt-4o: { input: 2, output: 2 }
        """) == ["c.yaml:3: prices.gpt-4o: duplicate key (first at line 2)"]
    assert problems(tmp_path, "prices_default: false\n")[0].startswith(
        "c.yaml:1: prices_default: unknown key (did you mean 'prices_defaults'?)")


def test_the_example_configs_commented_prices_load_when_uncommented() -> None:
    example = (pathlib.Path(__file__).resolve().parent.parent / "conf"
               / "sidecar.example.yaml").read_text().splitlines()
    start = next(i for i, line in enumerate(example) if line.startswith("# prices:"))
    block = [example[start][2:]]
    for line in example[start + 1:]:
        if not line.startswith("#   "):
            break
        block.append(line[2:])
    cfg = parse_config_text("\n".join(block) + "\n")
    assert cfg.prices["gpt-4o"] == Price(2.50, 10.00, cached_read=1.25)
    assert cfg.prices["claude-sonnet-4"] == Price(3.0, 15.0, cached_read=0.30,
                                                  cached_write=3.75)
    assert cfg.prices["my-vllm-model"] == Price(0.0, 0.0)
