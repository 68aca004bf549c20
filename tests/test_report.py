"""`logscore report` over records with a time and records without: a Fluentd file beside `logscore
score` output kept one axis mixing Unix times and line numbers ("record 1,796,313,630 .. record
1,796,317,170", a chart from 1970 to 2026 with every record in its two end bins)."""

from __future__ import annotations

import json
import re
import time

from .test_cli import logscore

FOUR_PM = 1796313600  # 2026-12-03 16:00:00 UTC
ADMIN = "url: segment admin (never seen in training)"
STATUS = "status: 599 (never seen in training)"
BINS = 60


def access_line(n: int, when: float) -> str:
    stamp = time.strftime("%d/%b/%Y:%H:%M:%S +0000", time.gmtime(when))
    return f'10.0.0.{n % 9} - - [{stamp}] "GET /p{n} HTTP/1.1" 200 12 "-" "curl"'


def scored(flagged_with: str | None, **fields) -> dict:
    return {"score": 1.0 if flagged_with else 0.2, "is_anomaly": bool(flagged_with), "model": "apache-access",
            "explanation": [flagged_with] if flagged_with else [], **fields}


def write_mixed(tmp_path) -> list[str]:
    """Three files, read later-first: Fluentd's out_file 17:00:30-17:59:30 (route web.access);
    `logscore score` over plain lines (no time at all); `logscore score --record` 16:00-16:59, whose
    lines 1, 31 and 32 lost their time (cut lines, a time field that reads as none)."""
    late = [time.strftime("%Y-%m-%dT%H:%M:%S+0000", time.gmtime(FOUR_PM + 3630 + 60 * i)) + "\tweb.access\t"
            + json.dumps({"host": "10.1.1.1", "anomaly_score": 0.99 if i in (0, 59) else 0.1,
                          "is_anomaly": i in (0, 59), "anomaly_model": "apache-access",
                          "anomaly_explanation": [ADMIN] if i in (0, 59) else []}) for i in range(60)]
    plain_flags = {5: ADMIN, 10: STATUS, 20: ADMIN}
    plain = [json.dumps(scored(plain_flags.get(n), line=n)) for n in range(1, 41)]
    early = []
    for i in range(60):
        flag = STATUS if i in (0, 30, 31) else ADMIN if i == 50 else None
        record = access_line(i, FOUR_PM + 60 * i) if i not in (0, 30, 31) else f"10.0.0.{i} - - GET /cut"
        extra = {"time": "not a time"} if i == 31 else {}
        early.append(json.dumps(scored(flag, line=i + 1, record=record, **extra)))
    for name, rows in (("late.log", late), ("plain.jsonl", plain), ("early.jsonl", early)):
        (tmp_path / name).write_text("\n".join(rows) + "\n")
    return [str(tmp_path / name) for name in ("late.log", "plain.jsonl", "early.jsonl")]


def charts(page: str) -> dict[str, tuple[list[int], str]]:
    """Per line chart of the page (by its title): the bins holding something, and its peak text."""
    found = {}
    for svg in re.findall(r"<svg.*?</svg>", page, re.S):
        if "<polyline" not in svg:
            continue
        ys = [float(point.split(",")[1]) for point in re.search(r'points="([^"]*)"', svg).group(1).split()]
        assert len(ys) == BINS
        floor = max(ys)  # (a bin of none sits on the axis)
        title = re.search(r"<title>(.*?)</title>", svg).group(1)
        found[title] = ([b for b, y in enumerate(ys) if y < floor], re.search(r">(peak [^<]*|none)<", svg).group(1))
    return found


def bin_of(seconds: float, start: float, end: float) -> int:
    return min(int((seconds - start) / (end - start) * BINS), BINS - 1)


def test_report_places_records_without_a_time_by_their_file_and_charts_files_without_any_apart(tmp_path):
    late, plain, early = write_mixed(tmp_path)
    done = logscore("report", late, plain, early, "--html", tmp_path / "report.html")
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    out = done.stdout
    assert out.startswith("160 scored records, 9 anomalies (5.625%) in 3 groups"), out  # every record counted
    assert "3 of 160 records hold no time of their own" in out
    assert f"40 of 160 records hold no time, in files holding none ({plain}): shown apart" in out
    seen = {m.group(1): m.group(0) for m in re.finditer(r"^ +[\d,]+  (r\d+)  .*$", out, re.M)}
    assert ("       4  r3  apache-access  2026-12-03 16:01:00 .. 2026-12-03 16:29:00 and 1 without a time: "
            f"{plain} line 10") in seen["r3"], out
    assert ("       3  r2  apache-access  2026-12-03 16:50:00 .. 2026-12-03 16:50:00 and 2 without a time: "
            f"{plain} line 5 .. 20") in seen["r2"]
    assert "       2  r1  apache-access · web.access  2026-12-03 17:00:30 .. 2026-12-03 17:59:30" in seen["r1"]
    assert not re.search(r"record [\d,]+", out) and "1970" not in out
    assert "per day" not in out  # (one day)

    page = (tmp_path / "report.html").read_text()
    assert (f"; 2026-12-03 16:01:00 .. 2026-12-03 17:59:30; 40 records without a time, charted apart by their "
            f"position: {plain} line 1 .. 40</p>") in page
    assert re.findall(r"<h2>(Anomaly rate[^<]*)</h2>", page) == [
        "Anomaly rate over time", "Anomaly rate by position (records of files holding no time, apart)"]
    start, end = FOUR_PM + 60, FOUR_PM + 3630 + 59 * 60  # line 1 of early.jsonl placed at line 2's time
    flagged_at = [FOUR_PM + 60, FOUR_PM + 29 * 60, FOUR_PM + 50 * 60, FOUR_PM + 3630, end]
    drawn = charts(page)
    assert drawn["share of records flagged, by time"][0] == sorted({bin_of(t, start, end) for t in flagged_at})
    assert drawn["share of records flagged, by position"][0] == [bin_of(line - 1, 0, 39) for line in (5, 10, 20)]
    assert drawn["r3 over the whole report, by time"] == ([0, bin_of(FOUR_PM + 29 * 60, start, end)], "peak 2")
    assert drawn["r3 over the whole report, by position"] == ([bin_of(9, 0, 39)], "peak 1")
    assert drawn["r1 over the whole report, by position"] == ([], "none")  # Fluentd's: all timed
    assert "seen 2026-12-03 16:01:00 .. 2026-12-03 16:29:00 and 1 without a time" in page
    histogram = [int(v.replace(",", "")) for v in re.findall(r"<title>≤[\d.]+: ([\d,]+)</title>", page)]
    assert sum(histogram) == 160


def test_report_of_records_all_timed_or_all_without_a_time_draws_one_axis(tmp_path, capsys):
    from logscore.cli import main

    late, plain, _ = write_mixed(tmp_path)
    assert main(["report", late, "--html", str(tmp_path / "timed.html")]) == 0
    out = capsys.readouterr().out
    assert "hold no time" not in out and "2026-12-03 17:00:30 .. 2026-12-03 17:59:30" in out
    timed = (tmp_path / "timed.html").read_text()
    assert "by position" not in timed and "; 2026-12-03 17:00:30 .. 2026-12-03 17:59:30</p>" in timed
    assert charts(timed)["share of records flagged, by time"] == ([0, BINS - 1], "peak 100.00%")

    assert main(["report", plain, "--html", str(tmp_path / "untimed.html")]) == 0
    out = capsys.readouterr().out
    assert f"40 of 40 records hold no time, in files holding none ({plain})" in out
    assert f"r1  apache-access  {plain} line 5 .. 20\n" in out and "1970" not in out
    untimed = (tmp_path / "untimed.html").read_text()
    assert "Anomaly rate over time" not in untimed and "by time" not in untimed and "1970" not in untimed
    assert f"; 40 records without a time, charted apart by their position: {plain} line 1 .. 40</p>" in untimed
    assert charts(untimed)["r1 over the whole report, by position"] == ([bin_of(4, 0, 39), bin_of(19, 0, 39)],
                                                                         "peak 1")


def test_report_over_many_files_without_a_time_names_the_first_few(tmp_path, capsys):
    """30 files of `logscore score` output without a time: the summary named every one (a line of
    1,452 characters); it names the first three and counts the rest."""
    from logscore.cli import main

    paths = []
    for n in range(30):
        path = tmp_path / f"scored-{n:02d}.jsonl"
        path.write_text(json.dumps(scored(ADMIN if n == 0 else None, line=1)) + "\n")
        paths.append(str(path))
    assert main(["report", *paths]) == 0
    line = next(line for line in capsys.readouterr().out.splitlines() if "hold no time" in line)
    assert f"in files holding none ({paths[0]}, {paths[1]}, {paths[2]} and 27 more)" in line
    assert paths[3] not in line and len(line) < 600


def test_report_names_a_record_s_client_under_every_name_the_sidecar_reads():
    """The report kept its own list of client fields, which missed remote_ip (the sidecar's alias
    for it): such records were all named "-" or by their host. It now reads the sidecar's aliases."""
    from logscore.parsers import FIELD_ALIASES
    from logscore.report import entity_of

    for alias in FIELD_ALIASES["access"]["remote_addr"]:
        record = {"host": "-", "path": "/a"}
        if "." in alias:  # (a nested ECS name, as the shipper sends it)
            outer, inner = alias.split(".", 1)
            record[outer] = {inner: "10.0.0.7"}
        else:
            record[alias] = "10.0.0.7"
        assert entity_of(record, None) == "10.0.0.7", alias
    assert entity_of({"remote_addr": "10.0.0.8", "remote": "10.9.9.9", "host": "-"}, None) == "10.0.0.8"


def test_a_shippers_own_file_field_stays_in_the_records_text():
    """`logscore score` writes where a line was ("line", "file"): left out of the text; a shipper's
    record holding its own "file" (in_tail's path_key) kept it out too, and the report lost it."""
    from logscore.report import text_of

    shipped = {"host": "a", "file": "/var/log/app.log", "anomaly_score": 0.99, "is_anomaly": True}
    assert json.loads(text_of(shipped)) == {"host": "a", "file": "/var/log/app.log"}
    scored = {"line": 3, "file": "access.log", "score": 0.99, "is_anomaly": True, "host": "a"}
    assert json.loads(text_of(scored)) == {"host": "a"}


def test_a_negative_top_is_refused():
    """--top -1 showed every group but the last (a Python slice), the HTML saying "the -1 largest" (probe)."""
    import pytest

    from logscore.cli import build_parser

    parser = build_parser()
    for value in ("-1", "x"):
        with pytest.raises(SystemExit) as refused:
            parser.parse_args(["report", "s.jsonl", "--top", value])
        assert refused.value.code == 2
    assert parser.parse_args(["report", "s.jsonl", "--top", "0"]).top == 0
