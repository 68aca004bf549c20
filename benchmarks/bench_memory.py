"""Peak memory of the sidecar under the largest, most memory-hungry requests its limits allow.

    python benchmarks/bench_memory.py [--json benchmarks/results/memory.json]

For each shape of tests/worst_inputs.py (many tiny values, long lines, ...) a fresh
`logscore serve` on the default model with the shipped defaults gets that payload
from 2 gRPC connections (8 calls each) or 16 HTTP connections at once; then all shapes at
once (32 gRPC calls a connection, twice the streams one may have open: gRPC takes in a stream's
data before the sidecar sees the call, so the streams a connection may open bound what it holds);
then the same with every line new (the featurizer's value caches fill). Prints
the peak RSS (VmHWM) of each run beside the idle baseline of the same run, with the load
average; writes JSON.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import machine, write_results  # noqa: E402
from logscore.settings import Settings  # noqa: E402
from tests.sidecar_process import SidecarProcess  # noqa: E402
from tests.worst_inputs import flood, worst_payloads  # noqa: E402

MIB = 1024 * 1024


CALLS_PER_PAYLOAD = 16  # worst_inputs.flood: 8 calls on each of 2 gRPC connections, or 16 HTTP connections


def run(payloads: dict, label: str, distinct: bool = False) -> dict:
    with tempfile.TemporaryDirectory() as workdir:
        process = SidecarProcess(ROOT / "models", Path(workdir)).start()
        try:
            idle = process.peak_rss_bytes()
            outcomes = flood(process, payloads)
            peak = process.peak_rss_bytes()
        finally:
            process.stop()
    # Never-seen lines: with ``distinct`` each line of a payload is new once, its payload sent
    # CALLS_PER_PAYLOAD times; else a payload repeats one line.
    never_seen = 1 / CALLS_PER_PAYLOAD if distinct else 0.0
    row = {"run": label, "idle_peak_mib": round(idle / MIB), "peak_mib": round(peak / MIB),
           "never_seen_line_share": round(never_seen, 4),
           "outcomes": {name: sorted(set(results)) for name, results in outcomes.items()},
           "load_average": os.getloadavg()[0]}
    print(f"{label:24s} idle {row['idle_peak_mib']:4d} MiB  peak {row['peak_mib']:4d} MiB  "
          f"never-seen lines {never_seen:.1%}  load {row['load_average']:.1f}  {row['outcomes']}", flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "memory.json"))
    args = parser.parse_args()
    defaults = Settings()
    print(f"machine: {machine()}; max_message_bytes {defaults.max_message_bytes}, "
          f"max_inflight_bytes {defaults.max_inflight_bytes}", flush=True)
    payloads = worst_payloads(defaults.max_message_bytes)
    rows = [run({name: payload}, name) for name, payload in payloads.items()]
    rows.append(run(payloads, "all at once"))
    rows.append(run(worst_payloads(defaults.max_message_bytes, distinct=True), "all at once, all new", distinct=True))
    write_results(args.json, {"machine": machine(), "max_message_bytes": defaults.max_message_bytes,
                              "max_inflight_bytes": defaults.max_inflight_bytes, "runs": rows})


if __name__ == "__main__":
    main()
