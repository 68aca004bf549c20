"""Teaching (issue #14): `logscore train --feedback STORE` learns records marked normal and leaves out
records marked keep; after retraining, the marked records score under the threshold with no rule at
all. And `logscore report` over scored output: groups, counts, entities, timeline, histogram."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from logscore.decide import decide
from logscore.feedback import KEEP, NORMAL, Entry, FeedbackStep, RuleSet, pattern_from_records
from logscore.feedback_store import SqliteStore
from logscore.model import Model

from .generate import blog_lines, shop_lines
from .sidecar_process import ROOT
from .test_cli import logscore
from .test_feedback import attacks_on, compare_lines, monitor_lines


def test_training_with_feedback_learns_what_was_marked_normal_and_keeps_true_anomalies_flagged(
        tmp_path, shop_model_path, shop_training_lines):
    model = Model.load(shop_model_path)
    marked, keep = compare_lines(3, seed=50), attacks_on(compare_lines(2, seed=51), seed=52)
    store = SqliteStore(str(tmp_path / "feedback.sqlite3"))
    store.migrate()
    store.add(Entry(0, NORMAL, pattern_from_records(model, marked), "ana", model="shop"))
    store.add(Entry(0, KEEP, pattern_from_records(model, keep), "sec", model="shop"))
    store.add(Entry(0, NORMAL, pattern_from_records(model, monitor_lines(1, seed=53)), "ops", model="other-model"))
    training = tmp_path / "train.log"
    training.write_text("\n".join(shop_training_lines + keep) + "\n")  # the true anomalies are in the log too

    for name, extra in (("plain", ()), ("taught", ("--feedback", tmp_path / "feedback.sqlite3"))):
        result = logscore("train", "--input", training, "--target-fpr", "0.01", "--name", "shop",
                          "--out", tmp_path / f"{name}.onnx", *extra)
        assert result.returncode == 0, result.stderr
    assert "feedback (" in result.stdout and "3 records learned as normal (0 still flagged)" in result.stdout
    assert "2 kept out as true anomalies (2 flagged by the new model)" in result.stdout

    plain, taught = Model.load(tmp_path / "plain.onnx"), Model.load(tmp_path / "taught.onnx")
    assert decide(plain, plain.score(marked)).is_anomaly.all()
    assert not decide(taught, taught.score(marked)).is_anomaly.any()  # no rule involved
    # Later records of their kind (other ids and values): the rule, still in force, covers what the
    # three examples could not teach (other lengths and digits).
    later = compare_lines(20, seed=54)
    rules = FeedbackStep(RuleSet(store.entries()), later)
    assert not decide(taught, taught.score(later), feedback=rules).is_anomaly.any()
    attacks = attacks_on(compare_lines(30, seed=55), seed=56)
    assert decide(taught, taught.score(attacks)).is_anomaly.mean() >= 0.9
    assert decide(taught, taught.score(keep)).is_anomaly.all()
    assert decide(taught, taught.score(monitor_lines(5, seed=57))).is_anomaly.all()  # another model's entry
    normal = shop_lines(1000, seed=58)
    assert decide(taught, taught.score(normal)).is_anomaly.mean() <= 0.02
    summary = json.loads(logscore("inspect", tmp_path / "taught.onnx", "--json").stdout)["metadata"]["training"]
    assert summary["feedback"] == {"store": str(tmp_path / "feedback.sqlite3"), "entries": 2, "normal_records": 3,
                                   "normal_flagged": 0, "keep_records": 2, "keep_flagged": 2}
    assert summary["records_read"] == len(shop_training_lines)  # the two kept out


def test_retraining_with_the_previous_model_does_not_learn_what_it_flags(tmp_path, shop_model_path):
    """An operator's log holds attacks nobody marked: retrained on it with --previous-model, what the
    serving model flags (its feedback applied) is left out, so the attacks stay flagged, while a kind
    marked normal is learned. Screening is off here (--keep-outliers): this is the mechanism alone."""
    model = Model.load(shop_model_path)
    store = SqliteStore(str(tmp_path / "feedback.sqlite3"))
    store.migrate()
    store.add(Entry(0, NORMAL, pattern_from_records(model, compare_lines(3, seed=60)), "ana", model="shop"))
    attacks = attacks_on(shop_lines(60, seed=61), seed=62)
    marked_kind = compare_lines(30, seed=63)
    training = tmp_path / "recent.log"
    training.write_text("\n".join(shop_lines(2000, seed=64) + marked_kind + attacks) + "\n")
    common = ("train", "--input", training, "--target-fpr", "0.01", "--keep-outliers",
              "--feedback", tmp_path / "feedback.sqlite3")

    result = logscore(*common, "--name", "shop", "--out", tmp_path / "plain.onnx")
    assert result.returncode == 0, result.stderr
    # As the README retrains: the new model takes the name of the one it replaces, not of --out.
    result = logscore(*common, "--out", tmp_path / "retrained.onnx", "--previous-model", shop_model_path)
    assert result.returncode == 0, result.stderr
    assert f"feedback ({tmp_path / 'feedback.sqlite3'}, 1 entries)" in result.stdout
    assert "left out as flagged by the previous model shop" in result.stdout
    assert "[train] scoring with the previous model: 2090/2090 records" in result.stderr  # progress

    def flagged(path, lines):
        retrained = Model.load(path)
        return decide(retrained, retrained.score(lines)).is_anomaly.mean()

    assert flagged(tmp_path / "plain.onnx", attacks) <= 0.2  # learned as normal
    assert flagged(tmp_path / "retrained.onnx", attacks) == 1.0
    assert flagged(tmp_path / "retrained.onnx", attacks_on(shop_lines(200, seed=65), seed=66)) >= 0.9
    assert flagged(tmp_path / "retrained.onnx", marked_kind) == 0.0  # no rule in force: learned
    assert flagged(tmp_path / "retrained.onnx", shop_lines(1000, seed=67)) <= 0.02
    inspected = logscore("inspect", tmp_path / "retrained.onnx", "--json")
    left_out = json.loads(inspected.stdout)["metadata"]["training"]["left_out_flagged"]
    assert left_out["model"] == "shop" and left_out["version"] == model.version
    assert len(attacks) <= left_out["records"] <= len(attacks) + 0.02 * 2030  # the attacks, and a normal tail
    assert left_out["examples"] and "ignored" not in left_out

    # A model of another site flags much of this traffic: its flags are not used, and it says so.
    elsewhere = logscore(*common, "--name", "apache-access", "--out", tmp_path / "other.onnx",
                         "--previous-model", ROOT / "models" / "apache-access.onnx")
    assert elsewhere.returncode == 0, elsewhere.stderr
    assert "it is no model of this traffic" in elsewhere.stderr
    # Its name finds no feedback in the store: said, with the names that do.
    assert "no active entry for model 'apache-access'; it holds entries for shop (1)" in elsewhere.stderr
    ignored = json.loads(logscore("inspect", tmp_path / "other.onnx", "--json").stdout)
    assert ignored["metadata"]["training"]["left_out_flagged"]["ignored"] is True
    # The model this one does not replace: refused before training, with what to give instead.
    wrong = logscore(*common, "--name", "checkout", "--out", tmp_path / "x.onnx", "--previous-model", shop_model_path)
    assert wrong.returncode != 0 and "give the model this one replaces" in wrong.stderr
    assert "Traceback" not in wrong.stderr and not (tmp_path / "x.onnx").exists()
    # A mistyped store is refused, not created empty.
    typo = logscore("train", "--input", training, "--feedback", tmp_path / "feedbak.sqlite3",
                    "--out", tmp_path / "y.onnx")
    assert typo.returncode != 0 and "no such file" in typo.stderr and not (tmp_path / "feedbak.sqlite3").exists()


def test_report_groups_scored_output_of_every_shipper(tmp_path, shop_model_path):
    lines = shop_lines(400, seed=60) + compare_lines(12, seed=61) + monitor_lines(5, seed=62)
    (tmp_path / "access.log").write_text("\n".join(lines) + "\n")
    scored = logscore("score", "--model", shop_model_path, "--explain", "4", "--record", tmp_path / "access.log")
    assert scored.returncode == 0, scored.stderr
    (tmp_path / "scored.jsonl").write_text(scored.stdout)
    flagged = [json.loads(x) for x in scored.stdout.splitlines() if json.loads(x)["is_anomaly"]]

    # The same records as Fluentd (out_file: time, tag, record with anomaly_score) and Logstash ([logscore]) write them.
    fluentd, logstash = [], []
    for entry in map(json.loads, scored.stdout.splitlines()):
        client = entry["record"].split(" ", 1)[0]
        fluentd.append("2026-03-01T10:00:00+00:00\tweb.access\t" + json.dumps(
            {"host": client, "message": entry["record"], "anomaly_score": entry["score"],
             "is_anomaly": entry["is_anomaly"], "anomaly_explanation": entry.get("explanation", [])}))
        logstash.append(json.dumps({"@timestamp": "2026-03-01T10:00:00Z", "message": entry["record"],
                                    "logscore": {"anomaly_score": entry["score"], "is_anomaly": entry["is_anomaly"],
                                                 "model": "shop", "explanation": entry.get("explanation", [])}}))
    (tmp_path / "fluentd.log").write_text("\n".join(fluentd + ["garbage that is no scored output"]) + "\n")
    (tmp_path / "logstash.jsonl").write_text("\n".join(logstash) + "\n")

    for name in ("scored.jsonl", "fluentd.log", "logstash.jsonl"):
        report = logscore("report", tmp_path / name, "--html", tmp_path / f"{name}.html")
        assert report.returncode == 0, report.stderr
        head = report.stdout.splitlines()[0]
        assert head.startswith(f"{len(lines):,} scored records, {len(flagged)} anomalies")
        groups = [line.split() for line in report.stdout.splitlines()[3:] if line[:8].strip().isdigit()]
        assert groups and int(groups[0][0].replace(",", "")) == 12, report.stdout  # the compare page's requests
        html = (tmp_path / f"{name}.html").read_text()
        assert html.count("<svg") >= 3 and "<script" not in html and "http://" not in html.split("</style>")[0]
    assert "1 lines not scored output (skipped)" in logscore("report", tmp_path / "fluentd.log").stdout
    assert "route web.access" not in report.stdout

    empty = tmp_path / "empty.jsonl"
    empty.write_text("not json\n")
    failed = logscore("report", empty)
    assert failed.returncode == 1 and "no scored records" in failed.stderr and "Traceback" not in failed.stderr


def test_report_shows_progress_on_big_inputs(tmp_path, monkeypatch, capsys):
    from logscore import report
    from logscore.cli import main

    monkeypatch.setattr(report, "PROGRESS_EVERY", 1000)
    rows = [json.dumps({"score": float(s), "is_anomaly": bool(s > 0.99), "explanation": ["url: x"]})
            for s in np.linspace(0, 1, 2500)]
    # two files: the lines read are counted across them (each file's records are placed once it is read)
    (tmp_path / "big.jsonl").write_text("\n".join(rows[:1250]) + "\n")
    (tmp_path / "more.jsonl").write_text("\n".join(rows[1250:]) + "\n")
    assert main(["report", str(tmp_path / "big.jsonl"), str(tmp_path / "more.jsonl")]) == 0
    captured = capsys.readouterr()
    assert "[report] 1,000 lines read" in captured.err and "[report] 2,000 lines read" in captured.err
    assert captured.out.startswith("2,500 scored records, 25 anomalies")
    assert f"r1  (model not recorded)  {tmp_path / 'more.jsonl'} line 1,226 .. 1,250" in captured.out


def test_report_keeps_its_largest_groups_past_its_group_limit_and_says_what_it_left_out(tmp_path, monkeypatch,
                                                                                         capsys):
    from logscore import report
    from logscore.cli import main

    monkeypatch.setattr(report, "MAX_GROUPS", 100)
    attack = {"score": 1.0, "is_anomaly": True, "explanation": ["url: shape id=9' or 1=1 (never seen)"]}
    rows = [json.dumps(attack)] * 500  # one big group first, then a flood of one-off anomalies
    rows += [json.dumps({"score": 1.0, "is_anomaly": True, "explanation": [f"url: /page{i} (never seen)"]})
             for i in range(1000)]
    (tmp_path / "flood.jsonl").write_text("\n".join(rows) + "\n")
    assert main(["report", str(tmp_path / "flood.jsonl"), "--top", "1"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("1,500 scored records, 1,500 anomalies")
    dropped = int(out[1].split("the ")[1].split(" smallest")[0].replace(",", ""))
    assert out[1].startswith("more than 100 groups") and dropped > 900
    assert f"({dropped:,} anomalies) are left out" in out[1]  # each dropped group a one-off
    kept = int(out[0].split(" in ")[1].split(" groups")[0].replace(",", ""))
    assert kept + dropped == 1001 and kept <= 100
    first_group = out[out.index("") + 1]  # after the summary (which warns: every record is flagged)
    assert first_group.split()[:2] == ["500", "r1"], out  # the attack's group, not a one-off (r: not a page id)


def test_report_reads_odd_times_and_notes_and_refuses_an_unwritable_html_path(tmp_path):
    base = {"anomaly_score": 0.999, "is_anomaly": True, "explanation": ["url: /x (never seen)"]}
    times = [1e20, 1.7e18, float("nan"), float("inf"), -5, 1.7e12, "2026-01-01T00:00:00Z", "yesterday", 1.7e9]
    rows = [json.dumps({**base, "time": t}) for t in times]  # nanoseconds, NaN: what shippers write
    rows += [json.dumps({**base, "notes": 5}), json.dumps({**base, "is_anomaly": False,
                                                           "notes": "suppressed by feedback #3"})]
    # is_anomaly as text (a pipeline that stringifies fields): "false" is no anomaly
    rows += [json.dumps({**base, "is_anomaly": "false"}), json.dumps({**base, "is_anomaly": "True"})]
    (tmp_path / "odd.jsonl").write_text("\n".join(rows) + "\n")
    done = logscore("report", tmp_path / "odd.jsonl", "--html", tmp_path / "odd.html")
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    assert done.stdout.startswith(f"{len(rows)} scored records, {len(rows) - 2} anomalies")
    assert "1 suppressed by feedback" in done.stdout  # a note given as one string, not a list
    # (a missing directory is made, as for train --out; a regular file is not a directory to write in)
    unwritable = logscore("report", tmp_path / "odd.jsonl", "--html", tmp_path / "odd.html" / "x.html")
    assert unwritable.returncode == 1 and "--html" in unwritable.stderr and "Traceback" not in unwritable.stderr


def test_report_of_score_output_without_records_says_to_score_with_record(tmp_path):
    """`logscore score` output (no --record) was told to add Fluentd's <inject> to get its times."""
    from logscore.report import read_scored, text_summary

    rows = [{"line": n, "score": 0.2, "is_anomaly": False, "model": "shop", "version": "v1"} for n in (1, 2)]
    (tmp_path / "scored.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    summary = text_summary(*read_scored([str(tmp_path / "scored.jsonl")], None), top=10)
    assert "2 of 2 records hold no time" in summary and "logscore score --record" in summary, summary
    assert "<inject>" not in summary


def test_report_charts_span_the_records_not_a_far_out_time():
    """One record with a time of 0 among a week's put every other record into one of the 60 bins of
    the rate chart: a week drawn as a single bar at the right end of 56 years."""
    from logscore.report import TIMELINE_BINS, rate_timeline

    week = 1796313840 + np.sort(np.random.default_rng(3).uniform(0, 7 * 86400, 5000))
    points, start, end, outside = rate_timeline(np.array([0.0, *week]), np.zeros(5001))
    assert (start, end, outside) == (week[0], week[-1], 1)
    assert len(points) == TIMELINE_BINS
    assert rate_timeline(week, np.zeros(5000))[1:] == (week[0], week[-1], 0), "without it, every record is charted"


def test_report_names_the_route_a_model_floods(tmp_path):
    """A forward-mode sidecar's default model met a new site on one tag: it flagged 22 % of that
    route's records; the sidecar's warning names the model only, and the report said nothing (fbday trial)."""
    def line(route, n, flagged):
        return f"{route}: [{1796313840 + n}.000000000, " + json.dumps(
            {"path": f"/p{n}", "anomaly_score": 1.0 if flagged else 0.1, "is_anomaly": flagged,
             "anomaly_model": "apache-access", "anomaly_explanation": [f"url: shape /p{n} (never seen)"]}) + "]"
    rows = [line("shop.access", n, n % 4 == 0) for n in range(200)]
    rows += [line("web.access", n, n == 0) for n in range(200)]
    (tmp_path / "records.txt").write_text("\n".join(rows) + "\n")
    done = logscore("report", tmp_path / "records.txt")
    assert done.returncode == 0, done.stderr
    assert "apache-access flagged 50 of 200 records of route shop.access (25.0%)" in done.stdout, done.stdout
    assert "route web.access (" not in done.stdout


def test_report_reads_the_time_fluentd_s_out_file_writes_before_each_record(tmp_path):
    """Fluentd's out_file writes `time<TAB>tag<TAB>{record}`, the event time outside the record: a
    syslog model's records (no time field, no access line) were placed by line number ("record
    369 .. record 501") instead of their time."""
    rows = [f"2026-12-03T16:0{i}:00+0000\tssh.syslog\t" + json.dumps(
        {"host": "LabSZ", "ident": "sshd", "message": f"fatal: buffer overflow {i}", "anomaly_score": 1.0,
         "is_anomaly": True, "anomaly_explanation": ["message alarms: alarm word fatal (never seen in training)"]})
        for i in range(3)]
    # the filter's notes (notes_key, anomaly_notes by default) count too
    rows.append("2026-12-03T16:03:00+0000\tssh.syslog\t" + json.dumps(
        {"message": "session opened", "anomaly_score": 0.4, "is_anomaly": False,
         "anomaly_notes": ["suppressed by feedback #3"]}))
    (tmp_path / "out_file.log").write_text("\n".join(rows) + "\n")
    # Fluent Bit's file output (the next hop of a forward-mode sidecar) writes `tag: [time, {record}]`;
    # its lines were refused as not scored output
    fluent_bit = [f"app.orders: [{1796313840 + 60 * i}.123456789, " + json.dumps(
        {"msg": "panic: ledger corrupt", "anomaly_score": 1.0, "is_anomaly": True, "anomaly_model": "app"},
        separators=(",", ":")) + "]" for i in range(2)]
    (tmp_path / "fluent-bit.txt").write_text("\n".join(fluent_bit) + "\n")
    done = logscore("report", tmp_path / "out_file.log", tmp_path / "fluent-bit.txt")
    assert done.returncode == 0, done.stderr
    assert "2026-12-03 16:00:00 .. 2026-12-03 16:02:00" in done.stdout and "record 1" not in done.stdout
    assert "1 suppressed by feedback" in done.stdout
    assert done.stdout.startswith("6 scored records, 5 anomalies") and "lines not scored output" not in done.stdout
    assert "app · app.orders  2026-12-03 16:04:00 .. 2026-12-03 16:05:00" in done.stdout, done.stdout
    # a JSON line whose values look like Fluent Bit's frame is still read as the JSON object it is
    (tmp_path / "json.txt").write_text(json.dumps({"pos": [12.5, {"z": 1}], "anomaly_score": 0.9,
                                                   "is_anomaly": True}) + "\n")
    done = logscore("report", tmp_path / "json.txt")
    assert done.returncode == 0 and done.stdout.startswith("1 scored records, 1 anomalies"), done.stdout


def test_report_counts_unscored_records_by_route_and_lists_anomaly_events_apart(tmp_path):
    """Behind forward mode, Fluent Bit's file holds records passed on unscored (a tag routed to no
    model) and the sidecar's anomaly events (tag logscore.anomaly): the report called the first
    "lines not scored output (skipped)", without their route or why, and counted each event as a
    scored record of its model (appday trial)."""
    def line(tag, record):
        return f"{tag}: [1796414748.991280342, " + json.dumps(record, separators=(",", ":")) + "]"
    rows = [line("app.zookeeper", {"log": f"INFO session {n}", "anomaly_score": 0.0, "is_anomaly": False,
                                   "anomaly_model": "zookeeper"}) for n in range(3)]
    reason = ("unscored: no model named in the request and no default model: give the request's `model` one of: "
              "zookeeper (or set the sidecar's default_model, or tag_routes for tags)")
    rows += [line("app.openstack", {"log": f"nova-api {n}", "anomaly_unscored": True, "anomaly_notes": [reason]})
             for n in range(2)]
    rows.append(line("app.kafka", {"log": "kafka up", "anomaly_unscored": True}))  # the Fluentd filter's: no note
    rows.append(json.dumps({"message": "GET /", "tag": "web", "tags": ["_httprequestfailure", "_logscore_unscored"]}))
    rows.append(line("logscore.anomaly", {
        "kind": "window", "model": "zookeeper", "key": "level=error share", "score": 1.0, "observed": 0.4,
        "expected_low": 0.0, "expected_high": 0.02, "explanation": "error share 40 %, expected 0 %-2 %",
        "start": 1796414760.0, "end": 1796414820.0, "id": 7, "dropped_before": 0}))
    (tmp_path / "records.txt").write_text("\n".join(rows) + "\n")
    done = logscore("report", tmp_path / "records.txt", "--html", tmp_path / "report.html")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("3 scored records, 0 anomalies"), done.stdout
    assert "not scored output" not in done.stdout
    assert f"2 records of route app.openstack passed on unscored: {reason.removeprefix('unscored: ')}" in done.stdout
    assert "1 record of route app.kafka passed on unscored (no reason in the output" in done.stdout
    assert "1 record of route web passed on unscored: _httprequestfailure" in done.stdout  # Logstash's
    assert "models: zookeeper (3)" in done.stdout
    assert "1 anomaly event: 2026-12-04 20:06:00 zookeeper window: error share 40 %, expected 0 %-2 %" in done.stdout
    page = (tmp_path / "report.html").read_text()
    assert "error share 40 %" in page and "<pre style='white-space:pre-wrap'>" in page  # long reasons wrap


def test_report_places_raw_application_lines_at_the_time_written_in_them(tmp_path):
    """Fluent Bit's tail without a parser (forward mode's usual sender) stamps each line with the
    moment it read it: a day of Hadoop and syslog lines caught up in a second showed every group
    at that second ("20:05:48 .. 20:05:48"), though each line holds its own time, which the
    sidecar's windows read first (appday trial)."""
    lines = ["2015-10-18 18:01:47,978 ERROR [main] org.apache.hadoop.mapred.YarnChild: java.lang.OutOfMemoryError",
             "2015-10-18 18:09:01,202 ERROR [main] org.apache.hadoop.mapred.YarnChild: java.lang.OutOfMemoryError"]
    rows = [f"app.hadoop: [1796414748.99128{n}, " + json.dumps(
        {"log": line, "anomaly_score": 1.0, "is_anomaly": True, "anomaly_model": "hadoop",
         "anomaly_explanation": ["message alarms: alarm word java.lang.OutOfMemoryError (never seen in training)"]})
        + "]" for n, line in enumerate(lines)]
    (tmp_path / "records.txt").write_text("\n".join(rows) + "\n")
    done = logscore("report", tmp_path / "records.txt")
    assert done.returncode == 0, done.stderr
    assert "2015-10-18 18:01:47 .. 2015-10-18 18:09:01" in done.stdout, done.stdout


def test_report_counts_records_passed_unscored_or_held_and_says_when_the_output_holds_no_time(tmp_path):
    """A week behind real Fluentd with the shipped example (`<format> @type json`): the records the
    filter passed unscored during a sidecar restart were counted as "lines not scored output", the
    records scored while learning were not told apart, and the groups were placed "record 7,359 ..
    record 55,574" without a word on why (weekone trial)."""
    scored = {"host": "1.2.3.4", "path": "/x", "anomaly_score": 0.2, "is_anomaly": False,
              "anomaly_model": "apache-access"}
    rows = [json.dumps(scored)] * 5
    rows += [json.dumps({**scored, "anomaly_notes": ["learning: route apache-access is learning its own model "
                                                     "(5 of 5000 records seen)"]})] * 2
    rows += [json.dumps({"host": "1.2.3.4", "path": "/y", "anomaly_unscored": True})] * 3
    rows += [json.dumps({"message": "GET /", "tags": ["_logscore_unscored"]})]  # Logstash's mark
    rows += ["not json"]
    (tmp_path / "scored.log").write_text("\n".join(rows) + "\n")
    done = logscore("report", tmp_path / "scored.log")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("7 scored records, 0 anomalies"), done.stdout
    assert "1 lines not scored output" in done.stdout
    assert "4 records of route (none) passed on unscored (no reason in the output" in done.stdout
    assert "2 records scored while their route learned its own model" in done.stdout
    assert "7 of 7 records hold no time" in done.stdout and "<inject> time_key time" in done.stdout
    (tmp_path / "down.log").write_text("\n".join(rows[7:10]) + "\n")
    down = logscore("report", tmp_path / "down.log")
    assert down.returncode == 1 and "only records passed on unscored (was the sidecar running?" in down.stderr, \
        down.stderr


def test_past_the_previous_model_s_limit_its_attackers_and_scanners_stay_out_of_training(shop_model_path):
    """A learned route's window on the week's fifth day: a new section's visitors (flagged 1-4 times
    each), six attacking addresses and a scanner: 10.9 % flagged, past the 10 % limit, so none of the
    previous model's flags were used and the learner's retrain learned the attack (395 of 400 attack
    lines flagged before, 180 after; the scanner's 137 of 700, 0) (weekone trial)."""
    from logscore.training.feedback import leave_out_flagged

    model = Model.load(shop_model_path)
    new_section = compare_lines(200, seed=71)  # each from a client of its own
    attackers = ["203.0.113.7", "203.0.113.8"]
    attacks = [attackers[i % 2] + line[line.index(" "):]
               for i, line in enumerate(attacks_on(shop_lines(60, seed=72), seed=73))]
    records = shop_lines(800, seed=70) + new_section + attacks
    warnings = []
    kept, left_out, _ = leave_out_flagged(records, model, None, warnings.append)
    assert left_out["ignored"] and left_out["fraction"] > 0.1, left_out
    assert not set(attacks) & set(kept), "an attacker's records were learned"
    assert set(new_section) <= set(kept)  # the new section is learned, as before
    assert sorted(left_out["clients"]) == attackers and left_out["records"] == len(attacks), left_out
    assert "but for the 60 records of the 2 clients it flags 10 times or more" in warnings[0], warnings


def test_a_kind_flagged_across_many_clients_is_learned_a_probe_from_few_and_sprayed_payloads_are_not(
        shop_model_path):
    """A section deployed after a learned route's first model stayed flagged through six retrains (30-43 %
    of its requests a day): each retrain left out every record the serving model flagged (weekone
    trial). A kind flagged across WIDESPREAD_CLIENTS clients is learned now; not a probe from a few
    addresses (each under CONCENTRATED_FLAGS), nor payloads the injection prior marks, however many send."""
    from logscore.cli import describe_left_out
    from logscore.training.feedback import leave_out_flagged

    model = Model.load(shop_model_path)
    new_section = compare_lines(50, seed=81)  # each from a client of its own
    probers = [f"203.0.113.{n}" for n in range(1, 6)]  # fewer than WIDESPREAD_CLIENTS
    probes = [f'{probers[i % len(probers)]} - - [0{1 + i % 9}/Mar/2026:10:00:00 +0000] "GET /wp-admin/setup-config.php '
              f'HTTP/1.1" 404 210 "-" "Mozilla/5.0"' for i in range(3 * len(probers))]
    sprayed = [re.sub(r"with=\d+", "with=%3Cscript%3Ealert(1)%3C/script%3E", line)  # from as many clients
               for line in compare_lines(15, seed=84)]
    records = shop_lines(1200, seed=80) + new_section + probes + sprayed
    flagged = set(flagged_texts(model, records))
    assert set(new_section) <= flagged and set(probes) <= flagged
    kept, left_out, _ = leave_out_flagged(records, model, None, [].append)
    assert not left_out.get("ignored"), left_out
    assert set(new_section) <= set(kept), "the new section was left out"
    assert not set(probes) & set(kept), "a probe from a few addresses was learned"
    assert not set(sprayed) & set(kept), "an injection sent from many clients was learned"
    assert left_out["learned_widespread"]["records"] >= len(new_section), left_out
    assert "learned all the same" in describe_left_out(left_out)  # as `logscore inspect` says it


def flagged_texts(model: Model, records: list[str]) -> list[str]:
    flags = decide(model, model.score(records)).is_anomaly
    return [r for r, flag in zip(records, flags) if flag]


def test_report_tells_a_week_day_by_day(tmp_path):
    """A week's scored output: the text named groups only, so a new section flagged from its day on and
    the day of an attack showed only in the HTML's timeline (weekone trial)."""
    day = 86400
    rows = [f"{time_text(1795651200 + d * day + i * 60)}\tweb.access\t" + json.dumps(
        {"host": "1.2.3.4", "path": f"/p{i}", "anomaly_score": 1.0 if flagged else 0.1, "is_anomaly": flagged})
        for d, flags in enumerate([0, 3, 40]) for i, flagged in enumerate([True] * flags + [False] * (100 - flags))]
    rows.append(f"{time_text(0)}\tweb.access\t" + json.dumps({"path": "/", "anomaly_score": 0.1, "is_anomaly": False}))
    (tmp_path / "week.log").write_text("\n".join(rows) + "\n")
    done = logscore("report", tmp_path / "week.log")
    assert done.returncode == 0, done.stderr
    # (the record of time 0 among them, a broken clock's, is left out of the days as of the charts)
    assert "per day (UTC):\n  2026-11-26         100 records         0 anomalies (0.00%)\n" in done.stdout, done.stdout
    assert "  2026-11-28         100 records        40 anomalies (40.00%)\n" in done.stdout


def time_text(seconds: float) -> str:
    import time

    return time.strftime("%Y-%m-%dT%H:%M:%S+0000", time.gmtime(seconds))


def test_report_prints_what_logs_hold_without_their_terminal_escapes(tmp_path, capsys):
    """A log's escape sequence in a model, route, entity or explanation retitled and cleared the
    operator's terminal, and its '\\r\\n' forged a line of the report."""
    from logscore.cli import main

    hostile = "\x1b]0;pwned\x07\x1b[2J\r\nFAKE\u202e"
    (tmp_path / "hostile.jsonl").write_text(json.dumps(
        {"score": 1.0, "is_anomaly": True, "model": hostile, "tag": hostile, "host": hostile, "time": 1796313840,
         "explanation": [f"url: {hostile}"]}) + "\n")
    assert main(["report", str(tmp_path / "hostile.jsonl")]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\r" not in out and "\u202e" not in out
    assert r"\x1b]0;pwned\x07\x1b[2J\r\nFAKE\u202e" in out and "\nFAKE" not in out
    assert len(out.splitlines()) == 6, out


def test_report_html_shows_what_logs_hold_as_escapes_not_reversed_or_hidden(tmp_path):
    """The HTML report wrote a record's U+202E (the rest of the line shown reversed), zero-width space,
    escape sequence and NUL raw, where the terminal report shows them as escapes."""
    from logscore.cli import main

    hostile = "\x1b]0;pwned\x07\u202etxt.exe\u200b\x00"
    (tmp_path / "hostile.jsonl").write_text(json.dumps(
        {"score": 1.0, "is_anomaly": True, "model": hostile, "tag": hostile, "host": hostile, "time": 1796313840,
         "explanation": [f"url: {hostile}"], "message": f"GET /{hostile}<script>"}) + "\n")
    assert main(["report", str(tmp_path / "hostile.jsonl"), "--html", str(tmp_path / "report.html")]) == 0
    html = (tmp_path / "report.html").read_text()
    assert not any(c in html for c in "\x1b\x07\u202e\u200b\x00"), "raw control or invisible characters"
    assert html.count(r"\x1b]0;pwned\x07\u202etxt.exe\u200b\x00") >= 4  # model, route, entity, feature, example
    assert "&lt;script&gt;" in html and "<script" not in html


def test_report_names_the_hosts_of_syslog_lines_scored_whole():
    """Syslog tailed whole (Fluent Bit without a parser: {"log": line}; `logscore score --record`:
    "record": line) gave `logscore report` no entity: its top entities were empty."""
    from logscore.report import entity_of

    rfc3164 = "Jun 14 15:16:01 combo sshd(pam_unix)[19939]: authentication failure; rhost=218.188.2.4"
    rfc3339 = "2024-01-15T10:23:45.123456+01:00 web-2 kernel: Out of memory: Killed process 812 (java)"
    assert entity_of({"log": rfc3164, "anomaly_score": 0.999}, None) == "combo"
    assert entity_of({"record": rfc3339, "score": 0.999}, None) == "web-2"
    assert entity_of({"record": {"message": rfc3164}}, None) == "combo"
    access = '10.0.0.9 - - [17/May/2015:10:05:03 +0000] "GET / HTTP/1.1" 200 512'
    assert entity_of({"log": access}, None) == "10.0.0.9"
    assert entity_of({"log": "2024-01-15 10:23:45,978 ERROR [main] pool exhausted"}, None) is None
    assert entity_of({"host": "db-1", "log": rfc3164}, None) == "db-1"  # (a field of its own wins)
    quoting = "Jun 14 15:16:01 web1 apache2: " + access  # (a syslog message quoting an access line)
    assert entity_of({"log": quoting}, None) == "web1"
    assert entity_of({"log": "www.example.com:443 " + access}, None) == "10.0.0.9"  # vhost_combined


def test_a_retrain_learns_every_record_a_normal_entry_s_rule_suppresses_not_only_its_examples(tmp_path,
                                                                                                shop_model_path):
    """Retraining on recent logs that hold a kind marked normal (the usual flow): screening took the
    kind's records for a cluster of attacks and set them aside (5 of 30 among 10,000 lines), so
    only the entry's examples vouched for the kind. The records its rule suppresses under the
    previous model are vouched for now: never set aside by screening, learned."""
    from logscore.cli import describe_left_out
    from logscore.features import load_spec
    from logscore.training.feedback import load_feedback
    from logscore.training.train import TrainOptions, train

    model = Model.load(shop_model_path)
    store = SqliteStore(str(tmp_path / "feedback.sqlite3"))
    store.migrate()
    store.add(Entry(0, NORMAL, pattern_from_records(model, compare_lines(3, seed=90)), "ana", model="shop"))
    marked_kind = compare_lines(12, seed=91)
    _, metadata = train(shop_lines(2000, seed=92) + marked_kind,
                        TrainOptions(spec=load_spec(None, "access"), name="shop", target_fpr=0.01,
                                     feedback=load_feedback(str(tmp_path / "feedback.sqlite3"), "shop"),
                                     previous=model))
    training = metadata["training"]
    set_aside = json.dumps([training["set_aside"]["examples"], training["injection_prior"]["examples"]])
    assert "compare" not in set_aside, set_aside
    assert training["left_out_flagged"]["vouched_by_feedback"] == len(marked_kind), training["left_out_flagged"]
    assert "12 flagged records learned as normal, the feedback's normal entries" in describe_left_out(
        training["left_out_flagged"])


def test_a_retrain_on_a_log_without_a_marked_kind_teaches_the_kind_not_only_its_examples(tmp_path,
                                                                                           shop_model_path):
    """A fleet trial marked compare pages normal, retrained on later lines that held none, then undid
    the entry: most of the kind's records were flagged again (the five examples, repeated, taught
    their own ids' n-grams and lengths). Their copies are variants now, other digits in the URL, the
    structure kept; an attack on the kind's page stays flagged."""
    from logscore.features import load_spec
    from logscore.training.feedback import load_feedback
    from logscore.training.train import TrainOptions, save_model, train

    model = Model.load(shop_model_path)
    store = SqliteStore(str(tmp_path / "feedback.sqlite3"))
    store.migrate()
    examples = compare_lines(5, seed=100)
    store.add(Entry(0, NORMAL, {**pattern_from_records(model, examples), "examples": examples}, "ana", model="shop"))
    proto, _ = train(shop_lines(3000, seed=101), TrainOptions(
        spec=load_spec(None, "access"), name="shop", target_fpr=0.01,
        feedback=load_feedback(str(tmp_path / "feedback.sqlite3"), "shop")))
    save_model(proto, tmp_path / "retrained.onnx")
    retrained = Model.load(tmp_path / "retrained.onnx")
    later = compare_lines(200, seed=102)
    # No rule in force: 72 % flagged with the examples repeated as they were, 5.5 % now (ids' digit
    # 3-grams that 3,000 lines of training never held, on any page)
    assert decide(retrained, retrained.score(later)).is_anomaly.mean() <= 0.15
    assert decide(retrained, retrained.score(attacks_on(later[:60], seed=103))).is_anomaly.mean() >= 0.9
    assert decide(retrained, retrained.score(shop_lines(1000, seed=104))).is_anomaly.mean() <= 0.02


def test_kind_variants_reach_a_url_under_an_alias_or_in_a_carried_line_and_spare_runs_that_must_stay():
    """The variants replaced only a field named `url` or a raw line: Fluentd's apache2 record (its URL
    is `path`) and a shipper's {"log": line} got 20 copies of the record itself, 4 times the weight
    an example had. And all digit runs were redrawn at once, so one that must stay (a hash's digits
    in a file name) left no variant at all."""
    from logscore.features import load_spec
    from logscore.training.feedback import kind_variants

    line = '10.0.0.1 - - [17/May/2015:10:05:03 +0000] "GET /products/4711/compare?with=93 HTTP/1.1" 200 5 "-" "x"'
    fluentd = {"host": "10.0.0.1", "method": "GET", "path": "/products/4711/compare?with=93", "code": 200}
    versioned = '10.0.0.1 - - [17/May/2015:10:05:03 +0000] "GET /api/v2/items/4711 HTTP/1.1" 200 5 "-" "x"'
    static = '10.0.0.1 - - [17/May/2015:10:05:03 +0000] "GET /static/js/app.3f9a2b1c.js HTTP/1.1" 200 5 "-" "x"'
    spec = load_spec(None, "access")
    for record in (line, fluentd, {"log": line}):
        copies = kind_variants([record], spec, repeat=5)
        assert copies[0] == record and len({json.dumps(c, sort_keys=True) for c in copies}) >= 15, record
        if isinstance(record, dict):
            assert all(set(c) == set(record) for c in copies)
    copies = kind_variants([versioned], spec, repeat=5)
    assert len(set(copies)) >= 10 and all("/api/v2/items/" in c for c in copies), "the id changes, v2 stays"
    assert kind_variants([static], spec, repeat=5) == [static] * 5  # (its digits are its template's)
    plain = '10.0.0.1 - - [17/May/2015:10:05:03 +0000] "GET /about HTTP/1.1" 200 5 "-" "x"'
    assert kind_variants([plain], spec, repeat=5) == [plain] * 5


def test_report_names_the_clients_and_times_of_records_nginx_parsers_made(tmp_path):
    """Fluentd's and Fluent Bit's nginx parsers name the client `remote` and the ident field `host`
    ("-"), and a time kept or injected in the log's own format is the access log's: a field trial's
    report (nginx -> in_tail @type nginx -> filter -> out_file) said every record held no time and
    named one entity, "-"."""
    rows = []
    for second in range(40):
        client = f"203.0.113.{second % 4 + 1}"
        rows.append(json.dumps({
            "remote": client, "host": "-", "user": "-", "method": "GET", "path": f"/search?q={second}'--",
            "code": "200", "size": "3", "referer": "-", "agent": "curl/8.0", "anomaly_score": 0.9995,
            "is_anomaly": True, "time": f"05/Dec/2026:06:12:{second:02d} +0000"}))
    (tmp_path / "scored.jsonl").write_text("\n".join(rows) + "\n")
    done = logscore("report", tmp_path / "scored.jsonl")
    assert done.returncode == 0, done.stderr
    assert "hold no time" not in done.stdout
    assert "top entities: 203.0.113.1 (10), 203.0.113.2 (10)" in done.stdout, done.stdout
    assert "2026-12-05 06:12:00 .. 2026-12-05 06:12:39" in done.stdout, done.stdout


def test_training_leaves_out_entries_past_their_expiry_and_says_how_many(tmp_path, shop_model_path,
                                                                        shop_training_lines):
    """A mark given for a while (a migration tool's traffic, `--expires 15s`) still taught `train
    --feedback` once expired (probe: 0 of 20 of the tool's lines flagged after the retrain, 20 of 20
    without the feedback): expired entries are left out, as removed ones are, and counted."""
    import time

    from logscore.training.feedback import load_feedback

    model = Model.load(shop_model_path)
    marked, migration = compare_lines(3, seed=70), monitor_lines(3, seed=71, agent="migration-tool/0.9")
    location = str(tmp_path / "feedback.sqlite3")
    store = SqliteStore(location)
    store.migrate()
    store.add(Entry(0, NORMAL, pattern_from_records(model, marked), "ana", model="shop"))
    until = time.time() + 1
    store.add(Entry(0, NORMAL, pattern_from_records(model, migration), "ops", model="shop", expires_at=until))
    store.add(Entry(0, NORMAL, pattern_from_records(model, monitor_lines(1, seed=72)), "ops", model="other-model",
                    expires_at=until))

    before = load_feedback(location, "shop", now=until - 0.5)
    assert (before.entries, before.expired, len(before.normal)) == (2, 0, 6)
    after = load_feedback(location, "shop", now=until)
    assert (after.entries, after.expired, len(after.normal)) == (1, 1, 3)  # the other model's is not counted
    assert after.normal == marked and len(after.rules) == 1

    while time.time() <= until:  # the migration's entry expires
        time.sleep(until - time.time() + 0.05)
    training = tmp_path / "train.log"
    training.write_text("\n".join(shop_training_lines) + "\n")
    result = logscore("train", "--input", training, "--target-fpr", "0.01", "--name", "shop",
                      "--out", tmp_path / "taught.onnx", "--feedback", location)
    assert result.returncode == 0, result.stderr
    assert "1 entries; 1 past their expiry left out): 3 records learned as normal" in result.stdout, result.stdout
    taught = Model.load(tmp_path / "taught.onnx")
    assert decide(taught, taught.score(monitor_lines(20, seed=73, agent="migration-tool/0.9"))).is_anomaly.all()
    assert not decide(taught, taught.score(marked)).is_anomaly.any()
    summary = json.loads(logscore("inspect", tmp_path / "taught.onnx", "--json").stdout)["metadata"]["training"]
    assert summary["feedback"]["expired_entries"] == 1


def with_clients(lines: list[str], clients: int, prefix: str = "10.0.0.") -> list[str]:
    """The lines sent by ``clients`` addresses in turn (a site whose visitors make many requests each)."""
    return [f"{prefix}{i % clients} {line.split(' ', 1)[1]}" for i, line in enumerate(lines)]


def test_past_the_limit_only_clients_flagged_far_above_the_rest_are_left_out(shop_model_path):
    """Another site's model flagging 40-45 % of a new site's records flags each of its frequent
    clients 10 times or more: every one was left out (probe s26: a CSIC log's 120 clients, all 8,000
    records, then "only 0 records to train on"). Now only a client flagged far above the rest is."""
    from logscore.training.feedback import leave_out_flagged

    default = Model.load(ROOT / "models" / "apache-access.onnx")
    visitors = with_clients(shop_lines(2000, seed=130), 40)  # 50 requests each
    scanner = with_clients(attacks_on(shop_lines(60, seed=131), seed=132), 1, prefix="203.0.113.")
    warnings = []
    kept, left_out, _ = leave_out_flagged(visitors + scanner, default, None, warnings.append)
    assert left_out["ignored"] and 0.3 < left_out["fraction"] < 0.5, left_out
    assert left_out["clients"] == ["203.0.113.0"] and left_out["records"] == len(scanner), left_out
    assert kept == visitors
    assert "clients it flags 10 times or more and far above that share" in warnings[0], warnings


def test_a_previous_model_flagging_most_records_leaves_no_client_out(shop_model_path):
    """At 97 % flagged every frequent client is flagged far more than 10 times (the real blog log under
    the shop's model: its crawlers and feed readers, 2,391 of 5,000 records, were left out)."""
    from logscore.training.feedback import leave_out_flagged

    records = with_clients(blog_lines(600, seed=133), 20)
    warnings = []
    kept, left_out, _ = leave_out_flagged(records, Model.load(shop_model_path), None, warnings.append)
    assert left_out["fraction"] > 0.5 and left_out["records"] == 0 and kept == records, left_out
    assert "it flags most of them, so no client stands out either" in warnings[0], warnings


def test_too_few_records_left_by_the_previous_model_name_it_and_what_to_do(shop_model_path):
    from logscore.features import load_spec
    from logscore.errors import InputError
    from logscore.training.train import TrainOptions, train

    records = shop_lines(46, seed=134) + attacks_on(shop_lines(4, seed=135), seed=136)  # 8 % flagged
    options = TrainOptions(spec=load_spec(None, "access"), name="shop", previous=Model.load(shop_model_path))
    with pytest.raises(InputError) as refused:
        train(records, options)
    assert "--previous-model 'shop' left out" in str(refused.value)
    assert "train without --previous-model" in str(refused.value)
