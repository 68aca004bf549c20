"""The score histogram counts alike however many records a batch has; refusals are counted and
logged without a flood."""

import logging

import numpy as np
import pytest

from logscore import metrics as metrics_module
from logscore.metrics import SCORE_BUCKETS, Metrics


def histogram(metrics: Metrics) -> dict:
    text = metrics.render().decode()
    return {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines()
            if line.startswith("logscore_score_")}


def test_small_and_large_batches_count_the_same():
    scores = np.random.default_rng(0).random(50).astype(np.float32) ** 0.1
    scores[:3] = [0.999, 1.0, 0.5]  # on bucket edges: counted as "less or equal"
    one_by_one, at_once = Metrics(), Metrics()
    for value in scores:
        one_by_one.scores.observe("m", np.array([value], dtype=np.float32))
    at_once.scores.observe("m", scores)
    counts, same = histogram(at_once), histogram(one_by_one)
    assert same.pop('logscore_score_sum{model="m"}') == pytest.approx(counts.pop('logscore_score_sum{model="m"}'))
    assert same == counts
    assert counts['logscore_score_count{model="m"}'] == 50
    for edge in SCORE_BUCKETS:
        assert counts[f'logscore_score_bucket{{le="{edge}",model="m"}}'] == int((scores.astype(np.float64) <= edge).sum())


def test_refusals_are_all_counted_and_logged_once_an_interval_per_kind(caplog, monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr(metrics_module.time, "monotonic", lambda: clock[0])
    metrics = Metrics()
    with caplog.at_level(logging.WARNING, logger="logscore.requests"):
        for n in range(5):
            metrics.refused("InvalidRequest", "grpc", f"event_stream: invalid msgpack (call {n})")
        metrics.refused("Unauthenticated", "http", "missing or wrong bearer token")
        clock[0] += metrics_module.REFUSAL_LOG_INTERVAL_S
        metrics.refused("InvalidRequest", "grpc", "no records")
    logged = [(r.kind, r.surface, r.reason, r.refused_since_last_logged) for r in caplog.records]
    assert logged == [("InvalidRequest", "grpc", "event_stream: invalid msgpack (call 0)", 0),
                      ("Unauthenticated", "http", "missing or wrong bearer token", 0),
                      ("InvalidRequest", "grpc", "no records", 4)]
    text = metrics.render().decode()
    assert 'logscore_errors_total{kind="InvalidRequest",surface="grpc"} 6.0' in text


def test_a_new_version_of_a_flooding_model_is_judged_afresh(caplog):
    """A flooding model replaced (retrained, learned) was still reported flooding from the old
    version's block, and a new version flooding too went unsaid for the rest of 10 minutes."""
    from types import SimpleNamespace

    from logscore.flood import FloodWatch

    def model(version):
        return SimpleNamespace(name="web", version=version, metadata={"calibration": {"target_fpr": 0.002}})
    watch = FloodWatch(block_records=100)
    with caplog.at_level(logging.WARNING, logger="logscore.serve"):
        watch.observe(model("v1"), 100, 30)
        assert watch.status()["web"]["version"] == "v1"
        watch.observe(model("v2"), 50, 0)
        assert watch.status() == {}, "the new version has scored no block yet"
        watch.observe(model("v2"), 50, 40)
        watch.observe(model("v2"), 100, 40)  # the same version again: within the interval, not logged
    warned = [r for r in caplog.records if "far more records" in r.getMessage()]
    assert [r.version for r in warned] == ["v1", "v2"]
    assert watch.status()["web"] == {"version": "v2", "flagged": 40, "of_records": 100, "expected_share": 0.002,
                                     "learned_here": False, "routes": [""]}


def test_a_learned_model_flooding_is_not_called_another_logs(caplog):
    """A route learned with --learn flooded when its host logged 400 lines of one never-seen error in
    10 s (syslog field trial): the warning and the review page said the model was another site's or
    log's and told the operator to train one on their own log or serve with --learn, which it did."""
    from types import SimpleNamespace

    from logscore.flood import FloodWatch
    from logscore.review import ReviewRing, render_page

    learned = SimpleNamespace(name="syslog", version="v2", metadata={
        "calibration": {"target_fpr": 0.001}, "training": {"learned_route": "syslog"}})
    watch = FloodWatch(block_records=100)
    with caplog.at_level(logging.WARNING, logger="logscore.serve"):
        watch.observe(learned, 100, 47, "sys.newhost")
    [warning] = [r.getMessage() for r in caplog.records if "far more records" in r.getMessage()]
    assert "learned from this traffic" in warning and "--learn" not in warning and "another site" not in warning
    page = render_page(ReviewRing(10), [], 0, {}, {}, {"store": "s", "reachable": True}, flooding=watch.status())
    banner = page.split("id=flooding>", 1)[1].split("</p>", 1)[0]
    assert "it learned from this traffic" in banner and "--learn" not in banner


def test_a_tag_flooding_is_seen_beside_a_busy_tag_the_same_model_scores_well(caplog):
    """One model serves every tag by default: an app log's tag routed to the access-log model flagged
    half its records, but the access log's busier tag filled the same blocks and the model's share
    stayed under the mismatch share, so nothing was said."""
    from types import SimpleNamespace

    model = SimpleNamespace(name="web", version="v1", metadata={"calibration": {"target_fpr": 0.002}})
    metrics = Metrics()
    metrics.floods.block_records = 100
    flags = np.zeros(100, dtype=bool)
    flags[90:95] = True  # the app's 10 records: 5 flagged; the access log's 90: none
    routes = ["web.access"] * 90 + ["app.worker"] * 10
    outcome = SimpleNamespace(notes=[], models=[model], scores=flags.astype(np.float32), is_anomaly=flags,
                              model_index=np.zeros(100, dtype=np.uint32))
    with caplog.at_level(logging.WARNING, logger="logscore.serve"):
        for _ in range(10):
            metrics.observe_outcome(outcome, "forward", routes)
    flooding = metrics.floods.status()["web"]
    assert flooding["routes"] == ["app.worker"] and (flooding["flagged"], flooding["of_records"]) == (50, 100)
    assert [r.route for r in caplog.records if "far more records" in r.getMessage()] == ["app.worker"]
    clean = SimpleNamespace(**{**vars(outcome), "is_anomaly": np.zeros(100, dtype=bool)})
    metrics.observe_outcome(clean, "grpc", "app.worker")  # a call's one tag: its block is judged alike
    assert metrics.floods.status() == {}, "a clean block of the tag clears it"


def test_a_flooding_model_sent_no_more_records_no_longer_floods_and_old_versions_count_on(monkeypatch, caplog):
    """/readyz said a model flooded forever once its records went to a model trained for the site
    (the warning's own advice); and while a model is replaced its old and new versions score side by
    side for a moment: the old one's records judged the old version afresh and repeated the warning."""
    from types import SimpleNamespace

    from logscore import flood

    def model(name, version="v1"):
        return SimpleNamespace(name=name, version=version, metadata={"calibration": {"target_fpr": 0.002}})
    clock = [1000.0]
    monkeypatch.setattr(flood.time, "monotonic", lambda: clock[0])
    watch = flood.FloodWatch(block_records=100)
    with caplog.at_level(logging.WARNING, logger="logscore.serve"):
        watch.observe(model("web"), 100, 30)
        watch.observe(model("web", "v2"), 100, 30)
        watch.observe(model("web"), 100, 30)  # the old version, a last call
        watch.observe(model("web", "v2"), 100, 30)
    assert [r.version for r in caplog.records if "far more records" in r.getMessage()] == ["v1", "v2"]
    clock[0] += flood.IDLE_S / 2
    watch.observe(model("site"), 100, 0)
    assert "web" in watch.status()
    clock[0] += flood.IDLE_S
    watch.observe(model("site"), 100, 0)
    assert watch.status() == {}


def test_a_model_retrained_for_days_keeps_only_its_recent_versions():
    """A learned route swaps in a new version at every retrain: each one was remembered for the
    life of the process (one a minute on a busy route with --learn-retrain-records small)."""
    from types import SimpleNamespace

    from logscore import flood

    watch = flood.FloodWatch(block_records=100)
    for n in range(1000):
        watch.observe(SimpleNamespace(name="web", version=f"v{n}", metadata={}), 10, 0)
    assert watch._versions["web"] == [f"v{n}" for n in range(1000 - flood.RECENT_VERSIONS, 1000)]


def test_tags_past_the_most_judged_apart_are_judged_together(monkeypatch):
    """Tags come from shippers, one per record in forward Message mode: a tag per record must not
    grow the watch without end."""
    from types import SimpleNamespace

    from logscore import flood

    monkeypatch.setattr(flood, "MAX_ROUTES", 2)
    model = SimpleNamespace(name="web", version="v1", metadata={"calibration": {"target_fpr": 0.002}})
    watch = flood.FloodWatch(block_records=100)
    watch.observe(model, 10, 0, "a")
    watch.observe(model, 10, 0, "b")
    for n in range(100):
        watch.observe(model, 1, 1, f"random-{n}")
    assert watch.status()["web"]["routes"] == [flood.OTHER_ROUTES]
    assert len(watch._seen_at) == 3


def test_with_learning_on_the_flood_warning_says_what_applies_not_to_serve_with_learn(tmp_path, shop_model_path,
                                                                                     caplog):
    """`serve --learn`, the shop's model serving a blog: its first candidate was kept aside (97 % of its
    window flagged) and the route's flags released; the flood warning then ended "or serve with --learn"
    (probe s26). It names the kept-aside model and learn_max_first_flagged instead."""
    import shutil
    from types import SimpleNamespace

    from logscore.learning import Learner
    from logscore.registry import ModelRegistry
    from logscore.scoring import ScoringService
    from logscore.settings import Settings

    from .generate import blog_lines

    models = tmp_path / "models"
    models.mkdir()
    shutil.copy(shop_model_path, models / "shop.onnx")
    settings = Settings(models_dir=str(models), learn="true", learn_records=200, learn_window=200)
    registry = ModelRegistry(str(models))
    registry.reload()
    learner = Learner(settings, registry, lambda: None)
    metrics = Metrics()
    metrics.floods.block_records = 100
    ScoringService(registry, settings, metrics, learner=learner)  # --learn: the watch hears of the learner
    model = registry.snapshot.models["shop"]
    lines = blog_lines(100, seed=140)
    learner.observe(learner.routes(model, lines), lines)
    flags = np.ones(100, dtype=bool)
    outcome = SimpleNamespace(notes=[], models=[model], scores=flags.astype(np.float32), is_anomaly=flags,
                              model_index=np.zeros(100, dtype=np.uint32))

    def warning_after(route_state: dict) -> str:
        for name, value in route_state.items():
            setattr(learner.routes_by_name["shop"], name, value)
        metrics.floods._logged_at.clear()  # (said once per 10 minutes: each state's warning heard here)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="logscore.serve"):
            metrics.observe_outcome(outcome, "http", "blog.access")
        [said] = [r.getMessage() for r in caplog.records if "far more records" in r.getMessage()]
        assert "serve with --learn" not in said
        return said

    kept = str(models / ".learning" / "shop" / "kept-1.onnx")
    said = warning_after({"first_kept_aside": True, "last": {"outcome": "kept_aside", "kept_as": kept}})
    assert f"copy the kept-aside model {kept} to {models}/shop.onnx" in said
    assert "learn_max_first_flagged 0.7" in said and "train one on your own log" in said
    assert "failed 3 times" in warning_after({"first_kept_aside": False, "failures": 3})
    assert "how far route shop is" in warning_after({"failures": 0})

    from logscore.review import ReviewRing, render_page

    page = render_page(ReviewRing(10), [], 0, {}, {}, {"store": "s", "reachable": True},
                       flooding=metrics.floods.status(), learning_on=True)
    banner = page.split("id=flooding>", 1)[1].split("</p>", 1)[0]
    assert "serve with --learn" not in banner and "--learn is on: /readyz `learning`" in banner, banner
