"""End-to-end throughput, latency and memory of the sidecar, from client processes, beside a
naive pipeline and a floor served the same way in the same run.

    python benchmarks/bench_sidecar.py [--quick] [--soak 1000000] [--json benchmarks/results/sidecar.json]

Starts `logscore serve` on the default model (Unix socket), and two plain grpc.aio servers
speaking the same Score RPC: **naive** (HashingVectorizer char 3-grams of the URL +
IsolationForest, benchmarks/baselines.py; scored in one worker thread, as the sidecar does) and
**grpc floor** (answers every record with 0 after decoding the request: what any Python gRPC
scorer pays), and a second sidecar run with ``--scoring-processes 2`` (rows "logscore 2
processes": featurizing and the graph in two worker processes; its memory is the sum of the three
processes). Then, from separate client processes:
  - throughput in records/s on **repetitive** and **novel** traffic (benchmarks/traffic.py):
    each client makes its own lines from its own seed; every run prints the share of request
    lines never sent before (over all clients' records) and the load average;
  - single-record round trips (unary and bidirectional stream), p50 / p99, against the sidecar
    and against the floor server with the same client;
  - the sidecar's memory after each run, and with ``--soak N``, while N novel records go through a
    fresh sidecar;
  - with ``--mlserver PYTHON`` (the python of a virtualenv holding MLServer 1.7: ``pip install
    'mlserver==1.7.*' scikit-learn 'uvloop<0.22'``; MLServer 1.7.1's worker pool fails on uvloop 0.22+),
    the naive pipeline served by **MLServer** (benchmarks/mlserver_naive.py, its default settings but
    debug logging; V2 ModelInfer over gRPC, TCP loopback), beside the sidecar over TCP loopback too;
    and MLServer with 2 inference processes (``parallel_workers: 2``; its default is 1) beside the
    sidecar with 2 scoring processes.
The machine is printed with the figures: compare ratios within a run, not across machines.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from benchmarks.common import (child_pids, client_processes, load_average, machine, percentiles_ms,  # noqa: E402
                               write_results)
from benchmarks.traffic import (TRAFFIC, csic_parameters, never_seen_share, real_lines,  # noqa: E402
                                sent_digests)
from tests.sidecar_process import SidecarProcess, free_port  # noqa: E402

# Lines all clients of a run make per second of it, shared among them: enough for the scorers'
# rates seen here (a client that runs out starts over, and the never-seen share printed says so;
# at 60,000 lines a second per client, one client alone started over on novel traffic: 42-57 %
# never seen). The gRPC floor, which featurizes nothing, goes faster and starts over.
LINES_PER_SECOND = 240_000


def make_request(lines: list[bytes]):
    from logscore.generated.logscore.v1 import scorer_pb2 as pb

    request = pb.ScoreRequest()
    request.lines.lines.extend(lines)
    return request


CHANNEL_OPTIONS = [("grpc.enable_http_proxy", 0), ("grpc.max_receive_message_length", 64 << 20),
                   ("grpc.max_send_message_length", 64 << 20)]
V2 = "v2:"  # a target served by MLServer: the V2 inference protocol, model "naive"


def stub_for(target: str):
    import grpc

    from logscore.generated.logscore.v1 import scorer_pb2_grpc as pb_grpc

    return pb_grpc.ScorerStub(grpc.insecure_channel(target, options=CHANNEL_OPTIONS))


def caller(target: str):
    """(make a request of encoded lines, send it): the Score RPC, or V2 ModelInfer at an MLServer target.
    Responses are not decoded: the client's cost stays the same for every server."""
    if not target.startswith(V2):
        return make_request, stub_for(target).Score
    import grpc

    channel = grpc.insecure_channel(target[len(V2):], options=CHANNEL_OPTIONS)
    infer = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer", request_serializer=bytes,
                                response_deserializer=bytes)
    return (lambda lines: v2_infer_request("naive", lines)), infer


def v2_infer_request(model: str, lines: list[bytes]) -> bytes:
    """A V2 ModelInferRequest (MLServer's dataplane.proto: model_name = 1, inputs = 5; a tensor's
    name = 1, datatype = 2, shape = 3, contents = 5; bytes_contents = 8) with one BYTES tensor
    "lines", encoded by hand: the project does not depend on MLServer's generated code."""
    contents = b"".join(_proto_field(8, line) for line in lines)
    tensor = (_proto_field(1, b"lines") + _proto_field(2, b"BYTES") + _proto_field(3, _varint(len(lines)))
              + _proto_field(5, contents))
    return _proto_field(1, model.encode()) + _proto_field(5, tensor)


def _proto_field(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def client_throughput(index: int, target: str, traffic: str, batch: int, seconds: float, seed: int, clients: int,
                      ready, out) -> None:
    """One client of ``clients``: its own lines, then Score calls back to back for ``seconds``."""
    count = max(batch * 2, int(seconds * LINES_PER_SECOND / clients))
    lines = TRAFFIC[traffic](count, seed * 100 + index)
    encode, send = caller(target)
    requests = [encode([line.encode() for line in lines[i: i + batch]])
                for i in range(0, len(lines) - batch + 1, batch)]
    send(encode([lines[0].encode()]), timeout=30)  # connected
    ready.wait()
    records, latencies = 0, []
    started = time.time()
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        call = time.perf_counter()
        send(requests[len(latencies) % len(requests)], timeout=60)
        latencies.append(time.perf_counter() - call)
        records += batch
    finished = time.time()
    sent = [lines[i % (len(requests) * batch)] for i in range(records)]
    out.put((records, latencies, started, finished, *sent_digests(sent)))


def throughput(target: str, traffic: str, batch: int, clients: int, seconds: float, seed: int,
               seen: dict) -> dict:
    results = client_processes(client_throughput, (target, traffic, batch, seconds, seed, clients), clients,
                               timeout=seconds + 300)
    records = sum(r[0] for r in results)
    elapsed = max(r[3] for r in results) - min(r[2] for r in results)
    novelty = never_seen_share(np.concatenate([r[4] for r in results]), np.concatenate([r[5] for r in results]),
                               seen.setdefault(traffic, set()))
    return {"traffic": traffic, "batch": batch, "clients": clients, "records_per_s": round(records / elapsed),
            **percentiles_ms(np.concatenate([r[1] for r in results]), "call"), **novelty,
            "load_average": load_average()}


def client_latency(index: int, target: str, calls: int, ready, out) -> None:
    lines = TRAFFIC["repetitive"](calls, 77)
    ready.wait()
    out.put(single_record_latency(target, calls, lines))


def single_record_latency(target: str, calls: int, lines: list[str]) -> dict:
    import queue

    encode, send = caller(target)
    requests = [encode([line.encode()]) for line in lines[:calls]]
    for request in requests[:200]:
        send(request, timeout=5)
    unary = []
    for request in requests:
        started = time.perf_counter()
        send(request, timeout=5)
        unary.append(time.perf_counter() - started)
    if target.startswith(V2):  # no stream in the comparison: V2's ModelStreamInfer is not what users call
        return {"calls": len(requests), **percentiles_ms(unary, "unary")}

    stub = stub_for(target)  # the same requests, streamed
    outgoing: queue.Queue = queue.Queue()

    def feed():
        while (item := outgoing.get()) is not None:
            yield item

    responses = stub.ScoreStream(feed())
    stream = []
    for request in requests:
        started = time.perf_counter()
        outgoing.put(request)
        next(responses)
        stream.append(time.perf_counter() - started)
    outgoing.put(None)
    return {"calls": len(requests), **percentiles_ms(unary, "unary"), **percentiles_ms(stream[50:], "stream")}


def python_server(address: str, kind: str, ready_file: str) -> None:
    """A plain grpc.aio server answering Score (and ScoreStream) for raw lines: ``naive`` scores
    them with the naive pipeline in one worker thread; ``floor`` answers 0 for every record."""
    import grpc

    from logscore.generated.logscore.v1 import scorer_pb2 as pb

    if kind == "naive":
        from benchmarks.baselines import fit_naive_url_isolation_forest

        baseline = fit_naive_url_isolation_forest(list(real_lines()))

        def score(lines: list[str]) -> list[float]:
            return baseline.score(lines).tolist()
    else:
        def score(lines: list[str]) -> list[float]:
            return [0.0] * len(lines)

    pool = ThreadPoolExecutor(1)

    async def answer(request_bytes: bytes) -> bytes:
        request = pb.ScoreRequest.FromString(request_bytes)
        lines = [line.decode("utf-8", "replace") for line in request.lines.lines]
        scores = score(lines) if len(lines) <= 8 else await asyncio.get_running_loop().run_in_executor(
            pool, score, lines)
        return pb.ScoreResponse(scores=scores, is_anomaly=[False] * len(scores),
                                model_index=[0] * len(scores)).SerializeToString()

    async def unary(request, context):
        return await answer(request)

    async def stream(requests, context):
        async for request in requests:
            yield await answer(request)

    async def serve():
        server = grpc.aio.server(options=[("grpc.max_receive_message_length", 64 << 20)])
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
            "logscore.v1.Scorer", {"Score": grpc.unary_unary_rpc_method_handler(unary),
                                   "ScoreStream": grpc.stream_stream_rpc_method_handler(stream)}),))
        server.add_insecure_port(address)
        await server.start()
        Path(ready_file).touch()
        await server.wait_for_termination()

    asyncio.run(serve())


def start_python_server(workdir: Path, kind: str) -> tuple[multiprocessing.Process, str]:
    # NOTE: this process never makes a gRPC call itself: gRPC's threads in a process that then
    # forks the clients hung them. The server says it is up through a file.
    socket, ready = workdir / f"{kind}.sock", workdir / f"{kind}.ready"
    process = multiprocessing.Process(target=python_server, args=(f"unix:{socket}", kind, str(ready)), daemon=True)
    process.start()
    deadline = time.monotonic() + 120  # the naive pipeline fits first
    while time.monotonic() < deadline and process.is_alive():
        if ready.exists():
            return process, f"unix:{socket}"
        time.sleep(0.2)
    process.terminate()
    raise RuntimeError(f"the {kind} server did not start")


def start_mlserver(python: str, workdir: Path, parallel_workers: int = 1) -> tuple[subprocess.Popen, str]:
    """MLServer serving the naive pipeline (benchmarks/mlserver_naive.py), fitted on the same lines
    as the naive server, in ``parallel_workers`` inference processes (its default: 1); returns the
    process and its V2 target."""
    folder = workdir / f"mlserver-{parallel_workers}"
    (folder / "naive").mkdir(parents=True)
    grpc_port, http_port = free_port(), free_port()
    (folder / "settings.json").write_text(json.dumps({
        "host": "127.0.0.1", "grpc_port": grpc_port, "http_port": http_port, "metrics_port": free_port(),
        "debug": False, "parallel_workers": parallel_workers,
        # its worker pool's Prometheus files; by default in .metrics under the current directory (the checkout)
        "metrics_dir": str(folder / "metrics")}))
    (folder / "naive" / "model-settings.json").write_text(json.dumps({
        "name": "naive", "implementation": "benchmarks.mlserver_naive.NaivePipeline"}))
    training = workdir / "naive-training.txt"
    training.write_text("\n".join(real_lines()), encoding="utf-8")
    log = open(folder / "mlserver.log", "ab")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "LOGSCORE_BENCH_TRAINING": str(training)}
    process = subprocess.Popen([str(Path(python).parent / "mlserver"), "start", str(folder)], env=env,
                               stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 180  # the pipeline fits when the model loads
    while time.monotonic() < deadline and process.poll() is None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/v2/models/naive/ready", timeout=2) as answer:
                if answer.status == 200:
                    return process, f"{V2}127.0.0.1:{grpc_port}"
        except OSError:
            pass
        time.sleep(0.5)
    process.terminate()
    raise RuntimeError(f"MLServer did not get ready (see {folder / 'mlserver.log'})")


def memory(pid: int) -> dict:
    status = Path(f"/proc/{pid}/status").read_text().splitlines()
    values = {line.split(":")[0]: line.split(":")[1].strip() for line in status if ":" in line}
    return {"rss_mib": round(int(values["VmRSS"].split()[0]) / 1024, 1),
            "peak_rss_mib": round(int(values["VmHWM"].split()[0]) / 1024, 1)}


def rss_text(memory: dict) -> str:
    if "total_rss_mib" in memory:
        return f"{memory['total_rss_mib']} MiB (sidecar {memory['rss_mib']} + {memory['scoring_processes_rss_mib']})"
    return f"{memory['rss_mib']} MiB"


def soak(target: str, pid: int, records: int, batch: int = 1000) -> dict:
    """Novel records through the sidecar, two clients, RSS every tenth of the way."""
    samples = [{"records": 0, **memory(pid)}]
    step = max(records // 10, batch * 2)
    sent = 0
    for part in range(10):
        sent += sum(client_processes(client_count, (target, batch, step // 2, 9000 + part), 2, timeout=900))
        samples.append({"records": sent, **memory(pid), "load_average": load_average()})
        print(f"  soak: {sent:>9} novel records (99 % of request lines never sent before), sidecar RSS "
              f"{samples[-1]['rss_mib']} MiB (peak {samples[-1]['peak_rss_mib']}), load "
              f"{samples[-1]['load_average']}", flush=True)
        if sent >= records:
            break
    return {"records": sent, "samples": samples}


def client_count(index: int, target: str, batch: int, records: int, seed: int, ready, out) -> None:
    lines = TRAFFIC["novel"](records, seed * 100 + index)
    stub = stub_for(target)
    ready.wait()
    for i in range(0, len(lines), batch):
        stub.Score(make_request([line.encode() for line in lines[i: i + batch]]), timeout=60)
    out.put(len(lines))


def start_sidecar(workdir: Path, tcp: Optional[str] = None, scoring_processes: int = 0) -> SidecarProcess:
    # 10,000-record requests (about 2.4 MB) exceed the default max_message_bytes (2 MiB): raised as an
    # operator sending such batches would.
    workdir.mkdir(parents=True, exist_ok=True)
    return SidecarProcess(ROOT / "models", workdir, reload_interval_s=0, max_message_bytes=8 * 2**20,
                          max_inflight_bytes=64 * 2**20, scoring_processes=scoring_processes,
                          **({"tcp": tcp} if tcp else {})).start()


def sidecar_memory(sidecar: SidecarProcess) -> dict:
    """RSS of the sidecar and, with scoring processes, of them too (their sum is what it costs)."""
    own = memory(sidecar.process.pid)
    children = child_pids(sidecar.process.pid)
    if not children:
        return own
    workers = [memory(pid) for pid in children]
    return {**own, "scoring_processes_rss_mib": [w["rss_mib"] for w in workers],
            "total_rss_mib": round(own["rss_mib"] + sum(w["rss_mib"] for w in workers), 1)}


RUNS = [  # (server, batch, clients)
    ("logscore", 1, 1), ("logscore", 100, 4), ("logscore", 1000, 1), ("logscore", 1000, 4), ("logscore", 10000, 4),
    ("logscore 2 processes", 1000, 1), ("logscore 2 processes", 1000, 4), ("logscore 2 processes", 10000, 4),
    ("naive", 1000, 1), ("naive", 1000, 4), ("grpc floor", 1000, 1), ("grpc floor", 1000, 4),
]
SCORING_PROCESSES = 2  # the rows "logscore 2 processes": a second sidecar, run with --scoring-processes 2
MLSERVER_RUNS = [  # with --mlserver: both over TCP loopback, as MLServer listens
    ("logscore tcp", 1000, 1), ("logscore tcp", 1000, 4), ("mlserver", 1000, 1), ("mlserver", 1000, 4),
    ("logscore 2 processes tcp", 1000, 1), ("logscore 2 processes tcp", 1000, 4),
    ("mlserver 2 workers", 1000, 1), ("mlserver 2 workers", 1000, 4),
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="short runs (a smoke test of the benchmark)")
    parser.add_argument("--soak", type=int, default=None, help="novel records sent to watch memory "
                        "(default 1,000,000; 20,000 with --quick)")
    parser.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "sidecar.json"))
    parser.add_argument("--mlserver", metavar="PYTHON", help="the python of a virtualenv with MLServer 1.7 "
                        "(see above): adds MLServer serving the naive pipeline, and the sidecar over TCP")
    args = parser.parse_args()
    seconds = 1.0 if args.quick else 4.0
    soak_records = args.soak if args.soak is not None else (20_000 if args.quick else 1_000_000)
    real_lines(), csic_parameters()  # read once, before the client processes fork
    workdir = Path(tempfile.mkdtemp(prefix="logscore-bench-"))
    tcp, processes_tcp = (f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}") if args.mlserver else (None, None)
    sidecar = start_sidecar(workdir, tcp)
    with_processes = start_sidecar(workdir / "processes", processes_tcp, scoring_processes=SCORING_PROCESSES)
    sidecars = {"logscore": sidecar, "logscore tcp": sidecar, "logscore 2 processes": with_processes,
                "logscore 2 processes tcp": with_processes}
    servers = [start_python_server(workdir, kind) for kind in ("naive", "floor")]
    targets = {"logscore": f"unix:{sidecar.socket}", "naive": servers[0][1], "grpc floor": servers[1][1],
               "logscore 2 processes": f"unix:{sidecars['logscore 2 processes'].socket}"}
    runs, latency_servers, mlservers = list(RUNS), ["logscore", "grpc floor"], []
    if args.mlserver:
        for name, workers in (("mlserver", 1), ("mlserver 2 workers", SCORING_PROCESSES)):
            process, targets[name] = start_mlserver(args.mlserver, workdir, workers)
            mlservers.append(process)
        targets["logscore tcp"], targets["logscore 2 processes tcp"] = tcp, processes_tcp
        runs += MLSERVER_RUNS
        latency_servers += ["logscore tcp", "mlserver"]
    # The sidecar imports the featurizer from the same path as this process: a worktree without the
    # compiled one built runs the pure-Python path, several times slower, and the figures must say so.
    from logscore.features.native import status as featurizer_status

    results = {"machine": machine(), "featurizer": featurizer_status(), "throughput": [], "latency": {}}
    print(f"machine: {results['machine']}; featurizer: {results['featurizer']}; load average at start "
          f"{load_average()}")
    seen: dict = {}
    try:
        for run, (traffic, (server, batch, clients)) in enumerate(
                (t, r) for t in ("repetitive", "novel") for r in runs):
            row = {"server": server, **throughput(targets[server], traffic, batch, clients, seconds, run, seen)}
            if server.startswith("logscore"):
                row["sidecar_memory_after"] = sidecar_memory(sidecars[server])
            results["throughput"].append(row)
            print(f"{traffic:10} {server:20} batch {batch:>6} clients {clients}: {row['records_per_s']:>8} records/s  "
                  f"call p50 {row['call_p50_ms']:>7} ms p99 {row['call_p99_ms']:>7} ms  never seen: "
                  f"{row['never_seen_request_lines']:.1%} of request lines  load {row['load_average']}"
                  + (f"  RSS {rss_text(row['sidecar_memory_after'])}" if "sidecar_memory_after" in row else ""),
                  flush=True)
        for name in latency_servers:
            row = client_processes(client_latency, (targets[name], 500 if args.quick else 3000), 1, timeout=600)[0]
            results["latency"][name] = row
            print(f"{name:12} single record: unary p50 {row['unary_p50_ms']} ms p99 {row['unary_p99_ms']} ms"
                  + (f"; stream p50 {row['stream_p50_ms']} ms p99 {row['stream_p99_ms']} ms" if "stream_p50_ms" in row
                     else ""), flush=True)
        results["latency"]["stream_p50_ratio_to_floor"] = round(
            results["latency"]["logscore"]["stream_p50_ms"] / results["latency"]["grpc floor"]["stream_p50_ms"], 2)
        print(f"single-record stream p50, logscore / floor: {results['latency']['stream_p50_ratio_to_floor']}")
        results["memory"] = memory(sidecar.process.pid)
        results["memory_with_scoring_processes"] = sidecar_memory(sidecars["logscore 2 processes"])
        print(f"sidecar memory after the runs above: {results['memory']}; with {SCORING_PROCESSES} scoring "
              f"processes: {results['memory_with_scoring_processes']}")
        sidecar.stop()
        with_processes.stop()
        if soak_records:
            # A fresh sidecar: the steady state of many novel records, apart from the high-water
            # mark that the 10,000-record batches above leave (their working memory, in the table).
            sidecar = start_sidecar(workdir / "soak")
            results["soak"] = soak(f"unix:{sidecar.socket}", sidecar.process.pid, soak_records)
        results["load_average_at_end"] = load_average()
        print(f"load average at the end {results['load_average_at_end']}")
    finally:
        sidecar.stop()
        with_processes.stop()
        for process, _ in servers:
            process.terminate()
        for process in mlservers:
            process.terminate()
            process.wait(timeout=30)
    write_results(args.json, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
