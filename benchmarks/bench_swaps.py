"""What learned swaps do to windows and clients: the same traffic with and without a model swapped in
every minute, as `serve --learn` swaps them (learn_retrain_records), in process on a simulated clock.

    python benchmarks/bench_swaps.py [--payloads fuzzdb/attack] [--out benchmarks/results/swaps.json]

A shop model is trained from 4 hours of its traffic with windows (60 s) and clients; two learned
models keep them (`train --behaviour-from`), each from 5,000 other records. Then 30 minutes of the
shop's traffic (4 records/s, 300 clients) with a 3-minute burst of 40 % 5xx (from minute 10.5), a
4-minute outage (from minute 20) and 16 scanners (tests' and bench_clients' scanners: fuzzdb
payloads and directory brute force, 40-200 requests each, at 2-20 requests/s, or 10 or 100 times
slower; at 100 times, 60 minutes) go through Behaviour in 1-s batches as a shipper flushes them,
three ways: one learned model serving throughout; the two swapped in by turns every 60 s, 37 s
into a window, through Behaviour.follow as a reload does; and the same swaps with each model
started from its trained state (``fresh``: what every swap did before a model with the same
detectors took over the live state). Reported per run: window events (5xx ones and drops named),
requests each scanner made until its client event, scanners announced again, normal clients'
client events. The outage's minutes hold the scanners' requests still (a service down whose
front still logs them).
"""

from __future__ import annotations

import argparse
import os
import random
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.bench_clients import SHARED, line_time, payloads, scanner_lines  # noqa: E402
from benchmarks.common import machine, write_results  # noqa: E402
from logscore.behaviour import Behaviour  # noqa: E402
from logscore.model import Model  # noqa: E402
from logscore.settings import Settings  # noqa: E402
from tests.generate import stamped, timed_shop_lines  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
T0 = 1_772_672_400.0  # 2026-03-01 01:00 UTC, among the trained hours
SWAP_S = 60.0
TICK_S = 15.0  # the sidecar's clock: a quarter window
BURST = (T0 + 630, T0 + 810)
OUTAGE = (T0 + 1200, T0 + 1440)
STATUS = re.compile(r'(" )(\d{3})( )')


class SimulatedClock:
    """time.time for the windows a model starts (WindowCounter reads the clock when made)."""

    def __init__(self):
        self.now = T0
        self._real = time.time

    def __enter__(self):
        time.time = lambda: self.now
        return self

    def __exit__(self, *exc):
        time.time = self._real


class Events:
    """The hub's side Behaviour publishes to."""

    def __init__(self):
        self.events = []

    def publish(self, events):
        self.events += events


def train(directory: Path) -> list[Path]:
    """The learned models (keeping the windows and clients of a model trained from history)."""
    def write(name: str, lines: list[str]) -> Path:
        path = directory / name
        path.write_text("\n".join(lines) + "\n")
        return path

    history = write("history.log", timed_shop_lines(4 * 3600, 4.0, seed=1))
    trained = directory / "history.onnx"
    command = [sys.executable, "-m", "logscore", "train", "--name", "shop"]
    subprocess.run(command + ["--input", str(history), "--out", str(trained), "--windows", "--entities"],
                   check=True, capture_output=True, cwd=ROOT)
    learned = []
    for k, start in enumerate((1_772_500_000.0, 1_772_600_000.0)):
        recent = write(f"recent{k}.log", timed_shop_lines(1800, 4.0, start=start, seed=5 + k)[:5000])
        learned.append(directory / f"learned{k}.onnx")
        subprocess.run(command + ["--input", str(recent), "--out", str(learned[-1]), "--behaviour-from", str(trained),
                                  "--learned-route", "shop"], check=True, capture_output=True, cwd=ROOT)
    return learned


def traffic(minutes: int, seed: int, slower: float, attacks: Path) -> list[tuple[float, str, str]]:
    """(arrival time, line, the scanner's address or None), in time order."""
    rng = random.Random(seed)
    timed = []
    for line in timed_shop_lines(minutes * 60, 4.0, start=T0, seed=100 + seed):
        moment = line_time(line)
        if OUTAGE[0] <= moment < OUTAGE[1]:
            continue
        if BURST[0] <= moment < BURST[1] and rng.random() < 0.4:
            line = STATUS.sub(r"\g<1>503\g<3>", line, count=1)
        timed.append((moment, line, None))
    normal = [line for _, line, _ in timed]
    found = scanner_lines(normal, payloads(attacks, rng), 16, T0 + 120,
                          T0 + minutes * 60, rng)
    for ip, requests in found.items():
        first = requests[0][0]
        for moment, line in requests:
            moment = first + (moment - first) * slower
            timed.append((moment, stamped(line, moment), ip))
    return sorted(timed, key=lambda entry: entry[0])


def replay(timed: list, learned: list[Path], minutes: int, how: str) -> dict:
    """``how``: "served" (no swap), "carried" (swaps), "fresh" (swaps, each model from its trained state)."""
    settings = Settings.load(flags={"models_dir": str(learned[0].parent), "episodes_file": ""}, environ={})
    hub = Events()
    behaviour = Behaviour(settings, hub)
    by_second = defaultdict(list)
    for moment, line, ip in timed:
        by_second[int(moment)].append((line, ip))
    fed, detected, client_events = Counter(), {}, Counter()
    novel = scored_records = 0  # records holding a feature the serving record model never saw
    swaps = 0
    with SimulatedClock() as clock:
        model = swap_in(behaviour, learned[0], how)
        next_swap = T0 + 37 + SWAP_S if how != "served" else float("inf")
        next_tick = T0 + TICK_S
        for second in range(int(T0), int(T0) + minutes * 60):
            clock.now = now = second + 1.0
            if now >= next_swap:
                swaps += 1
                model = swap_in(behaviour, learned[swaps % 2], how)
                next_swap += SWAP_S
            batch = by_second.get(second, [])
            if batch:
                seen = len(hub.events)
                lines = [line for line, _ in batch]
                scored = model.score(lines)
                novel += int((scored.novelty > 0).sum())
                scored_records += len(lines)
                behaviour.observe({model: list(range(len(lines)))}, [scored], len(lines), ["access"] * len(lines), now)
                fed.update(ip for _, ip in batch if ip)
                for event in hub.events[seen:]:
                    if event.kind == "client":
                        ip = event.key.partition("=")[2]
                        client_events[ip] += 1
                        if ip in fed:
                            detected.setdefault(ip, fed[ip])
            while now >= next_tick:
                behaviour.tick(now)
                next_tick += TICK_S
    return {**summary(hub.events, fed, detected, client_events, swaps),
            "never_seen_share": round(novel / max(scored_records, 1), 4)}


def swap_in(behaviour: Behaviour, path: Path, how: str) -> Model:
    model = Model.load(path)
    model.name = "shop"
    if how == "fresh":
        for watched in behaviour._models.values():
            watched.fingerprint = None  # no detectors in common: the new model starts afresh
    behaviour.follow({model})
    return model


def summary(events: list, fed: Counter, detected: dict, client_events: Counter, swaps: int) -> dict:
    windows = [e for e in events if e.kind == "window"]
    delays = sorted(detected.values())
    return {"swaps": swaps, "window_events": len(windows),
            "5xx_event_windows_s": [round(e.start - T0) for e in windows if "5xx" in e.key],
            "burst_events": sum(BURST[0] - SWAP_S < e.start < BURST[1] and "5xx" in e.key for e in windows),
            "drop_events_s": [round(e.start - T0) for e in windows if e.observed < e.expected_low],
            "drop_event_keys": [e.key for e in windows if e.observed < e.expected_low],
            "scanners_detected": len(delays), "requests_to_detection": delays,
            "mean_requests_to_detection": round(sum(delays) / len(delays), 1) if delays else None,
            "scanners_announced_again": sum(n - 1 for ip, n in client_events.items() if ip in fed),
            "normal_client_events": sum(n for ip, n in client_events.items() if ip not in fed)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--payloads", default=str(SHARED / "payloads" / "fuzzdb" / "attack"))
    parser.add_argument("--out", default="benchmarks/results/swaps.json")
    args = parser.parse_args()
    results = {"machine": machine(), "load_average_start": os.getloadavg(), "runs": []}
    with tempfile.TemporaryDirectory() as directory:
        learned = train(Path(directory))
        for slower, minutes in ((1.0, 30), (10.0, 30), (100.0, 60)):
            for seed in range(3 if slower < 100 else 2):
                timed = traffic(minutes, seed, slower, Path(args.payloads))
                for how in ("served", "carried", "fresh"):
                    run = {"scanners_slower": slower, "minutes": minutes, "seed": seed, "run": how,
                           **replay(timed, learned, minutes, how)}
                    print({k: v for k, v in run.items() if k != "requests_to_detection"}, flush=True)
                    results["runs"].append(run)
    results["load_average_end"] = os.getloadavg()
    write_results(args.out, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
