"""A peer that speaks HTTP/2 to a gRPC server by hand (with ``h2``), to do what no gRPC client does:
open calls whose request message never comes, comes in part, or is announced bigger than it is, and
read nothing of what the server sends back.

Each :class:`RawPeer` is one connection, driven by a thread of its own: it opens the calls it was
given, sends their data as fast as the server's flow-control windows let it, never acknowledges what
it receives (so the server's sends to it stall once its windows are full), and records how each call
ended. Loopback only.
"""
from __future__ import annotations

import select
import socket
import ssl
import struct
import threading
import time
from dataclasses import dataclass, field

import h2.config
import h2.connection
import h2.events
import h2.exceptions

from gapaware.common.security import bearer


def grpc_message(payload: bytes, announced: int | None = None) -> bytes:
    """``payload`` framed as a gRPC message: the uncompressed flag and a length, ``announced`` (the
    payload's own by default) whether or not that many bytes follow."""
    return struct.pack(">BI", 0, len(payload) if announced is None else announced) + payload


@dataclass
class RawCall:
    """A call to open: its method, the bytes to send after its headers, and whether to end its side."""

    method: str
    data: bytes = b""
    end: bool = False
    token: str | None = None
    stream_id: int = 0
    status: str | None = None         # grpc-status, or "reset" for a stream reset by the server
    message: str = ""                 # grpc-message
    ended_at: float | None = None     # time.monotonic() when the server ended it
    received: int = 0                 # response bytes received (never acknowledged)
    _unsent: memoryview = field(default=memoryview(b""), repr=False)


class RawPeer:
    """One connection to ``address`` that opens ``calls`` and keeps them going until :meth:`close`;
    over TLS when given the CA (a PEM file) that signed the server's certificate."""

    def __init__(self, address: str, calls: list[RawCall], tls_ca: str | None = None) -> None:
        host, port = address.rsplit(":", 1)
        self.address = address
        self.calls = calls
        self.opened_at: float | None = None
        self._sock = socket.create_connection((host, int(port)), timeout=10)
        if tls_ca is not None:
            context = ssl.create_default_context(cafile=str(tls_ca))
            context.set_alpn_protocols(["h2"])
            self._sock = context.wrap_socket(self._sock, server_hostname=host)
        self._settled = False  # the server's SETTINGS arrived: they say how many calls a connection may open
        self._h2 = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
        self._by_stream: dict[int, RawCall] = {}
        self._stop = threading.Event()
        self._opened = threading.Event()
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def wait_opened(self, timeout: float = 30) -> None:
        assert self._opened.wait(timeout), f"the calls were not opened: {self.error!r}"
        assert self.error is None, self.error

    def ended(self) -> list[RawCall]:
        return [call for call in self.calls if call.ended_at is not None]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self._sock.close()

    def _run(self) -> None:
        try:
            self._h2.initiate_connection()
            self._flush()
            while not self._settled and not self._stop.is_set():
                self._read()
            for call in self.calls:
                self._open(call)
            self.opened_at = time.monotonic()
            self._opened.set()
            while not self._stop.is_set():
                self._send_data()
                self._read()
        except (OSError, h2.exceptions.ProtocolError) as error:
            self.error = error
        finally:
            self._opened.set()

    def _open(self, call: RawCall) -> None:
        call.stream_id = self._h2.get_next_available_stream_id()
        headers = [(":method", "POST"), (":scheme", "http"), (":path", call.method), (":authority", self.address),
                   ("content-type", "application/grpc"), ("te", "trailers")]
        if call.token is not None:
            headers.append(("authorization", bearer(call.token)))
        self._h2.send_headers(call.stream_id, headers, end_stream=call.end and not call.data)
        call._unsent = memoryview(call.data)
        self._by_stream[call.stream_id] = call
        self._flush()

    def _send_data(self) -> None:
        for call in self.calls:
            if not call._unsent or call.ended_at is not None:
                continue
            window = min(self._h2.local_flow_control_window(call.stream_id), self._h2.max_outbound_frame_size)
            if window <= 0:
                continue
            part, call._unsent = call._unsent[:window], call._unsent[window:]
            self._h2.send_data(call.stream_id, bytes(part), end_stream=call.end and not call._unsent)
        self._flush()

    def _read(self) -> None:
        pending = isinstance(self._sock, ssl.SSLSocket) and self._sock.pending()
        if not pending and not select.select([self._sock], [], [], 0.05)[0]:
            return
        data = self._sock.recv(65536)
        if not data:
            raise ConnectionResetError("the server closed the connection")
        for event in self._h2.receive_data(data):
            self._settled = self._settled or isinstance(event, h2.events.RemoteSettingsChanged)
            call = self._by_stream.get(getattr(event, "stream_id", 0))
            if call is None:
                continue
            if isinstance(event, (h2.events.ResponseReceived, h2.events.TrailersReceived)):
                headers = dict(event.headers)
                call.status = headers.get("grpc-status", call.status)
                call.message = headers.get("grpc-message", call.message)
            elif isinstance(event, h2.events.DataReceived):
                call.received += len(event.data)
            if isinstance(event, h2.events.StreamReset):
                call.status = call.status or "reset"
            if isinstance(event, (h2.events.StreamEnded, h2.events.StreamReset)):
                call.ended_at = time.monotonic()
        self._flush()

    def _flush(self) -> None:
        outgoing = self._h2.data_to_send()
        if outgoing:
            self._sock.sendall(outgoing)


def open_calls(address: str, calls: list[RawCall], per_connection: int = 90,
               tls_ca: str | None = None) -> list[RawPeer]:
    """``calls`` opened over as many connections as the server's limit of calls per connection needs."""
    peers = [RawPeer(address, calls[i:i + per_connection], tls_ca) for i in range(0, len(calls), per_connection)]
    for peer in peers:
        peer.wait_opened()
    return peers
