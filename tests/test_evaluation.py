"""Metrics on data with known answers, and `logscore evaluate` end to end."""

import json
import subprocess
import sys

import numpy as np
import pytest

from logscore.evaluation import (Evaluation, average_precision, best_f1, confusion, group_sessions, roc_auc,
                                sequence_ceiling, tpr_at_fpr)
from logscore.sessions import SessionSpec, SessionTracker

from .generate import ATTACKS, attack_lines, shop_lines
from .sidecar_process import ROOT


def test_perfectly_separable_sets():
    labels = np.array([0] * 50 + [1] * 50)
    scores = np.concatenate([np.linspace(0, 0.4, 50), np.linspace(0.6, 1, 50)])
    assert roc_auc(labels, scores) == 1.0
    assert average_precision(labels, scores) == 1.0
    assert tpr_at_fpr(labels, scores, 0.01) == (1.0, 0.6)


def test_identical_sets_are_near_chance():
    rng = np.random.default_rng(0)
    scores = rng.normal(size=20_000)
    labels = rng.integers(0, 2, size=20_000)
    assert abs(roc_auc(labels, scores) - 0.5) < 0.02
    assert roc_auc(labels, np.zeros(20_000)) == 0.5  # all tied


def test_small_known_example():
    labels, scores = np.array([0, 0, 1, 1]), np.array([0.1, 0.4, 0.35, 0.8])
    assert roc_auc(labels, scores) == 0.75
    assert average_precision(labels, scores) == pytest.approx((1 + 2 / 3) / 2)
    assert tpr_at_fpr(labels, scores, 0.0) == (0.5, 0.8)
    assert tpr_at_fpr(labels, scores, 0.5) == (1.0, 0.35)
    assert confusion(labels, scores >= 0.35) == {"tp": 2, "fp": 1, "tn": 1, "fn": 0, "precision": 0.6667,
                                                 "recall": 1.0, "f1": 0.8, "fpr": 0.5}
    assert best_f1(labels, scores)["threshold"] == 0.35


def test_recall_by_type():
    evaluation = Evaluation(np.array([1, 1, 1, 0]), np.array([0.9, 0.1, 0.95, 0.2]), 0.5,
                            ["sqli", "xss", "sqli", ""])
    assert evaluation.recall_by_type() == {"sqli": {"recall": 1.0, "count": 2}, "xss": {"recall": 0.0, "count": 1}}


def test_at_threshold_figures_use_the_decided_flags_beside_the_target():
    labels, scores = np.array([0, 0, 0, 0, 1, 1]), np.array([0.1, 0.2, 0.3, 0.99, 0.95, 0.999])
    plain = Evaluation(labels, scores, 0.98, target_fpr=0.25).report()
    assert (plain["recall_at_threshold"], plain["fpr_at_threshold"], plain["target_fpr"]) == (0.5, 0.25, 0.25)
    # decide flagged the unparsable record 4 (score 0.95) too: recall counts it
    decided = Evaluation(labels, scores, 0.98, flags=(scores >= 0.98) | (np.arange(6) == 4)).report()
    assert (decided["recall_at_threshold"], decided["fpr_at_threshold"]) == (1.0, 0.25)


def test_sessions_take_their_most_anomalous_record():
    texts = ["a blk_1 x", "b blk_2", "c blk_1", "no key", "d blk_3"]
    ids, scores, labels = group_sessions(texts, np.array([0.2, 0.1, 0.9, 1.0, 0.3]), np.array([0, 0, 1, 1, 0]),
                                         r"blk_\d+")
    assert ids == ["blk_1", "blk_2", "blk_3"]
    assert scores.tolist() == [0.9, 0.1, 0.3] and labels.tolist() == [1, 0, 0]
    _, _, overridden = group_sessions(texts, np.zeros(5), np.zeros(5), r"blk_\d+", {"blk_2": 1})
    assert overridden.tolist() == [0, 1, 0]


def test_sessions_are_keyed_as_the_tracker_keys_them():
    r"""evaluate grouped by findall: `blk_(\d+)` gave ids '1' and '2', so --session-labels' blk_1 met no
    session; and an empty match was an id (review, session 27)."""
    texts = ["a blk_1 x", "b blk_2", "c blk_1 req=", "d req=r9"]
    tracker = SessionTracker(SessionSpec(key=r"blk_(\d+)"))
    tracked_ids = {tracker.keys.key_and_event(text)[0] for text in texts} - {None}
    ids, _, labels = group_sessions(texts, np.zeros(4), np.zeros(4), r"blk_(\d+)", {"blk_2": 1})
    assert ids == sorted(tracked_ids) == ["blk_1", "blk_2"] and labels.tolist() == [0, 1]
    ids, _, _ = group_sessions(texts, np.zeros(4), np.zeros(4), r"(?<=req=)\w*")
    assert ids == ["r9"]


def test_field_maps_are_keyed_by_the_text_the_tracker_reads():
    """evaluate read a field map whole as JSON: another field's id was found first, non-ASCII came escaped
    (`user=Jos` for José), an anchored key matched nothing (review, session 27)."""
    from logscore.evaluation import session_texts

    records = [{"host": "blk_9", "message": "got blk_1"}, {"message": "user=José logged in"},
               {"message": "blk_7 anchored"}, {"log": "raw-line key blk_5"}, {"host": "only a host"}]
    for key in (r"blk_\d+", r"user=\w+", r"^blk_\d+"):
        tracker = SessionTracker(SessionSpec(key=key))
        tracked = [tracker.keys.key_and_event(tracker.keys.text(r) or "")[0] for r in records]
        texts = session_texts(None, records, key)
        ids, _, _ = group_sessions(texts, np.zeros(len(records)), np.zeros(len(records)), key)
        assert ids == sorted(set(tracked) - {None}), key
    assert session_texts(None, records, r"blk_\d+")[:2] == ["got blk_1", "user=José logged in"]


def test_sequence_ceiling_ranks_sequences_by_their_share_of_anomalies():
    # ("a","b"): 3 normal + 1 anomalous; ("a","c"): one anomaly, seen nowhere else; ("a",): 4 normal.
    sessions = [("a", "b")] * 4 + [("a", "c")] + [("a",)] * 4
    labels = [0, 0, 0, 1, 1, 0, 0, 0, 0]
    ceiling = sequence_ceiling(sessions, labels, normal_sessions=[("a", "b"), ("a",)])
    # Best: flag ("a","c") only (precision 1, recall 1/2); adding ("a","b") costs 3 false alarms.
    assert ceiling["best_f1"] == pytest.approx(2 / 3, abs=1e-4)
    # ("a","c") outranks all 7 normals; the other anomaly ties with its 3 twins, beats 4 normals.
    assert ceiling["roc_auc"] == pytest.approx((7 + 1.5 + 4) / 14, abs=1e-4)
    assert ceiling["anomalies"] == 2 and ceiling["anomalies_like_a_normal_session"] == 1


def evaluate(*args) -> dict:
    result = subprocess.run([sys.executable, "-m", "logscore", "evaluate", *map(str, args)], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_evaluate_command_on_files_and_labeled_jsonl(tmp_path, shop_model_path):
    normal = shop_lines(2000, seed=60)
    attacks = attack_lines(shop_lines(300, seed=61), 200, seed=62)
    (tmp_path / "normal.log").write_text("\n".join(normal) + "\n")
    (tmp_path / "attacks.log").write_text("\n".join(line for _, line in attacks) + "\n")
    report = evaluate("--model", shop_model_path, "--normal", tmp_path / "normal.log",
                      "--anomalous", tmp_path / "attacks.log", "--report", tmp_path / "r.json",
                      "--plots", tmp_path / "shop")
    assert report["records"] == 2200 and report["anomalous"] == 200
    for png in report["plots"]:
        assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert report["roc_auc"] > 0.98 and report["tpr_at_fpr_1pct"] > 0.9
    assert json.loads((tmp_path / "r.json").read_text()) == report
    rows = [{"message": line, "label": "normal", "split": "test"} for line in normal[:500]]
    rows += [{"message": line, "label": "anomalous", "kind": kind, "split": "test"} for kind, line in attacks]
    rows += [{"message": "ignored", "label": "anomalous", "split": "train"}]
    (tmp_path / "labeled.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    typed = evaluate("--model", shop_model_path, "--labeled", tmp_path / "labeled.jsonl", "--type-column", "kind",
                     "--where", "split=test")
    assert typed["records"] == 700
    assert set(typed["recall_by_type"]) == set(ATTACKS)


def test_evaluate_sessions(tmp_path, shop_model_path):
    normal = shop_lines(400, seed=63)
    lines = [f"{line} session=s{i % 40}" for i, line in enumerate(normal)]
    attacks = [f"{line} session=x{i % 10}" for i, (_, line) in enumerate(attack_lines(normal, 30, seed=64))]
    (tmp_path / "n.log").write_text("\n".join(lines) + "\n")
    (tmp_path / "a.log").write_text("\n".join(attacks) + "\n")
    report = evaluate("--model", shop_model_path, "--normal", tmp_path / "n.log", "--anomalous", tmp_path / "a.log",
                      "--session-key", r"session=\w+")
    assert report["unit"] == "session" and report["records"] == 50 and report["anomalous"] == 10

    # A log as it comes (HDFS's), its labels per session only: every line went in as normal, and
    # evaluate refused "the data has one class only" before reading the session labels (appday trial)
    (tmp_path / "all.log").write_text("\n".join(lines + attacks) + "\n")
    (tmp_path / "sessions.csv").write_text("Session,Label\n" + "".join(f"session=x{i},Anomaly\n" for i in range(10)))
    by_session = evaluate("--model", shop_model_path, "--normal", tmp_path / "all.log", "--session-key",
                          r"session=\w+", "--session-labels", tmp_path / "sessions.csv")
    assert (by_session["records"], by_session["anomalous"]) == (50, 10)
    assert by_session["roc_auc"] == report["roc_auc"]
    (tmp_path / "none.csv").write_text("Session,Label\n")
    one_class = subprocess.run([sys.executable, "-m", "logscore", "evaluate", "--model", shop_model_path, "--normal",
                                tmp_path / "all.log", "--session-key", r"session=\w+", "--session-labels",
                                tmp_path / "none.csv"], capture_output=True, text=True, cwd=ROOT)
    assert one_class.returncode == 1 and "sessions have one class only" in one_class.stderr, one_class.stderr


def test_published_accuracy_tables_are_the_recorded_results():
    """docs/accuracy.md shows what benchmarks/evaluate_all.py last wrote, not hand-edited figures."""
    from benchmarks.evaluate_all import decisions_table, table
    from benchmarks.learn_new_site import learning_section

    results = json.loads((ROOT / "benchmarks" / "results" / "accuracy.json").read_text())
    learning = json.loads((ROOT / "benchmarks" / "results" / "learning.json").read_text())
    published = (ROOT / "docs" / "accuracy.md").read_text()
    for marker, expected in (("results", table(results)), ("decisions", decisions_table(results)),
                             ("learning", learning_section(learning))):
        between = published.split(f"<!-- {marker}:start -->")[1].split(f"<!-- {marker}:end -->")[0]
        assert between.strip() == expected, f"rerun benchmarks/evaluate_all.py (it rewrites the {marker} table)"


def labeled_args(*flags):
    from logscore.cli import build_parser

    return build_parser().parse_args(["evaluate", *map(str, flags)])


def test_labeled_rows_that_do_not_parse_are_counted_and_csv_is_known_by_its_name_before_gz(tmp_path, capsys):
    """A JSON line cut short or holding a list was dropped without a word; lab.csv.gz and lab.CSV
    were read as JSON lines and every row dropped ("no records")."""
    import gzip

    from logscore.cli import read_labeled
    from logscore.errors import InputError

    rows = [{"message": f"GET /item/{i}", "label": "attack" if i % 10 == 0 else "normal"} for i in range(200)]
    lines = [json.dumps(row) for row in rows]
    lines[57] = lines[57][:20]  # cut while written
    (tmp_path / "lab.jsonl").write_text("\n".join(lines[:100] + [""] + lines[100:]) + "\n")  # a blank line 101
    records, labels, _ = read_labeled(labeled_args("--labeled", tmp_path / "lab.jsonl"))
    assert len(records) == 199 and sum(labels) == 20
    said = capsys.readouterr().err
    assert "1 of 200 rows (0.5%) are not JSON objects (the first at line 58): they are left out" in said
    lines[150] = "[1, 2]"
    lines[151] = lines[151][:-1]
    (tmp_path / "lab.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(InputError, match=r"3 of 200 rows \(1\.5%\) are not JSON objects \(the first at line 58\): "
                       r"more than 1%; fix or remove them"):
        read_labeled(labeled_args("--labeled", tmp_path / "lab.jsonl"))
    table = "message,label,split\n" + "".join(f"{r['message']},{r['label']},{'train' if i % 2 else 'test'}\n"
                                              for i, r in enumerate(rows))
    with gzip.open(tmp_path / "lab.csv.gz", "wt") as out:
        out.write(table)
    (tmp_path / "LAB.CSV").write_text(table.replace("GET /item/7,", "GET /item/7,extra,"))
    records, labels, _ = read_labeled(labeled_args("--labeled", tmp_path / "lab.csv.gz", "--where", "split=test"))
    assert len(records) == 100 and records[0] == {"message": "GET /item/0", "split": "test"} and sum(labels) == 20
    records, _, _ = read_labeled(labeled_args("--labeled", tmp_path / "LAB.CSV"))
    assert len(records) == 199
    assert "1 of 200 rows (0.5%) are not CSV rows with the header's number of columns (the first at line 9)" \
        in capsys.readouterr().err


def test_a_where_without_its_value_is_refused_when_the_flags_are_read(capsys):
    with pytest.raises(SystemExit) as raised:
        labeled_args("--labeled", "x.csv", "--where", "split")
    assert raised.value.code == 2
    assert "argument --where: 'split': give COLUMN=VALUE, e.g. split=test" in capsys.readouterr().err
    assert labeled_args("--labeled", "x.csv", "--where", "note=a=b").where == [("note", "a=b")]


def test_outputs_that_cannot_be_written_are_refused_before_the_model_is_read(tmp_path):
    """--report /nodir/x/r.json and --plots /nodir/x/p failed with tracebacks after all the scoring."""
    (tmp_path / "a.log").write_text("GET /\n")
    (tmp_path / "file").write_text("")
    for flag, path, said in (("--report", tmp_path / "file" / "x" / "r.json", "--report"),
                             ("--plots", tmp_path / "file" / "x" / "p", "--plots"),
                             ("--report", tmp_path, "--report")):
        result = subprocess.run([sys.executable, "-m", "logscore", "evaluate", "--model", tmp_path / "absent.onnx",
                                 "--normal", tmp_path / "a.log", "--anomalous", tmp_path / "a.log", flag, path],
                                cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert result.returncode == 1 and "Traceback" not in result.stderr
        assert result.stderr.startswith(f"logscore evaluate: error: {said} {path}")
        assert "absent.onnx" not in result.stderr


def test_a_labeled_column_no_row_holds_or_a_where_no_row_matches_names_what_the_rows_hold(tmp_path):
    """`--where splot=test` and `--where split=nope` were told "no records: give --normal/--anomalous files
    or --labeled FILE" (--labeled given), and `--type-column metod` gave an empty recall per type (probe)."""
    from logscore.cli import read_labeled
    from logscore.errors import InputError

    table = "method,url,label,split,kind\n" + "".join(
        f"GET,/item/{i},{'attack' if i % 10 == 0 else 'normal'},{'test' if i % 2 else 'train'},"
        f"{'sqli' if i % 10 == 0 else ''}\n" for i in range(100))
    (tmp_path / "lab.csv").write_text(table)
    columns = "its columns are method, url, label, split, kind"
    for flags, said in ((["--where", "splot=test"], f"no column named by --where splot; {columns}"),
                        (["--type-column", "knd"], f"no column named by --type-column knd; {columns}"),
                        (["--where", "split=nope"], "no row matches split=nope (--where); split holds 'train', 'test'"),
                        (["--where", "split=test", "--where", "method=POST"],
                         "no row matches split=test and method=POST (--where); split holds 'train', 'test'; "
                         "method holds 'GET'")):
        with pytest.raises(InputError) as refused:
            read_labeled(labeled_args("--labeled", tmp_path / "lab.csv", *flags))
        assert f"--labeled {tmp_path / 'lab.csv'}: {said}" == str(refused.value)
    records, labels, types = read_labeled(labeled_args("--labeled", tmp_path / "lab.csv", "--where", "split=train",
                                                       "--type-column", "kind"))
    assert len(records) == 50 and sum(labels) == 10 and set(types) == {"", "sqli"}
