"""sidecar.scrub: which credentials a request's error answer must not echo, and the
masking filter, whatever the split of the body into pieces (pure)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.scrub import MIN_SECRET_BYTES, SecretScrubber, mask, request_secrets

KEY = b"sk-provider-0123456789abcdef"
CLIENT = b"sk-client-ABCDEFGHIJ"


def test_request_secrets_are_the_upstream_key_and_the_clients_credentials() -> None:
    headers = [(b"authorization", b"Bearer " + CLIENT), (b"x-api-key", b"xk-12345678"),
               (b"content-type", b"application/json"), (b"api-key", b"short")]
    found = request_secrets(KEY.decode(), headers)
    assert KEY in found and CLIENT in found and b"Bearer " + CLIENT in found
    assert b"xk-12345678" in found
    assert b"short" not in found  # under MIN_SECRET_BYTES: not a real key
    assert all(len(s) >= MIN_SECRET_BYTES for s in found)
    assert list(found) == sorted(found, key=len, reverse=True)
    assert request_secrets(None, [(b"content-type", b"application/json")]) == ()


def test_mask_keeps_length_and_shape() -> None:
    body = b'{"error":{"message":"Incorrect API key provided: ' + KEY + b'."}}'
    out = mask(body, (KEY,))
    assert KEY not in out and len(out) == len(body)
    assert out == body.replace(KEY, b"*" * len(KEY))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=200), max_size=12),
       st.integers(min_value=0, max_value=3))
def test_scrubber_masks_secrets_split_across_pieces_anyhow(cuts: list[int], n: int) -> None:
    body = b"x" * 7 + (b" key " + KEY + b" client " + CLIENT) * n + b" end"
    secrets = request_secrets(KEY.decode(), [(b"authorization", b"Bearer " + CLIENT)])
    f = SecretScrubber(secrets)
    points = sorted({min(c, len(body)) for c in cuts})
    pieces = [body[a:b] for a, b in zip([0, *points], [*points, len(body)], strict=True)]
    out = b"".join(f.feed(p) for p in pieces) + f.flush()
    assert out == mask(body, secrets)
    assert KEY not in out and CLIENT not in out and len(out) == len(body)


def test_scrubber_masks_what_an_inner_filter_outputs() -> None:
    class Upper:
        def feed(self, data: bytes) -> bytes:
            return data.upper()

        def flush(self) -> bytes:
            return b" TAIL " + KEY.upper()

    f = SecretScrubber((KEY.upper(),), Upper())
    out = f.feed(b"a " + KEY[:5]) + f.feed(KEY[5:]) + f.flush()
    assert KEY.upper() not in out and out.startswith(b"A ")
