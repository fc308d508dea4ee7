"""Config loading: the migration shape, named upstreams, env expansion, and
FILE:LINE: field: problem for every class of mistake."""

from __future__ import annotations

import pathlib
import textwrap

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.config import (
    Config,
    LimitsConfig,
    MeterConfig,
    TimeoutsConfig,
    UpstreamConfig,
    load_config,
    parse_config_text,
    validate_config_file,
    validate_config_text,
)
from sidecar.errors import ConfigError

REPO = pathlib.Path(__file__).resolve().parent.parent
CONF = REPO / "conf"

MIGRATION = """\
listen: :8080
routes:
  - path: /v1/chat/completions
    upstreams:
      - target: api.openai.com        # a host, a URL, or a name under upstreams:
        weight: 50
      - target: http://127.0.0.1:9000
        weight: 50
    middleware:
      - type: token_limiter
        config: { limit: 1000, period: 1m }
      - type: metrics_collector
        config: { provider: prometheus }
meter:
  db: ./meter.db
"""

SECRET = "sk-live-THIS-MUST-NEVER-BE-PRINTED"


def write(tmp_path: pathlib.Path, text: str, name: str = "c.yaml") -> str:
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return str(p)


def load(tmp_path: pathlib.Path, text: str, env: dict[str, str] | None = None) -> Config:
    return load_config(write(tmp_path, text), env=env or {})


def problems(tmp_path: pathlib.Path, text: str, env: dict[str, str] | None = None) -> list[str]:
    """Rendered errors with the tmp dir stripped: 'c.yaml:LINE: field: problem'."""
    path = write(tmp_path, text)
    prefix = str(tmp_path) + "/"
    return [str(e).replace(prefix, "") for e in validate_config_file(path, env=env or {})]


def only_problem(tmp_path: pathlib.Path, text: str, env: dict[str, str] | None = None) -> str:
    found = problems(tmp_path, text, env)
    assert len(found) == 1, found
    return found[0]


# --------------------------------------------------------------------------- accepted shapes


def test_migration_file_is_exactly_the_documented_shape() -> None:
    assert (CONF / "migration.yaml").read_text() == MIGRATION


def test_migration_shape_loads_as_is(tmp_path: pathlib.Path) -> None:
    cfg = load(tmp_path, MIGRATION, env={"OPENAI_API_KEY": SECRET})
    assert (cfg.listen_host, cfg.listen_port, cfg.workers) == ("0.0.0.0", 8080, 1)
    assert len(cfg.routes) == 1
    route = cfg.routes[0]
    assert route.path == "/v1/chat/completions"
    assert route.format == "openai"
    openai, local = route.upstreams
    assert openai.weight == 50 and local.weight == 50
    assert openai.upstream == UpstreamConfig(
        name="api.openai.com",
        url="https://api.openai.com",
        scheme="https",
        host="api.openai.com",
        port=443,
        format="openai",
        api_key=SECRET,
    )
    assert local.upstream == UpstreamConfig(
        name="127.0.0.1:9000",
        url="http://127.0.0.1:9000",
        scheme="http",
        host="127.0.0.1",
        port=9000,
        api_key=None,
    )
    assert [(m.type, m.config) for m in route.middleware] == [
        ("token_limiter", {"limit": 1000, "period": 60.0, "requests": None, "key": None,
                           "reserve": 256, "tiers": {}}),
        ("metrics_collector", {"provider": "prometheus"}),
    ]
    assert set(cfg.upstreams) == {"api.openai.com", "127.0.0.1:9000"}
    assert cfg.meter.db == str(tmp_path / "meter.db")  # relative to the config file
    assert cfg.limits == LimitsConfig() and cfg.timeouts == TimeoutsConfig()


def test_migration_file_in_repo_loads_without_any_env() -> None:
    cfg = load_config(CONF / "migration.yaml", env={})
    assert cfg.upstreams["api.openai.com"].api_key is None
    assert cfg.meter.db == str(CONF / "meter.db")
    assert cfg.source.endswith("migration.yaml")


def test_named_upstream_with_env_key(tmp_path: pathlib.Path) -> None:
    cfg = load(
        tmp_path,
        """\
        upstreams:
          claude:
            url: https://api.anthropic.com
            format: anthropic                 # openai (default) | anthropic
            api_key: ${ANTHROPIC_API_KEY}
        routes:
          - path: /v1/messages
            upstreams: [{ target: claude }]
        """,
        env={"ANTHROPIC_API_KEY": SECRET},
    )
    claude = cfg.upstreams["claude"]
    assert (claude.url, claude.format, claude.api_key) == (
        "https://api.anthropic.com",
        "anthropic",
        SECRET,
    )
    route = cfg.route_for("/v1/messages")
    assert route is not None and route.format == "anthropic"
    assert route.upstreams[0].upstream is claude and route.upstreams[0].weight == 1


def test_named_upstream_all_fields(tmp_path: pathlib.Path) -> None:
    (tmp_path / "ca.pem").write_text("not checked here\n")
    cfg = load(
        tmp_path,
        """\
        upstreams:
          internal:
            url: HTTPS://LLM.Example.COM:8443/openai/
            format: openai
            forward_client_auth: true
            ca_bundle: ca.pem
            tls_verify: false
            pool_max_idle: 0
            pool_idle_ttl: 500ms
          claude:
            url: https://api.anthropic.com
            anthropic_version: 2023-06-01
        """,
    )
    up = cfg.upstreams["internal"]
    assert up.url == "https://llm.example.com:8443/openai"
    assert (up.scheme, up.host, up.port, up.base_path) == (
        "https",
        "llm.example.com",
        8443,
        "/openai",
    )
    assert up.forward_client_auth is True and up.tls_verify is False
    assert up.ca_bundle == str(tmp_path / "ca.pem")
    assert (up.pool_max_idle, up.pool_idle_ttl) == (0, 0.5)
    # Well-known host: format inferred; an unquoted YAML date stays the string it looks like.
    assert cfg.upstreams["claude"].format == "anthropic"
    assert cfg.upstreams["claude"].anthropic_version == "2023-06-01"


@pytest.mark.parametrize(
    ("target", "url", "name"),
    [
        ("api.openai.com", "https://api.openai.com", "api.openai.com"),
        ("example.com:443", "https://example.com", "example.com"),
        ("vllm:8000", "http://vllm:8000", "vllm:8000"),
        ("localhost", "https://localhost", "localhost"),
        ("10.0.0.5:80", "http://10.0.0.5", "10.0.0.5"),
        ("[::1]:9000", "http://[::1]:9000", "[::1]:9000"),
        ("http://127.0.0.1:8000/openai/", "http://127.0.0.1:8000/openai", "127.0.0.1:8000/openai"),
        ("https://gw.example.com:443/v", "https://gw.example.com/v", "gw.example.com/v"),
    ],
)
def test_inline_targets(tmp_path: pathlib.Path, target: str, url: str, name: str) -> None:
    cfg = load(tmp_path, f"routes: [{{path: /x, upstreams: [{{target: '{target}'}}]}}]\n")
    up = cfg.routes[0].upstreams[0].upstream
    assert (up.url, up.name) == (url, name)
    assert cfg.upstreams == {name: up}


def test_bare_anthropic_host_takes_format_and_key_from_env(tmp_path: pathlib.Path) -> None:
    cfg = load(
        tmp_path,
        "routes: [{path: /v1/messages, upstreams: [{target: api.anthropic.com}]}]\n",
        env={"ANTHROPIC_API_KEY": SECRET, "OPENAI_API_KEY": "other"},
    )
    up = cfg.upstreams["api.anthropic.com"]
    assert (up.format, up.api_key) == ("anthropic", SECRET)


def test_same_inline_target_in_two_routes_is_one_upstream(tmp_path: pathlib.Path) -> None:
    cfg = load(
        tmp_path,
        """\
        routes:
          - path: /v1/chat/completions
            upstreams: [{target: vllm:8000}]
          - path: /v1/embeddings
            upstreams: [{target: "http://vllm:8000/"}]
        """,
    )
    assert cfg.routes[0].upstreams[0].upstream is cfg.routes[1].upstreams[0].upstream
    assert list(cfg.upstreams) == ["vllm:8000"]


def test_generated_name_never_shadows_a_named_upstream(tmp_path: pathlib.Path) -> None:
    cfg = load(
        tmp_path,
        """\
        upstreams:
          "127.0.0.1:9000": { url: "http://127.0.0.1:9001" }
        routes:
          - path: /a
            upstreams: [{target: "127.0.0.1:9000"}]
          - path: /b
            upstreams: [{target: "http://127.0.0.1:9000"}]
        """,
    )
    assert cfg.routes[0].upstreams[0].upstream.url == "http://127.0.0.1:9001"  # the name wins
    b = cfg.routes[1].upstreams[0].upstream
    assert (b.name, b.url) == ("http://127.0.0.1:9000", "http://127.0.0.1:9000")


@pytest.mark.parametrize(
    ("listen", "host", "port"),
    [
        ("':8080'", "0.0.0.0", 8080),
        ("8080", "127.0.0.1", 8080),
        ("'8080'", "127.0.0.1", 8080),
        ("127.0.0.1:8080", "127.0.0.1", 8080),
        ("'[::1]:8080'", "::1", 8080),
        ("localhost:8080", "localhost", 8080),
        ("0", "127.0.0.1", 0),
        ("':0'", "0.0.0.0", 0),
    ],
)
def test_listen_forms(tmp_path: pathlib.Path, listen: str, host: str, port: int) -> None:
    cfg = load(tmp_path, f"listen: {listen}\n")
    assert (cfg.listen_host, cfg.listen_port) == (host, port)


def test_defaults_when_sections_are_absent_or_empty(tmp_path: pathlib.Path) -> None:
    cfg = load(tmp_path, "meter:\nlimits:\ntimeouts:\ntokenizer:\nupstreams:\nroutes:\n")
    assert (cfg.listen_host, cfg.listen_port, cfg.workers, cfg.routes) == ("127.0.0.1", 8080, 1, ())
    assert cfg.limits == LimitsConfig() and cfg.timeouts == TimeoutsConfig()
    assert cfg.meter == MeterConfig(db=str(tmp_path / "meter.db"))
    assert cfg.meter.spill_path == str(tmp_path / "meter.db.spill.jsonl")
    assert cfg.tokenizer.dir is None


def test_sizes_durations_and_paths(tmp_path: pathlib.Path) -> None:
    (tmp_path / "tok").mkdir()
    cfg = load(
        tmp_path,
        """\
        workers: 4
        meter:
          db: data/m.db
          queue_size: 10
          batch_rows: 2
          flush_ms: 1s
          spill: /var/tmp/spill.jsonl
        limits:
          max_body_bytes: 1MB
          max_header_bytes: 16KiB
          max_connections: 50
          max_pipelined_bytes: 1.5 KiB
          write_high_water: 2MiB
          write_low_water: 1024
          tap_body_bytes: 1GiB
        timeouts:
          connect: 2.5
          first_byte: 500ms
          idle: 1m30s
          total: 2h
          client_idle: 5
          shutdown_grace: 0
        tokenizer:
          dir: tok
        """,
    )
    assert cfg.workers == 4
    assert cfg.meter == MeterConfig(
        db=str(tmp_path / "data" / "m.db"),
        queue_size=10,
        batch_rows=2,
        flush_ms=1000,
        spill="/var/tmp/spill.jsonl",
    )
    assert cfg.limits == LimitsConfig(
        max_body_bytes=1_000_000,
        max_header_bytes=16 * 1024,
        max_connections=50,
        max_pipelined_bytes=1536,
        write_high_water=2 * 1024 * 1024,
        write_low_water=1024,
        tap_body_bytes=1024**3,
    )
    assert cfg.timeouts == TimeoutsConfig(
        connect=2.5, first_byte=0.5, idle=90.0, total=7200.0, client_idle=5.0, shutdown_grace=0.0
    )
    assert cfg.tokenizer.dir == str(tmp_path / "tok")


def test_route_for_matches_exact_paths_only(tmp_path: pathlib.Path) -> None:
    cfg = load(
        tmp_path,
        """\
        routes:
          - path: /v1/chat/completions
            upstreams: [{target: a.example.com}]
          - path: /custom
            upstreams: [{target: b.example.com}]
        """,
    )
    chat = cfg.route_for("/v1/chat/completions")
    assert chat is not None and chat.upstreams[0].upstream.host == "a.example.com"
    assert cfg.route_for("/v1/chat/completions?debug=1") is chat
    assert cfg.route_for("/v1/chat/completions/") is None
    assert cfg.route_for("/v1/chat") is None
    custom = cfg.route_for("/custom")
    assert custom is not None and custom.format == "openai"  # unknown paths: openai passthrough
    assert cfg.routes_by_path == {"/v1/chat/completions": chat, "/custom": custom}


def test_yaml_anchors_and_merge_keys(tmp_path: pathlib.Path) -> None:
    cfg = load(
        tmp_path,
        """\
        upstreams:
          a: &base { url: "http://a.internal:8000", pool_max_idle: 8 }
          b: { <<: *base, url: "http://b.internal:8000" }
        """,
    )
    assert cfg.upstreams["b"].url == "http://b.internal:8000"
    assert cfg.upstreams["b"].pool_max_idle == 8


# --------------------------------------------------------------------------- environment


def test_env_expansion_forms(tmp_path: pathlib.Path) -> None:
    cfg = load(
        tmp_path,
        """\
        listen: ${HOST:-127.0.0.1}:${PORT}
        workers: ${WORKERS:-3}
        upstreams:
          u:
            url: http://${UP_HOST}:${UP_PORT:-9000}/$${literal}
            tls_verify: ${VERIFY:-true}
            api_key: ${EMPTY_KEY:-}
        """,
        env={"PORT": "9999", "UP_HOST": "vllm.internal", "EMPTY_KEY": ""},
    )
    assert (cfg.listen_host, cfg.listen_port, cfg.workers) == ("127.0.0.1", 9999, 3)
    u = cfg.upstreams["u"]
    assert u.url == "http://vllm.internal:9000/${literal}"
    assert u.tls_verify is True and u.api_key is None


def test_unset_env_var_names_the_variable(tmp_path: pathlib.Path) -> None:
    text = """\
        upstreams:
          claude:
            url: https://api.anthropic.com
            api_key: ${ANTHROPIC_API_KEY}
        """
    assert only_problem(tmp_path, text) == (
        "c.yaml:4: upstreams.claude.api_key: environment variable ANTHROPIC_API_KEY is not set "
        "(write ${ANTHROPIC_API_KEY:-} if optional)"
    )


def test_malformed_env_reference(tmp_path: pathlib.Path) -> None:
    assert only_problem(tmp_path, "meter:\n  db: ${1BAD}\n") == (
        "c.yaml:2: meter.db: malformed reference ${1BAD}; use ${VAR} or ${VAR:-default}"
    )
    assert only_problem(tmp_path, "meter:\n  db: ${OPEN\n") == (
        "c.yaml:2: meter.db: unterminated ${...} in '${OPEN'"
    )


# --------------------------------------------------------------------------- error classes


def test_bad_weight_points_at_its_line(tmp_path: pathlib.Path) -> None:
    text = """\
        listen: :8080
        routes:
          - path: /v1/chat/completions
            upstreams:
              - target: api.openai.com
                weight: 50
              - target: http://127.0.0.1:9000
                weight: fifty
        """
    assert only_problem(tmp_path, text) == (
        "c.yaml:8: routes[0].upstreams[1].weight: must be an integer >= 0, got 'fifty'"
    )


def test_load_config_raises_configerror_with_parts(tmp_path: pathlib.Path) -> None:
    path = write(tmp_path, "listen: :8080\nworkers: 0\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    err = info.value
    assert (err.file, err.line, err.field) == (path, 2, "workers")
    assert err.problem == "must be an integer >= 1, got 0"
    assert str(err) == f"{path}:2: workers: must be an integer >= 1, got 0"


def test_unknown_keys_at_every_depth(tmp_path: pathlib.Path) -> None:
    text = """\
        listne: :8080
        upstreams:
          u:
            url: http://u.internal
            timeout: 5
        routes:
          - path: /v1/chat/completions
            upstream: []
          - path: /v1/embeddings
            upstreams:
              - target: u
                wieght: 2
            middleware:
              - type: token_limiter
                config: { limit: 5, period: 1s, burst: 10 }
        meter:
          db: m.db
          flush: 5
        limits: { max_body: 1 }
        timeouts: { conect: 1 }
        tokenizer: { path: x }
        """
    assert problems(tmp_path, text) == [
        "c.yaml:1: listne: unknown key (did you mean 'listen'?); allowed: access_log, auth, "
        "limits, listen, meter, metrics, prices, prices_defaults, routes, tiers, timeouts, "
        "tokenizer, "
        "trusted_peers, upstreams, workers",
        "c.yaml:5: upstreams.u.timeout: unknown key (did you mean 'queue_timeout'?); "
        "allowed: anthropic_version, api_key, "
        "ca_bundle, default_max_tokens, format, forward_client_auth, health_check, max_concurrent, max_queue, "
        "pool_idle_ttl, pool_max_idle, queue_timeout, tls_verify, url",
        "c.yaml:7: routes[0].upstreams: is required",
        "c.yaml:8: routes[0].upstream: unknown key (did you mean 'upstreams'?); allowed: "
        "identity, max_attempts, middleware, model, on_client_disconnect, path, retry_budget, "
        "retry_on, strategy, upstreams",
        "c.yaml:12: routes[1].upstreams[0].wieght: unknown key (did you mean 'weight'?); "
        "allowed: model, target, weight",
        "c.yaml:15: routes[1].middleware[0].config.burst: unknown key; allowed: key, limit, "
        "period, requests, reserve, tiers",
        "c.yaml:18: meter.flush: unknown key (did you mean 'flush_ms'?); allowed: batch_rows, "
        "db, flush_ms, journal, journal_dir, journal_rotate_bytes, queue_size, spill",
        "c.yaml:19: limits.max_body: unknown key (did you mean 'max_body_bytes'?); allowed: "
        "backend, max_body_bytes, max_connections, max_drains, max_header_bytes, max_headers, "
        "max_pipelined_bytes, redis_failure, redis_timeout, tap_body_bytes, write_high_water, "
        "write_low_water",
        "c.yaml:20: timeouts.conect: unknown key (did you mean 'connect'?); allowed: "
        "client_idle, connect, drain, first_byte, heartbeat, idle, request_body, request_head, "
        "shutdown_grace, total",
        "c.yaml:21: tokenizer.path: unknown key; allowed: dir",
    ]


def test_wrong_types_name_the_expected_type(tmp_path: pathlib.Path) -> None:
    text = """\
        workers: "2"
        upstreams:
          u:
            url: http://u.internal
            tls_verify: "yes"
            format: gpt
            pool_idle_ttl: soon
        routes: { path: /x }
        meter:
          queue_size: 1.5
          db: [a]
        limits:
          max_body_bytes: 8 megs
        timeouts:
          connect: -1
        """
    assert problems(tmp_path, text) == [
        "c.yaml:1: workers: must be an integer >= 1, got '2'",
        "c.yaml:5: upstreams.u.tls_verify: must be a boolean (true or false), got 'yes'",
        "c.yaml:6: upstreams.u.format: must be one of openai, anthropic, got 'gpt'",
        "c.yaml:7: upstreams.u.pool_idle_ttl: must be a duration > 0 (seconds, or a string "
        "like '500ms', '30s', '5m', '1h'), got 'soon'",
        "c.yaml:8: routes: must be a list, got a mapping",
        "c.yaml:10: meter.queue_size: must be an integer >= 1, got 1.5",
        "c.yaml:11: meter.db: must be a path, got a list",
        "c.yaml:13: limits.max_body_bytes: must be a size in bytes >= 1 (an integer, or a "
        "string like '64KiB', '8MiB', '1MB'), got '8 megs'",
        "c.yaml:15: timeouts.connect: must be a duration > 0 (seconds, or a string like "
        "'500ms', '30s', '5m', '1h'), got -1",
    ]


_LISTEN_FORMS = "must be a port or HOST:PORT (e.g. ':8080', '127.0.0.1:8080', '[::1]:8080')"


@pytest.mark.parametrize(
    ("listen", "problem"),
    [
        ("'::1:8080'", f"{_LISTEN_FORMS}, got '::1:8080'"),
        ("70000", "port must be 0..65535 (0 picks a free port), got 70000"),
        ("'host:http'", "port must be 0..65535 (0 picks a free port), got 'host:http'"),
        ("true", f"{_LISTEN_FORMS}, got true"),
        ("'bad host:80'", f"{_LISTEN_FORMS}, got 'bad host:80'"),
    ],
)
def test_bad_listen(tmp_path: pathlib.Path, listen: str, problem: str) -> None:
    found = only_problem(tmp_path, f"workers: 1\nlisten: {listen}\n")
    assert found == f"c.yaml:2: listen: {problem}"


def test_route_rules(tmp_path: pathlib.Path) -> None:
    text = """\
        routes:
          - path: v1/chat/completions
            upstreams: [{target: a.example.com}]
          - path: /v1/embeddings
            upstreams: []
          - path: /v1/completions
            upstreams:
              - target: a.example.com
                weight: 0
              - target: b.example.com
                weight: 0
          - path: /v1/responses
            upstreams: [{target: a.example.com}]
          - path: /v1/responses
            upstreams: [{target: b.example.com}]
          - path: /dup
            upstreams:
              - target: a.example.com
              - target: https://a.example.com/
          - upstreams: [{weight: 1}]
        """
    assert problems(tmp_path, text) == [
        "c.yaml:2: routes[0].path: must start with '/' and contain no spaces, '?' or '#', "
        "got 'v1/chat/completions'",
        "c.yaml:5: routes[1].upstreams: must be a non-empty list",
        "c.yaml:7: routes[2].upstreams: at least one upstream needs a weight > 0",
        "c.yaml:14: routes[4].path: duplicate route path '/v1/responses' (first at line 12)",
        "c.yaml:19: routes[5].upstreams[1].target: upstream 'a.example.com' is already listed "
        "at line 18",
        "c.yaml:20: routes[6].path: is required",
        "c.yaml:20: routes[6].upstreams[0].target: is required",
    ]


def test_cross_format_routes_translate_on_chat_and_messages_only(tmp_path: pathlib.Path) -> None:
    text = """\
        upstreams:
          claude: { url: https://api.anthropic.com, api_key: "${A_KEY:-}", default_max_tokens: 1000 }
          gpt: { url: https://api.openai.com, api_key: "${OPENAI_API_KEY:-}" }
        routes:
          - path: /v1/messages
            upstreams:
              - target: gpt
          - path: /v1/chat/completions
            upstreams:
              - target: claude
        """
    cfg = load(tmp_path, text)
    assert [r.format for r in cfg.routes] == ["anthropic", "openai"]
    assert cfg.routes[1].upstreams[0].upstream.default_max_tokens == 1000
    text = """\
        upstreams:
          gpt: { url: https://api.openai.com, api_key: "${O_KEY:-}", default_max_tokens: 10 }
          fwd: { url: http://127.0.0.1:9, format: openai, forward_client_auth: true }
        routes:
          - path: /v1/passthrough
            upstreams:
              - target: api.anthropic.com
          - path: /v1/embeddings
            upstreams:
              - target: api.anthropic.com
          - path: /v1/messages
            upstreams:
              - target: fwd
          - path: /v1/messages
            model: m
            upstreams:
              - target: http://127.0.0.1:9
        """
    assert problems(tmp_path, text) == [
        "c.yaml:2: upstreams.gpt.default_max_tokens: only applies to format: anthropic",
        "c.yaml:7: routes[0].upstreams[0].target: route path /v1/passthrough serves OpenAI "
        "format but upstream 'api.anthropic.com' is anthropic; only chat completions and "
        "messages routes translate between formats",
        "c.yaml:10: routes[1].upstreams[0].target: route path /v1/embeddings serves OpenAI "
        "format but upstream 'api.anthropic.com' is anthropic; only chat completions and "
        "messages routes translate between formats",
        "c.yaml:13: routes[2].upstreams[0].target: upstream 'fwd' is openai and forwards the "
        "client's credential, which is an Anthropic one on this route; give it an api_key to "
        "translate",
        "c.yaml:17: routes[3].upstreams[0].target: route path /v1/messages serves Anthropic "
        "format but inline target '127.0.0.1:9' is assumed openai; to translate, declare it "
        "under upstreams: with its format",
    ]


def test_explicit_format_overrides_well_known_host(tmp_path: pathlib.Path) -> None:
    # Anthropic's OpenAI-compatible endpoint: same host, openai format, stated explicitly.
    cfg = load(
        tmp_path,
        """\
        upstreams:
          claude-compat: { url: "https://api.anthropic.com/v1/..", format: openai }
        routes: [{ path: /v1/chat/completions, upstreams: [{ target: claude-compat }] }]
        """,
    )
    assert cfg.routes[0].upstreams[0].upstream.format == "openai"


def test_targets_that_are_neither_names_nor_hosts(tmp_path: pathlib.Path) -> None:
    text = """\
        upstreams:
          claude: { url: https://api.anthropic.com }
        routes:
          - path: /v1/messages
            upstreams:
              - target: claud
              - target: ftp://files.example.com
              - target: https://user:pw@api.example.com
              - target: "http://a.example.com/?x=1"
              - target: "https://a.example.com:99999"
              - target: 42
        """
    assert problems(tmp_path, text) == [
        "c.yaml:6: routes[0].upstreams[0].target: 'claud' is not a named upstream (did you "
        "mean 'claude'?) nor a host (a bare host needs a dot or a port, or write a URL); named "
        "upstreams: claude",
        "c.yaml:7: routes[0].upstreams[1].target: URL scheme must be http or https, got 'ftp'",
        "c.yaml:8: routes[0].upstreams[2].target: credentials in the URL are not allowed; use "
        "api_key: ${VAR}",
        "c.yaml:9: routes[0].upstreams[3].target: must not have a query or fragment, got "
        "'http://a.example.com/?x=1'",
        "c.yaml:10: routes[0].upstreams[4].target: port must be 1..65535 in "
        "'https://a.example.com:99999'",
        "c.yaml:11: routes[0].upstreams[5].target: must be a string, got 42",
    ]


def test_named_upstream_rules(tmp_path: pathlib.Path) -> None:
    text = """\
        upstreams:
          no-url: { format: openai }
          missing-ca:
            url: https://x.example.com
            ca_bundle: certs/nope.pem
          plain-ca:
            url: http://x.example.com
            ca_bundle: c.yaml
          openai-version:
            url: https://x.example.com
            anthropic_version: "2023-06-01"
          both-creds:
            url: https://x.example.com
            api_key: ${KEY}
            forward_client_auth: true
          "bad name":
            url: https://x.example.com
          bare: { url: x.example.com }
          not-a-mapping: https://x.example.com
        """
    assert problems(tmp_path, text, env={"KEY": SECRET}) == [
        "c.yaml:2: upstreams.no-url.url: is required",
        # problems() strips the tmp dir: the message holds the resolved absolute path.
        "c.yaml:5: upstreams.missing-ca.ca_bundle: file not found: 'certs/nope.pem'",
        "c.yaml:8: upstreams.plain-ca.ca_bundle: only applies to https upstreams",
        "c.yaml:11: upstreams.openai-version.anthropic_version: only applies to format: anthropic",
        "c.yaml:15: upstreams.both-creds.forward_client_auth: cannot be true when api_key is "
        "set; choose one credential",
        'c.yaml:16: upstreams["bad name"]: upstream names use letters, digits and . _ : - '
        "(starting with a letter or digit)",
        "c.yaml:18: upstreams.bare.url: must be a URL starting with http:// or https://, got "
        "'x.example.com'",
        "c.yaml:19: upstreams.not-a-mapping: must be a mapping, got a string",
    ]


def test_middleware_rules(tmp_path: pathlib.Path) -> None:
    text = """\
        routes:
          - path: /v1/chat/completions
            upstreams: [{target: a.example.com}]
            middleware:
              - type: rate_limiter
              - type: token_limiter
              - type: token_limiter
                config: { limit: 0, period: 1m }
              - type: token_limiter
                config: { limit: 10 }
              - type: metrics_collector
                config: { provider: statsd }
              - config: {}
              - type: metrics_collector
              - type: metrics_collector
        """
    assert problems(tmp_path, text) == [
        "c.yaml:5: routes[0].middleware[0].type: unknown middleware type 'rate_limiter'; "
        "known: metrics_collector, token_limiter",
        "c.yaml:6: routes[0].middleware[1].config: is required (limit, period)",
        "c.yaml:8: routes[0].middleware[2].config.limit: must be an integer >= 1, got 0",
        "c.yaml:10: routes[0].middleware[3].config.period: is required",
        "c.yaml:12: routes[0].middleware[4].config.provider: must be one of prometheus, got "
        "'statsd'",
        "c.yaml:13: routes[0].middleware[5].type: is required",
        "c.yaml:15: routes[0].middleware[7].type: metrics_collector twice",
    ]


def test_limits_water_marks_must_be_ordered(tmp_path: pathlib.Path) -> None:
    text = """\
        limits:
          write_high_water: 64KiB
          write_low_water: 128KiB
        """
    assert only_problem(tmp_path, text) == (
        "c.yaml:3: limits.write_low_water: write_low_water (131072) must not exceed "
        "write_high_water (65536)"
    )


def test_request_deadlines_and_header_count_load_and_are_checked(
        tmp_path: pathlib.Path) -> None:
    cfg = load(tmp_path, "timeouts:\n  request_head: 5s\n  request_body: 2m\n"
                         "limits:\n  max_headers: 50\n")
    assert (cfg.timeouts.request_head, cfg.timeouts.request_body) == (5.0, 120.0)
    assert cfg.limits.max_headers == 50
    defaults = load(tmp_path, "listen: :8080\n")
    assert (defaults.timeouts.request_head, defaults.timeouts.request_body,
            defaults.limits.max_headers) == (10.0, 60.0, 100)
    found = problems(tmp_path, "timeouts:\n  request_head: 0s\nlimits:\n  max_headers: 0\n")
    assert [f.split(": ")[0:2] for f in found] == [["c.yaml:2", "timeouts.request_head"],
                                                   ["c.yaml:4", "limits.max_headers"]], found


def test_missing_tokenizer_dir(tmp_path: pathlib.Path) -> None:
    path = write(tmp_path, "tokenizer:\n  dir: ./nope\n")
    [err] = validate_config_file(path)
    assert str(err) == f"{path}:2: tokenizer.dir: directory not found: '{tmp_path}/nope'"


def test_duplicate_keys_are_errors(tmp_path: pathlib.Path) -> None:
    text = """\
        workers: 2
        meter:
          db: a.db
          db: b.db
        workers: 3
        """
    assert problems(tmp_path, text) == [
        "c.yaml:4: meter.db: duplicate key (first at line 3)",
        "c.yaml:5: workers: duplicate key (first at line 1)",
    ]


def test_yaml_syntax_error_has_line(tmp_path: pathlib.Path) -> None:
    text = """\
        listen: :8080
        routes:
          - path: /v1/chat/completions
            upstreams: [{ target: a.example.com }
        meter:
          db: x
        """
    [msg] = problems(tmp_path, text)
    assert msg.startswith("c.yaml:5: <yaml>: invalid YAML: ")
    assert "line 4" in msg  # where the unclosed flow sequence started


def test_tab_indentation_is_a_yaml_error(tmp_path: pathlib.Path) -> None:
    [msg] = problems(tmp_path, "meter:\n\tdb: x\n")
    assert msg.startswith("c.yaml:2: <yaml>: invalid YAML: found character '\\t'")


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("", "the file is empty; expected a mapping"),
        ("# only a comment\n", "the file is empty; expected a mapping"),
        ("- path: /x\n", "the file must be a mapping, got a list"),
        ("just text\n", "the file must be a mapping, got a string"),
    ],
)
def test_empty_or_non_mapping_file_is_line_1(
    tmp_path: pathlib.Path, text: str, problem: str
) -> None:
    assert only_problem(tmp_path, text) == f"c.yaml:1: <root>: {problem}"


def test_unreadable_file(tmp_path: pathlib.Path) -> None:
    path = str(tmp_path / "missing.yaml")
    [err] = validate_config_file(path)
    assert str(err) == f"{path}: <root>: cannot read the file: No such file or directory"
    (tmp_path / "latin1.yaml").write_bytes(b"workers: 1\nname: caf\xe9\n")
    [err] = validate_config_file(tmp_path / "latin1.yaml")
    assert (err.line, err.problem) == (2, "the file is not valid UTF-8")


def test_all_errors_collected_in_line_order(tmp_path: pathlib.Path) -> None:
    text = """\
        workers: 0
        routes:
          - path: /v1/chat/completions
            upstreams: [{target: a.example.com, weight: -1}]
        meter: { queue_size: 0 }
        """
    path = write(tmp_path, text)
    errors = validate_config_file(path)
    assert [(e.line, e.field) for e in errors] == [
        (1, "workers"),
        (4, "routes[0].upstreams[0].weight"),
        (5, "meter.queue_size"),
    ]
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.line == 1  # load_config raises the first one


def test_upstream_with_no_body_still_needs_url(tmp_path: pathlib.Path) -> None:
    assert problems(tmp_path, "upstreams:\n  u:\n  v: {url: 'http://v.internal'}\n") == [
        "c.yaml:2: upstreams.u.url: is required"
    ]


def test_bad_merge_key(tmp_path: pathlib.Path) -> None:
    found = problems(tmp_path, "upstreams:\n  u:\n    url: http://u.internal\n    <<: 5\n")
    assert found[0] == (
        "c.yaml:4: upstreams.u: bad merge key (<<): expected a mapping or list of mappings for "
        "merging, but found scalar"
    )


@settings(max_examples=300, deadline=None)
@given(
    edits=st.lists(
        st.tuples(
            st.integers(min_value=0, max_value=len(MIGRATION) - 1),
            st.sampled_from([*" :-{}[],'\"\n#&*!|>$@?\t0a/.", "${", "<<: ", "- ", ""]),
        ),
        min_size=1,
        max_size=6,
    )
)
def test_mangled_config_gives_config_errors_never_crashes(edits: list[tuple[int, str]]) -> None:
    text = MIGRATION
    for pos, piece in edits:
        text = text[:pos] + piece + text[pos + 1 :]
    # validate_config_text is what `sidecar check` relies on: only ConfigErrors, never a raise.
    for err in validate_config_text(text, "m.yaml", env={}, base_dir="/nonexistent"):
        assert isinstance(err, ConfigError)
        assert err.line is None or 1 <= err.line <= text.count("\n") + 2


def test_unsupported_yaml_tags(tmp_path: pathlib.Path) -> None:
    assert only_problem(tmp_path, "workers: !!python/name:os.system 1\n") == (
        "c.yaml:1: workers: must be an integer >= 1, got a value with unsupported YAML tag "
        "'tag:yaml.org,2002:python/name:os.system'"
    )


# --------------------------------------------------------------------------- secrets


def test_api_key_is_not_in_repr(tmp_path: pathlib.Path) -> None:
    cfg = load(
        tmp_path,
        """\
        upstreams:
          u: { url: https://u.example.com, api_key: "${KEY}" }
        routes: [{ path: /v1/chat/completions, upstreams: [{ target: api.openai.com }] }]
        """,
        env={"KEY": SECRET, "OPENAI_API_KEY": SECRET},
    )
    assert cfg.upstreams["u"].api_key == SECRET
    assert cfg.upstreams["api.openai.com"].api_key == SECRET
    assert SECRET not in repr(cfg)
    assert SECRET not in str(cfg)


def test_literal_api_key_is_rejected_without_echoing_it(tmp_path: pathlib.Path) -> None:
    text = f"""\
        upstreams:
          u:
            url: https://u.example.com
            api_key: {SECRET}
        """
    msg = only_problem(tmp_path, text)
    assert msg == (
        "c.yaml:4: upstreams.u.api_key: must come from the environment, e.g. ${OPENAI_API_KEY}; "
        "a literal key in the file is not allowed (the value is not shown)"
    )
    assert only_problem(tmp_path, "upstreams:\n  u: {url: 'http://u.x', api_key: 12345}\n") == (
        "c.yaml:2: upstreams.u.api_key: must be a string from the environment, got an integer "
        "(not shown)"
    )


def test_values_from_env_are_never_echoed(tmp_path: pathlib.Path) -> None:
    text = """\
        workers: ${W}
        routes:
          - path: /x
            upstreams: [{ target: a.example.com, weight: "${W}" }]
        """
    found = problems(tmp_path, text, env={"W": SECRET})
    assert found == [
        "c.yaml:1: workers: must be an integer >= 1, got the value of '${W}' (not shown)",
        "c.yaml:4: routes[0].upstreams[0].weight: must be an integer >= 0, got the value of "
        "'${W}' (not shown)",
    ]


def test_yaml_error_does_not_quote_the_line(tmp_path: pathlib.Path) -> None:
    text = f"upstreams:\n  u:\n    api_key: {SECRET}: oops\n"
    [msg] = problems(tmp_path, text)
    assert msg.startswith("c.yaml:3: <yaml>: invalid YAML")
    assert SECRET not in msg


# --------------------------------------------------------------------------- shipped files


def test_example_config_loads_and_states_the_defaults() -> None:
    cfg = load_config(CONF / "sidecar.example.yaml", env={})
    assert (cfg.listen_host, cfg.listen_port, cfg.workers) == ("127.0.0.1", 8080, 1)
    # The example documents the defaults; it must not drift from them.
    assert cfg.limits == LimitsConfig()
    assert cfg.timeouts == TimeoutsConfig()
    defaults = MeterConfig()
    assert cfg.meter == MeterConfig(
        db=str(CONF / "meter.db"),
        queue_size=defaults.queue_size,
        batch_rows=defaults.batch_rows,
        flush_ms=defaults.flush_ms,
    )
    claude = cfg.upstreams["claude"]
    assert claude == UpstreamConfig(
        name="claude",
        url="https://api.anthropic.com",
        scheme="https",
        host="api.anthropic.com",
        port=443,
        format="anthropic",
    )
    assert [r.path for r in cfg.routes] == ["/v1/chat/completions", "/v1/messages"]
    assert cfg.upstreams["local-vllm"].base_path == "/openai"


def test_example_config_takes_keys_from_env() -> None:
    cfg = load_config(CONF / "sidecar.example.yaml", env={"ANTHROPIC_API_KEY": SECRET})
    assert cfg.upstreams["claude"].api_key == SECRET


def test_parse_config_text_resolves_against_base_dir(tmp_path: pathlib.Path) -> None:
    cfg = parse_config_text("meter: { db: m.db }\n", "inline.yaml", env={}, base_dir=str(tmp_path))
    assert cfg.meter.db == str(tmp_path / "m.db")
    with pytest.raises(ConfigError) as info:
        parse_config_text("workers: x\n", "<stdin>", env={})
    assert str(info.value) == "<stdin>:1: workers: must be an integer >= 1, got 'x'"


# --------------------------------------------------------------------------- failover keys

FAILOVER_ROUTE = """\
routes:
  - path: /v1/chat/completions
    upstreams:
      - target: http://127.0.0.1:9000
      - target: http://127.0.0.1:9001
"""


def test_failover_keys_load_and_default(tmp_path: pathlib.Path) -> None:
    plain = load(tmp_path, FAILOVER_ROUTE).routes[0]
    assert (plain.strategy, plain.retry_on, plain.max_attempts, plain.retry_budget) == (
        "weighted", None, 3, 0.2)
    cfg = load(tmp_path, FAILOVER_ROUTE + "    strategy: priority\n"
               "    retry_on: [connect, 429, 503, first_byte_timeout]\n"
               "    max_attempts: 2\n    retry_budget: 0.5\n")
    r = cfg.routes[0]
    assert r.strategy == "priority" and r.max_attempts == 2 and r.retry_budget == 0.5
    assert r.retry_on == ("connect", "429", "503", "first_byte_timeout")


@pytest.mark.parametrize(("line", "problem"), [
    ("    strategy: fastest\n",
     "c.yaml:6: routes[0].strategy: must be one of weighted, priority, least_inflight, latency"),
    ("    retry_on: [429, 418]\n", "c.yaml:6: routes[0].retry_on: must be one of connect,"),
    ("    retry_on: 429\n", "c.yaml:6: routes[0].retry_on: must be a list of connect,"),
    ("    max_attempts: 0\n", "c.yaml:6: routes[0].max_attempts: must be an integer >= 1"),
    ("    retry_budget: 1.5\n", "c.yaml:6: routes[0].retry_budget: must be a number from 0 to 1"),
    ("    on_client_disconnect: wait\n",
     "c.yaml:6: routes[0].on_client_disconnect: must be one of abort, drain, got 'wait'"),
])
def test_bad_failover_keys_name_file_line_and_field(
        tmp_path: pathlib.Path, line: str, problem: str) -> None:
    assert only_problem(tmp_path, FAILOVER_ROUTE + line).startswith(problem)


# -- routing and avalanche keys -------------------------------------------------------

def test_model_routes_rename_gate_health_check_and_tiers_load(tmp_path: pathlib.Path) -> None:
    cfg = load(tmp_path, """\
        trusted_peers: [127.0.0.1, "10.0.0.0/8", "::1"]
        tiers: [enterprise, pro, free]
        upstreams:
          primary:
            url: http://127.0.0.1:9001
            max_concurrent: 8
            max_queue: 20
            queue_timeout: 2s
            health_check: { path: /health, interval: 5s, timeout: 1s }
        routes:
          - path: /v1/chat/completions
            model: [gpt-4o, "gpt-4o-*"]
            upstreams:
              - { target: primary }
              - { target: http://127.0.0.1:9002, model: deepseek-chat }
          - path: /v1/chat/completions
            upstreams: [{ target: primary }]
        """)
    assert cfg.trusted_peers == ("127.0.0.1/32", "10.0.0.0/8", "::1/128")
    assert cfg.tiers == ("enterprise", "pro", "free")
    up = cfg.upstreams["primary"]
    assert (up.max_concurrent, up.max_queue, up.queue_timeout) == (8, 20, 2.0)
    assert up.health_check is not None
    assert (up.health_check.path, up.health_check.interval, up.health_check.timeout) == (
        "/health", 5.0, 1.0)
    first, fallback = cfg.routes
    assert first.models == ("gpt-4o", "gpt-4o-*") and fallback.models == ()
    assert [ru.model for ru in first.upstreams] == [None, "deepseek-chat"]
    assert cfg.route_for("/v1/chat/completions") is first
    assert cfg.upstreams["127.0.0.1:9002"].max_concurrent is None  # default: no limit


def test_routing_key_problems(tmp_path: pathlib.Path) -> None:
    text = """\
        trusted_peers: [nginx.local]
        tiers: [pro, pro]
        upstreams:
          u:
            url: http://u.internal
            max_concurrent: 0
            health_check: { path: health, interval: 1s, timeout: 2s }
        routes:
          - path: /v1/chat/completions
            upstreams: [{ target: u }]
          - path: /v1/chat/completions
            model: gpt-4o
            upstreams: [{ target: u, model: "gpt-*" }]
          - path: /v1/embeddings
            model: [text-embedding-3-small]
            upstreams: [{ target: u }]
          - path: /v1/embeddings
            model: text-embedding-3-small
            upstreams: [{ target: u }]
        """
    assert problems(tmp_path, text) == [
        "c.yaml:1: trusted_peers: must be an IP address or CIDR network, got 'nginx.local'",
        "c.yaml:2: tiers: tier 'pro' is listed twice",
        "c.yaml:6: upstreams.u.max_concurrent: must be an integer >= 1, got 0",
        "c.yaml:7: upstreams.u.health_check.path: must start with '/' and contain no "
        "spaces, '?' or '#', got 'health'",
        "c.yaml:13: routes[1].upstreams[0].model: must be the model name sent to this "
        "upstream, got 'gpt-*'",
        "c.yaml:17: routes[3].path: duplicate route for models text-embedding-3-small on "
        "path '/v1/embeddings' (first at line 14)",
    ]
    # A route serving every model on a path shadows those after it.
    text = """\
        routes:
          - path: /v1/chat/completions
            upstreams: [{ target: http://127.0.0.1:9 }]
          - path: /v1/chat/completions
            model: gpt-4o
            upstreams: [{ target: http://127.0.0.1:9 }]
        """
    assert problems(tmp_path, text) == [
        "c.yaml:4: routes[1].path: unreachable: the route at line 2 serves every model on "
        "'/v1/chat/completions'; put model-matched routes before it",
    ]
    text = """\
        upstreams:
          u: { url: "http://u.internal", health_check: { interval: 1s, timeout: 1s } }
        routes: [{ path: /x, upstreams: [{ target: u }] }]
        """
    assert problems(tmp_path, text) == [
        "c.yaml:2: upstreams.u.health_check.timeout: must be shorter than interval "
        "(1s >= 1s)",
    ]


def test_redis_timeout_loads_and_names_its_line_when_bad(tmp_path: pathlib.Path) -> None:
    assert load(tmp_path, FAILOVER_ROUTE).limits.redis_timeout == 0.5
    cfg = load(tmp_path, FAILOVER_ROUTE + "limits:\n  redis_timeout: 2s\n")
    assert cfg.limits.redis_timeout == 2.0
    problem = only_problem(tmp_path, FAILOVER_ROUTE + "limits:\n  redis_timeout: soon\n")
    assert problem.startswith("c.yaml:7: limits.redis_timeout: "), problem


def test_disconnect_policy_and_its_caps_load_with_defaults(tmp_path: pathlib.Path) -> None:
    plain = load(tmp_path, FAILOVER_ROUTE)
    assert plain.routes[0].on_client_disconnect == "abort"
    assert (plain.timeouts.drain, plain.limits.max_drains) == (60.0, 64)
    cfg = load(tmp_path, FAILOVER_ROUTE + "    on_client_disconnect: drain\n"
               "timeouts: { drain: 2m }\nlimits: { max_drains: 0 }\n")
    assert cfg.routes[0].on_client_disconnect == "drain"
    assert (cfg.timeouts.drain, cfg.limits.max_drains) == (120.0, 0)
    assert only_problem(tmp_path, FAILOVER_ROUTE + "limits: { max_drains: -1 }\n").startswith(
        "c.yaml:6: limits.max_drains: must be an integer >= 0, got -1")
