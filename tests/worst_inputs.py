"""The largest and most memory-hungry requests the sidecar's limits allow, sent all at once.

Used by tests/test_hardening.py (the shipped memory limit holds) and
benchmarks/bench_memory.py (what each shape costs). Every payload stays just under
max_message_bytes; the ways to make memory explode are many tiny values (each a
Python object once decoded), long lines and many concurrent calls.
"""

from __future__ import annotations

import http.client
import json
import threading
from typing import Callable

import grpc
import msgpack

from logscore.generated.logscore.v1 import scorer_pb2 as pb

from .generate import shop_lines

MAX_RECORD_BYTES = 65_536  # the default max_record_bytes


def worst_payloads(max_message_bytes: int, distinct: bool = False) -> dict[str, tuple[str, bytes]]:
    """name -> (surface, payload); ``distinct`` makes every line new (the featurizer's caches fill)."""
    budget = max_message_bytes - 4096  # room for the envelope
    base = shop_lines(1, seed=7)[0]

    def line(i: int, length: int) -> str:
        tail = f"&v={i}" if distinct else ""
        return (base.replace("GET /", "GET /" + "a" * max(0, length - len(base) - len(tail)) + tail + "?", 1))

    long_lines = [line(i, MAX_RECORD_BYTES - 64).encode() for i in range(budget // MAX_RECORD_BYTES)]
    count = min(20_000, budget // (len(base) + 16))  # the most records a request may hold, if they fit
    short_lines = [line(i, budget // count - 16).encode() for i in range(count)]
    many_fields = pb.ScoreRequest()
    fields = {f"k{i}": "" for i in range(budget // 1000 // 10)}
    for _ in range(1000):
        many_fields.structured.records.add(fields=fields)
    # Explanations of long URLs of never-seen CJK (thousands of keys a record) named 20 a record: the
    # most a request may ask (scoring.MAX_EXPLANATIONS). Naming them held 130 MB a step of 512 records.
    cjk = "".join(chr(0x4E00 + (i * 7919) % 20_000) for i in range(700))
    explained = [line(i, 0).replace("GET /", f"GET /{cjk}/{i}/", 1).encode() for i in range(1000)]
    empty_arrays = b"".join(msgpack.packb([0, {"v": [[]] * 65_000}]) for _ in range(budget // 65_010))
    tiny_values = [{"v": [1] * 2000} for _ in range(budget // 4010)]
    return {
        "grpc_long_lines": ("grpc", pb.ScoreRequest(lines=pb.RawLines(lines=long_lines)).SerializeToString()),
        "grpc_short_lines": ("grpc", pb.ScoreRequest(lines=pb.RawLines(lines=short_lines)).SerializeToString()),
        "grpc_many_fields": ("grpc", many_fields.SerializeToString()),
        "grpc_explained_cjk_lines": ("grpc", pb.ScoreRequest(explain=20, lines=pb.RawLines(
            lines=explained[: budget // (len(explained[0]) + 8)])).SerializeToString()),
        "grpc_empty_arrays": ("grpc", pb.ScoreRequest(event_stream=empty_arrays).SerializeToString()),
        "http_tiny_values": ("http", json.dumps({"records": tiny_values}, separators=(",", ":")).encode()),
        "http_long_lines": ("http", json.dumps({"records": [x.decode() for x in long_lines]}).encode()),
    }


def flood(sidecar, payloads: dict[str, tuple[str, bytes]], calls_per_connection: int = 8,
          grpc_connections: int = 2) -> dict[str, list[str]]:
    """Send each payload ``calls_per_connection`` times over each of ``grpc_connections`` gRPC
    connections (HTTP: as many connections), all at once; the outcome of every call by payload."""
    outcomes: dict[str, list[str]] = {name: [] for name in payloads}
    channels = [grpc.insecure_channel(f"unix:{sidecar.socket}", options=[("grpc.max_send_message_length", -1),
                                                                         ("logscore.connection", i)])
                for i in range(grpc_connections)]
    calls: list[Callable[[], None]] = []
    for name, (surface, payload) in payloads.items():
        if surface == "grpc":
            for channel in channels:
                score = channel.unary_unary("/logscore.v1.Scorer/Score")
                calls += [lambda score=score, name=name, payload=payload: outcomes[name].append(
                    grpc_outcome(score, payload))] * calls_per_connection
        else:
            calls += [lambda name=name, payload=payload: outcomes[name].append(
                http_outcome(sidecar.http_port, payload))] * (calls_per_connection * grpc_connections)
    threads = [threading.Thread(target=call) for call in calls]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(300)
    for channel in channels:
        channel.close()
    return outcomes


def grpc_outcome(score, payload: bytes) -> str:
    try:
        score(payload, timeout=120)
        return "OK"
    except grpc.RpcError as error:
        if error.code() == grpc.StatusCode.UNAVAILABLE:
            return f"UNAVAILABLE: {error.details()}"
        return error.code().name


def http_outcome(port: int, payload: bytes) -> str:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        connection.request("POST", "/v1/score", payload, {"Content-Type": "application/json"})
        response = connection.getresponse()
        response.read()
        return str(response.status)
    except OSError as error:
        return type(error).__name__
    finally:
        connection.close()
