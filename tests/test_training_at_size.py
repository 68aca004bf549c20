"""Training as large logs meet it: no silent stage, no list of every line read."""

import itertools
import json
import signal
import subprocess
import sys

import pytest

from logscore.features import load_spec
from logscore.features.featurizer import SESSION_FIELDS
from logscore.training.train import TrainOptions, train

from .generate import session_lines, shop_lines
from .sidecar_process import ROOT
from .test_cli import logscore


def test_grouping_and_scoring_held_out_records_say_how_far_they_are():
    stages = []

    def progress(stage, done, total, unit="records"):
        stages.append((stage, done, total))

    # chunk 64: a fold's 1,200 held-out records are more than one block of 16 chunks
    train(shop_lines(6000, seed=3), TrainOptions(spec=load_spec(None, "access"), chunk=64, screening_rounds=0),
          progress)
    grouping = [done for stage, done, _ in stages if stage == "grouping similar records"]
    assert 0 < grouping[1] < grouping[-1] == 6000  # reported as it goes, not only at its start
    scoring = [(done, total) for stage, done, total in stages if stage == "fold 1/5: scoring held-out records"]
    assert len(scoring) >= 2 and scoring[0][0] < scoring[-1][0] == scoring[-1][1]
    assert any(stage == "checking the records parse" for stage, _, _ in stages)


class Stop(Exception):
    pass


def test_session_training_reads_records_as_it_goes_not_all_first():
    # 36,000 sessions of three events, a hundred interleaved at a time
    lines = [f"{step} xfer-1-{session}" for first in range(0, 36_000, 100) for step in ("open", "write", "close")
             for session in range(first, first + 100)]
    consumed = 0

    def counted():
        nonlocal consumed
        for consumed, line in enumerate(lines, start=1):
            yield line

    def progress(stage, done, total, unit="records"):
        if stage == "reading":  # the first report, after 50,000 records read
            raise Stop(consumed)

    spec = {"format": "plain", "fields": SESSION_FIELDS, "sessions": {"key": r"xfer-\d+-\d+"}}
    with pytest.raises(Stop) as stopped:
        train(counted(), TrainOptions(spec=spec, max_records=10_000), progress)
    # a list of every line (and of every session so far) was built before the first record was sampled
    assert stopped.value.args[0] == 50_000 < len(lines)


def test_records_tracked_one_at_a_time_are_the_sessions_tracked_in_a_batch():
    from logscore.sessions import SessionSpec, SessionTracker

    lines, _ = session_lines(300, seed=6)
    spec = SessionSpec.from_dict({"key": r"xfer-\d+-\d+", "max_sessions": 50})
    batch = SessionTracker(spec).track(lines)
    one_at_a_time = list(itertools.islice(SessionTracker(spec).track_each(iter(lines)), len(lines)))
    assert one_at_a_time == batch


def test_a_message_is_masked_once_for_its_tokens_and_its_alarms(monkeypatch):
    from logscore import masking
    from logscore.features import Featurizer

    masked = []

    class CountingPattern:
        def sub(self, replace, text):
            masked.append(text)
            return pattern.sub(replace, text)

    pattern = masking._PATTERNS[True, True]  # (the syslog spec's message: hosts and MACs masked)
    monkeypatch.setitem(masking._PATTERNS, (True, True), CountingPattern())
    masking._remembered.cache_clear()
    lines = [f"Mar  1 10:00:{i % 60:02d} web1 sshd[{i}]: authentication failure for user{i} from 10.0.0.{i % 250}"
             for i in range(300)]
    Featurizer(load_spec(None, "syslog")).transform(lines)
    assert len(masked) == len(set(masked)) == 300  # tokens masked them; alarms (weight 8) found them masked


def test_windows_without_timestamps_are_refused_before_the_record_model_is_trained(tmp_path):
    records = [json.dumps({"level": "INFO", "message": f"job {i} done in {i % 90} ms"}) for i in range(3000)]
    result = logscore("train", "--input", "-", "--format", "jsonl", "--json-records", "--windows",
                      "--out", tmp_path / "m.onnx", stdin="\n".join(records))
    assert result.returncode == 1
    assert "--windows: only 0 of 2000 records carry a readable timestamp" in result.stderr
    assert "fold 1/5" not in result.stderr  # (it trained for ten minutes on 1M lines, then refused)


def test_ctrl_c_while_training_stops_with_a_line_and_leaves_no_model(tmp_path):
    source = tmp_path / "access.log"
    source.write_text("\n".join(shop_lines(6000, seed=4)) + "\n")
    out = tmp_path / "m.onnx"
    # SIGINT as a terminal gives it: a run in the background (CI) inherits it ignored
    process = subprocess.Popen([sys.executable, "-m", "logscore", "train", "--input", str(source), "--out", str(out)],
                               cwd=ROOT, stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    for line in process.stderr:
        if "fold 1/5" in line:  # training, well past reading
            break
    process.send_signal(signal.SIGINT)
    rest = process.stderr.read()
    assert process.wait(timeout=30) == 130
    assert "Traceback" not in rest and rest.rstrip().endswith("logscore train: interrupted")
    assert not list(tmp_path.glob("*m.onnx*"))


def test_entities_train_the_cross_fitted_halves_before_holding_every_record_s_fields(monkeypatch):
    import numpy as np

    from logscore.training import behaviour

    calls = []

    def cross_fitted(records, metadata, progress):
        calls.append("half models trained")
        return np.zeros(0), np.zeros(0)

    def score_for_behaviour(*args, **kwargs):  # returns every record's fields: held from here on
        calls.append("fields held")
        raise Stop

    class Model:
        def SerializeToString(self):
            return b""

    monkeypatch.setattr(behaviour, "cross_fitted", cross_fitted)
    monkeypatch.setattr(behaviour, "score_for_behaviour", score_for_behaviour)
    with pytest.raises(Stop):
        behaviour.learn_behaviour(Model(), {"featurizer": {}}, [], behaviour.BehaviourOptions(entities=True),
                                  lambda *args: None)
    assert calls == ["half models trained", "fields held"]  # (1M access lines: 2.9 GB with both at once)


def test_a_new_stage_is_said_even_right_after_the_last_one(capsys):
    from logscore.cli import ProgressPrinter

    progress = ProgressPrinter()
    progress("behaviour: scoring records", 10, 10)
    progress("behaviour: learning windows", 0, None)
    progress("behaviour: learning windows", 1, None)  # within half a second of the stage's first line: not said
    assert capsys.readouterr().err.splitlines() == ["[train] behaviour: scoring records: 10/10 records",
                                                     "[train] behaviour: learning windows: 0 records"]
