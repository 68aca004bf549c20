"""Decisions that hold on real traffic (issue #11): garbage is flagged, training refuses nonsense,
attacks in the training data are set aside, the realized FPR sits beside its target, and one
truncation rule gives one answer on every surface."""

from __future__ import annotations

import json
import random
import re
from types import SimpleNamespace
from urllib.parse import quote

import numpy as np
import pytest

from logscore.decide import decide, flags_truncated, flags_unparsed
from logscore.features import load_spec
from logscore.model import Model, make_session
from logscore.training.robust import screen
from logscore.training.streaming import raw_scores
from logscore.training.train import TrainOptions, fit, held_back_fpr, quiet, save_model, train

from .generate import ATTACKS, WORDS, attack_lines, blog_lines, shop_lines, shop_request, syslog_lines
from .sidecar_process import ROOT, SidecarProcess, models_dir_with
from .test_cli import logscore


@pytest.fixture(scope="module")
def shop_model(shop_model_path):
    return Model.load(shop_model_path)


def trained(lines, tmp_path, name="m", spec=None, **options) -> tuple[Model, dict]:
    proto, metadata = train(lines, TrainOptions(spec=spec or load_spec(None, "access"), name=name, **options))
    save_model(proto, tmp_path / f"{name}.onnx")
    return Model.load(tmp_path / f"{name}.onnx"), metadata


# --- 3. garbage is flagged -----------------------------------------------------------------

@pytest.mark.parametrize("path", ["shop", "default"])
def test_records_that_do_not_parse_are_flagged_when_the_training_data_parsed(path, shop_model_path):
    model = Model.load(shop_model_path if path == "shop" else ROOT / "models" / "apache-access.onnx")
    normal = shop_lines(3, seed=80) if path == "shop" else blog_lines(3, seed=80)
    records = ["\x00\x01\xff\xfe binary", "Mar  3 10:00:00 host sshd[1]: not an access line",
               {"message": "garbage that is no access line"}, {"message": normal[0]}, normal[1], {"host": "web1"},
               {"host": "web1", "url": "/", "status": 200}]
    result = model.score(records)
    decision = decide(model, result)
    assert flags_unparsed(model)
    assert decision.is_anomaly.tolist()[:3] == [True, True, True]
    assert not decision.is_anomaly[3] and not decision.is_anomaly[4]
    # A field map whose message parses is scored as that line.
    assert result.scores[3] == pytest.approx(model.score([normal[0]]).scores[0])
    # A map with none of the model's fields and no line (a shipper's key renamed) is no access
    # record either; one with some of them is (a shipper extracted what it could).
    assert decision.is_anomaly[5] and result.unparsed.tolist()[5:] == [True, False]
    notes = {i: text for i, _, text in decision.notes}
    assert sorted(notes) == [0, 1, 2, 5] and all(text.startswith("did not parse as access") for text in notes.values())
    if path == "default":  # by score alone garbage stays under the threshold (0.990 < 0.998): issue #11's bug
        assert not result.is_anomaly[:3].any()


def test_a_record_that_does_not_parse_is_not_said_flagged_while_its_route_learns(shop_model):
    """Behind Fluent Bit, a learning syslog route's empty line was noted "did not parse as syslog;
    flagged: ..." beside is_anomaly false (the route's flags were held): the note said the opposite of
    the decision. Once the route has its model, the note says flagged again."""
    records = ["", "\x00\x01 binary"]
    result = shop_model.score(records)
    held = decide(shop_model, result, learning=["route shop is learning", None])
    assert held.is_anomaly.tolist() == [False, True]
    notes = {i: text for i, _, text in held.notes if text.startswith("did not parse")}
    assert notes == {0: "did not parse as access; not flagged while its route learns (flagged after: the model's "
                        "training data parsed)",
                     1: "did not parse as access; flagged: the model's training data parsed"}


def test_when_the_training_data_did_not_parse_either_such_records_are_only_noted(tmp_path):
    lines = shop_lines(1500, seed=81)
    lines += [f"free text line number {i}" for i in range(60)]  # 3.8 % unparsed in training
    model, metadata = trained(lines, tmp_path)
    assert metadata["training"]["unparsed_records"] == 60 and metadata["training"]["warnings"]
    decision = decide(model, model.score(["another free text line"]))
    assert not flags_unparsed(model) and not decision.is_anomaly[0]
    assert "scored with its fields missing" in decision.notes[0][2]


def test_learning_holds_flags_and_says_so(shop_model):
    attack = [line for _, line in attack_lines(shop_lines(5, seed=82), 2, seed=83)]
    result = shop_model.score(attack)
    assert result.is_anomaly.all()
    decision = decide(shop_model, result, ["route shop: 10 of 5000 records", None])
    assert decision.is_anomaly.tolist() == [False, True]
    assert decision.notes == [(0, "record", "learning: route shop: 10 of 5000 records")]
    assert result.scores[0] > 0.99  # the score stays


# --- 4. training refuses nonsense ------------------------------------------------------------

def test_training_refuses_input_that_does_not_parse_and_says_what_to_try(tmp_path):
    (tmp_path / "syslog.log").write_text("\n".join(syslog_lines(2000, seed=84)) + "\n")
    wrong = logscore("train", "--input", tmp_path / "syslog.log", "--out", tmp_path / "m.onnx")
    assert wrong.returncode == 1 and not (tmp_path / "m.onnx").exists()
    assert "2,000 of 2,000 records (100.0%) do not parse as access" in wrong.stderr
    assert "try --format syslog" in wrong.stderr and "Traceback" not in wrong.stderr
    rng = random.Random(85)
    (tmp_path / "random.bin").write_bytes(bytes(rng.randrange(256) for _ in range(200_000)))
    noise = logscore("train", "--input", tmp_path / "random.bin", "--out", tmp_path / "m.onnx")
    assert noise.returncode == 1 and "do not parse as access" in noise.stderr
    assert "check the file is a text log" in noise.stderr


def test_training_warns_when_some_records_do_not_parse(tmp_path):
    lines = shop_lines(1000, seed=86) + ["<<< not a log line >>>"] * 30
    (tmp_path / "mixed.log").write_text("\n".join(lines) + "\n")
    result = logscore("train", "--input", tmp_path / "mixed.log", "--out", tmp_path / "m.onnx")
    assert result.returncode == 0, result.stderr
    assert "warning: 30 of 1,030 records (2.9%) do not parse as access" in result.stderr
    assert "warning: 30 of 1,030" in logscore("inspect", tmp_path / "m.onnx").stdout


# --- 1. attacks in the training data; 7. realized FPR beside the target --------------------

@pytest.fixture(scope="module")
def attack_traffic():
    """Fresh normal lines and attacks, for measuring models trained below."""
    return shop_lines(4000, seed=87), [line for _, line in attack_lines(shop_lines(500, seed=88), 400, seed=89)]


def test_attacks_mixed_into_training_are_set_aside_and_still_caught(tmp_path, attack_traffic):
    fresh, attacks = attack_traffic
    normal = shop_lines(3000, seed=90)
    mixed_in = [line for _, line in attack_lines(shop_lines(300, seed=91), 30, seed=92)]  # 1 % of training
    robust, metadata = trained(normal + mixed_in, tmp_path, "robust", target_fpr=0.002)
    naive, _ = trained(normal + mixed_in, tmp_path, "naive", target_fpr=0.002, set_aside=False)
    set_aside = metadata["training"]["set_aside"]
    assert 30 <= set_aside["records"] <= 36, set_aside  # the 30 attacks, a few normal lines at most
    assert set(e["record"] for e in set_aside["examples"]) <= set(mixed_in)
    assert "more than 1.75x" in set_aside["rule"]  # 1 % far out: the lower level
    recall = lambda model: float(model.score(attacks).is_anomaly.mean())  # noqa: E731
    assert recall(robust) >= 0.9 and recall(naive) < 0.5, (recall(robust), recall(naive))
    assert robust.score(fresh).is_anomaly.mean() <= 0.006
    shown = logscore("inspect", tmp_path / "robust.onnx").stdout
    assert f"set aside as likely attacks: {set_aside['records']} records" in shown
    assert set_aside["examples"][0]["record"][:60] in shown
    assert f"rule: {set_aside['rule']}" in shown
    # The data holds attacks: the kept records near the top vouch for no feature only they hold.
    assert f"not vouching for their features (the data holds attacks): {set_aside['unusual_not_vouching']} " in shown


def scanner_lines(normal: list[str], count: int, seed: int) -> list[str]:
    """A scanner's requests: guessed paths, 404s, one user agent (a key most of its lines share)."""
    rng = random.Random(seed)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(4, 9))) for _ in range(500)]
    lines = []
    for i in range(count):
        path = f"/{rng.choice(words)}/{rng.choice(words)}.php" if i % 2 else f"/products/{rng.choice(words)}"
        line = re.sub(r'"(GET|POST) [^ ]+ (HTTP/[0-9.]+)" [0-9]+ ', rf'"GET {path} \2" 404 ', rng.choice(normal), count=1)
        lines.append(re.sub(r'"[^"]*"$', '"Mozilla/5.00 (Nikto/2.1.6) (Evasions:None)"', line))
    return lines


def test_screening_reads_only_the_keys_it_can_use_and_trains_the_same_model(tmp_path, monkeypatch):
    """Screening's key pairs leave out keys past screening_bound; with a target FPR well above
    MAX_CONTAMINATION (more records may be set aside, their common keys are cluster keys) the
    model must equal the one trained with every key kept."""
    import logscore.training.train as training

    normal = shop_lines(4000, seed=11)
    lines = normal + scanner_lines(normal, 320, seed=5)  # 7.4 %: a key of the scanner's beyond 5 %
    random.Random(5).shuffle(lines)
    options = dict(spec=load_spec(None, "access"), name="m", target_fpr=0.1, seed=1)
    bounded, metadata = train(lines, TrainOptions(**options))
    monkeypatch.setattr(training, "screening_bound", lambda records, target_fpr: float("inf"))
    every_key, _ = train(lines, TrainOptions(**options))
    assert metadata["training"]["set_aside"]["records"] > 0.025 * len(lines)  # past the default bound's reach
    assert bounded.graph.SerializeToString() == every_key.graph.SerializeToString()


DOUBTFUL, MATES = np.arange(980, 992), [10, 20, 30, 40]


def screen_known_answer(far_out: int, target_fpr: float) -> tuple:
    """(screening, fit masks, vouching masks) of robust.screen on the set-up the next test describes."""
    raw = np.zeros(1000)
    raw[900:980] = 1.0
    raw[DOUBTFUL] = 2.0
    raw[1000 - far_out:] = 5.0
    calls, vouching_given = [], []

    def score_out_of_fold(fit_mask, vouching=None):
        calls.append(fit_mask.copy())
        vouching_given.append(vouching)
        scores = raw.copy()
        scores[MATES] = 0.0 if fit_mask[DOUBTFUL].all() else 2.2
        return scores[:, None].astype(np.float32)

    screening = screen(score_out_of_fold, 1000, target_fpr, 2.5, 3, contaminated_factor=1.75)
    return screening, calls, vouching_given


@pytest.mark.parametrize("far_out, target_fpr, outcome", [(1, 0.02, "first level"), (8, 0.02, "lowered"),
                                                         (6, 0.001, "first level"), (8, 0.013, "lowered, stopped")])
def test_the_set_aside_level_drops_only_when_the_data_evidently_holds_attacks(far_out, target_fpr, outcome):
    """Known answer (robust.screen): 1,000 records, 80 of them a normal tail at 1.0 (the 98th
    percentile, the reference); 12 at 2.0 (above 1.75x the reference, under 2.5x); ``far_out``
    at 5.0. One far out (0.1 %) is what clean data shows: only it is set aside. Eight (0.8 %)
    are evidence of attacks: the level drops to 1.75x and the records at 2.0 go too, with the
    4 records that looked normal while those vouched for them (round 2) — as long as the records
    it adds fit in the target FPR's share or in 1.5 times the records far out: 16 fit in 20
    (2 %); with 6 far out at a 0.1 % target, 12 fit in neither 1 nor 1.5 x 6; at 1.3 % the 12 fit
    in 13 but the 4 mates do not, and screening stops before round 2. Where the
    level dropped, the folds are scored once more with the records at or above the top 4 % (2.6 %)
    of the kept scores vouching for nothing: the tail at 1.0 and those above."""
    screening, calls, vouching_given = screen_known_answer(far_out, target_fpr)
    doubtful, mates = DOUBTFUL, MATES
    aside = set(np.flatnonzero(screening.set_aside))
    far = set(range(1000 - far_out, 1000))
    described = screening.describe([""] * 1000)
    if outcome == "lowered":
        assert aside == far | set(doubtful) | set(mates) and screening.factor == 1.75
        assert screening.rounds == 2 and len(calls) == 4  # the mates surface once the doubtful are out
    elif outcome == "lowered, stopped":
        assert aside == far | set(doubtful) and screening.factor == 1.75
        assert screening.rounds == 1 and len(calls) == 3
    else:
        assert aside == far and screening.factor == 2.5 and screening.rounds == 1 and len(calls) == 2
    assert "more than %sx the score" % screening.factor in described["rule"]
    if outcome.startswith("lowered"):
        assert vouching_given[:-1] == [None] * (len(calls) - 1) and (calls[-1] == ~screening.set_aside).all()
        assert set(np.flatnonzero(~vouching_given[-1])) == set(range(900, 1000)) | set(mates)
        assert described["unusual_not_vouching"] == (80 if outcome == "lowered" else 84)  # the mates are kept
    else:
        assert vouching_given == [None, None] and screening.vouching is None
        assert "unusual_not_vouching" not in described


@pytest.mark.parametrize("far_out, target_fpr, with_mates", [(8, 0.001, False), (2, 0.02, True)])
def test_the_level_drops_on_the_evidence_of_what_stands_far_out(far_out, target_fpr, with_mates):
    """The set-up above. Eight far out at a 0.1 % target: the 12 records the lower level adds fit
    in no target share (1), but in 1.5 times the records far out (12); before session 12 the level
    stayed, and attacks at 0.35 % and 1.4 % of CSIC's training data kept it high (recall 0.57-0.75).
    Two far out (0.2 %) count as evidence now (from 0.15 %); they did not (above 0.2 %)."""
    screening, _, _ = screen_known_answer(far_out, target_fpr)
    expected = set(range(1000 - far_out, 1000)) | set(DOUBTFUL) | (set(MATES) if with_mates else set())
    assert set(np.flatnonzero(screening.set_aside)) == expected and screening.factor == 1.75


def test_features_only_unusual_records_hold_stay_never_seen():
    """Known answer (training.train.fit with ``vouching``): a probe for a page that does not exist,
    sent 3 times, among 1,000 normal lines. Learned, its path is seen 3 times and its copies score
    low; held only by records that vouch for nothing, its features stay never seen: the probe
    scores exactly as under a model that never saw it, and the normal lines as before."""
    normal = shop_lines(1000, seed=93)
    probes = [line.replace("GET /robots.txt", "GET /backup/site.sql.bak")
              for line in normal if "GET /robots.txt" in line][:3]
    assert len(probes) == 3
    options = TrainOptions(spec=load_spec(None, "access"))

    def scores(records, vouching=None):
        fitted = fit(records, options, quiet, "test", vouching=vouching)
        session = make_session(fitted.graph().SerializeToString())
        return raw_scores(session, fitted.featurizer, [probes[0], *normal[:50]], options.chunk)[:, 0]

    never_seen = scores(normal)
    learned = scores(normal + probes)
    unvouched = scores(normal + probes, np.array([True] * len(normal) + [False] * len(probes)))
    assert unvouched == pytest.approx(never_seen)
    assert learned[0] < never_seen[0] - 1.0  # three never-seen path features at least, each down to 0.23


URL_SPEC = {"format": "jsonl", "fields": [{"field": "url", "converters": [{"kind": "url"}]}]}


def shop_urls_with_a_tail(count: int, seed: int) -> list[dict]:
    """The shop's URLs, 6 % of them sign-ups whose passwords give rare value shapes: a normal tail
    where a probe for a page that does not exist (3 never-seen features) does not stand out."""
    rng = random.Random(seed)
    records = []
    for _ in range(count):
        if rng.random() < 0.06:
            password = "".join(rng.choice("ab9.-") for _ in range(int(rng.paretovariate(1.5)) + 1))
            records.append({"url": f"/register?login={rng.choice(WORDS)}{rng.randint(1, 99)}&password={password}"})
        else:
            records.append({"url": shop_request(rng)[1]})
    return records


def probes_and_attacks(seed: int) -> tuple[list[dict], list[dict]]:
    """10 probes for backup files that do not exist, and 30 injection attacks (far out)."""
    rng = random.Random(seed)
    probes = [{"url": f"/{rng.choice(['static', 'images', 'products'])}/{rng.choice(WORDS)}."
                      f"{rng.choice(['bak', 'old', 'inc', 'sql'])}"} for _ in range(10)]
    families = sorted(ATTACKS)
    payload = lambda i: quote(rng.choice(ATTACKS[families[i % len(families)]]), safe="")  # noqa: E731
    attacks = [{"url": f"/cart/add?item={payload(i)}&qty=1&{rng.choice(['id', 'file', 'cmd'])}={payload(i)}"}
               for i in range(30)]
    return probes, attacks


@pytest.mark.parametrize("vouching", ["unusual records vouch for nothing", "off"])
def test_probes_that_look_like_the_normal_tail_do_not_hide_their_copies(tmp_path, monkeypatch, vouching):
    """Known answer: 10 probes (0.25 %) score like the normal tail and survive screening; 30
    attacks mixed in with them lower the level (the data holds attacks). Their features held
    only by unusual records stay never seen, so the copies score 3.0 (path, segment and
    parameter set never seen) and are flagged; learned (the rule off), each was seen once and
    the copies pass (at most 3 x 0.61 = 1.84)."""
    if vouching == "off":
        monkeypatch.setattr("logscore.training.robust.unusual_records", lambda raw, *_: np.zeros(len(raw), bool))
    probes, attacks = probes_and_attacks(seed=95)
    model, metadata = trained(shop_urls_with_a_tail(4000, seed=2) + attacks + probes, tmp_path, "tail",
                              spec=URL_SPEC, target_fpr=0.005)
    set_aside = metadata["training"]["set_aside"]
    assert "more than 1.75x" in set_aside["rule"] and set_aside["records"] == 30  # the attacks, no probe
    copies = model.score(probes)
    assert model.score(shop_urls_with_a_tail(4000, seed=97)).is_anomaly.mean() <= 0.005
    if vouching == "off":
        assert not copies.is_anomaly.any() and copies.raw_scores.max() < 2.0
    else:
        assert set_aside["unusual_not_vouching"] >= len(probes)
        assert copies.is_anomaly.all() and (copies.raw_scores == 3.0).all()


def test_clean_training_data_loses_nothing(tmp_path, attack_traffic):
    fresh, attacks = attack_traffic
    normal = shop_lines(3000, seed=90)
    robust, metadata = trained(normal, tmp_path, "robust", target_fpr=0.002)
    naive, _ = trained(normal, tmp_path, "naive", target_fpr=0.002, set_aside=False)
    assert metadata["training"]["set_aside"]["records"] <= 3
    assert "more than 2.5x" in metadata["training"]["set_aside"]["rule"]
    assert robust.score(attacks).is_anomaly.mean() >= naive.score(attacks).is_anomaly.mean()
    assert robust.score(fresh).is_anomaly.mean() <= naive.score(fresh).is_anomaly.mean() + 0.001


def test_realized_false_positive_rate_is_reported_beside_the_target(shop_model):
    calibration = shop_model.metadata["calibration"]
    held = calibration["held_back"]
    assert held["records"] == 4000 - shop_model.metadata["training"]["set_aside"]["records"]
    assert calibration["target_fpr"] / 3 <= held["fpr"] <= calibration["target_fpr"] * 3, held
    assert held["fpr"] == round(held["flagged"] / held["records"], 6)
    aside = held.get("set_aside", 0)  # screening's and the injection prior's, left out of the figure
    assert held["records"] + aside == shop_model.metadata["training"]["records_used"]
    if aside:  # the figure to expect were the set-aside records normal after all
        assert 0 <= held["set_aside_flagged"] <= aside
        assert held["fpr_with_set_aside"] == round((held["flagged"] + held["set_aside_flagged"])
                                                   / (held["records"] + aside), 6)


def test_the_held_back_figure_is_given_with_the_records_set_aside_too():
    """Known answer: 1,000 records in 5 folds, 15 set aside (10 far above everything, 5 at the
    median). Kept-only the figure is the target's; were the set-aside records normal, the 10 high
    ones would be flagged too (a clean log's long tail: CSIC's access lines flagged 0.367 % of new
    normal requests against a held-back 0.103 %)."""
    rng = np.random.default_rng(3)
    raw = rng.normal(size=(1000, 1)).astype(np.float32)
    raw[:10] = 100.0
    raw[10:15] = float(np.median(raw[15:]))
    kept = np.arange(1000) >= 15
    folds = np.arange(1000) % 5
    held = held_back_fpr(raw, folds, kept, TrainOptions(spec={}, target_fpr=0.01))
    kept_only = held_back_fpr(raw[15:], folds[15:], kept[15:], TrainOptions(spec={}, target_fpr=0.01))
    assert {k: held[k] for k in ("records", "flagged", "fpr")} == kept_only and kept_only["records"] == 985
    assert (held["set_aside"], held["set_aside_flagged"]) == (15, 10)
    assert held["fpr_with_set_aside"] == round((kept_only["flagged"] + 10) / 1000, 6)


def test_evaluate_mixes_anomalies_into_training_and_reports_at_threshold_figures(tmp_path):
    (tmp_path / "train.log").write_text("\n".join(shop_lines(2000, seed=93)) + "\n")
    (tmp_path / "normal.log").write_text("\n".join(shop_lines(2000, seed=94)) + "\n")
    attacks = [line for _, line in attack_lines(shop_lines(300, seed=95), 400, seed=96)]
    (tmp_path / "attacks.log").write_text("\n".join(attacks) + "\n")
    reports = {}
    for extra in ([], ["--keep-outliers"]):
        result = logscore("evaluate", "--train", tmp_path / "train.log", "--normal", tmp_path / "normal.log",
                          "--anomalous", tmp_path / "attacks.log", "--contaminate", "0.05", "--target-fpr", "0.002",
                          *extra)
        assert result.returncode == 0, result.stderr
        reports[tuple(extra)] = json.loads(result.stdout)
    robust, naive = reports[()], reports[("--keep-outliers",)]
    assert robust["training"]["anomalous_mixed_in"] == 20 and robust["anomalous"] == 380  # moved, not tested
    assert robust["training"]["set_aside"] >= 20 and naive["training"]["set_aside"] == 0
    assert robust["recall_at_threshold"] >= 0.9 > naive["recall_at_threshold"]
    assert robust["fpr_at_threshold"] <= 0.006 and robust["target_fpr"] == 0.002
    assert robust["roc_auc"] > 0.99 and robust["held_back_fpr"] is not None
    both = logscore("evaluate", "--model", tmp_path / "x.onnx", "--train", tmp_path / "train.log",
                    "--normal", tmp_path / "normal.log", "--anomalous", tmp_path / "attacks.log")
    assert both.returncode == 1 and "give --model FILE.onnx, or --train" in both.stderr


# --- 6. one truncation rule, one answer on every surface ---------------------------------------

def test_a_huge_line_scores_the_same_offline_over_grpc_and_http(tmp_path, shop_model_path):
    normal = shop_lines(1, seed=97)[0]
    huge = normal.replace('HTTP/1.1"', "?q=" + "a" * 5_000_000 + ' HTTP/1.1"', 1)  # a 5 MB access line
    oversized_field = {"url": "/search?q=" + "b" * 20_000, "method": "GET", "status": "200"}
    (tmp_path / "lines.log").write_text(huge + "\n" + normal + "\n")
    (tmp_path / "maps.jsonl").write_text(json.dumps(oversized_field) + "\n")
    # The HTTP call below carries the whole 5 MB line: allow it (logscore client sends it cut just past the rule).
    sidecar = SidecarProcess(models_dir_with(tmp_path, shop_model_path, "shop"), tmp_path,
                             max_message_bytes=8 * 1024 * 1024, max_inflight_bytes=64 * 1024 * 1024).start()
    try:
        answers = {}
        for surface in ("score", "client"):
            target = ["--model", shop_model_path] if surface == "score" else ["--socket", sidecar.socket]
            rows = []
            for path, extra in ((tmp_path / "lines.log", []), (tmp_path / "maps.jsonl", ["--json-records"])):
                result = logscore(surface, *target, *extra, path)
                assert result.returncode == 0, result.stderr
                rows += [json.loads(line) for line in result.stdout.splitlines()]
            answers[surface] = [{k: v for k, v in row.items() if k not in ("model", "line")} for row in rows]
        status, http = sidecar.http_post("/v1/score?model=shop", [huge, normal, oversized_field])
        assert status == 200
    finally:
        sidecar.stop()
    assert answers["score"] == answers["client"]
    huge_row, normal_row, field_row = answers["score"]
    assert huge_row["truncated"] and huge_row["unparsed"] and huge_row["is_anomaly"]  # cut, then unparsable
    assert "cut to 65536 characters" in huge_row["notes"][-1]
    assert field_row["truncated"] and not field_row.get("unparsed") and "unparsed" not in normal_row
    for row, result in zip(answers["score"], http["results"]):
        assert (result["anomaly_score"], result["is_anomaly"]) == (row["score"], row["is_anomaly"])
        assert result.get("notes", []) == row.get("notes", [])


def with_long_agents(lines: list[str], chars: int) -> list[str]:
    """The lines with each user agent repeated past ``chars`` characters: normal words, cut when scored."""
    longer = []
    for line in lines:
        head, agent = line.rsplit(' "', 1)
        agent = agent.rstrip('"') + " "
        longer.append(f'{head} "{agent * (chars // len(agent) + 1)}"')
    return longer


def test_a_record_cut_before_scoring_is_flagged_when_training_held_none_that_long(shop_model):
    """What lies past max_field_chars is never scored: an attack placed there passed, noted
    `truncated` but not flagged (probe s26: 0 of 30 past 8,300 characters of padding)."""
    cut = with_long_agents(shop_lines(8, seed=120), 8300)
    result = shop_model.score(cut + shop_lines(1, seed=121))
    assert result.truncated.tolist() == [True] * 8 + [False]
    assert not result.is_anomaly[:8].all()  # by score alone some pass: what the rule is for
    assert shop_model.metadata["training"]["truncated_records"] == 0 and flags_truncated(shop_model)
    decision = decide(shop_model, result)
    assert decision.is_anomaly[:8].all() and not decision.is_anomaly[8]
    notes = {i: text for i, _, text in decision.notes}
    assert sorted(notes) == list(range(8))
    assert all("; flagged: the rest was not scored" in text and "train on it" in text for text in notes.values())
    learning = decide(shop_model, result, learning=["route shop is learning"] + [None] * 8)
    assert not learning.is_anomaly[0] and learning.is_anomaly[1]
    assert "not flagged while its route learns" in [t for i, _, t in learning.notes if i == 0][0]


@pytest.mark.parametrize("shipped", [False, True])
def test_a_model_trained_on_records_that_long_only_notes_the_cut(tmp_path, shipped):
    lines = shop_lines(1500, seed=122) + with_long_agents(shop_lines(60, seed=123), 9000)  # 3.8 % cut
    records = [{"log": line} for line in lines] if shipped else lines  # (Fluent Bit's field maps: counted apart)
    model, metadata = trained(records, tmp_path, target_fpr=0.01)
    assert metadata["training"]["truncated_records"] == 60 and not flags_truncated(model)
    result = model.score(with_long_agents(shop_lines(20, seed=124), 9000))
    decision = decide(model, result)
    assert result.truncated.all() and decision.is_anomaly.tolist() == result.is_anomaly.tolist()
    assert all("flagged" not in text for _, _, text in decision.notes)


def test_the_shipped_model_counted_no_cut_records_and_flags_them_as_an_access_model():
    """Trained before the count was kept: an access model flags them (Apache refuses a request
    line or header over 8,190 bytes by default); a model of another format does not."""
    model = Model.load(ROOT / "models" / "apache-access.onnx")
    assert "truncated_records" not in model.metadata["training"] and flags_truncated(model)
    result = model.score(with_long_agents(blog_lines(5, seed=125), 8300))
    assert result.truncated.all() and decide(model, result).is_anomaly.all()
    older_syslog = SimpleNamespace(metadata={"training": {"records_used": 5000}, "calibration": {}},
                                   featurizer=SimpleNamespace(sessions=None, log_format="syslog"))
    assert not flags_truncated(older_syslog)  # a long message may be normal there: retrain to count them


def test_a_syslog_model_reads_host_names_as_values_not_words(tmp_path):
    """sshd names its peers by reverse DNS: each new host was a never-seen word, and a seen line
    with only a new host scored 1.0."""
    rng = random.Random(87)

    def word() -> str:
        return "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(4, 9)))

    def reverse_dns() -> str:  # p5083-ipbf2104marunouchi.tokyo.ocn.ne.jp: places and providers are words
        return f"{word()}{rng.randint(1, 9999)}.{word()}.{word()}.{rng.choice(['net', 'com', 'ne.jp', 'de'])}"

    def failures(count: int, hosts: list[str]) -> list[str]:
        return [f"Mar {rng.randint(1, 28):2d} 10:{rng.randint(0, 59):02d}:{rng.randint(0, 59):02d} host1 "
                f"sshd[{rng.randint(100, 9999)}]: authentication failure; logname= uid=0 euid=0 tty=ssh "
                f"ruser= rhost={rng.choice(hosts)}" for _ in range(count)]

    regulars = [reverse_dns() for _ in range(20)]  # the same few peers, day after day
    (tmp_path / "train.log").write_text("\n".join(syslog_lines(1700, seed=88) + failures(300, regulars)) + "\n")
    model = tmp_path / "syslog.onnx"
    trained = logscore("train", "--input", tmp_path / "train.log", "--format", "syslog", "--out", model)
    assert trained.returncode == 0, trained.stderr
    (tmp_path / "later.log").write_text("\n".join(failures(50, [reverse_dns() for _ in range(50)])) + "\n")
    later = logscore("score", "--model", model, tmp_path / "later.log")
    scored = [json.loads(line) for line in later.stdout.splitlines()]
    assert len(scored) == 50 and sum(r["is_anomaly"] for r in scored) == 0, [r for r in scored if r["is_anomaly"]]


def test_a_never_seen_error_stands_out_in_a_log_full_of_new_words(tmp_path):
    """A log whose lines keep bringing new words (a third of them here) learns that new words are
    normal: short never-seen error lines scored 0.71-0.88, under the threshold, while a never-seen
    word of failure should stand out (the `alarms` converter)."""
    rng = random.Random(90)
    vocabulary = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(4, 9)))
                  for _ in range(20_000)]

    def chatty(count: int) -> list[str]:
        return [f"Mar {rng.randint(1, 28):2d} 10:{rng.randint(0, 59):02d}:{rng.randint(0, 59):02d} host1 "
                f"app[{rng.randint(100, 9999)}]: " + " ".join(rng.choices(vocabulary, k=rng.randint(3, 12)))
                for _ in range(count)]

    (tmp_path / "train.log").write_text("\n".join(syslog_lines(1400, seed=91) + chatty(600)) + "\n")
    model = tmp_path / "syslog.onnx"
    assert logscore("train", "--input", tmp_path / "train.log", "--format", "syslog", "--out", model).returncode == 0
    errors = ["kernel: Out of memory: Killed process 4711 (java) total-vm:812345kB",
              "app[311]: java.lang.OutOfMemoryError: Java heap space",
              "sshd[22]: fatal: Cannot bind any address",
              "app[77]: segfault at 10 ip 00007f3a2b1c4d5e sp 00007ffd9a8b7c60 error 4 in libc.so",
              "systemd[1]: Failed to start Session 12 of user alice.",
              "app[90]: database disk image is malformed, refusing to start",
              "CRON[5]: pam_unix(cron:session): authentication failure; user=bob",
              # (no word of failure before the alarms' word list 2: syslog trial)
              "com.apple.xpc.launchd[1]: (com.apple.mdworker[12345]) Service exited due to SIGSEGV",
              "sandboxd[129]: QQ(10018) deny file-read-data /private/etc/master.passwd"]
    later = [f"Mar  4 11:00:{i:02d} host1 {line}" for i, line in enumerate(errors)]
    (tmp_path / "later.log").write_text("\n".join(later + syslog_lines(100, seed=92) + chatty(100)) + "\n")
    scored = [json.loads(line) for line in logscore("score", "--model", model, tmp_path / "later.log").stdout.splitlines()]
    assert [r["is_anomaly"] for r in scored[:9]] == [True] * 9, [r["score"] for r in scored[:9]]
    assert not any(r["is_anomaly"] for r in scored[9:])  # new words alone: as in training
