"""Time and memory of `logscore train` on access lines, through the real command.

    python benchmarks/bench_train.py [--records 100000,1000000] [--detectors rarity] [--json benchmarks/results/train.json]

Writes generated shop lines (tests/generate.py: a long tail of requests) to a file, runs
`logscore train --input FILE --format access` in a child process and reports its wall and CPU
time, its peak resident memory, and the memory per record above a 2,000-line run in the same
invocation (what does not grow with the records). Each run states the share of lines whose
request line is the first of its kind in the file, and the load average (the machine is shared).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import load_average, machine, write_results  # noqa: E402
from tests.generate import shop_lines  # noqa: E402

BASELINE_RECORDS = 2000  # a run this small measures what does not grow with the records


def run_child(command: list[str]) -> dict:
    """Wall, CPU and peak RSS of one child process (each run in its own measuring child, so
    RUSAGE_CHILDREN's maximum is that run's)."""
    script = (
        "import json, resource, subprocess, sys, time\n"
        "started = time.perf_counter()\n"
        f"done = subprocess.run({command!r}, capture_output=True, text=True)\n"
        "usage = resource.getrusage(resource.RUSAGE_CHILDREN)\n"
        "print(json.dumps({'returncode': done.returncode, 'stderr': done.stderr[-2000:],\n"
        "                  'wall_s': time.perf_counter() - started, 'cpu_s': usage.ru_utime + usage.ru_stime,\n"
        "                  'peak_rss_mib': usage.ru_maxrss / 1024}))\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", default="100000,1000000")
    parser.add_argument("--detectors", default="rarity")
    parser.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "train.json"))
    args = parser.parse_args()
    logscore = str(Path(sys.executable).with_name("logscore"))
    workdir = Path(tempfile.mkdtemp(prefix="logscore-train-bench-"))
    results = {"machine": machine(), "detectors": args.detectors, "traffic": "tests/generate.py shop_lines",
               "runs": []}
    print(f"machine: {results['machine']}")
    baseline = None
    for count in [BASELINE_RECORDS, *(int(n) for n in args.records.split(","))]:
        data = workdir / f"access-{count}.log"
        lines = shop_lines(count, seed=12)
        data.write_text("\n".join(lines) + "\n")
        # how new the data is: the share of lines whose request line comes first in the file
        first_seen = len({line.split('"', 2)[1] for line in lines}) / count
        model = workdir / f"model-{count}.onnx"
        run = run_child([logscore, "train", "--input", str(data), "--format", "access", "--detectors",
                         args.detectors, "--out", str(model)])
        if run["returncode"] != 0:
            print(run["stderr"])
            return 1
        baseline = baseline or run
        row = {"records": count, "wall_s": round(run["wall_s"], 1), "cpu_s": round(run["cpu_s"], 1),
               "peak_rss_mib": round(run["peak_rss_mib"], 1),
               "bytes_per_record": round((run["peak_rss_mib"] - baseline["peak_rss_mib"]) * 2 ** 20
                                         / max(count - BASELINE_RECORDS, 1)),
               "model_bytes": model.stat().st_size, "request_lines_first_seen_share": round(first_seen, 3),
               "load_average": load_average()}
        results["runs"].append(row)
        print(f"{count:>9} lines: {row['wall_s']} s wall, {row['cpu_s']} s CPU, peak RSS {row['peak_rss_mib']} MiB "
              f"({row['bytes_per_record']} bytes a record above a {BASELINE_RECORDS}-line run)  "
              f"request lines first seen {first_seen:.1%}  "
              f"load {row['load_average']}",
              flush=True)
        data.unlink()
    write_results(args.json, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
