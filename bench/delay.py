"""A TCP relay that holds every byte for a fixed time in each direction: a link's latency, in userspace.

For kernels without ``netem`` (``tc`` then cannot delay packets): the relay accepts connections,
opens one to ``upstream`` for each, and forwards what each side sends after ``delay`` seconds.
What the two ends see is a round trip longer by twice ``delay``: every request and its answer, and
gRPC's flow-control updates. TCP's own congestion window sees only the hops on either side of the
relay, so its slow start is not delayed.

    python -m bench.delay LISTEN_HOST LISTEN_PORT UPSTREAM_HOST UPSTREAM_PORT DELAY_MS READY_FILE
"""
from __future__ import annotations

import collections
import json
import socket
import sys
import threading
import time
from pathlib import Path

READ_BYTES = 256 * 1024


def _forward(source: socket.socket, target: socket.socket, delay: float) -> None:
    """Moves what ``source`` sends to ``target``, each piece ``delay`` seconds after it arrived (the pieces
    due by then go in one send); passes the end of the stream on the same way."""
    pending: collections.deque[tuple[float, bytes]] = collections.deque()
    ready = threading.Condition()

    def send() -> None:
        while True:
            with ready:
                ready.wait_for(lambda: pending)
                due = pending[0][0]
            wait = due - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            with ready:
                now, batch = time.monotonic(), []
                while pending and pending[0][0] <= now:
                    batch.append(pending.popleft()[1])
            try:
                target.sendall(b"".join(batch))
                if not batch[-1]:
                    target.shutdown(socket.SHUT_WR)
                    return
            except OSError:
                return

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    while True:
        try:
            data = source.recv(READ_BYTES)
        except OSError:
            data = b""
        with ready:
            pending.append((time.monotonic() + delay, data))
            ready.notify()
        if not data:
            break
    sender.join()


def _relay(client: socket.socket, upstream: tuple[str, int], delay: float) -> None:
    with client, socket.create_connection(upstream) as server:
        for sock in (client, server):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        back = threading.Thread(target=_forward, args=(server, client, delay), daemon=True)
        back.start()
        _forward(client, server, delay)
        back.join()


def serve(listen: tuple[str, int], upstream: tuple[str, int], delay: float, ready_file: Path) -> None:
    with socket.create_server(listen, backlog=64) as listener:
        ready_file.write_text(json.dumps({"port": listener.getsockname()[1]}))
        while True:
            client, _ = listener.accept()
            threading.Thread(target=_relay, args=(client, upstream, delay), daemon=True).start()


if __name__ == "__main__":
    listen_host, listen_port, upstream_host, upstream_port, delay_ms, ready = sys.argv[1:]
    serve((listen_host, int(listen_port)), (upstream_host, int(upstream_port)), float(delay_ms) / 1000, Path(ready))
