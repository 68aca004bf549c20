"""Forward mode: real forward clients -> the real sidecar -> a forward receiver as next hop."""

from __future__ import annotations

import gzip
import socket
import socketserver
import threading
import time
import uuid

import msgpack
import pytest
from fluent import sender as fluent_sender

from .generate import attack_lines, blog_lines
from .sidecar_process import ROOT, SidecarProcess, free_port


class ForwardReceiver:
    """A next hop: accepts forward messages, records them, acks chunks (like Fluentd's in_forward)."""

    def __init__(self, port: int):
        self.port = port
        self.records: list[tuple[str, dict]] = []
        self.chunks: list[str] = []
        self._server = None

    def start(self) -> "ForwardReceiver":
        receiver = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self):
                unpacker = msgpack.Unpacker(raw=False)
                while data := self.request.recv(65536):
                    unpacker.feed(data)
                    for tag, packed, option in unpacker:
                        for _, record in _entries(packed):
                            receiver.records.append((tag, record))
                        receiver.chunks.append(option["chunk"])
                        self.request.sendall(msgpack.packb({"ack": option["chunk"]}))

        socketserver.ThreadingTCPServer.allow_reuse_address = True
        self._server = socketserver.ThreadingTCPServer(("127.0.0.1", self.port), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def wait_for(self, count: int, timeout: float = 10.0) -> list[tuple[str, dict]]:
        deadline = time.monotonic() + timeout
        while len(self.records) < count and time.monotonic() < deadline:
            time.sleep(0.02)
        return self.records


def _entries(packed: bytes):
    unpacker = msgpack.Unpacker(raw=False, unicode_errors="surrogateescape")
    unpacker.feed(packed)
    return list(unpacker)


def event_time(seconds: int) -> msgpack.ExtType:
    return msgpack.ExtType(0, seconds.to_bytes(4, "big") + (0).to_bytes(4, "big"))


def send_chunk(port: int, message: list, timeout: float = 5.0, bytes_as_str: bool = False) -> dict | None:
    """Send one forward message; return the ack (None if the connection closed without one).

    ``bytes_as_str`` packs bytes as msgpack str, as Fluentd's out_forward packs entries.
    """
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as connection:
        connection.sendall(msgpack.packb(message, use_bin_type=not bytes_as_str))
        unpacker = msgpack.Unpacker(raw=False)
        try:
            while data := connection.recv(65536):
                unpacker.feed(data)
                for answer in unpacker:
                    return answer
        except (socket.timeout, ConnectionError):
            return None
    return None


@pytest.fixture()
def chain(tmp_path):
    receiver = ForwardReceiver(free_port()).start()
    forward_port = free_port()
    sidecar = SidecarProcess(ROOT / "models", tmp_path, forward=f"127.0.0.1:{forward_port}",
                             forward_to=f"127.0.0.1:{receiver.port}", forward_ack_timeout_s=1).start()
    yield sidecar, forward_port, receiver
    sidecar.stop()
    receiver.stop()


def test_fluent_logger_messages_arrive_scored(chain):
    sidecar, port, receiver = chain
    logger = fluent_sender.FluentSender("web", host="127.0.0.1", port=port, nanosecond_precision=True)
    lines = blog_lines(5, seed=30) + [line for _, line in attack_lines(blog_lines(5, seed=31), 1, seed=32)]
    for line in lines:
        assert logger.emit("access", {"message": line}), logger.last_error
    logger.close()
    records = receiver.wait_for(len(lines))
    assert [r["message"] for _, r in records] == lines
    assert all(tag == "web.access" for tag, _ in records)
    assert [r["is_anomaly"] for _, r in records] == [False] * 5 + [True]
    assert all(0 <= r["anomaly_score"] <= 1 and r["anomaly_model"] == "apache-access" for _, r in records)


def test_gzip_packed_forward_is_acked_after_the_next_hop(chain):
    sidecar, port, receiver = chain
    lines = blog_lines(199, seed=33)
    records = [{"log": line} for line in lines] + [{"log": "bytes that are not UTF-8: \udcff\udcfe"}]
    packer = msgpack.Packer(use_bin_type=True, unicode_errors="surrogateescape")
    entries = b"".join(packer.pack([event_time(1_700_000_000 + i), r]) for i, r in enumerate(records))
    chunk = uuid.uuid4().hex
    # As Fluentd's out_forward sends it: entries as a str, gzip (two members), size and chunk options.
    compressed = gzip.compress(entries[: len(entries) // 2]) + gzip.compress(entries[len(entries) // 2:])
    ack = send_chunk(port, ["docker.web", compressed, {"size": 200, "compressed": "gzip", "chunk": chunk}],
                     bytes_as_str=True)
    assert ack == {"ack": chunk}
    assert len(receiver.records) == 200 and len(receiver.chunks) == 1  # next hop had it before our ack
    assert all("anomaly_score" in r for _, r in receiver.records)
    assert receiver.records[-1][1]["log"] == records[-1]["log"]  # every byte passed on as it came


def test_fluent_bit_forward_mode_entries(chain):
    sidecar, port, receiver = chain
    entries = [[[event_time(1_700_000_000), {}], {"log": line}] for line in blog_lines(3, seed=34)]
    chunk = uuid.uuid4().hex
    assert send_chunk(port, ["fb.web", entries, {"chunk": chunk}]) == {"ack": chunk}
    assert [r["is_anomaly"] for _, r in receiver.wait_for(3)] == [False] * 3


def test_next_hop_down_means_no_ack_and_a_resend_loses_nothing(chain):
    sidecar, port, receiver = chain
    receiver.stop()
    lines = blog_lines(20, seed=35)
    chunk = uuid.uuid4().hex
    message = ["web", b"".join(msgpack.packb([1_700_000_000, {"message": line}]) for line in lines),
               {"size": 20, "chunk": chunk}]
    assert send_chunk(port, message) is None  # no ack: the sender keeps the chunk and retries
    assert receiver.records == []
    receiver.start()  # the next hop comes back on the same port
    assert send_chunk(port, message) == {"ack": chunk}
    assert sorted(r["message"] for _, r in receiver.wait_for(20)) == sorted(lines)


def test_garbage_closes_the_connection_and_the_sidecar_keeps_serving(chain):
    sidecar, port, receiver = chain
    with socket.create_connection(("127.0.0.1", port), timeout=5) as connection:
        connection.sendall(b"\xc1\xc1 GET / HTTP/1.1\r\n\r\n")
        assert connection.recv(100) == b""  # closed, nothing acked
    chunk = uuid.uuid4().hex
    assert send_chunk(port, ["web", [[1_700_000_000, {"message": "x"}]], {"chunk": chunk}]) == {"ack": chunk}
    assert 'logscore_errors_total{kind="forward_protocol",surface="forward"}' in sidecar.http_get("/metrics")[1].decode()
