"""Raw HTTP/2, for gRPC calls no client library can be made to send (a message announced and never
finished): frames, a Score call's headers, and the frames a connection has received whole.
tests/test_hardening.py and benchmarks/bench_grpc_connections.py use it."""

from __future__ import annotations

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"  # what a client sends first, before its SETTINGS
DATA, HEADERS, RST_STREAM, SETTINGS, PING, GOAWAY, WINDOW_UPDATE = 0, 1, 3, 4, 6, 7, 8
END_STREAM = ACK = 1  # flags (ACK on SETTINGS and PING)
END_HEADERS = 4
FRAME_HEADER = 9  # bytes: length (3), type, flags, stream (4)
MAX_DATA = 16_384  # a DATA frame's largest payload before the server's SETTINGS raise it


def frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    return len(payload).to_bytes(3, "big") + bytes([kind, flags]) + stream.to_bytes(4, "big") + payload


def hpack_literal(name: str, value: str) -> bytes:
    """A header "literal without indexing, new name", no Huffman coding (lengths under 127)."""
    return b"\x00" + bytes([len(name)]) + name.encode() + bytes([len(value)]) + value.encode()


def score_headers() -> bytes:
    """The headers of a Score call (a HEADERS frame's payload)."""
    return b"".join(hpack_literal(name, value) for name, value in [
        (":method", "POST"), (":scheme", "http"), (":path", "/logscore.v1.Scorer/Score"),
        (":authority", "localhost"), ("content-type", "application/grpc"), ("te", "trailers")])


def whole_frames(buffer: bytes) -> tuple[list[tuple[int, int, int, bytes]], bytes]:
    """(the frames ``buffer`` holds whole as (type, flags, stream, payload), the bytes after them)."""
    frames = []
    while len(buffer) >= FRAME_HEADER + int.from_bytes(buffer[:3], "big"):
        end = FRAME_HEADER + int.from_bytes(buffer[:3], "big")
        stream = int.from_bytes(buffer[5:9], "big") & 0x7FFFFFFF
        frames.append((buffer[3], buffer[4], stream, buffer[FRAME_HEADER:end]))
        buffer = buffer[end:]
    return frames, buffer
