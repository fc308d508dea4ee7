"""End to end: a sidecar out of file descriptors (issue 14, item 7).

uvloop's accept never reports EMFILE (libuv accepts and closes the waiting clients
itself), so a sidecar at its descriptor limit dropped clients without a word. It now
sizes its client connections from RLIMIT_NOFILE: past that, clients get a 503 and one
error line per burst is logged, and it serves again once they leave. Run in a child
process whose limit is lowered (the test process keeps its own).
"""

from __future__ import annotations

import pathlib
import resource
import socket
import subprocess
import sys
import time

from e2e_helpers import ClientConn, chat_body, request_bytes

from sidecar.fdlimit import FD_RESERVE, client_budget

NOFILE = 200
POOL_IDLE = 2  # per upstream; the demo config has two

CHILD = r"""
import asyncio, dataclasses, logging, resource, sys
resource.setrlimit(resource.RLIMIT_NOFILE, ({n}, {n}))
logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(name)s %(message)s")
import uvloop
from sidecar.demo import _demo_config
from sidecar.mock import MockUpstream
from sidecar.server import Server
import sidecar.fdlimit
sidecar.fdlimit.BURST_QUIET_S = 1.0  # the test waits for the end of the burst

async def main():
    mock = MockUpstream(host="127.0.0.1", port=0)
    await mock.start()
    config = _demo_config(mock.port, {db!r})
    ups = {{k: dataclasses.replace(u, pool_max_idle={idle}) for k, u in config.upstreams.items()}}
    routes = tuple(dataclasses.replace(r, upstreams=tuple(dataclasses.replace(
        ru, upstream=ups[ru.upstream.name]) for ru in r.upstreams)) for r in config.routes)
    server = Server(dataclasses.replace(config, upstreams=ups, routes=routes))
    await server.start()
    print(server.port, flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    await server.stop()
    await mock.stop()

uvloop.run(main())
"""


def test_past_the_descriptor_limit_clients_get_503_and_one_log_line(
        tmp_path: pathlib.Path) -> None:
    assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] >= 1000  # room for our sockets
    cap = client_budget(NOFILE, 2 * POOL_IDLE)
    assert cap == (NOFILE - FD_RESERVE - 2 * POOL_IDLE) // 2
    code = CHILD.format(n=NOFILE, db=str(tmp_path / "meter.db"), idle=POOL_IDLE)
    log = (tmp_path / "sidecar.log").open("w+b")
    child = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=log)
    held: list[socket.socket] = []
    try:
        assert child.stdout is not None
        port = int(child.stdout.readline())
        for _ in range(cap + 40):
            held.append(socket.create_connection(("127.0.0.1", port), timeout=5))
            time.sleep(0.002)  # accepted in this order
        time.sleep(1.0)
        answered = []
        for s in held:
            s.setblocking(False)
            try:
                answered.append(s.recv(4096))
            except BlockingIOError:
                answered.append(None)  # accepted and open
        # The first `cap` are held open; every one past them got a 503 and was closed.
        assert answered[:cap] == [None] * cap
        for data in answered[cap:]:
            assert data is not None and data.startswith(b"HTTP/1.1 503 "), data
            assert b'"code":"overloaded"' in data
        for s in held:
            s.close()
        held.clear()
        # Served again once the clients left (the descriptors came back).
        deadline = time.monotonic() + 10
        while True:
            with ClientConn(port) as c:
                c.send(request_bytes("POST", "/v1/chat/completions", chat_body()))
                if c.read_response().status == 200:
                    break
            assert time.monotonic() < deadline
            time.sleep(0.2)
        time.sleep(2.5)  # the burst is declared over 1 s (here) after its last refusal
    finally:
        for s in held:
            s.close()
        assert child.stdin is not None
        child.stdin.close()
        child.wait(30)
    log.seek(0)
    text = log.read().decode()
    errors = [ln for ln in text.splitlines()
              if ln.startswith("ERROR") and "out of file descriptors" in ln]
    assert len(errors) == 1, text[-3000:]
    assert f"RLIMIT_NOFILE {NOFILE} carries {cap}" in errors[0]
    assert any("burst over, 40 in it" in ln for ln in text.splitlines()), text[-3000:]
