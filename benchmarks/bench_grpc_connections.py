"""Peak memory of the sidecar under a client opening many gRPC connections of stalled calls.

    python benchmarks/bench_grpc_connections.py [--connections 8 32 96] [--seconds 12]
        [--json benchmarks/results/grpc-connections.json]

For each count N, a fresh `logscore serve` (shipped defaults, gRPC over TCP) gets N raw HTTP/2
connections, each keeping 16 Score streams open (the most one may open) that announce a
2,000,000-byte message and send all of it but its last byte as fast as the server's flow control
allows, opening a new stream for each one the sidecar ends (refused past max_grpc_calls). Meanwhile
an ordinary client makes one Score call on a connection of its own. Prints the peak RSS (VmHWM)
beside the idle one, the connections the sidecar let stay open, the ordinary call's outcome and
the sidecar's refusal counters, with the load average; writes JSON. The idle RSS is the floor of
the same run. No stalled message is ever complete, so none is decoded or scored: what is held is
gRPC's transport buffers, whatever the bytes (zeros), and a share of never-seen values does not
apply (printed as such; `bench_memory.py` measures memory under never-seen records).
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import grpc  # noqa: E402

from benchmarks.common import machine, write_results  # noqa: E402
from logscore.generated.logscore.v1 import scorer_pb2 as pb  # noqa: E402
from logscore.generated.logscore.v1 import scorer_pb2_grpc as pb_grpc  # noqa: E402
from tests.http2 import (ACK, DATA, END_HEADERS, END_STREAM, GOAWAY, HEADERS, MAX_DATA, PING, PREFACE,  # noqa: E402
                         RST_STREAM, SETTINGS, WINDOW_UPDATE, frame, score_headers, whole_frames)
from tests.sidecar_process import SidecarProcess, free_port  # noqa: E402

MIB = 1024 * 1024
STREAMS = 16  # serve.STREAMS_PER_CONNECTION
ANNOUNCED = 2_000_000  # each message's announced size: under max_message_bytes


class StalledConnection:
    """One connection keeping STREAMS calls open, each sent all but its last byte within flow control."""

    def __init__(self, port: int):
        self.socket = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.socket.sendall(PREFACE + frame(SETTINGS, 0, 0))
        self.connection_window, self.initial_window = 65_535, 65_535
        self.windows: dict[int, int] = {}  # open stream -> its send window
        self.sent: dict[int, int] = {}  # open stream -> bytes of its message sent
        self.next_stream, self.ended, self.closed, self.buffer = 1, 0, False, b""

    def run(self, until: float) -> None:
        try:
            while time.monotonic() < until and not self.closed:
                self._open_streams()
                self._send_data()
                self._read()
        except OSError:
            self.closed = True
        self.socket.close()

    def _open_streams(self) -> None:
        while len(self.sent) < STREAMS:
            stream, self.next_stream = self.next_stream, self.next_stream + 2
            self.socket.sendall(frame(HEADERS, END_HEADERS, stream, score_headers()))
            self.windows[stream], self.sent[stream] = self.initial_window, 0

    def _send_data(self) -> None:
        total, frames = ANNOUNCED + 5 - 1, []
        for stream in self.sent:
            while self.sent[stream] < total and min(self.connection_window, self.windows[stream]) > 0:
                size = min(MAX_DATA, total - self.sent[stream], self.connection_window, self.windows[stream])
                prefix = b"\x00" + ANNOUNCED.to_bytes(4, "big") if not self.sent[stream] else b""
                frames.append(frame(DATA, 0, stream, prefix + b"\x00" * (size - len(prefix))))
                self.sent[stream] += size
                self.connection_window -= size
                self.windows[stream] -= size
        if frames:
            self.socket.sendall(b"".join(frames))

    def _read(self) -> None:
        self.socket.settimeout(0.2)
        try:
            data = self.socket.recv(1 << 20)
        except socket.timeout:
            return
        self.closed = not data
        frames, self.buffer = whole_frames(self.buffer + data)
        for kind, flags, stream, payload in frames:
            self._on_frame(kind, flags, stream, payload)

    def _on_frame(self, kind: int, flags: int, stream: int, payload: bytes) -> None:
        if kind == SETTINGS and not flags & ACK:
            for at in range(0, len(payload), 6):
                if int.from_bytes(payload[at:at + 2], "big") == 4:  # SETTINGS_INITIAL_WINDOW_SIZE
                    value = int.from_bytes(payload[at + 2:at + 6], "big")
                    self.windows = {s: w + value - self.initial_window for s, w in self.windows.items()}
                    self.initial_window = value
            self.socket.sendall(frame(SETTINGS, ACK, 0))
        elif kind == WINDOW_UPDATE:
            increment = int.from_bytes(payload, "big") & 0x7FFFFFFF
            if not stream:
                self.connection_window += increment
            elif stream in self.windows:
                self.windows[stream] += increment
        elif kind == PING and not flags & ACK:
            self.socket.sendall(frame(PING, ACK, 0, payload))
        elif (kind == RST_STREAM or (kind == HEADERS and flags & END_STREAM)) and stream in self.sent:
            del self.sent[stream], self.windows[stream]
            self.ended += 1
        elif kind == GOAWAY:
            self.closed = True


def ordinary_call(port: int) -> str:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        try:
            pb_grpc.ScorerStub(channel).Score(pb.ScoreRequest(lines=pb.RawLines(lines=[b"x"])), timeout=10)
            return "OK"
        except grpc.RpcError as error:
            return f"{error.code().name}: {error.details()[:120]}"


def run(connections: int, seconds: float) -> dict:
    with tempfile.TemporaryDirectory() as workdir:
        port = free_port()
        process = SidecarProcess(ROOT / "models", Path(workdir), tcp=f"127.0.0.1:{port}").start()
        try:
            idle = process.peak_rss_bytes()
            clients = [StalledConnection(port) for _ in range(connections)]
            until = time.monotonic() + seconds
            threads = [threading.Thread(target=client.run, args=(until,)) for client in clients]
            for thread in threads:
                thread.start()
            time.sleep(seconds * 0.75)
            ordinary = ordinary_call(port)
            for thread in threads:
                thread.join()
            row = {"connections": connections, "idle_peak_mib": round(idle / MIB),
                   "peak_mib": round(process.peak_rss_bytes() / MIB),
                   "closed_by_sidecar": sum(client.closed for client in clients),
                   "streams_ended_by_sidecar": sum(client.ended for client in clients), "ordinary_call": ordinary,
                   "too_many_calls": process.metric('logscore_errors_total{kind="too_many_calls"'),
                   "listener_full_warnings": process.log().count('"gRPC listener full"'),
                   "never_seen_share": "n/a: no message is completed, none decoded",
                   "load_average": os.getloadavg()[0]}
        finally:
            process.stop()
    print(f"{connections:4d} connections: idle {row['idle_peak_mib']} MiB, peak {row['peak_mib']} MiB, "
          f"{row['closed_by_sidecar']} closed by the sidecar; ordinary call {ordinary}; never-seen share n/a "
          f"(no message completed); load "
          f"{row['load_average']:.1f}", flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, nargs="+", default=[8, 32, 96])
    parser.add_argument("--seconds", type=float, default=12.0)
    parser.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "grpc-connections.json"))
    args = parser.parse_args()
    rows = [run(count, args.seconds) for count in args.connections]
    write_results(args.json, {"machine": machine(), "runs": rows})


if __name__ == "__main__":
    main()
