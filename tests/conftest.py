"""Shared test set-up: offline tokenizer files and loopback helpers."""

from __future__ import annotations

import os
import pathlib

REPO = pathlib.Path(__file__).resolve().parent.parent
SHARED_TIKTOKEN = REPO.parent / "shared" / "tiktoken"

# Tests and CI run offline: encodings come from ../shared/tiktoken beside the checkout.
if "SIDECAR_TOKENIZER_DIR" not in os.environ and SHARED_TIKTOKEN.is_dir():
    os.environ["SIDECAR_TOKENIZER_DIR"] = str(SHARED_TIKTOKEN)


# ---------------------------------------------------------------------------
# An in-process stack (mock provider + sidecar) on its own uvloop thread, so sync
# clients such as the official openai SDK can drive it from the test thread.

import asyncio  # noqa: E402
import threading  # noqa: E402
from collections.abc import Callable, Iterator  # noqa: E402
from typing import Any  # noqa: E402

import pytest  # noqa: E402


class Stack:
    def __init__(self, tmp_path: pathlib.Path, mock_kwargs: dict[str, Any],
                 config_edit: Callable[[Any], Any] | None) -> None:
        self.tmp_path = tmp_path
        self.db = str(tmp_path / "meter.db")
        self._mock_kwargs = mock_kwargs
        self._config_edit = config_edit
        self.loop: asyncio.AbstractEventLoop | None = None
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._error: BaseException | None = None
        self.thread = threading.Thread(target=self._main, daemon=True)

    def _main(self) -> None:
        import uvloop

        try:
            uvloop.run(self._serve())
        except BaseException as exc:  # surfaced to the test thread in start()/stop()
            self._error = exc
            self._ready.set()

    async def _start_upstreams(self) -> Any:
        """Start the provider(s) on the loop; return the sidecar's config for them."""
        from sidecar.demo import _demo_config
        from sidecar.mock import MockUpstream

        self.mock = MockUpstream(host="127.0.0.1", port=0, **self._mock_kwargs)
        await self.mock.start()
        return _demo_config(self.mock.port, self.db)

    async def _stop_upstreams(self) -> None:
        await self.mock.stop()

    async def _serve(self) -> None:
        from sidecar.server import Server

        self.loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        config = await self._start_upstreams()
        if self._config_edit is not None:
            config = self._config_edit(config)
        self.server = Server(config)
        await self.server.start()
        self.port = self.server.port
        self.url = f"http://127.0.0.1:{self.port}"
        self._ready.set()
        try:
            await self._stop.wait()
        finally:
            await self.server.stop()
            await self._stop_upstreams()

    def start(self) -> Stack:
        self.thread.start()
        if not self._ready.wait(15) or self._error is not None:
            raise RuntimeError(f"stack did not start: {self._error!r}")
        return self

    def call(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on the stack's loop thread and return its result."""
        assert self.loop is not None
        fut: asyncio.Future[Any] = asyncio.run_coroutine_threadsafe(_as_coro(fn), self.loop)  # type: ignore[arg-type]
        return fut.result(10)

    def stop(self) -> None:
        if self.loop is not None and self._stop is not None and self.thread.is_alive():
            self.loop.call_soon_threadsafe(self._stop.set)
        self.thread.join(30)
        if self._error is not None:
            raise self._error

    def rows(self, where: str = "1=1") -> list[dict[str, Any]]:
        from e2e_helpers import meter_rows

        return meter_rows(self.db, where)


async def _as_coro(fn: Callable[[], Any]) -> Any:
    return fn()


@pytest.fixture
def stack_factory(tmp_path: pathlib.Path) -> Iterator[Callable[..., Stack]]:
    made: list[Stack] = []

    def make(config_edit: Callable[[Any], Any] | None = None, **mock_kwargs: Any) -> Stack:
        s = Stack(tmp_path, mock_kwargs, config_edit).start()
        made.append(s)
        return s

    yield make
    for s in made:
        s.stop()
