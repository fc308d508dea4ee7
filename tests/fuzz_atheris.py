"""Coverage-guided fuzzing of the parsers with atheris (libFuzzer for Python).

The same targets as the hypothesis tests (tests/fuzz_targets.py), fed raw bytes that
libFuzzer mutates towards new coverage of the instrumented sidecar modules. The first
bytes of each input choose the target, where to cut the rest into reads, and the
target's options; the rest is the payload.

    python tests/fuzz_atheris.py -max_total_time=60            # all targets, mixed
    python tests/fuzz_atheris.py --target tap -runs=200000     # one target
    python tests/fuzz_atheris.py -max_total_time=600 corpus/   # keep a corpus

libFuzzer options are passed through (-runs, -max_total_time, -timeout, -seed...).
A failing input is written as crash-<sha1> in the working directory (-artifact_prefix=
to put it elsewhere) and the run exits non-zero; replay it with
``python tests/fuzz_atheris.py crash-<sha1>``. tests/test_fuzz_atheris.py runs a bounded
pass of this in the test suite when atheris is installed (``pip install atheris``).
"""

from __future__ import annotations

import os
import sys

import atheris

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

with atheris.instrument_imports(include=["sidecar"]):
    import fuzz_targets as T

NAMES = sorted(T.TARGETS)
# A well-formed case per target, checked once before fuzzing (libFuzzer finds the rest).
SEEDS = {
    "request_reader": b"POST /v1/chat/completions HTTP/1.1\r\nHost: a\r\nContent-Length: 2"
                      b"\r\n\r\n{}GET / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
                      b"2\r\nab\r\n0\r\n\r\n",
    "response_parser": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                       b"a\r\ndata: x\n\n\r\n0\r\n\r\n",
    "tap": b'data: {"choices":[{"delta":{"content":"hi"}}],"usage":null}\n\n'
           b'data: {"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":4}}\n\n'
           b"data: [DONE]\n\n",
    "json_edit": b'{"model":"m","stream":true,"stream_options":{"x":1},"n":1E2}',
}
SEEDS["client_side"] = SEEDS["request_reader"]
SEEDS["stripper"] = SEEDS["tap"]
SEEDS["scrub"] = (b"\x07sk-abc12" + b"\x00" * 28
                  + b'{"error":{"message":"Incorrect API key provided: sk-abc12"}}')


def run_one(name: str, fdp: atheris.FuzzedDataProvider) -> None:
    cuts = [fdp.ConsumeIntInRange(0, 1 << 12) for _ in range(fdp.ConsumeIntInRange(0, 8))]
    if name == "tap":
        flags = fdp.ConsumeIntInRange(0, 255)
        caps = (64, 300, 4096, 1 << 20)
        data = fdp.ConsumeBytes(fdp.remaining_bytes())
        T.tap_target(data, cuts, endpoint=flags % 6, stream=bool(flags & 8),
                     body_cap=caps[(flags >> 4) & 3], counter=bool(flags & 64),
                     peek=bool(flags & 128), views=bool(flags & 1))
        return
    data = fdp.ConsumeBytes(fdp.remaining_bytes())
    if name == "request_reader":
        T.request_reader_target(data, cuts)
    elif name == "client_side":
        T.client_side_target(data, cuts)
    elif name == "response_parser":
        T.response_parser_target(data, cuts)
        T.response_body_start(data)
    elif name == "stripper":
        T.stripper_target(data, cuts)
    elif name == "scrub":
        T.TARGETS["scrub"](data, cuts)
    elif name == "json_edit":
        T.json_edit_target(data)


def main() -> None:
    only = None
    argv = list(sys.argv)
    if "--target" in argv:
        i = argv.index("--target")
        only = argv[i + 1]
        del argv[i:i + 2]
        if only not in T.TARGETS:
            raise SystemExit(f"--target: one of {', '.join(NAMES)}")

    def test_one_input(data: bytes) -> None:
        fdp = atheris.FuzzedDataProvider(data)
        name = only or NAMES[fdp.ConsumeIntInRange(0, len(NAMES) - 1)]
        run_one(name, fdp)

    # The well-formed seeds go through their targets once before fuzzing starts.
    for name in NAMES:
        if only in (None, name):
            T.TARGETS[name](SEEDS[name], [7, 30])
    atheris.Setup(argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
