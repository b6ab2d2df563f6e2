"""The physical limit on this host: the same bytes over a plain loopback TCP socket.

A peer process keeps one preallocated buffer and serves two commands on one connection:
``P`` (the client pushes ``n`` bytes, the peer answers one byte once all arrived) and ``L``
(the peer sends its ``n`` bytes). Both sides use ``sendall``/``recv_into`` on preallocated
buffers: no Python object per byte, no copy beyond the kernel's.
"""
from __future__ import annotations

import multiprocessing
import socket
import struct

BUFFER_SOCKET_BYTES = 4 * 1024 * 1024


def _recv_exactly(sock: socket.socket, view: memoryview) -> None:
    received = 0
    while received < len(view):
        got = sock.recv_into(view[received:])
        if got == 0:
            raise ConnectionError("peer closed the connection mid-transfer")
        received += got


def _serve(listener: socket.socket) -> None:
    conn, _ = listener.accept()
    with conn:
        header = bytearray(9)
        buffer = memoryview(bytearray())
        while True:
            try:
                _recv_exactly(conn, memoryview(header))
            except ConnectionError:
                return
            command, nbytes = header[:1], struct.unpack("<Q", header[1:])[0]
            if len(buffer) != nbytes:
                buffer = memoryview(bytearray(nbytes))
            if command == b"P":
                _recv_exactly(conn, buffer)
                conn.sendall(b"k")
            elif command == b"L":
                conn.sendall(buffer)
            else:
                return


class RawTcpPeer:
    """A peer process on a loopback port and one connection to it."""

    def __init__(self) -> None:
        listener = socket.create_server(("127.0.0.1", 0))
        self._process = multiprocessing.get_context("fork").Process(target=_serve, args=(listener,), daemon=True)
        self._process.start()
        self._sock = socket.create_connection(listener.getsockname())
        listener.close()
        for option in (socket.SO_SNDBUF, socket.SO_RCVBUF):
            self._sock.setsockopt(socket.SOL_SOCKET, option, BUFFER_SOCKET_BYTES)

    def push(self, payload: memoryview) -> None:
        self._sock.sendall(b"P" + struct.pack("<Q", len(payload)))
        self._sock.sendall(payload)
        _recv_exactly(self._sock, memoryview(bytearray(1)))

    def pull(self, into: memoryview) -> None:
        self._sock.sendall(b"L" + struct.pack("<Q", len(into)))
        _recv_exactly(self._sock, into)

    def close(self) -> None:
        self._sock.close()
        self._process.join(timeout=10)
        if self._process.is_alive():
            self._process.kill()

    def __enter__(self) -> RawTcpPeer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
