"""Session models: trained on whole sessions, served record by record with bounded state."""

import re
import subprocess
import sys

import numpy as np
import pytest

from logscore.model import Model
from logscore.sessions import SessionSpec, SessionTracker

from .generate import session_lines
from .sidecar_process import ROOT, SidecarProcess, models_dir_with

SPEC = SessionSpec(key=r"xfer-\d+-\d+")


def test_sessions_group_in_order_and_mask_variables():
    lines = ["open xfer-1-1 from 10.0.0.1", "open xfer-1-2 from 10.0.0.2", "close xfer-1-1 after 5 s", "no key"]
    assert SessionTracker(SPEC).track(lines) == [
        {"events": "open <session> from <ip>"}, {"events": "open <session> from <ip>"},
        {"events": "open <session> from <ip>\nclose <session> after <num> s"}, {"events": "no key"}]


def test_tracker_scores_each_record_as_its_session_so_far_with_bounds():
    tracker = SessionTracker(SessionSpec(key=r"s\d+", max_sessions=2, max_events=3))
    out = tracker.track(["a s1", "b s2", "c s1", "lonely"])
    assert [r["events"] for r in out] == ["a <session>", "b <session>", "a <session>\nc <session>", "lonely"]
    tracker.track(["d s3"])  # a third session: the least recently seen (s2) is forgotten
    assert len(tracker) == 2
    assert tracker.track(["e s2"])[0]["events"] == "e <session>"
    assert tracker.track(["x s9"] * 5)[-1]["events"] == "\n".join(["x <session>"] * 3)  # at most 3 events


@pytest.fixture(scope="module")
def session_model(tmp_path_factory):
    lines, _ = session_lines(3000, seed=1)
    path = tmp_path_factory.mktemp("sessions") / "transfers.onnx"
    source = path.with_suffix(".log")
    source.write_text("\n".join(lines) + "\n")
    result = subprocess.run([sys.executable, "-m", "logscore", "train", "--input", str(source), "--format", "plain",
                             "--session-key", r"xfer-\d+-\d+", "--target-fpr", "0.01", "--out", str(path)],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert f"{len(lines)} read" in result.stdout  # every record, as its session so far
    return path


def test_broken_sessions_stand_out_where_they_break(session_model):
    model = Model.load(session_model)
    assert model.metadata["featurizer"]["sessions"]["key"] == r"xfer-\d+-\d+"
    lines, broken = session_lines(400, seed=2, broken=0.1)
    result = model.score(lines)
    keys = [re.search(r"xfer-\d+-\d+", line).group(0) for line in lines]
    flagged_sessions = {k for k, flag in zip(keys, result.is_anomaly) if flag}
    assert len(broken & flagged_sessions) >= 0.9 * len(broken)
    assert len(flagged_sessions - broken) <= 0.05 * (400 - len(broken))
    for key, line, flag in zip(keys, lines, result.is_anomaly):
        if key in broken and line.startswith("error"):
            assert flag, line  # flagged at the record where the session breaks
    first_lines = [i for i, line in enumerate(lines) if line.startswith("open")]
    assert not np.any(result.is_anomaly[first_lines])  # a session's start is ordinary


def test_the_sidecar_keeps_sessions_across_requests(session_model, tmp_path):
    sidecar = SidecarProcess(models_dir_with(tmp_path, session_model, "transfers"), tmp_path).start()
    try:
        key = "xfer-9-9"
        answers = [sidecar.http_post("/v1/score", {"message": line})[1]
                   for line in (f"open {key} from 10.0.0.1", f"write {key} chunk 0 size 10",
                                f"error {key} connection reset after 3 s")]
        assert [a["is_anomaly"] for a in answers] == [False, False, True]
        explained = sidecar.http_post("/v1/score?explain=2", {"message": f"close {key} after 4 s"})[1]
        assert any("never seen" in e for e in explained["explanation"]), explained
    finally:
        sidecar.stop()


def test_checking_review_groups_against_new_feedback_leaves_sessions_as_they_were(session_model):
    """The review ring scores its groups' examples again when the feedback changes; a session
    model's examples, scored again, would join their sessions a second time."""
    from logscore.decide import decide
    from logscore.feedback import NORMAL, Entry, FeedbackStep, RuleSet
    from logscore.review import ReviewRing

    model = Model.load(session_model)
    lines, _ = session_lines(400, seed=3, broken=0.2)
    ring = ReviewRing()
    decide(model, model.score(lines), feedback=FeedbackStep(RuleSet(), lines, observe=ring.observe,
                                                            inspect_always=True))
    assert ring.snapshot()  # flagged records grouped, examples kept
    sessions = {key: list(events) for key, events in model.sessions._sessions.items()}
    ring.recheck(RuleSet([Entry(1, NORMAL, {"field": "message", "value": "x"}, "ana", model="another")]))
    assert {key: list(events) for key, events in model.sessions._sessions.items()} == sessions
