"""Session models: trained on whole sessions, served record by record with bounded state."""

import json
import random
import re
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest

from logscore.decide import decide, notes_by_record
from logscore.metrics import Metrics
from logscore.model import Model
from logscore.sessions import SessionSpec, SessionTracker

from .generate import session_lines
from .sidecar_process import ROOT, SidecarProcess, http_request, models_dir_with

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
        # A record with no text is an empty event: said so, and counted.
        answer = sidecar.http_post("/v1/score", {"records": [{"foo": "bar"}, {"message": None}]})[1]
        notes = [r["notes"] for r in answer["results"]]
        assert all(any(n.startswith("no text") and "message" in n for n in mine) for mine in notes), answer
        assert sidecar.metric('logscore_session_records_without_text_total{model="transfers"}') == 2
        # Feedback does not apply: the review page offers no marks on its groups, and both refusals say why.
        page = sidecar.http_get("/ui/")[1].decode()
        group = re.search(r'data-group="([^"]+)"', page).group(1)
        assert "feedback does not apply to session models; retrain (logscore train --session-key" in page
        assert "value=normal" not in page and "value=keep" not in page
        for mark in ({"group": group}, {"field": "message", "value": "x"}):
            status, raw = http_request(sidecar.http_port, "POST", "/v1/feedback", json.dumps(
                {"verdict": "normal", "author": "ana", "model": "transfers", **mark}).encode(),
                {"Content-Type": "application/json"})
            assert status == 400 and "feedback does not apply to session models; retrain" in raw.decode(), raw
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
    sessions = {key: list(session.events) for key, session in model.sessions._sessions.items()}
    ring.recheck(RuleSet([Entry(1, NORMAL, {"field": "message", "value": "x"}, "ana", model="another")]))
    assert {key: list(session.events) for key, session in model.sessions._sessions.items()} == sessions


def test_a_session_of_huge_lines_holds_at_most_its_bound_in_characters():
    """Bounded in bytes, not only in records: each line is cut to the sidecar's line limit before it
    joins its session, and a session keeps only its last events that fit in max_chars (it held
    every whole line: 142 lines of 1.9 MB took a sidecar from 156 to 377 MiB)."""
    tracker = SessionTracker(SessionSpec(key=r"s\d+", max_events=1024), max_chars=1000, max_line_chars=5000)
    huge = [f"a s1 {'x' * 100_000} {i}" for i in range(50)]
    tracked, notes = tracker.track_noting(huge)
    assert all(len(fields["events"]) <= 1000 for fields in tracked)
    assert sum(len(event) for session in tracker._sessions.values() for event in session.events) <= 1000
    assert "line was cut to 5000 characters" in notes[0][0]
    assert any("the session was cut" in note for note in notes[-1])
    small = tracker.track_noting(["b s1"])
    assert small[0][0]["events"].endswith("b <session>") and len(small[0][0]["events"]) <= 1000  # newest counts


def long_transfer_lines(sessions: int, seed: int, writes: tuple[int, int]) -> list[str]:
    """Interleaved transfers of many writes each: sessions far longer than a field's 8,192 characters."""
    rng = random.Random(seed)
    pending = []
    for number in range(sessions):
        key = f"xfer-{seed}-{number}"
        steps = [f"open {key} from 10.0.0.{rng.randint(1, 254)}"]
        steps += [f"write {key} chunk {i} size {rng.randint(100, 9000)}" for i in range(rng.randint(*writes))]
        pending.append(steps + [f"checksum {key} ok", f"close {key} after {rng.randint(1, 90)} s"])
    lines = []
    while pending:
        steps = pending[rng.randrange(len(pending))]
        lines.append(steps.pop(0))
        pending = [p for p in pending if p]
    return lines


def test_an_anomalous_event_late_in_a_long_session_is_flagged(tmp_path):
    """Events past the first ~8,192 characters of a session were never scored: the events field was
    cut from its head. The session keeps its last events instead, so the newest always counts."""
    source, path = tmp_path / "long.log", tmp_path / "long.onnx"
    source.write_text("\n".join(long_transfer_lines(60, seed=1, writes=(1, 400))) + "\n")
    result = subprocess.run([sys.executable, "-m", "logscore", "train", "--input", str(source), "--format", "plain",
                             "--session-key", r"xfer-\d+-\d+", "--target-fpr", "0.01", "--out", str(path)],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    model = Model.load(path)
    key = "xfer-9-1"
    lines = [f"open {key} from 10.0.0.7"] + [f"write {key} chunk {i} size {100 + i}" for i in range(400)]
    lines.insert(300, f"error {key} connection reset after 3 s")  # ~11,000 characters into the session
    scored = model.score(lines)
    assert scored.is_anomaly[300], scored.scores[295:305]
    assert not scored.is_anomaly[290:300].any()  # what came before it, cut the same way, is ordinary
    notes = notes_by_record([(i, text) for i, _, text in decide(model, scored).notes], len(lines))
    assert any(text.startswith("truncated: the session was cut") for text in notes[300]), notes[300]
    assert not any("raw line" in text for text in notes[300])


def test_evicted_sessions_are_counted_said_once_an_interval_and_noted_when_they_return(caplog):
    """A flood of new ids evicted open sessions silently, and they then flagged as new."""
    tracker = SessionTracker(SessionSpec(key=r"s\d+", max_sessions=2))
    with caplog.at_level("WARNING", logger="logscore.sessions"):
        tracker.track(["a s1", "a s2", "a s3"])  # s1 evicted
        fields, notes = tracker.track_noting(["b s1", "b s1", "b s3"])  # s1 back (s2 evicted), s3 still open
        tracker.track([f"a s{n}" for n in range(10, 20)])  # ten more evicted, within the interval
    assert fields[0]["events"] == "b <session>"  # its earlier event was forgotten
    assert [bool(n) and n[0].startswith("session restarted") for n in notes] == [True, False, False]
    assert "max_sessions" in notes[0][0]
    assert tracker.counts.restarted == 1 and tracker.counts.evicted == 12
    said = [r for r in caplog.records if "open sessions evicted" in r.getMessage()]
    assert len(said) == 1 and said[0].evicted_since_last_logged == 1
    metrics = Metrics()
    metrics.set_models({"blocks": SimpleNamespace(sessions=tracker, version="1")})
    scraped = metrics.render().decode()
    assert 'logscore_session_evictions_total{model="blocks"} 12.0' in scraped
    assert 'logscore_session_restarts_total{model="blocks"} 1.0' in scraped


def test_a_record_without_text_is_noted_and_counted():
    tracker = SessionTracker(SessionSpec(key=r"s\d+", field="msg"))
    fields, notes = tracker.track_noting([{"foo": "bar"}, {"msg": None}, {"msg": ""}, {"msg": "a s1"}, ""])
    assert [bool(n) for n in notes] == [True, True, True, False, True]
    assert notes[0][0].startswith("no text: the record has no msg / message / log / unmatched_line field")
    assert tracker.counts.without_text == 4
    assert fields[3]["events"] == "a <session>"
    # an empty field is none: the next name holding the line is read (review: noted "no text")
    fields, notes = tracker.track_noting([{"msg": "", "log": "b s2"}])
    assert fields[0]["events"] == "b <session>" and notes == [()]


def test_an_event_cut_to_what_a_session_keeps_is_noted():
    """A record longer than max_chars but under the line limit lost its tail without a note (the
    featurizer, which noted it before, now meets an event already cut: review)."""
    tracker = SessionTracker(SessionSpec(key=r"s\d+"), max_chars=1000, max_line_chars=5000)
    (keyed, single), notes = tracker.track_noting(["a s1 " + "x" * 3000, "no key " + "y" * 3000])
    assert len(keyed["events"]) <= 1000 and len(single["events"]) <= 1000
    assert all(any("its event was cut to the 1000 characters" in note for note in n) for n in notes), notes
    assert tracker.track_noting(["b s1"])[1] != [()]  # (its session, cut, says so on)


def test_a_session_model_is_not_learned_on_arrival_and_says_why(session_model, tmp_path, caplog):
    """--learn checked a session model's candidate on records scored without their sessions'
    beginnings (70.9 % flagged where the model flags 4.4 % in order): any candidate passed."""
    from logscore.learning import Learner
    from logscore.settings import Settings

    settings = Settings.load(flags={"models_dir": str(tmp_path), "learn": "true"}, environ={})
    learner = Learner(settings, SimpleNamespace(entity_field=None), request_reload=lambda: None)
    model = Model.load(session_model)
    lines, _ = session_lines(20, seed=4)
    with caplog.at_level("WARNING", logger="logscore.learning"):
        assert learner.routes(model, lines) == [None] * len(lines)  # no route: nothing kept, no flag held
        learner.routes(model, lines)
    assert learner.routes_by_name == {}
    said = [r for r in caplog.records if r.getMessage() == "learning: route not learned"]
    assert len(said) == 1 and "session model is not learned on arrival" in said[0].reason
    assert "logscore train --session-key" in said[0].reason


def test_a_session_key_no_record_holds_is_refused_and_one_few_hold_is_warned_of(tmp_path):
    """`train --session-key zzz_nomatch` wrote a "session model" of one-event sessions without a word (probe)."""
    lines, _ = session_lines(600, seed=5)
    keyed = sum(bool(re.search(r"xfer-\d+-\d+", line)) for line in lines)
    (tmp_path / "t.log").write_text("\n".join(lines) + "\n")

    def train(key: str, out: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "logscore", "train", "--input", str(tmp_path / "t.log"),
                               "--format", "plain", "--session-key", key, "--out", str(tmp_path / out)],
                              cwd=ROOT, capture_output=True, text=True, timeout=300)

    none = train("zzz_nomatch", "none.onnx")
    assert none.returncode == 1 and "Traceback" not in none.stderr
    assert (f"session key 'zzz_nomatch': it matches none of the text of {len(lines):,} records (raw lines, or the "
            "field 'message' of field maps) (or only an empty text)") in none.stderr, none.stderr
    assert not (tmp_path / "none.onnx").exists()
    # a key only some records hold (transfers whose id ends in 7): said, with the share
    few_key = r"xfer-\d+-\d*7\b"
    few = sum(bool(re.search(few_key, line)) for line in lines)
    assert 0 < few < 0.5 * len(lines)
    warned = train(few_key, "few.onnx")
    assert warned.returncode == 0, warned.stderr
    assert f"only {few:,} of the text of {len(lines):,} records" in warned.stderr
    assert f"({few / len(lines):.1%}) hold it" in warned.stderr
    whole = train(r"xfer-\d+-\d+", "whole.onnx")
    assert whole.returncode == 0 and keyed == len(lines) and "session key" not in whole.stderr, whole.stderr


def test_an_empty_match_of_the_key_is_no_session_id():
    """`(?<=req=)\\w*` passes the empty-text check, yet matches '' in "req= ": those records were one growing
    session keyed '' while counted unkeyed (review, session 27); each is now a session of its own."""
    tracker = SessionTracker(SessionSpec(key=r"(?<=req=)\w*"))
    empty_keyed = [f"GET /{page} req= user 1" for page in "abc"]
    tracked = tracker.track(empty_keyed + ["GET /d req=r7 user 1", "GET /e req=r7 user 2"])
    events = [fields["events"] for fields in tracked]
    assert [event.count("\n") for event in events] == [0, 0, 0, 0, 1], events
    assert (tracker.counts.keyed, tracker.counts.unkeyed, len(tracker)) == (2, 3, 1)


def test_a_long_session_id_is_held_by_a_digest_and_its_session_goes_on():
    """An id is whatever the key's pattern matches: lines whose blk_ id ran to 60,000 digits held
    58 KiB a session beside the events the bound counts (probe, session 30). Held by a digest, the
    session still goes on, and ids alike up to their last character are still two sessions."""
    from logscore.sessions import MAX_HELD_ID_CHARS

    tracker = SessionTracker(SessionSpec(key=r"blk_\d+"))
    long_id, other = "blk_" + "7" * 60_000, "blk_" + "7" * 59_999 + "8"
    tracked = tracker.track([f"open {long_id}", f"open {other}", f"write {long_id}", "close blk_1", "ack blk_1"])
    assert [fields["events"] for fields in tracked] == ["open <session>", "open <session>",
                                                        "open <session>\nwrite <session>", "close <session>",
                                                        "close <session>\nack <session>"]
    assert len(tracker) == 3 and all(len(held) <= MAX_HELD_ID_CHARS for held in tracker._sessions)
