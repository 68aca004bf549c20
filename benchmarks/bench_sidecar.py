"""End-to-end throughput and latency of the sidecar, from client processes.

    python benchmarks/bench_sidecar.py [--quick] [--json benchmarks/results/sidecar.json]

Starts `logscore serve` on the default model (Unix socket and TCP), then from
separate client processes measures:
  - throughput in records/s for batch sizes 1 to 10,000 over the socket and TCP,
    one call in flight and 4 in flight (4 client processes), on repetitive traffic
    (few distinct values) and, over the socket, on long-tail traffic (a third new);
  - single-record round trips (unary and bidirectional stream): p50 / p99, and the same
    against a no-op gRPC server doing 0, 50 and 100 µs of work per call (the stack's floor);
  - the sidecar's resident memory (VmRSS, VmHWM) after each run and at the end.
Records are access lines made by tests/generate.py. The machine is printed with
the figures: compare ratios across machines, not absolute numbers.
"""

from __future__ import annotations

import argparse
import multiprocessing
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from benchmarks.common import client_processes, machine, percentiles_ms, write_results  # noqa: E402
from tests.generate import blog_lines, shop_lines  # noqa: E402
from tests.sidecar_process import SidecarProcess, free_port  # noqa: E402


def make_request(lines: list[bytes]):
    from logscore.generated.logscore.v1 import scorer_pb2 as pb

    request = pb.ScoreRequest()
    request.lines.lines.extend(lines)
    return request


def client_throughput(target: str, batch: int, seconds: float, lines: list[bytes], out) -> None:
    """One client calling Score back to back, cycling through ``lines`` in batches (so the
    sidecar sees new values at the rate the data has them, not one batch over and over)."""
    import grpc

    from logscore.generated.logscore.v1 import scorer_pb2_grpc as pb_grpc

    stub = pb_grpc.ScorerStub(grpc.insecure_channel(target, options=[("grpc.enable_http_proxy", 0)]))
    requests = [make_request(lines[i: i + batch]) for i in range(0, len(lines) - batch + 1, batch)]
    stub.Score(requests[0], timeout=30)  # warm up
    records, latencies = 0, []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        started = time.perf_counter()
        stub.Score(requests[len(latencies) % len(requests)], timeout=30)
        latencies.append(time.perf_counter() - started)
        records += batch
    out.put((records, latencies))


def throughput(target: str, batch: int, clients: int, seconds: float, lines: list[bytes]) -> dict:
    started = time.perf_counter()
    results = client_processes(client_throughput, (target, batch, seconds, lines), clients, timeout=seconds + 120)
    elapsed = time.perf_counter() - started
    records = sum(r for r, _ in results)
    return {"batch": batch, "clients": clients, "records_per_s": round(records / min(elapsed, seconds + 1)),
            **percentiles_ms(np.concatenate([lat for _, lat in results]), "call")}


def single_record_latency(target: str, calls: int, lines: list[bytes]) -> dict:
    import grpc

    from logscore.generated.logscore.v1 import scorer_pb2_grpc as pb_grpc

    stub = pb_grpc.ScorerStub(grpc.insecure_channel(target, options=[("grpc.enable_http_proxy", 0)]))
    requests = [make_request([line]) for line in lines[:calls]]
    for request in requests[:200]:
        stub.Score(request, timeout=5)
    unary = []
    for request in requests:
        started = time.perf_counter()
        stub.Score(request, timeout=5)
        unary.append(time.perf_counter() - started)

    import queue
    import threading

    outgoing: queue.Queue = queue.Queue()
    stream_times = []

    def feed():
        while True:
            item = outgoing.get()
            if item is None:
                return
            yield item

    responses = stub.ScoreStream(feed())
    lock = threading.Lock()
    for request in requests:
        started = time.perf_counter()
        outgoing.put(request)
        next(responses)
        with lock:
            stream_times.append(time.perf_counter() - started)
    outgoing.put(None)
    return {"calls": len(requests), **percentiles_ms(unary, "unary"), **percentiles_ms(stream_times[50:], "stream")}


def noop_server(address: str, work_us: float) -> None:
    """A gRPC server answering with a fixed response after ``work_us`` of busy Python work per
    call: the floor any Python sidecar pays, and what each microsecond of its own work adds."""
    import asyncio

    import grpc

    from logscore.generated.logscore.v1 import scorer_pb2 as pb

    answer = pb.ScoreResponse(scores=[0.5], is_anomaly=[False], model_index=[0]).SerializeToString()

    def work():
        end = time.perf_counter() + work_us / 1e6
        while time.perf_counter() < end:
            pass

    async def stream(requests, context):
        async for _ in requests:
            work()
            yield answer

    async def unary(request, context):
        work()
        return answer

    async def serve():
        server = grpc.aio.server()
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
            "logscore.v1.Scorer", {"ScoreStream": grpc.stream_stream_rpc_method_handler(stream),
                                   "Score": grpc.unary_unary_rpc_method_handler(unary)}),))
        server.add_insecure_port(address)
        await server.start()
        await server.wait_for_termination()

    asyncio.run(serve())


def noop_floor(workdir: Path, calls: int, lines: list[bytes], work_us: float) -> dict:
    """Single-record round trips against the no-op server, same client code."""
    socket = workdir / f"noop-{work_us}.sock"
    server = multiprocessing.Process(target=noop_server, args=(f"unix:{socket}", work_us), daemon=True)
    server.start()
    try:
        deadline = time.monotonic() + 10
        while not socket.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        return {"work_us": work_us, **single_record_latency(f"unix:{socket}", calls, lines)}
    finally:
        server.terminate()


def memory(pid: int) -> dict:
    status = Path(f"/proc/{pid}/status").read_text().splitlines()
    values = {line.split(":")[0]: line.split(":")[1].strip() for line in status if ":" in line}
    return {"rss": values.get("VmRSS"), "peak_rss": values.get("VmHWM")}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="short runs (a smoke test of the benchmark)")
    parser.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "sidecar.json"))
    args = parser.parse_args()
    seconds = 1.0 if args.quick else 4.0
    lines = [line.encode() for line in blog_lines(10_000, seed=9)]
    # Repetitive: the default model's own site, 17 request paths (every value cached after the
    # first batch). Long tail: a shop, a third of its requests never seen before (ids, searches).
    traffics = {"repetitive": lines, "long_tail": [line.encode() for line in shop_lines(200_000, seed=9)]}
    workdir = Path(tempfile.mkdtemp(prefix="logscore-bench-"))
    tcp = f"127.0.0.1:{free_port()}"
    sidecar = SidecarProcess(ROOT / "models", workdir, tcp=tcp, reload_interval_s=0).start()
    results = {"machine": machine(), "throughput": [], "latency": {}}
    print(f"machine: {results['machine']}")
    try:
        targets = {"unix": f"unix:{sidecar.socket}", "tcp": tcp}
        batches = (1, 10, 100, 1000, 10000)
        runs = [("repetitive", transport, batch, clients) for transport in targets for batch in batches
                for clients in (1, 4)]
        runs += [("long_tail", "unix", batch, clients) for batch in (100, 1000, 10000) for clients in (1, 4)]
        for traffic, transport, batch, clients in runs:
            row = {"traffic": traffic, "transport": transport,
                   **throughput(targets[transport], batch, clients, seconds, traffics[traffic]),
                   "sidecar_memory_after": memory(sidecar.process.pid)}
            results["throughput"].append(row)
            print(f"{traffic:10} {transport:5} batch {batch:>6} clients {clients}: {row['records_per_s']:>9} "
                  f"records/s   call p50 {row['call_p50_ms']} ms  p99 {row['call_p99_ms']} ms   "
                  f"sidecar RSS {row['sidecar_memory_after']['rss']}", flush=True)
        for transport, target in targets.items():
            row = single_record_latency(target, 500 if args.quick else 3000, lines)
            results["latency"][transport] = row
            print(f"{transport:5} single record: unary p50 {row['unary_p50_ms']} ms p99 {row['unary_p99_ms']} ms;"
                  f" stream p50 {row['stream_p50_ms']} ms p99 {row['stream_p99_ms']} ms")
        results["latency"]["noop_grpc_floor_unix"] = []
        for work_us in (0, 50, 100):
            floor = noop_floor(workdir, 500 if args.quick else 3000, lines, work_us)
            results["latency"]["noop_grpc_floor_unix"].append(floor)
            print(f"no-op gRPC server doing {work_us} µs of work per call (same client): unary p50 "
                  f"{floor['unary_p50_ms']} ms; stream p50 {floor['stream_p50_ms']} ms p99 {floor['stream_p99_ms']} ms")
        results["memory"] = memory(sidecar.process.pid)
        print(f"sidecar memory: {results['memory']}")
    finally:
        sidecar.stop()
    write_results(args.json, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
