"""A TCP proxy on loopback that tests put between two real nodes.

It can slow what flows back to the client (to catch a transfer mid-stream), record every
byte both ways (to look for plaintext on the wire), and cut and heal the link (a
network partition).
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time

from tests.support.nodes import free_port

# A small receive window towards the target keeps the sender from parking megabytes in
# kernel buffers while the proxy throttles, so "slow" really is slow at the sender.
_TARGET_RCVBUF = 65536


class TcpProxy:
    """Forward ``127.0.0.1:port`` to ``127.0.0.1:target_port``."""

    def __init__(
        self,
        target_port: int,
        port: int | None = None,
        rate: float | None = None,
        record: bool = False,
    ) -> None:
        self.target_port = target_port
        self.port = port or free_port()
        self.rate = rate  # bytes/s towards the client; None: full speed
        self.record = record
        self.upstream = bytearray()  # client -> target, when recording
        self.downstream = bytearray()  # target -> client, when recording
        self.downstream_bytes = 0
        self.open = True
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()
        self._listener = socket.create_server(("127.0.0.1", self.port))
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if not self.open:
                client.close()
                continue
            target = socket.socket()
            try:
                target.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _TARGET_RCVBUF)
                target.connect(("127.0.0.1", self.target_port))
            except OSError:
                target.close()
                client.close()
                continue
            with self._lock:
                self._sockets |= {client, target}
            threading.Thread(target=self._pump, args=(client, target, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(target, client, True), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, down: bool) -> None:
        try:
            while data := source.recv(16384 if down and self.rate else 262144):
                with self._lock:
                    if down:
                        self.downstream_bytes += len(data)
                    if self.record:
                        (self.downstream if down else self.upstream).extend(data)
                sink.sendall(data)
                rate = self.rate
                if down and rate:
                    time.sleep(len(data) / rate)
        except OSError:
            pass
        finally:
            for s in (source, sink):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                s.close()
                with self._lock:
                    self._sockets.discard(s)

    def captured(self) -> bytes:
        """Every byte recorded so far, both directions."""
        with self._lock:
            return bytes(self.upstream) + bytes(self.downstream)

    def cut(self) -> None:
        """Refuse new connections and drop the open ones (kept-alive ones included)."""
        self.open = False
        with self._lock:
            sockets = list(self._sockets)
        for s in sockets:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def heal(self) -> None:
        self.open = True

    def stop(self) -> None:
        self._listener.close()
        self.cut()
