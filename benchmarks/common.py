"""What every benchmark script shares: the machine's description, processes' CPU and children,
and writing results."""

from __future__ import annotations

import json
import multiprocessing
import os
import platform
from pathlib import Path

import numpy as np
import onnxruntime


def cpu_seconds(pid: int) -> float:
    """A process's user + system CPU so far (from /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def child_pids(pid: int) -> list[int]:
    """The children of a process, whichever of its threads started them (the sidecar's scoring
    processes are started from a thread of its executor)."""
    return [int(child) for task in Path(f"/proc/{pid}/task").iterdir()
            for child in (task / "children").read_text().split()]


def machine() -> dict:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "numpy": np.__version__, "onnxruntime": onnxruntime.__version__}


def write_results(path: str, results: dict) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {path}")


def client_processes(client, args: tuple, clients: int, timeout: float) -> list:
    """Run ``client(index, *args, ready, queue)`` in ``clients`` processes at once and return what
    each put on the queue. Each client makes its own data from its ``index``, then waits at the
    ``ready`` barrier, so that timing starts when every client has its data."""
    queue = multiprocessing.Queue()
    ready = multiprocessing.Barrier(clients)
    workers = [multiprocessing.Process(target=client, args=(index, *args, ready, queue))
               for index in range(clients)]
    for worker in workers:
        worker.start()
    results = [queue.get(timeout=timeout) for _ in workers]
    for worker in workers:
        worker.join()
    return results


def load_average() -> str:
    """The 1, 5 and 15 minute load averages (the machine is shared: every figure states it)."""
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "unknown"


def percentiles_ms(durations, name: str) -> dict:
    """``{name}_p50_ms`` and ``{name}_p99_ms`` of durations given in seconds."""
    milliseconds = np.asarray(durations, dtype=np.float64) * 1000
    return {f"{name}_p{q}_ms": round(float(np.percentile(milliseconds, q)), 3) for q in (50, 99)}
