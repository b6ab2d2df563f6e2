"""``/metrics`` over HTTP from the server's event loop, with a bounded cost per peer.

prometheus_client's own server starts a thread for every connection and keeps it as long as the peer
keeps the connection, so a peer that opens many and sends nothing holds as many threads. Here a
connection is a coroutine; at most :data:`CONNECTIONS` are served at once (more are closed at once),
each must send its request head (at most :data:`MAX_HEAD_BYTES`) and take its answer within
:data:`REQUEST_SECONDS`, and the connection is closed after one answer. The exposition itself is
prometheus_client's (``generate_latest``), run in a pool thread because the gauges read the state
under its lock.
"""
from __future__ import annotations

import asyncio

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

CONNECTIONS = 8
REQUEST_SECONDS = 5.0
MAX_HEAD_BYTES = 8192
PATHS = ("/metrics", "/")


async def serve_metrics(registry: CollectorRegistry, host: str, port: int) -> asyncio.Server:
    """Serves ``registry`` at ``http://host:port/metrics`` until the returned server is closed."""
    busy = 0

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal busy
        if busy >= CONNECTIONS:
            writer.close()
            return
        busy += 1
        try:
            async with asyncio.timeout(REQUEST_SECONDS):
                head = await reader.readuntil(b"\r\n\r\n")
                method, path, *_ = head.split(b"\r\n", 1)[0].decode("latin-1").split(" ") + ["", ""]
                if method != "GET" or path.split("?", 1)[0] not in PATHS:
                    writer.write(_response(b"404 Not Found", b"text/plain", b"the metrics are at GET /metrics\n"))
                else:
                    body = await asyncio.get_running_loop().run_in_executor(None, generate_latest, registry)
                    writer.write(_response(b"200 OK", CONTENT_TYPE_LATEST.encode(), body))
                await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            pass  # a peer that is slow, sends too much or goes away gets nothing more
        finally:
            busy -= 1
            writer.close()

    return await asyncio.start_server(answer, host, port, limit=MAX_HEAD_BYTES)


def _response(status: bytes, content_type: bytes, body: bytes) -> bytes:
    return b"".join((b"HTTP/1.1 ", status, b"\r\nContent-Type: ", content_type,
                     b"\r\nContent-Length: ", str(len(body)).encode(), b"\r\nConnection: close\r\n\r\n", body))
