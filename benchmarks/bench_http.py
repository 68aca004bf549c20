"""The HTTP/JSON surface as Logstash uses it: one-event requests over keep-alive, and batches.

    python benchmarks/bench_http.py [--quick] [--json benchmarks/results/http.json]

Starts `logscore serve` on the default model and sends, over one keep-alive
connection per client process, what Logstash's http filter sends: repetitive traffic (the real
access log, benchmarks/traffic.py), each client its own order of it. Beside it, in the same run,
a **floor**: a plain asyncio HTTP/1.1 server that decodes each request's JSON and answers a score
of 0 per event (what any Python HTTP scorer pays). Prints events/s, per-request p50/p99 and the
share of request lines never sent before, with the machine and load described; writes JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import multiprocessing
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from benchmarks.common import client_processes, load_average, machine, percentiles_ms, write_results  # noqa: E402
from benchmarks.traffic import never_seen_share, real_lines, repetitive_lines, sent_digests  # noqa: E402
from tests.sidecar_process import SidecarProcess, free_port  # noqa: E402


def client(index: int, port: int, batch: int, seconds: float, ready, out) -> None:
    lines = repetitive_lines(5000, seed=1100 + index)  # each client its own order of the real log
    if batch == 1:
        bodies = [json.dumps({"message": line}) for line in lines[:200]]
    else:
        bodies = [json.dumps({"records": [{"message": line} for line in lines[i: i + batch]]})
                  for i in range(0, len(lines) - batch + 1, batch)]
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    headers = {"content-type": "application/json", "Connection": "Keep-Alive"}
    latencies, events, i = [], 0, 0
    ready.wait()
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        started = time.perf_counter()
        conn.request("POST", "/v1/score?model=apache-access", bodies[i % len(bodies)], headers)
        response = conn.getresponse()
        response.read()
        assert response.status == 200
        latencies.append(time.perf_counter() - started)
        events += batch
        i += 1
    sent = [line for n in range(i) for line in json_lines(bodies[n % len(bodies)])]
    out.put((events, latencies, *sent_digests(sent)))


def json_lines(body: str) -> list[str]:
    decoded = json.loads(body)
    return [r["message"] for r in decoded["records"]] if "records" in decoded else [decoded["message"]]


def run(port: int, batch: int, clients: int, seconds: float, seen: set) -> dict:
    results = client_processes(client, (port, batch, seconds), clients, timeout=seconds + 60)
    novelty = never_seen_share(np.concatenate([r[2] for r in results]), np.concatenate([r[3] for r in results]),
                               seen)
    return {"batch": batch, "clients": clients, "events_per_s": round(sum(r[0] for r in results) / seconds),
            **percentiles_ms(np.concatenate([r[1] for r in results]), "request"),
            "never_seen_request_lines": novelty["never_seen_request_lines"], "load_average": load_average()}


def floor_server(port: int, ready) -> None:
    """Keep-alive HTTP/1.1: read a request, decode its JSON, answer a score of 0 per event."""

    async def connection(reader, writer):
        try:
            await answer(reader, writer)
        except asyncio.IncompleteReadError:  # the client closed its connection
            writer.close()

    async def answer(reader, writer):
        while head := await reader.readuntil(b"\r\n\r\n"):
            length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length"))
            decoded = json.loads(await reader.readexactly(length))
            events = len(decoded["records"]) if "records" in decoded else 1
            answer = {"results": [{"anomaly_score": 0.0, "is_anomaly": False}] * events} if "records" in decoded \
                else {"anomaly_score": 0.0, "is_anomaly": False}
            body = json.dumps(answer).encode()
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: "
                         + str(len(body)).encode() + b"\r\n\r\n" + body)
            await writer.drain()

    async def serve():
        server = await asyncio.start_server(connection, "127.0.0.1", port)
        ready.set()
        async with server:
            await server.serve_forever()

    asyncio.run(serve())


def start_floor() -> tuple[multiprocessing.Process, int]:
    port, ready = free_port(), multiprocessing.Event()
    process = multiprocessing.Process(target=floor_server, args=(port, ready), daemon=True)
    process.start()
    if not ready.wait(30):
        raise RuntimeError("the floor HTTP server did not start")
    return process, port


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "http.json"))
    args = parser.parse_args()
    seconds = 1.0 if args.quick else 4.0
    sidecar = SidecarProcess(ROOT / "models", Path(tempfile.mkdtemp(prefix="logscore-http-")),
                             reload_interval_s=0).start()
    floor, floor_port = start_floor()
    real_lines()  # read once, before the client processes fork
    results = {"machine": machine(), "traffic": "repetitive: the real access log, each client its own order",
               "runs": [], "floor": []}
    print(f"machine: {results['machine']}")
    seen: dict = {}
    try:
        for batch, clients in ((1, 1), (1, 4), (100, 1), (1000, 1), (1000, 4)):
            for server, port in (("runs", sidecar.http_port), ("floor", floor_port)):
                row = run(port, batch, clients, seconds, seen.setdefault(server, set()))
                results[server].append(row)
                print(f"{'logscore' if server == 'runs' else 'floor':8} batch {batch:>5} clients {clients}: "
                      f"{row['events_per_s']:>8} events/s   request p50 {row['request_p50_ms']} ms  "
                      f"p99 {row['request_p99_ms']} ms  never seen {row['never_seen_request_lines']:.1%}  "
                      f"load {row['load_average']}", flush=True)
    finally:
        sidecar.stop()
        floor.terminate()
    write_results(args.json, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
