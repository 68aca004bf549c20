"""Cost of behaviour over time: window bookkeeping and client tracking per record, memory with 1M clients.

    python benchmarks/bench_behaviour.py [--records 200000] [--clients 1000000]

CPU time, in one run, per record of 1,000-record batches already scored (the sidecar counts
what Model.score returns): the window bookkeeping (counting keys of the open window), the
client tracking (features + the detector's graph), telling late records (each record's written
time read, against its source's least delay), and, as the floor beside them, the record
scoring itself (Model.score) of the same batches, both as the behaviour model scores them
(with the text columns windows and clients read) and as a record model alone (none). Two kinds
of traffic: repetitive (the shop's URLs) and novel (every URL new: each needs its template
worked out once).

Memory: a child process feeds 1,000,000 distinct clients through one model's client tracker
(65,536 slots, the default) and reports its resident-memory growth, beside a child that keeps
the same clients in a plain dict of their counts (what unbounded per-client state costs).
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import machine, write_results  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def train_model(directory: Path) -> Path:
    from tests.generate import timed_shop_lines

    training = directory / "train.log"
    training.write_text("\n".join(timed_shop_lines(3 * 3600, 2.0, seed=1)) + "\n")
    path = directory / "shop.onnx"
    subprocess.run([sys.executable, "-m", "logscore", "train", "--input", str(training), "--out", str(path),
                    "--windows", "--entities"], check=True, capture_output=True, cwd=ROOT)
    return path


def traffic(kind: str, count: int) -> list[str]:
    """repetitive: lines drawn from a pool of 2,000 (log traffic repeats); novel: every URL new."""
    from tests.generate import timed_shop_lines

    if kind == "repetitive":
        pool = timed_shop_lines(1000, 2.2, start=1_772_500_000.0, seed=7)[:2000]
        rng = random.Random(3)
        return [rng.choice(pool) for _ in range(count)]
    lines = timed_shop_lines(count // 2, 2.2, start=1_772_500_000.0, seed=7)[:count]
    return [line.replace(" HTTP/1.1", f"/n{i}x{i * 7919 % 10007} HTTP/1.1", 1) for i, line in enumerate(lines)]


def per_record_costs(model_path: Path, kind: str, records: int, batch: int = 1000) -> dict:
    """CPU time per record: scoring with the columns windows and clients read, the same records
    scored by the same model read as a record model only (no such columns: the floor), and the
    window and client bookkeeping of each batch."""
    from logscore.behaviour import ModelBehaviour, own_times
    from logscore.model import Model
    from logscore.settings import Settings

    model = Model.load(model_path)
    floor = Model.load(model_path)
    floor.behaviour_fields = ()  # the record model alone: the fields it featurizes, nothing more
    settings = Settings.load(flags={"models_dir": str(model_path.parent)}, environ={})
    lines = traffic(kind, records)
    scoring = record_only = windows = clients = lateness = 0.0
    distinct_times = 0  # timestamps read per batch (each distinct text is parsed once a batch)
    watched = ModelBehaviour(model, settings)
    urls = [line.split('"')[1] for line in lines]
    first_seen = len(set(urls)) / len(urls)  # share of requests whose URL no earlier request had
    for start in range(0, len(lines), batch):
        part = lines[start: start + batch]
        began = time.process_time()
        floor.score(part)
        alone = time.process_time()
        scored = model.score(part)
        counted = time.process_time()
        watched.windows.observe(scored.columns, len(part), None)
        tracked = time.process_time()
        watched.clients.observe(scored.columns, np.full(len(part), time.time()), scored.novelty, scored.scores)
        done = time.process_time()
        own = own_times(scored.columns, len(part), None)  # each record's written time: is it late?
        watched.lateness.late(own, None, float(np.nanmax(own)) + 1.0)
        timed = time.process_time()
        record_only += alone - began
        scoring += counted - alone
        windows += tracked - counted
        clients += done - tracked
        lateness += timed - done
        distinct_times += len(set(scored.columns["time"]))
    n = len(lines)
    return {"records": n, "record_model_scoring_us_per_record": round(record_only / n * 1e6, 2),
            "scoring_us_per_record": round(scoring / n * 1e6, 2),
            "window_bookkeeping_us_per_record": round(windows / n * 1e6, 3),
            "client_tracking_us_per_record": round(clients / n * 1e6, 2),
            "lateness_us_per_record": round(lateness / n * 1e6, 3),
            "distinct_timestamps_per_1000_records": round(distinct_times / n * 1000),
            "keys_counted": len(watched.windows.keys), "share_of_urls_never_seen_before": round(first_seen, 4),
            "featurizer": "compiled" if model.featurizer.native is not None else "python"}


CHILD = r'''
import sys, time, numpy as np
from pathlib import Path
def rss():
    return int([l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith("VmRSS:")][0].split()[1])
kind, clients, model_path = sys.argv[1], int(sys.argv[2]), sys.argv[3]
from logscore.model import Model
from logscore.behaviour import entity_spec
from logscore.entities import ClientWatch
model = Model.load(model_path)
spec = entity_spec(model)
batch = 1000
columns = {"remote_addr": [""] * batch, "status": ["200"] * batch, "url": ["/products/1"] * batch}
novelty, scores = np.zeros(batch), np.full(batch, 0.5)
watch = ClientWatch(spec, "shop")
plain = {}
watch.observe(columns, np.full(batch, 0.0), novelty, scores)  # warm: imports, first allocations
before = rss()
started = time.process_time()
for start in range(0, clients, batch):
    addresses = columns["remote_addr"]
    for i in range(batch):
        addresses[i] = f"10.{(start + i) >> 16 & 255}.{(start + i) >> 8 & 255}.{(start + i) & 255}x{start + i}"
    if kind == "tracker":
        watch.observe(columns, np.full(batch, float(start)), novelty, scores)
    else:
        for address in addresses:
            plain[address] = plain.get(address, 0) + 1
print(rss() - before, round((time.process_time() - started) / clients * 1e6, 2), len(watch.tracker) if kind == "tracker" else len(plain))
'''


def memory(model_path: Path, clients: int) -> dict:
    found = {}
    for kind in ("tracker", "plain_dict"):
        done = subprocess.run([sys.executable, "-c", CHILD, kind, str(clients), str(model_path)], check=True,
                              capture_output=True, text=True, cwd=ROOT)
        growth_kib, cpu_us, held = done.stdout.split()
        found[kind] = {"rss_growth_mib": round(int(growth_kib) / 1024, 1), "cpu_us_per_record": float(cpu_us),
                       "clients_held": int(held)}
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--clients", type=int, default=1_000_000)
    parser.add_argument("--out", default="benchmarks/results/behaviour.json")
    args = parser.parse_args()
    random.seed(0)
    with tempfile.TemporaryDirectory() as directory:
        model_path = train_model(Path(directory))
        results = {"machine": machine(), "load_average_start": os.getloadavg()}
        for kind in ("repetitive", "novel"):
            results[kind] = per_record_costs(model_path, kind, args.records)
            print(kind, results[kind], flush=True)
        results["memory_1m_clients"] = memory(model_path, args.clients)
        print(results["memory_1m_clients"])
    results["load_average_end"] = os.getloadavg()
    write_results(args.out, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
