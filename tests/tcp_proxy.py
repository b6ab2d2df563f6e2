"""A loopback TCP proxy that can lose the server's replies, for exactly-once tests.

After :meth:`drop_replies_after` the client has sent the bytes it names, every byte from the server
to the client is discarded, so a request reaches the server and is acted upon but its reply never
arrives (a push's ready frame, which comes before its gradient, still gets through); :meth:`cut`
then closes every connection (the client sees ``UNAVAILABLE``) and lets replies through again.
"""
from __future__ import annotations

import socket
import threading


class ReplyDroppingProxy:
    def __init__(self, target_port: int) -> None:
        self._target = ("127.0.0.1", target_port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self.address = f"127.0.0.1:{self.port}"
        self.dropping = threading.Event()
        self.dropped_bytes = 0
        self._forwarded = 0             # bytes from the client to the server
        self._drop_from: float = float("inf")
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self._target)
            with self._lock:
                self._sockets += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, True), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, is_reply: bool) -> None:
        try:
            while data := source.recv(65536):
                if is_reply and self._forwarded >= self._drop_from:
                    self.dropping.set()
                    self.dropped_bytes += len(data)
                    continue
                if not is_reply:
                    self._forwarded += len(data)
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def drop_replies_after(self, request_bytes: int) -> None:
        """Replies are dropped once the client has sent ``request_bytes`` more from now on."""
        self._drop_from = self._forwarded + request_bytes

    def cut(self) -> None:
        """Closes every connection through the proxy, then lets replies through again."""
        with self._lock:
            sockets, self._sockets = self._sockets, []
        for sock in sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()
        self.dropping.clear()
        self._drop_from = float("inf")

    def close(self) -> None:
        self._listener.close()
        self.cut()
