"""Scanners among real clients: client-level ROC-AUC and requests to detection of the client detector.

    python benchmarks/bench_clients.py [--log apache_logs] [--payloads fuzzdb/attack] [--scanners 60]

The real access log (../shared/data/elastic_apache_access_logs, 4 days) is split in time: the
first half trains the record model and the client detector (`logscore train --entities`, the
same code in process); into the second half, scanners are synthesized from new IPs at scanner
rates (2-20 requests a second): fuzzdb payloads injected into the site's own URLs, and directory
brute force (guessed admin, backup and config paths). The second half is replayed in time order
through the record model and the product's ClientWatch, in batches as the sidecar sees them.

Reported: client-level ROC-AUC (a client's score: the highest entity_score of its requests) and
the requests each scanner made before its first entity_score at the threshold, beside the floor
of the same run: record scores alone (per line, and per client as its highest record score).

``--learned-records N``: as `serve --learn` would serve it, the record model is learned from the
first half's last N lines only and keeps the client detector learned from the whole first half
(`train --behaviour-from`): does the detector hold when its novelty and mean_score features come
from a record model that saw fewer records?

An experiment the product does not run (operations.md says why): ``--recalibrate`` sets the client
threshold again on the N lines' clients, each line scored by a record model that never saw it (the
cross-fitted halves training scores clients with), at training's quantile; ``--window-scanners K``
puts K scanners among those N lines (the record model learns from them too, as the learner would).
"""

from __future__ import annotations

import argparse
import datetime
import os
import random
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import machine, write_results  # noqa: E402
from logscore.artifact import Artifact  # noqa: E402
from logscore.behaviour import entity_spec  # noqa: E402
from logscore.entities import ClientWatch  # noqa: E402
from logscore.evaluation import roc_auc  # noqa: E402
from logscore.features import load_spec  # noqa: E402
from logscore.inputs import read_lines  # noqa: E402
from logscore.model import Model  # noqa: E402
from logscore.timestamps import parse_time  # noqa: E402
from logscore.entities import CLIENT_FIELDS  # noqa: E402
from logscore.timestamps import TIME_FIELDS  # noqa: E402
from logscore.training.behaviour import (BehaviourOptions, carry_behaviour, client_replay,  # noqa: E402
                                         client_threshold, cross_fitted, learn_behaviour, score_for_behaviour)
from logscore.training.train import TrainOptions, train  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
FAMILIES = ("sql-injection", "xss", "path-traversal", "lfi", "os-cmd-execution", "rfi")
WORDS = ("admin", "administrator", "backup", "backups", "old", "test", "dev", "staging", "config", "conf", "db",
         "database", "sql", "dump", "wp-admin", "wp-login.php", "phpmyadmin", "pma", "mysql", "login", "console",
         "manager", "server-status", ".git/config", ".env", ".svn/entries", "web.config", "cgi-bin", "install",
         "setup", "upload", "uploads", "private", "secret", "tmp", "logs", "api", "shell", "cmd", "debug")
EXTENSIONS = ("", "/", ".php", ".bak", ".zip", ".tar.gz", ".old", ".sql", ".txt", ".asp", ".jsp")
SCANNER_AGENTS = ("sqlmap/1.7.2#stable (https://sqlmap.org)", "Nikto/2.5.0", "gobuster/3.6",
                  "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0 Safari/537.36",
                  "curl/8.4.0", "python-requests/2.31.0")


def line_time(line: str) -> float:
    start = line.find("[")
    return parse_time(line[start + 1: line.find("]", start)]) or 0.0


def stamp(seconds: float) -> str:
    return datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc).strftime("%d/%b/%Y:%H:%M:%S +0000")


def payloads(directory: Path, rng: random.Random) -> dict[str, list[str]]:
    found = {}
    for family in FAMILIES:
        lines = [line for path in sorted((directory / family).rglob("*.txt")) for line in read_lines([str(path)])
                 if line.strip() and not line.startswith("#")]
        rng.shuffle(lines)
        found[family] = lines
    return found


def scanner_lines(normal: list[str], payload_lists: dict, count: int, start: float, end: float,
                  rng: random.Random) -> dict[str, list[tuple[float, str]]]:
    """Scanners by IP: (time, access line) of each request."""
    urls = [line.split('"')[1].split(" ")[1] for line in normal if line.count('"') >= 2 and " " in line.split('"')[1]]
    scanners = {}
    for number in range(count):
        ip = f"{rng.choice([198, 203, 185, 45])}.{rng.randint(0, 255)}.{rng.randint(0, 255)}.{number % 250 + 1}"
        rate = rng.uniform(2.0, 20.0)
        moment = rng.uniform(start, end - 600)
        agent = rng.choice(SCANNER_AGENTS)
        brute = number % 2 == 0
        family = rng.choice(FAMILIES)
        requests = []
        for _ in range(rng.randint(40, 200)):
            moment += rng.expovariate(rate)
            if brute:
                url = "/" + rng.choice(WORDS) + rng.choice(EXTENSIONS)
                status = rng.choices(["404", "403", "301", "200"], weights=[85, 7, 5, 3])[0]
            else:
                base = rng.choice(urls)
                payload = rng.choice(payload_lists[family]).strip().replace(" ", "%20").replace('"', "%22")
                separator = "&" if "?" in base else "?"
                url = f"{base}{separator}{rng.choice(['id', 'q', 'page', 'file'])}={payload}"
                status = rng.choices(["200", "404", "500", "400"], weights=[50, 30, 10, 10])[0]
            size = rng.randint(200, 5000) if status == "200" else rng.randint(0, 400)
            requests.append((moment, f'{ip} - - [{stamp(moment)}] "GET {url} HTTP/1.1" {status} {size} "-" "{agent}"'))
        scanners[ip] = requests
    return scanners


def with_scanners(window: list[str], payload_lists: dict, count: int) -> list[str]:
    """The window's lines with ``count`` scanners' requests among them, in time order."""
    if not count:
        return window
    moments = [line_time(line) for line in window]
    added = scanner_lines(window, payload_lists, count, moments[0], moments[-1], random.Random(1))
    return [line for _, line in sorted([*zip(moments, window), *(r for rs in added.values() for r in rs)])]


def window_threshold(model_proto, metadata: dict, window: list[str]) -> dict:
    """The client threshold set again on the window's clients: each line scored by a record model
    that never saw it (training's cross-fitted halves), clients replayed, training's quantile."""
    clients = metadata["entities"]
    quiet = lambda *a: None  # noqa: E731
    fields, _, _ = score_for_behaviour(model_proto.SerializeToString(), metadata, window, quiet,
                                       also=(clients["key"], *CLIENT_FIELDS, *TIME_FIELDS))
    scores, novelty = cross_fitted(window, metadata, quiet)
    matrix, owner = client_replay(fields, scores, novelty, clients["key"], float(clients["half_life_s"]))
    scorer = entity_spec(Model(Artifact("(window)", model_proto.SerializeToString(), metadata, ""))).score
    threshold, count, reaching = client_threshold(scorer(matrix), owner, float(clients["target_fpr"]))
    return {"threshold": threshold, "clients": count, "clients_reaching": reaching}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--log", default=str(SHARED / "elastic_apache_access_logs" / "apache_logs"))
    parser.add_argument("--payloads", default=str(SHARED / "payloads" / "fuzzdb" / "attack"))
    parser.add_argument("--scanners", type=int, default=60)
    parser.add_argument("--batch", type=int, default=256, help="records per scoring call in the replay")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--learned-records", type=int, default=0, metavar="N",
                        help="replay with a record model learned from the first half's last N lines, keeping the "
                        "client detector of the whole first half (as --learn does)")
    parser.add_argument("--recalibrate", action="store_true",
                        help="with --learned-records: set the client threshold again on the N lines' clients")
    parser.add_argument("--window-scanners", type=int, default=0, metavar="K",
                        help="with --learned-records: K scanners among the N lines")
    parser.add_argument("--out", help="default benchmarks/results/clients.json (clients-learned-N.json)")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    lines = sorted(read_lines([args.log]), key=line_time)
    times = [line_time(line) for line in lines]
    middle = times[0] + (times[-1] - times[0]) / 2
    training = [line for line, t in zip(lines, times) if t < middle]
    testing = [(t, line) for line, t in zip(lines, times) if t >= middle]
    print(f"training on {len(training)} lines before {stamp(middle)}; testing on {len(testing)}", flush=True)

    started = time.process_time()
    model_proto, metadata = train(training, TrainOptions(spec=load_spec(None, "access"), name="apache-access"))
    model_proto, metadata = learn_behaviour(model_proto, metadata, training, BehaviourOptions(entities=True),
                                            lambda *a: None)
    recalibrated = None
    payload_lists = payloads(Path(args.payloads), rng)
    if args.learned_records:
        history = Artifact("(history)", model_proto.SerializeToString(), metadata, "")
        window = with_scanners(training[-args.learned_records:], payload_lists, args.window_scanners)
        learned, learned_metadata = train(window, TrainOptions(spec=load_spec(None, "access"), name="apache-access"))
        model_proto, metadata = carry_behaviour(learned, learned_metadata, history)
        if args.recalibrate:
            recalibrated = window_threshold(model_proto, metadata, window)
    model = Model(Artifact("(benchmark)", model_proto.SerializeToString(), metadata, ""))
    training_seconds = time.process_time() - started

    scanners = scanner_lines([line for _, line in testing], payload_lists, args.scanners, middle, times[-1], rng)
    stream = sorted(testing + [request for requests in scanners.values() for request in requests])
    watch = ClientWatch(entity_spec(model), model.name)
    if recalibrated is not None:
        watch.spec.threshold = recalibrated["threshold"]
    by_client: dict[str, list] = {}
    line_scores, line_labels = [], []
    started = time.process_time()
    for position in range(0, len(stream), args.batch):
        part = stream[position: position + args.batch]
        scored = model.score([line for _, line in part])
        entity, _ = watch.observe(scored.columns, np.array([t for t, _ in part]), scored.novelty, scored.scores)
        for (moment, line), record_score, client_score, client in zip(part, scored.scores, entity,
                                                                       scored.columns["remote_addr"]):
            by_client.setdefault(client, []).append((float(client_score), float(record_score)))
            line_scores.append(float(record_score))
            line_labels.append(int(client in scanners))
    replay_seconds = time.process_time() - started

    clients = sorted(by_client)
    labels = np.array([int(c in scanners) for c in clients])
    entity_max = np.array([max(s for s, _ in by_client[c]) for c in clients])
    record_max = np.array([max(r for _, r in by_client[c]) for c in clients])
    threshold = watch.spec.threshold
    requests_to_detection = []
    for ip in scanners:
        hits = [i for i, (s, _) in enumerate(by_client[ip], start=1) if s >= threshold]
        requests_to_detection.append(hits[0] if hits else None)
    detected = [n for n in requests_to_detection if n is not None]
    normal_flagged = int(((entity_max >= threshold) & (labels == 0)).sum())
    results = {
        "machine": machine(), "load_average": os.getloadavg(), "seed": args.seed,
        "record_model_learned_from": args.learned_records or len(training),
        "training_lines": len(training), "test_lines": len(testing),
        "normal_clients": int((labels == 0).sum()), "scanners": len(scanners),
        "scanner_requests": sum(len(r) for r in scanners.values()),
        "client_roc_auc": round(roc_auc(labels, entity_max), 4),
        "floor_client_roc_auc_max_record_score": round(roc_auc(labels, record_max), 4),
        "floor_line_roc_auc_record_score": round(roc_auc(np.array(line_labels), np.array(line_scores)), 4),
        "threshold": threshold, "trained_threshold": metadata["entities"]["threshold"],
        "recalibrated_on_window": recalibrated, "window_scanners": args.window_scanners,
        "scanners_detected": len(detected),
        "detected_within_20_requests": sum(1 for n in detected if n <= 20),
        "requests_to_detection_median": float(np.median(detected)) if detected else None,
        "requests_to_detection_max": max(detected) if detected else None,
        "normal_clients_flagged": normal_flagged,
        "normal_client_fpr": round(normal_flagged / max(int((labels == 0).sum()), 1), 4),
        "cpu_seconds": {"training": round(training_seconds, 1), "replay": round(replay_seconds, 1)},
    }
    # How new the test traffic is to the model: the share of normal test lines with a never-seen feature.
    results["never_seen_share_of_normal_test_lines"] = round(float(np.mean(
        model.score([line for _, line in testing]).novelty > 0)), 4)
    for key, value in results.items():
        if key != "machine":
            print(f"{key}: {value}")
    experiment = ("-recalibrated" if args.recalibrate else "") + (
        f"-window-scanners-{args.window_scanners}" if args.window_scanners else "")
    write_results(args.out or ("benchmarks/results/" + (f"clients-learned-{args.learned_records}{experiment}.json"
                                                        if args.learned_records else "clients.json")), results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
