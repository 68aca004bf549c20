"""The HTTP/JSON surface as Logstash uses it: one-event requests over keep-alive, and batches.

    python benchmarks/bench_http.py [--quick] [--json benchmarks/results/http.json]

Starts `logscore serve` on the default model and sends, over one keep-alive
connection per client process, what Logstash's http filter sends: repetitive traffic (the real
access log, benchmarks/traffic.py), each client its own order of it. Prints events/s and
per-request p50/p99 with the machine and load described; writes JSON.
"""

from __future__ import annotations

import argparse
import http.client
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from benchmarks.common import client_processes, load_average, machine, percentiles_ms, write_results  # noqa: E402
from benchmarks.traffic import real_lines, repetitive_lines  # noqa: E402
from tests.sidecar_process import SidecarProcess  # noqa: E402


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
    out.put((events, latencies))


def run(port: int, batch: int, clients: int, seconds: float) -> dict:
    results = client_processes(client, (port, batch, seconds), clients, timeout=seconds + 60)
    return {"batch": batch, "clients": clients, "events_per_s": round(sum(e for e, _ in results) / seconds),
            **percentiles_ms(np.concatenate([lat for _, lat in results]), "request"), "load_average": load_average()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "http.json"))
    args = parser.parse_args()
    seconds = 1.0 if args.quick else 4.0
    sidecar = SidecarProcess(ROOT / "models", Path(tempfile.mkdtemp(prefix="logscore-http-")),
                             reload_interval_s=0).start()
    real_lines()  # read once, before the client processes fork
    results = {"machine": machine(), "traffic": "repetitive: the real access log, each client its own order",
               "runs": []}
    print(f"machine: {results['machine']}")
    try:
        for batch, clients in ((1, 1), (1, 4), (100, 1), (1000, 1), (1000, 4)):
            row = run(sidecar.http_port, batch, clients, seconds)
            results["runs"].append(row)
            print(f"batch {batch:>5} clients {clients}: {row['events_per_s']:>8} events/s   "
                  f"request p50 {row['request_p50_ms']} ms  p99 {row['request_p99_ms']} ms  load {row['load_average']}",
                  flush=True)
    finally:
        sidecar.stop()
    write_results(args.json, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
