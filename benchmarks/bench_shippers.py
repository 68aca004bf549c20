"""Real shippers with and without the scoring stage: lines/s and CPU seconds per process.

    python benchmarks/bench_shippers.py [--lines 400000] [--rounds 3] [--quick] [--scoring-processes N] [--explain]
                                        [--flood] [--site-model]
                                        [--filter NAME=VALUE ...] [--tail NAME=VALUE ...] [--json PATH]

Pipelines, each run with the stage and without it, paired and interleaved (with, without,
with, ...), every run on a fresh sidecar (cold caches) and fresh shippers:

- Fluentd: in_tail -> [filter logscore, default settings] -> out_file; and, as the floor of any
  stage in that place, a filter that only adds a constant score to each record (written for the
  run: Fluentd's stock record_transformer costs more than the logscore filter itself)
- Fluent Bit: tail -> forward -> [logscore --forward] -> Fluent Bit forward input -> file; and, as
  the floor of any stage in that place, a third Fluent Bit relaying forward to forward (a relay in
  C that does nothing else; the vendored build has no filters, so it does not even add a field)
- the same in Message mode (a Tag per record: one forward message per record)

With ``--flood`` every line carries an attack (the tests' generated payloads in the shop's
lines), so that the stage flags nearly every record, as a model meeting traffic it was not trained
on or an attack does: forward mode then names each one's features and the review page inspects
them. ``sidecar_us_per_line`` is the sidecar's CPU per line of each run.

The sidecar serves the shipped default model, trained on another site (a blog), which flags
about 43 % of this shop's lines: a new site's first hour. With ``--site-model`` it serves a model
that ``logscore train`` learned first from 20,000 other lines of the same shop (other random
ids and words than the run's), as an operator's own model or one learned on arrival would.

Throughput is lines / (time from appending the lines to the tailed file until the last one is
in the output). CPU seconds are read from /proc for each process over that window. The load
average is printed before and after each run: the machine is shared. Needs Fluentd and
Fluent Bit as scripts/test.sh finds them (../shared/vendor, or FLUENTD_SOURCE /
SERVERENGINE_SOURCE / FLUENT_BIT).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import child_pids, cpu_seconds, machine, write_results  # noqa: E402
from tests.generate import attack_lines, shop_lines  # noqa: E402
from tests.sidecar_process import SidecarProcess, free_port  # noqa: E402

VENDOR = ROOT.parent / "shared" / "vendor"
FLUENTD = Path(os.environ.get("FLUENTD_SOURCE", VENDOR / "fluentd"))
SERVERENGINE = Path(os.environ.get("SERVERENGINE_SOURCE", VENDOR / "serverengine"))
FLUENT_BIT = Path(os.environ.get("FLUENT_BIT", VENDOR / "fluent-bit" / "bin" / "fluent-bit"))
PLUGIN = ROOT / "fluentd-plugin"


def process_tree_cpu_seconds(pid: int) -> float:
    """CPU of a process and of its children (the sidecar's scoring processes)."""
    return cpu_seconds(pid) + sum(cpu_seconds(child) for child in child_pids(pid))


def load_average() -> float:
    return round(os.getloadavg()[0], 2)


def novel_share(lines: list[str]) -> float:
    """Share of lines whose request (method, URL) did not occur earlier in the run."""
    seen, novel = set(), 0
    for line in lines:
        request = line.split('"')[1]
        novel += request not in seen
        seen.add(request)
    return round(novel / len(lines), 3)


def output_files(directory: Path) -> list[Path]:
    return [p for p in directory.glob("*") if p.is_file() and p.suffix != ".meta"]


def count_lines(directory: Path) -> int:
    return sum(p.read_bytes().count(b"\n") for p in output_files(directory))


def count_marked(directory: Path) -> dict:
    """Output records that carry a score, and those a stage passed on marked unscored: a stage that
    gives up under load would otherwise look fast."""
    texts = [p.read_bytes() for p in output_files(directory)]
    return {"scored": sum(t.count(b'"anomaly_score"') for t in texts),
            "unscored": sum(t.count(b'"anomaly_unscored"') for t in texts),
            "flagged": sum(t.count(b'"is_anomaly":true') for t in texts)}


class Run:
    """Processes of one pipeline run; measures from feed() until `expected` lines are out."""

    def __init__(self, work: Path):
        self.work = work
        self.processes: dict[str, subprocess.Popen] = {}
        self.sidecar: SidecarProcess | None = None

    def spawn(self, name: str, args: list[str], env: dict | None = None) -> None:
        log = open(self.work / f"{name}.log", "ab")
        self.processes[name] = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT,
                                                env={**os.environ, **(env or {})})

    def wait_log(self, name: str, text: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in (self.work / f"{name}.log").read_text(errors="replace"):
                return
            time.sleep(0.1)
        raise RuntimeError(f"{name} did not log {text!r}; see {self.work / (name + '.log')}")

    def measure(self, source: Path, lines: list[str], output: Path, timeout: float = 600) -> dict:
        pids = {name: p.pid for name, p in self.processes.items()}
        if self.sidecar is not None:
            pids["sidecar"] = self.sidecar.process.pid
        cpu_of = {name: process_tree_cpu_seconds if name == "sidecar" else cpu_seconds for name in pids}
        before = {name: cpu_of[name](pid) for name, pid in pids.items()}
        load_before = load_average()
        started = time.monotonic()
        with open(source, "a") as feed:
            feed.write("\n".join(lines) + "\n")
        deadline = started + timeout
        while count_lines(output) < len(lines):
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {count_lines(output)} of {len(lines)} lines out; see {self.work}")
            time.sleep(0.05)
        elapsed = time.monotonic() - started
        cpu = {name: round(cpu_of[name](pid) - before[name], 2) for name, pid in pids.items()}
        per_line = ({"sidecar_us_per_line": round(cpu["sidecar"] / len(lines) * 1e6, 2)} if "sidecar" in cpu else {})
        return {"lines_per_s": round(len(lines) / elapsed), "seconds": round(elapsed, 2), "cpu_s": cpu, **per_line,
                "load_before": load_before, "load_after": load_average(), **count_marked(output)}

    def stop(self) -> None:
        for process in self.processes.values():
            process.terminate()
        for process in self.processes.values():
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                process.kill()
        if self.sidecar is not None:
            self.sidecar.stop()


@contextlib.contextmanager
def workspace():
    """A temporary directory with an empty tailed file and an output directory; the run's processes."""
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "access.log").touch()
        (work / "out").mkdir()
        yield Run(work), work / "access.log", work / "out"


# Set from the command line: the sidecar's further settings (--scoring-processes), the
# logscore filter's (--explain: explanation_key; --filter), and Fluentd's in_tail's (--tail, with and
# without the stage).
SIDECAR_SETTINGS: dict = {}
MODELS = {"dir": ROOT / "models"}  # --site-model: a directory holding the model trained for the run
FILTER_SETTINGS: dict = {}
TAIL_SETTINGS: dict = {}

# The least any stage in the filter's place costs Fluentd: a filter that adds constant fields.
FLOOR_FILTER = "<filter web.**>\n  @type constant_score\n</filter>\n"
FLOOR_PLUGIN = """require 'fluent/plugin/filter'

module Fluent::Plugin
  class ConstantScoreFilter < Filter
    Fluent::Plugin.register_filter('constant_score', self)

    def filter(_tag, _time, record)
      record['anomaly_score'] = 0.5
      record['is_anomaly'] = false
      record
    end
  end
end
"""


def fluentd(lines: list[str], with_stage: bool, floor: bool = False) -> dict:
    with workspace() as (run, source, output):
        work = run.work
        stage = FLOOR_FILTER if floor else ""
        if with_stage:
            run.sidecar = SidecarProcess(MODELS["dir"], work, **SIDECAR_SETTINGS).start()
            more = "".join(f"  {name} {value}\n" for name, value in FILTER_SETTINGS.items())
            stage = f"<filter web.**>\n  @type logscore\n  endpoint unix://{run.sidecar.socket}\n{more}</filter>\n"
        tail = "".join(f"  {name} {value}\n" for name, value in TAIL_SETTINGS.items())
        (work / "fluent.conf").write_text(f"""
<source>
  @type tail
  path {source}
  pos_file {work}/access.pos
  tag web.access
{tail}  <parse>
    @type none
  </parse>
</source>
{stage}
<match web.**>
  @type file
  path {output}/scored
  <format>
    @type json
  </format>
  <buffer>
    flush_mode interval
    flush_interval 0.2s
  </buffer>
</match>
""")
        rubylib = ":".join(str(p) for p in (PLUGIN / "test" / "fluentd_shims", FLUENTD / "lib",
                                            SERVERENGINE / "lib", PLUGIN / "lib"))
        plugins = work / "plugins"
        plugins.mkdir()
        (plugins / "filter_constant_score.rb").write_text(FLOOR_PLUGIN)
        run.spawn("fluentd", ["ruby", str(FLUENTD / "bin" / "fluentd"), "-c", str(work / "fluent.conf"),
                              "-p", str(plugins), "--no-supervisor"], {"RUBYLIB": rubylib})
        try:
            run.wait_log("fluentd", "fluentd worker is now running")
            time.sleep(1)  # in_tail's watchers are set up just after
            return run.measure(source, lines, output)
        finally:
            run.stop()


def fluent_bit(lines: list[str], with_stage: bool, message_mode: bool = False, acks: bool = True,
               floor: bool = False) -> dict:
    """Forward mode; with message_mode, a Tag per record (a record accessor) makes Fluent Bit send
    one Message-mode message per record; with floor, a plain Fluent Bit relay stands where the
    sidecar would."""
    with workspace() as (run, source, output):
        work = run.work
        (work / "parsers.conf").write_text("[PARSER]\n    Name json\n    Format json\n")
        service = f"[SERVICE]\n    Flush 0.2\n    Log_Level info\n    Parsers_File {work / 'parsers.conf'}\n"
        parse, tag, acks = "", "", "    Require_ack_response true\n" if acks else ""
        if message_mode:
            lines = [json.dumps({"kind": f"k{i % 3}", "log": line}) for i, line in enumerate(lines)]
            parse, tag = "    Parser json\n", "    Tag web.$kind\n"
        receiver_port = free_port()

        def forward_to(port: int) -> str:
            """The output section sending on to ``port`` (the sender's, and the relay's in the floor run)."""
            return (f"[OUTPUT]\n    Name forward\n    Match *\n    Host 127.0.0.1\n    Port {port}\n"
                    f"{acks}    Retry_Limit no_limits\n")

        (work / "receiver.conf").write_text(service + f"""
[INPUT]
    Name forward
    Listen 127.0.0.1
    Port {receiver_port}
[OUTPUT]
    Name file
    Match *
    Path {output}
    File records.txt
""")
        target = receiver_port
        if with_stage:
            target = free_port()
            run.sidecar = SidecarProcess(MODELS["dir"], work, forward=f"127.0.0.1:{target}",
                                         forward_to=f"127.0.0.1:{receiver_port}", **SIDECAR_SETTINGS).start()
        elif floor:
            target = free_port()
            (work / "relay.conf").write_text(service + f"""
[INPUT]
    Name forward
    Listen 127.0.0.1
    Port {target}
""" + forward_to(receiver_port))
            run.spawn("relay", [str(FLUENT_BIT), "-c", str(work / "relay.conf")])
        (work / "sender.conf").write_text(service + f"""
[INPUT]
    Name tail
    Path {source}
    Tag web.access
{parse}""" + forward_to(target) + tag)
        run.spawn("receiver", [str(FLUENT_BIT), "-c", str(work / "receiver.conf")])
        run.spawn("sender", [str(FLUENT_BIT), "-c", str(work / "sender.conf")])
        try:
            run.wait_log("sender", "inotify_fs_add")
            return run.measure(source, lines, output)
        finally:
            run.stop()


# Fluent Bit's Message mode with acks is stop-and-wait per record: fewer lines keep the run short.
MOST_LINES = {"fluent-bit-message-mode": 20_000}
FLOORS = {"fluentd": lambda lines: fluentd(lines, False, floor=True),  # a constant-field filter instead
          "fluent-bit": lambda lines: fluent_bit(lines, False, floor=True)}  # a plain relay in C
PIPELINES = {"fluentd": fluentd, "fluent-bit": fluent_bit,
             "fluent-bit-message-mode": lambda lines, with_stage: fluent_bit(lines, with_stage, message_mode=True),
             "fluent-bit-message-mode-no-acks": lambda lines, with_stage: fluent_bit(lines, with_stage, True, False)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # NOTE: Fluentd's in_tail reads in steps about a second apart when it falls behind: a run of
    # 100,000 lines (2-4 s) measures those steps, not throughput (ratios of 0.5-1.0 that longer
    # runs do not keep).
    parser.add_argument("--lines", type=int, default=400_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="30,000 lines, 1 round")
    parser.add_argument("--only", choices=sorted(PIPELINES))
    parser.add_argument("--scoring-processes", type=int, default=0, metavar="N",
                        help="run the sidecar with N scoring processes (its CPU then includes theirs)")
    parser.add_argument("--explain", action="store_true", help="the Fluentd filter sets explanation_key (3 "
                        "features named per record, its default explain)")
    parser.add_argument("--filter", action="append", default=[], metavar="NAME=VALUE",
                        help="a further setting of the logscore filter (say batch_records=500); repeatable")
    parser.add_argument("--tail", action="append", default=[], metavar="NAME=VALUE",
                        help="a setting of Fluentd's in_tail, with and without the stage (say read_lines_limit=4000)")
    parser.add_argument("--flood", action="store_true", help="every line carries an attack: the stage flags "
                        "nearly every record")
    parser.add_argument("--site-model", action="store_true", help="serve a model trained on 20,000 other lines "
                        "of the same shop instead of the default model (trained on a blog)")
    parser.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "shippers.json"))
    args = parser.parse_args()
    if args.explain:
        FILTER_SETTINGS["explanation_key"] = "anomaly_explanation"
    for option, settings, example in (("--filter", FILTER_SETTINGS, "batch_records=500"),
                                      ("--tail", TAIL_SETTINGS, "read_lines_limit=4000")):
        for setting in getattr(args, option[2:]):
            name, _, value = setting.partition("=")
            if not value:
                parser.error(f"{option} {setting!r}: give NAME=VALUE, say {example}")
            settings[name] = value
    if args.scoring_processes:
        SIDECAR_SETTINGS["scoring_processes"] = args.scoring_processes
    if args.quick:
        args.lines, args.rounds = 30_000, 1
    missing = [str(p) for p in (FLUENTD / "bin" / "fluentd", FLUENT_BIT) if not p.exists()]
    if missing:
        print(f"bench_shippers: missing {', '.join(missing)}; see ../shared/vendor/README.md", file=sys.stderr)
        return 2
    lines = shop_lines(args.lines, seed=90)
    if args.flood:
        lines = [line for _, line in attack_lines(lines, args.lines, seed=91)]
    traffic = "generated shop, every line attacked (a flood)" if args.flood else "generated shop"
    with tempfile.TemporaryDirectory() as models:
        if args.site_model:
            MODELS["dir"] = train_site_model(Path(models))
        return run_pipelines(args, lines, traffic)


def train_site_model(models: Path) -> Path:
    """A models directory holding one model, shop.onnx, trained by the real command on other shop lines."""
    training = models / "training.log"
    training.write_text("\n".join(shop_lines(20_000, seed=89)) + "\n")
    (models / "served").mkdir()
    done = subprocess.run([sys.executable, "-m", "logscore", "train", "--input", str(training), "--out",
                           str(models / "served" / "shop.onnx")], cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"logscore train failed: {done.stderr.strip()}")
    return models / "served"


def run_pipelines(args: argparse.Namespace, lines: list[str], traffic: str) -> int:
    results = {"machine": machine(), "lines": args.lines, "rounds": args.rounds, "traffic": traffic,
               "scoring_processes": args.scoring_processes, "explain": args.explain,
               "model": "trained on 20,000 other lines of the shop" if args.site_model else "shipped default",
               "filter_settings": dict(FILTER_SETTINGS), "tail_settings": dict(TAIL_SETTINGS),
               "novel_share": novel_share(lines), "pipelines": {}}
    print(f"{args.lines} lines of {traffic} traffic, {results['novel_share']:.0%} of requests never seen "
          f"earlier in the run; model {results['model']}; {args.rounds} paired rounds; {machine()['cpu']}, "
          f"{os.cpu_count()} cores")
    for name, pipeline in PIPELINES.items():
        if args.only and name != args.only:
            continue
        kinds = ("with", "without", "floor") if name in FLOORS else ("with", "without")
        runs = {kind: [] for kind in kinds}
        count = min(len(lines), MOST_LINES.get(name, len(lines)))
        for round_number in range(args.rounds):
            for kind in kinds:  # paired and interleaved
                measured = FLOORS[name](lines[:count]) if kind == "floor" else pipeline(lines[:count], kind == "with")
                runs[kind].append(measured)
                print(f"  {name:10s} round {round_number + 1} {kind:7s} stage: {measured['lines_per_s']:>7,} lines/s "
                      f"in {measured['seconds']:6.2f} s, CPU s {measured['cpu_s']}, scored {measured['scored']:,} "
                      f"unscored {measured['unscored']:,}, flagged {measured['flagged']:,}, load "
                      f"{measured['load_before']} -> {measured['load_after']}")
        ratios = [w["lines_per_s"] / wo["lines_per_s"] for w, wo in zip(runs["with"], runs["without"])]
        summary = {"lines": count, "with_lines_per_s": statistics.median(r["lines_per_s"] for r in runs["with"]),
                   "without_lines_per_s": statistics.median(r["lines_per_s"] for r in runs["without"]),
                   "ratio_median": round(statistics.median(ratios), 2), "ratios": [round(r, 2) for r in ratios],
                   "runs": runs}
        if "floor" in runs:  # what any stage in that place keeps
            floors = [f["lines_per_s"] / wo["lines_per_s"] for f, wo in zip(runs["floor"], runs["without"])]
            summary.update(floor_lines_per_s=statistics.median(r["lines_per_s"] for r in runs["floor"]),
                           floor_ratio_median=round(statistics.median(floors), 2),
                           floor_ratios=[round(r, 2) for r in floors])
        results["pipelines"][name] = summary
        print(f"{name}: with the stage {summary['with_lines_per_s']:,.0f} lines/s, without "
              f"{summary['without_lines_per_s']:,.0f}; ratio {summary['ratio_median']} (per round {summary['ratios']})"
              + (f"; the floor stage instead: {summary['floor_lines_per_s']:,.0f} lines/s, ratio "
                 f"{summary['floor_ratio_median']} (per round {summary['floor_ratios']})" if "floor" in runs else ""))
    write_results(args.json, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
