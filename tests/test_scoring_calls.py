"""The short cuts of small scoring calls answer as the general paths do, on the same records:
a batch without records scored high (no feedback step), one model's metrics."""

import asyncio
import json
import shutil
from types import SimpleNamespace

import numpy as np
import pytest

from logscore.decide import decide
from logscore.feedback import FeedbackStep, RuleSet, pattern_from_records
from logscore.feedback_store import Entry
from logscore.metrics import Metrics
from logscore.registry import ModelRegistry
from logscore.scoring import ScoreCall, ScoringService
from logscore.settings import Settings

from .generate import blog_lines, shop_lines
from .sidecar_process import ROOT


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    """The default model: records that do not parse score under its threshold (decide flags them)."""
    directory = tmp_path_factory.mktemp("models")
    shutil.copy(ROOT / "models" / "apache-access.onnx", directory)
    registry = ModelRegistry(str(directory))
    registry.reload()
    return registry


def mixed_records(flagged: bool) -> list:
    normal = blog_lines(6, seed=11)
    records = [normal[0], "not an access line at all", normal[1][:30] + "/" + "a" * 70_000 + normal[1][30:],
               {"message": "also garbage"}, normal[2], normal[3][:60] + "/" + "b" * 9000 + normal[3][60:]]
    if flagged:
        records += [line for line in shop_lines(40, seed=3)][:6]
    return records


@pytest.mark.parametrize("flagged", [False, True])
def test_a_batch_decides_as_with_the_feedback_step_whether_or_not_a_record_scores_high(registry, flagged):
    """The service builds no feedback step for a batch without records flagged by their score:
    its answer is the one decide gives with the step (rules and review page on)."""
    model = registry.resolve("", "")
    records = mixed_records(flagged)
    scored = model.score(records, 3)
    assert bool(scored.is_anomaly.any()) == flagged and scored.unparsed.sum() == 3 and scored.truncated.sum() == 2
    high = [records[i] for i in np.flatnonzero(scored.is_anomaly)] or ["-"]  # feedback on some of them
    rule = Entry(1, "normal", pattern_from_records(model, high[:1]), "test", model=model.name)
    keep = Entry(2, "keep", pattern_from_records(model, high[-1:]), "test", model=model.name)
    seen = []
    feedback = SimpleNamespace(rules=RuleSet([rule, keep]))
    review = SimpleNamespace(observe=lambda *args: seen.append(args[2]), admit=lambda name, n: n)
    service = ScoringService(registry, Settings(), Metrics(), feedback=feedback, review=review)
    try:
        outcome = asyncio.run(service.score(ScoreCall(records, explain=3)))
    finally:
        service.executor.shutdown()
    step = FeedbackStep(RuleSet([rule, keep]), records, observe=lambda *args: None, inspect_always=True)
    general = decide(model, model.score(records, 3), None, step)
    assert outcome.notes == sorted(general.notes)
    np.testing.assert_array_equal(outcome.is_anomaly, general.is_anomaly)
    np.testing.assert_array_equal(outcome.scores, general.scores)
    assert outcome.explanations == scored.explanations
    assert bool(seen) == flagged  # the review page sees flagged records only


def metric_values(metrics: Metrics) -> dict:
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in metrics.render().decode().splitlines()
            if line.startswith(("logscore_records_scored_total", "logscore_anomalies_total", "logscore_score_"))}


def test_one_models_outcome_counts_as_the_same_records_split_between_models():
    model = SimpleNamespace(name="m", version="v1")
    scores = np.array([0.1, 0.9995, 0.5, 1.0, 0.3], dtype=np.float32)
    flags = scores > 0.999
    whole, split = Metrics(), Metrics()
    whole.observe_outcome(SimpleNamespace(notes=[], models=[model], scores=scores, is_anomaly=flags,
                                          model_index=np.zeros(5, np.uint32)), "grpc")
    split.observe_outcome(SimpleNamespace(notes=[], models=[model, model], scores=scores, is_anomaly=flags,
                                          model_index=np.array([0, 1, 0, 1, 1], np.uint32)), "grpc")
    assert metric_values(whole) == metric_values(split)
    assert metric_values(whole)['logscore_anomalies_total{model="m"}'] == 2


def test_http_gives_its_invalid_utf8_notes_to_the_service_as_grpc_gives_its_decoding_notes(registry):
    """HTTP merged its notes into the outcome after scoring, gRPC through ScoreCall.notes: two ways
    to keep alike (review A). Now both pass them in the call, and the answer holds each once."""
    from logscore.servers.http import Request, SidecarHttp

    service = ScoringService(registry, Settings(), Metrics())
    calls = []
    scored = service.score

    async def recorded(call):
        calls.append(call)
        return await scored(call)
    service.score = recorded
    body = b'[{"message": "GET /cafe.gif"}, {"message": "GET /caf\xe9.gif"}]'
    request = Request("POST", "/v1/score", {}, {"content-type": "application/json"}, body)
    try:
        response = asyncio.run(SidecarHttp(service, None).score(request))
    finally:
        service.executor.shutdown()
    assert response.status == 200, response.body
    [call] = calls
    assert [(i, field) for i, field, _ in call.notes] == [(1, "utf8")]
    answer = json.loads(response.body)
    assert [(n["index"], n["field"]) for n in answer["notes"] if n["field"] == "utf8"] == [(1, "utf8")], answer
    assert sum("invalid UTF-8" in note for note in answer["results"][1]["notes"]) == 1, answer
