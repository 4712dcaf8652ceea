"""Helpers of the serving tests: raw HTTP (exact bytes, chunked bodies) and hand-made image files."""
from __future__ import annotations

import base64
import contextlib
import http.client
import io
import json
import struct
import zlib
from urllib.parse import urlsplit

import numpy as np
from PIL import Image


def request(url: str, method: str, path: str, body: bytes | dict | None = None, key: str | None = None,
         headers: dict[str, str] | None = None, chunked: bool = False, timeout: float = 60) -> tuple[int, dict]:
    """(status, JSON) of one request sent exactly as given; a refused upload still reads the answer."""
    parts = urlsplit(url)
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    sent = {"content-type": "application/json", **(headers or {})}
    if key:
        sent["authorization"] = f"Bearer {key}"
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    try:
        conn.putrequest(method, path)
        for name, value in sent.items():
            conn.putheader(name, value)
        if chunked:
            conn.putheader("transfer-encoding", "chunked")
        elif data is not None and "content-length" not in {k.lower() for k in sent}:
            conn.putheader("content-length", str(len(data)))
        conn.endheaders()
        # the server may answer before reading everything (413): the answer is what counts
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            _send(conn, data or b"", chunked)
        response = conn.getresponse()
        raw = response.read()
        return response.status, json.loads(raw) if raw else {}
    finally:
        conn.close()


def _send(conn: http.client.HTTPConnection, data: bytes, chunked: bool, piece: int = 64 << 10) -> None:
    if not chunked:
        conn.send(data)
        return
    for start in range(0, len(data), piece):
        chunk = data[start:start + piece]
        conn.send(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
    conn.send(b"0\r\n\r\n")


def encode(image: np.ndarray, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format=fmt)
    return buffer.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def bomb_png(width: int = 30000, height: int = 30000) -> bytes:
    """A valid PNG header announcing width×height RGB pixels (2.7 GB decoded) in a few hundred bytes."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    rows = zlib.compress(b"\x00" * (1 + 3 * width) * 4, 9)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", rows) + _chunk(b"IEND", b"")


def _listening_sockets() -> dict[int, tuple[str, int]]:
    """inode → (host, port) of every listening IPv4 TCP socket on this machine (/proc/net/tcp)."""
    out = {}
    with open("/proc/net/tcp") as table:
        for line in list(table)[1:]:
            fields = line.split()
            if fields[3] != "0A":  # TCP_LISTEN
                continue
            address, port = fields[1].split(":")
            host = ".".join(str(int(address[i:i + 2], 16)) for i in (6, 4, 2, 0))  # little-endian hex
            out[int(fields[9])] = (host, int(port, 16))
    return out


def _socket_inodes(pid: int) -> set[int]:
    import os

    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(int(target[8:-1]))
    return inodes


def listening_ports(pid: int) -> list[tuple[str, int]]:
    """(host, port) of the TCP sockets process `pid` listens on, for the HTTP ones of a replica: those Ray
    itself opens (gRPC, object transfer) listen on all interfaces and are left out, as are IPv6 ones."""
    sockets = _listening_sockets()
    return [sockets[i] for i in _socket_inodes(pid) if i in sockets and sockets[i][0] != "0.0.0.0"]


def listener_process(port: int) -> str | None:
    """The command name (/proc/<pid>/comm) of the process listening on TCP `port`, if any."""
    import os

    inodes = {inode for inode, (_, p) in _listening_sockets().items() if p == port}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if inodes & _socket_inodes(int(pid)):
                with open(f"/proc/{pid}/comm") as comm:
                    return comm.read().strip()
        except OSError:
            continue
    return None
