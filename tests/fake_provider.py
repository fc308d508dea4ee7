"""A hand-written provider on loopback that answers with scripted bytes.

The mock provider (``sidecar.mock``) speaks correct HTTP; these tests need a
provider that does not: two responses in one write, a body that ends at the
close, an echo of the credentials it was sent. Each connection reads one request
(head, then a content-length body) and is answered by ``respond(request)``, which
returns the writes to make (bytes, or a float: seconds to sleep between writes)
and whether to close afterwards. Threads, not the sidecar's loop: the provider
must not share the code (or the loop) under test.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

# Bounds, so a test that goes wrong stops instead of hanging.
READ_TIMEOUT_S = 10.0
MAX_REQUEST_BYTES = 1 << 20


@dataclass
class Seen:
    head: bytes
    body: bytes

    def header(self, name: bytes) -> bytes | None:
        for line in self.head.split(b"\r\n")[1:]:
            k, _, v = line.partition(b":")
            if k.strip().lower() == name.lower():
                return v.strip()
        return None


Script = tuple[Sequence[bytes | float], bool]  # (writes and pauses, close after)


@dataclass
class FakeProvider:
    respond: Callable[[Seen], Script]
    seen: list[Seen] = field(default_factory=list)
    connections: int = 0

    def __post_init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.sock.settimeout(0.2)
        self.port = int(self.sock.getsockname()[1])
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._accept = threading.Thread(target=self._accept_loop, daemon=True)
        self._accept.start()

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.connections += 1
            t = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            self._threads.append(t)
            t.start()

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(READ_TIMEOUT_S)
        buf = b""
        try:
            while not self._stop.is_set():
                while b"\r\n\r\n" not in buf:
                    data = conn.recv(65536)
                    if not data or len(buf) > MAX_REQUEST_BYTES:
                        return
                    buf += data
                head, _, buf = buf.partition(b"\r\n\r\n")
                seen = Seen(head, b"")
                length = int(seen.header(b"content-length") or b"0")
                while len(buf) < length:
                    data = conn.recv(65536)
                    if not data:
                        return
                    buf += data
                seen.body, buf = buf[:length], buf[length:]
                self.seen.append(seen)
                writes, close = self.respond(seen)
                for w in writes:
                    if isinstance(w, float):
                        self._stop.wait(w)
                    else:
                        conn.sendall(w)
                if close:
                    return
        except OSError:
            return
        finally:
            conn.close()

    def stop(self) -> None:
        self._stop.set()
        self.sock.close()
        self._accept.join(5)
        for t in self._threads:
            t.join(5)


def chunk(payload: bytes) -> bytes:
    return b"%x\r\n%b\r\n" % (len(payload), payload)
