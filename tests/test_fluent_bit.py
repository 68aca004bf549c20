"""Fluent Bit through the sidecar's forward mode, with the real Fluent Bit binary on both sides:

    Fluent Bit (tail -> forward output) -> logscore --forward -> Fluent Bit (forward input -> file)

Fluent Bit is not packaged for Debian 12: scripts/test.sh points FLUENT_BIT at the binary in
../shared/vendor when it is there; without it these tests skip, saying why.
"""

from __future__ import annotations

import calendar
import json
import os
import signal
import subprocess
import time
import uuid
from pathlib import Path

import msgpack
import pytest

from logscore.report import read_scored, text_summary

from .generate import attack_lines, blog_lines, syslog_lines, timed_shop_lines
from .sidecar_process import ROOT, SidecarProcess, free_port
from .test_forward import counter, event_time, send_chunk

FLUENT_BIT = Path(os.environ.get("FLUENT_BIT", ROOT.parent / "shared" / "vendor" / "fluent-bit" / "bin" / "fluent-bit"))
pytestmark = pytest.mark.skipif(not FLUENT_BIT.is_file(), reason=(
    f"no Fluent Bit binary at {FLUENT_BIT}: set FLUENT_BIT to a fluent-bit 5.x executable"))

# Lines carry their own time (with nanoseconds), a sequence number and a kind (for a per-record tag).
PARSERS = """
[PARSER]
    Name   stamped
    Format json
    Time_Key t
    Time_Format %Y-%m-%dT%H:%M:%S.%LZ
    Time_Keep On
"""
START = calendar.timegm((2026, 12, 1, 10, 0, 0))


def stamp(n: int) -> tuple[int, int]:
    """Seconds and nanoseconds of line n. NOTE: nanoseconds are multiples of 1/512 s, which
    Fluent Bit's parser (a double for the fraction) reads exactly; others can lose 1 ns there."""
    return START + n // 7, (n * 1_953_125 * 37) % 1_000_000_000


def stamped_lines(count: int, first: int = 0) -> list[str]:
    access = blog_lines(500, seed=50)
    lines = []
    for n in range(first, first + count):
        seconds, nanoseconds = stamp(n)
        moment = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{nanoseconds:09d}Z"
        lines.append(json.dumps({"t": moment, "n": n, "kind": f"k{n % 3}", "message": access[n % len(access)]}))
    return lines


def expected_time(n: int, as_integer: bool = False) -> str:
    """How Fluent Bit's file output prints the event time of line n."""
    seconds, nanoseconds = stamp(n)
    return f"{seconds}.{0 if as_integer else nanoseconds:09d}"


class FluentBit:
    """One fluent-bit process with a config written to its own directory."""

    def __init__(self, workdir: Path, name: str, body: str):
        self.dir = workdir / name
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "parsers.conf").write_text(PARSERS)
        service = (f"[SERVICE]\n    Flush 0.2\n    Grace 5\n    Log_Level info\n"
                   f"    Parsers_File {self.dir / 'parsers.conf'}\n"
                   # Retries within seconds, not the default minutes: tests restart things.
                   f"    scheduler.base 1\n    scheduler.cap 2\n")
        (self.dir / "fluent-bit.conf").write_text(service + body)
        self.log = self.dir / "fluent-bit.log"
        self.process: subprocess.Popen | None = None

    def start(self) -> "FluentBit":
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen([str(FLUENT_BIT), "-c", str(self.dir / "fluent-bit.conf")],
                                            stdout=log, stderr=subprocess.STDOUT)
        return self

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def receiver(workdir: Path, port: int) -> FluentBit:
    (workdir / "received").mkdir(exist_ok=True)
    return FluentBit(workdir, "receiver", f"""
[INPUT]
    Name forward
    Listen 127.0.0.1
    Port {port}
[OUTPUT]
    Name file
    Match *
    Path {workdir / 'received'}
    File records.txt
""")


def sender(workdir: Path, source: Path, port: int, options: str, input_options: str = "", parser: str = "stamped",
           tag: str = "web.access", name: str = "sender") -> FluentBit:
    """Fluent Bit tailing source (with ``parser``; None: none, each line under ``log``) and
    forwarding it to port."""
    parse = f"    Parser {parser}" if parser else ""
    return FluentBit(workdir, name, f"""
[INPUT]
    Name tail
    Path {source}
    Read_From_Head On
    Refresh_Interval 1
{parse}
    Tag {tag}
{input_options}
[OUTPUT]
    Name forward
    Match *
    Host 127.0.0.1
    Port {port}
    Retry_Limit no_limits
{options}
""")


def received(workdir: Path) -> list[tuple[str, str, dict]]:
    """(tag, time, record) of every line the receiver's file output wrote: 'tag: [time, {...}]'."""
    path = workdir / "received" / "records.txt"
    if not path.exists():
        return []
    out = []
    text = path.read_text()
    for line in text[: text.rfind("\n") + 1].splitlines():  # whole lines only: the file is being written
        tag, _, rest = line.partition(": [")
        moment, _, record = rest.partition(", ")
        out.append((tag, moment, json.loads(record[:-1])))
    return out


def wait_for_lines(workdir: Path, count: int, timeout: float, distinct: bool = False) -> list:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        lines = received(workdir)
        if (len({r["n"] for _, _, r in lines}) if distinct else len(lines)) >= count:
            return lines
        time.sleep(0.2)
    return received(workdir)


@pytest.fixture()
def chain(tmp_path):
    """A receiving Fluent Bit and the sidecar in forward mode in front of it; yields a sender factory."""
    hop, forward = free_port(), free_port()
    parts = {"receiver": receiver(tmp_path, hop).start()}
    parts["sidecar"] = SidecarProcess(ROOT / "models", tmp_path, forward=f"127.0.0.1:{forward}",
                                      forward_to=f"127.0.0.1:{hop}").start()
    source = tmp_path / "input.log"
    parts["forward_port"] = forward

    def start_sender(lines: list[str], options: str, input_options: str = "") -> FluentBit:
        source.write_text("\n".join(lines) + "\n")
        parts["sender"] = sender(tmp_path, source, forward, options, input_options).start()
        return parts["sender"]

    yield tmp_path, parts, start_sender
    for name in ("sender", "sidecar", "receiver"):
        if name in parts:
            parts[name].stop()
    assert "Traceback" not in parts["sidecar"].log()


MODES = {
    "acks": "    Require_ack_response true",
    "no acks": "",
    "send options": "    Send_options true",
    "gzip": "    Compress gzip\n    Require_ack_response true",
    "time as integer": "    Time_as_Integer true\n    Require_ack_response true",
    "metadata off": "    Retain_metadata_in_forward_mode false",
    "message mode (a tag per record)": "    Tag web.$kind\n    Require_ack_response true",
}


@pytest.mark.parametrize("mode", MODES)
def test_every_record_arrives_once_with_its_time_and_a_score(chain, mode):
    workdir, parts, start_sender = chain
    lines = stamped_lines(2000)
    start_sender(lines, MODES[mode])
    out = wait_for_lines(workdir, len(lines), timeout=60)
    assert sorted(r["n"] for _, _, r in out) == list(range(len(lines))), parts["sender"].log.read_text()[-2000:]
    as_integer = mode == "time as integer"
    assert all(moment == expected_time(r["n"], as_integer) for _, moment, r in out), mode
    assert all(isinstance(r.get("anomaly_score"), float) and "anomaly_unscored" not in r for _, _, r in out)
    expected_tags = {f"web.k{r['n'] % 3}" for _, _, r in out} if mode.startswith("message") else {"web.access"}
    assert {tag for tag, _, _ in out} == expected_tags


def test_flagged_records_say_why_and_are_grouped_by_it_at_their_own_time(chain):
    """Forward mode added no explanation: `logscore report` over Fluent Bit's output put every
    anomaly of a model in one group ("no explanation in the output"), and the review page placed
    them at their arrival. Flagged records now say why (others do not), and both group by it; the
    page at each record's own time (the lines' stamps, days ago)."""
    workdir, parts, start_sender = chain
    lines = stamped_lines(400)
    attacked = {40 * k + 20: line for k, (_, line) in enumerate(attack_lines(blog_lines(50, seed=51), 8, seed=52))}
    for n, attack in attacked.items():
        lines[n] = json.dumps({**json.loads(lines[n]), "message": attack})
    start_sender(lines, "    Require_ack_response true")
    out = wait_for_lines(workdir, len(lines), timeout=60)
    flagged = {r["n"]: r for _, _, r in out if r["is_anomaly"]}
    assert set(attacked) <= set(flagged), sorted(flagged)
    assert all(len(r["anomaly_explanation"]) == 3 for r in flagged.values())
    assert not any("anomaly_explanation" in r for _, _, r in out if not r["is_anomaly"])

    totals, groups = read_scored([workdir / "received" / "records.txt"], None)
    assert totals.anomalies == len(flagged) and len(groups.by_id) >= 4  # four kinds of attack at least
    assert "no explanation in the output" not in text_summary(totals, groups, 20)
    status, page = parts["sidecar"].http_get("/ui/")
    assert status == 200
    for n in attacked:
        assert time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(stamp(n)[0])) in page.decode(), n


@pytest.mark.parametrize("acks", [True, False], ids=["acks", "no acks"])
def test_next_hop_stopped_15_s_and_restarted_nothing_lost(chain, acks):
    workdir, parts, start_sender = chain
    first = stamped_lines(1000)
    start_sender(first, "    Require_ack_response true" if acks else "")
    assert len(wait_for_lines(workdir, 1000, timeout=60)) >= 1000
    parts["receiver"].stop()
    with open(workdir / "input.log", "a") as source:
        source.write("\n".join(stamped_lines(1000, first=1000)) + "\n")
    time.sleep(15)
    parts["receiver"].start()
    out = wait_for_lines(workdir, 2000, timeout=90, distinct=True)
    assert {r["n"] for _, _, r in out} == set(range(2000)), parts["sender"].log.read_text()[-2000:]
    assert all("anomaly_score" in r for _, _, r in out)


def test_a_200000_line_backlog_is_scored_whole_in_bounded_memory(chain):
    workdir, parts, start_sender = chain
    lines = stamped_lines(200_000)
    start_sender(lines, "    Require_ack_response true")
    out = wait_for_lines(workdir, len(lines), timeout=300)
    assert {r["n"] for _, _, r in out} == set(range(len(lines)))
    assert all("anomaly_score" in r and "anomaly_unscored" not in r for _, _, r in out)
    peak = parts["sidecar"].peak_rss_bytes() / 2**20
    print(f"sidecar peak RSS {peak:.0f} MiB for a {len(lines)}-line backlog")
    assert peak <= 300


def test_a_record_past_the_value_budget_in_a_gzip_chunk_costs_only_itself(chain):
    """Fluent Bit with `Compress gzip` sends CompressedPackedForward. One JSON log holding a
    2,000,000-item array (past the 1,000,000-value budget) refused its whole chunk: 0 of the
    other 2,999 records arrived in 40 s, the chunk resent for ever (dropped at a retry limit).
    Skipped by its bytes, counted; the others arrive once each."""
    workdir, parts, start_sender = chain
    lines = stamped_lines(3000)
    lines[2500] = json.dumps({**json.loads(lines[2500]), "items": [0] * 2_000_000}, separators=(",", ":"))
    start_sender(lines, "    Compress gzip\n    Require_ack_response true",
                 input_options="    Buffer_Chunk_Size 1M\n    Buffer_Max_Size 16M")  # a 4 MB line
    out = wait_for_lines(workdir, 2999, timeout=60)
    assert sorted(r["n"] for _, _, r in out) == [n for n in range(3000) if n != 2500]
    assert all(isinstance(r.get("anomaly_score"), float) for _, _, r in out)
    sidecar = parts["sidecar"]
    assert counter(sidecar, "forward_invalid_entry") == 1 and counter(sidecar, "forward_protocol") == 0
    assert "could not be decoded (a slice of PackedForward entries holds more than 1,000,000" in sidecar.log()


def test_an_entry_fluent_bit_cannot_read_costs_only_itself(chain):
    """Fluent Bit as the next hop acks a chunk holding a time it cannot read (a negative number,
    milliseconds, an EventTime of 10**9 nanoseconds) or a record nested about 60 maps deep, and
    drops all of it: through the sidecar, which passes such entries on as PackedForward, one of
    them lost every record relayed with it (up to max_batch_records, of any sender), without a
    word. Such entries are skipped and counted."""
    workdir, parts, _ = chain
    odd = [-5, float("nan"), 1_796_400_000_123, event_time(1_796_400_000, 10**9),
           msgpack.ExtType(0, b"\x00" * 4), [event_time(1_796_400_000), "metadata"],
           -1, -2, -1.0]  # a group marker's seconds outside Fluent Bit's [time, metadata] form
    entries = [[moment, {"message": f"odd {n}"}] for n, moment in enumerate(odd)]
    deep: dict = {"message": "deep"}
    for _ in range(70):  # the depth a JSON log line may reach through Fluentd's json parser
        deep = {"n": deep}
    entries.append([1_796_400_000, {"message": "deep", "payload": deep}])
    entries += [[event_time(1_796_400_001, 5), {"message": "kept"}], [[1_796_400_002, {}], {"message": "kept too"}]]
    chunk = uuid.uuid4().hex
    assert send_chunk(parts["forward_port"], ["web.access", entries, {"chunk": chunk}]) == {"ack": chunk}
    out = wait_for_lines(workdir, 2, timeout=30)
    assert [(moment, r["message"]) for _, moment, r in out] == [("1796400001.000000005", "kept"),
                                                                ("1796400002.000000000", "kept too")]
    sidecar = parts["sidecar"]
    assert counter(sidecar, "forward_invalid_entry") == len(odd) + 1


def test_a_fluent_bit_sending_tls_is_named_with_the_fix_and_loses_nothing_once_fixed(chain):
    """Fluent Bit with `tls on` towards the plain forward port: the sidecar names it (it once said
    only that the sender was silent, blaming secure forward), and Fluent Bit keeps the records."""
    workdir, parts, start_sender = chain
    start_sender(stamped_lines(20), "    tls on\n    tls.verify off\n    Require_ack_response true")
    sidecar = parts["sidecar"]
    sidecar.wait_for(lambda: "opened with a TLS ClientHello" in sidecar.log(), timeout=30, what="the TLS warning")
    assert received(workdir) == []
    parts["sender"].stop()
    parts["sender"] = sender(workdir, workdir / "input.log", parts["forward_port"],
                             "    Require_ack_response true").start()
    assert len(wait_for_lines(workdir, 20, timeout=60)) == 20  # from the head of the file again


def test_a_next_hop_asking_for_secure_forward_is_named_with_the_fix(tmp_path):
    """A Fluent Bit next hop with `Shared_Key` on its forward input greets with a HELO: the sidecar
    logged "connection failed: UnicodeDecodeError 'utf-8' codec can't decode byte 0x86" (its
    nonce), naming neither the cause nor the fix. Nothing is acked meanwhile: the sender resends."""
    hop, forward = free_port(), free_port()
    secure = FluentBit(tmp_path, "secure-receiver", f"""
[INPUT]
    Name forward
    Listen 127.0.0.1
    Port {hop}
    Shared_Key secret
    Self_Hostname hop
[OUTPUT]
    Name stdout
    Match *
""").start()
    sidecar = SidecarProcess(ROOT / "models", tmp_path, forward=f"127.0.0.1:{forward}", forward_to=f"127.0.0.1:{hop}",
                             forward_ack_timeout_s=2).start()
    try:
        sidecar.wait_for(lambda: secure.log.exists() and "listening on" in secure.log.read_text(), timeout=20,
                         what="the next hop to listen")
        for _ in range(5):  # as a sender resends (a try may see the hop's reset before its HELO)
            assert send_chunk(forward, ["web.access", [[1_796_400_000, {"message": "x"}]], {"chunk": "c1"}]) is None
            if "it asks for secure forward" in sidecar.log():
                break
            time.sleep(1)  # the hop counts as down for a backoff
        assert "remove the shared_key there" in sidecar.log() and "UnicodeDecodeError" not in sidecar.log()
    finally:
        sidecar.stop()
        secure.stop()


def test_the_fluent_bit_example_passes_its_dry_run():
    example = ROOT / "fluentd-plugin" / "examples" / "fluent-bit-forward.yaml"
    result = subprocess.run([str(FLUENT_BIT), "-c", str(example), "--dry-run"], capture_output=True, text=True,
                            timeout=30)
    assert result.returncode == 0 and "configuration test is successful" in result.stdout + result.stderr, (
        result.stdout + result.stderr)


def test_a_stack_trace_joined_by_fluent_bit_is_one_record_with_one_score(chain):
    """One line a record, a Java stack trace was an alert a frame (70 for five exceptions in a
    probe); Fluent Bit's multiline parser makes it one record, which passes the sidecar whole."""
    workdir, parts, _ = chain
    source = workdir / "app.log"
    trace = ['Exception in thread "main" java.lang.IllegalStateException: ledger checksum mismatch',
             "\tat com.acme.billing.Ledger.verify(Ledger.java:218)",
             "\tat com.acme.billing.Main.main(Main.java:12)"]
    source.write_text("\n".join(["Dec 02 10:00:00 app started", *trace, "Dec 02 10:00:01 app ready"]) + "\n")
    forward = parts["sidecar"].settings["forward"].rpartition(":")[2]
    parts["sender"] = sender(workdir, source, int(forward), "    Require_ack_response true",
                             input_options="    multiline.parser java", parser=None, tag="app.log",
                             name="multiline-sender").start()
    out = wait_for_lines(workdir, 3, timeout=30)
    assert [r["log"].rstrip("\n") for _, _, r in out] == ["Dec 02 10:00:00 app started", "\n".join(trace),
                                                         "Dec 02 10:00:01 app ready"]
    assert all(isinstance(r.get("anomaly_score"), float) and "anomaly_unscored" not in r for _, _, r in out)


def test_tail_without_a_parser_catching_up_old_lines_is_no_burst(behaviour_model, tmp_path):
    """Fluent Bit's tail without a parser gives each line the moment it read it as its time:
    catching up a file of old lines (after a restart, or a file copied in), that is now for every
    line, and the sidecar counted them as a burst and a crowd of fast clients. The line's own
    timestamp tells: they are scored, and left out of windows and clients."""
    hop, forward = free_port(), free_port()
    parts = {"receiver": receiver(tmp_path, hop).start()}
    parts["sidecar"] = sidecar = SidecarProcess(behaviour_model.parent, tmp_path, forward=f"127.0.0.1:{forward}",
                                                forward_to=f"127.0.0.1:{hop}").start()
    source = tmp_path / "access.log"
    backlog = timed_shop_lines(300, 3.0, time.time() - 900, seed=12)  # written 15 to 10 minutes ago
    source.write_text("\n".join(backlog) + "\n")
    parts["sender"] = sender(tmp_path, source, forward, "    Require_ack_response true", parser=None).start()
    try:
        out = wait_for_lines(tmp_path, len(backlog), timeout=60)
        time.sleep(2.5)  # the windows they arrived in close (forward mode sends their events on)
        out = received(tmp_path)
        assert [r for tag, _, r in out if tag != "web.access"] == []  # no anomaly event
        assert len(out) == len(backlog), parts["sender"].log.read_text()[-2000:]
        assert all("anomaly_score" in r and "entity_score" not in r for _, _, r in out)
        assert sidecar.metric('logscore_late_records_total{model="shop"}') == len(backlog)
        assert json.loads(sidecar.http_get("/v1/anomalies")[1])["events"] == []
        live = timed_shop_lines(3, 3.0, time.time() - 3, seed=13)
        with open(source, "a") as appended:
            appended.write("\n".join(live) + "\n")
        out = wait_for_lines(tmp_path, len(backlog) + len(live), timeout=60)
        assert sum(0 <= r.get("entity_score", -1) <= 1 for tag, _, r in out if tag == "web.access") == len(live)
    finally:
        for name in ("sender", "sidecar", "receiver"):
            parts[name].stop()


def test_syslog_lines_tailed_without_a_parser_score_as_the_lines_trained_on(tmp_path):
    """Fluent Bit's tail without a parser sends each line under `log`: a syslog model trained on
    files took that whole line as the message (the line alone gives the text after `app[pid]:`)
    and flagged every normal line it received that way (500 of 500 in a probe)."""
    from logscore.features import load_spec
    from logscore.training.train import TrainOptions, save_model, train

    models = tmp_path / "models"
    models.mkdir()
    model, _ = train(syslog_lines(2500, seed=1), TrainOptions(spec=load_spec(None, "syslog"), name="syslog"))
    save_model(model, models / "syslog.onnx")
    hop, forward = free_port(), free_port()
    parts = {"receiver": receiver(tmp_path, hop).start()}
    parts["sidecar"] = SidecarProcess(models, tmp_path, forward=f"127.0.0.1:{forward}",
                                      forward_to=f"127.0.0.1:{hop}").start()
    source = tmp_path / "syslog"
    lines = syslog_lines(300, seed=9)
    source.write_text("\n".join(lines) + "\n")
    parts["sender"] = sender(tmp_path, source, forward, "    Require_ack_response true", parser=None,
                             tag="sys.log").start()
    try:
        out = wait_for_lines(tmp_path, len(lines), timeout=60)
        assert sorted(r["log"] for _, _, r in out) == sorted(lines), parts["sender"].log.read_text()[-2000:]
        assert all(isinstance(r.get("anomaly_score"), float) for _, _, r in out)
        assert sum(r["is_anomaly"] for _, _, r in out) == 0
    finally:
        for name in ("sender", "sidecar", "receiver"):
            parts[name].stop()
