"""The short cuts of small scoring calls answer as the general paths do, on the same records:
a one-entry event stream, a batch without records scored high (no feedback step), one model's
metrics, the session's inner run."""

import asyncio
import shutil
from types import SimpleNamespace

import msgpack
import numpy as np
import pytest

from logscore import records as records_module
from logscore.admission import VALUE_BYTES, Admission
from logscore.decide import decide
from logscore.errors import InvalidRequest, Overloaded
from logscore.feedback import FeedbackStep, RuleSet, pattern_from_records
from logscore.feedback_store import Entry
from logscore.metrics import Metrics
from logscore.model import GRAPH_OUTPUTS, Model, graph_inputs, run_graph
from logscore.records import decode_event_stream
from logscore.registry import ModelRegistry
from logscore.scoring import ScoreCall, ScoringService
from logscore.settings import Settings

from .generate import blog_lines, shop_lines
from .sidecar_process import ROOT

ENTRIES = [
    [1700000000, {"message": "GET / HTTP/1.1"}],
    [1700000000.5, {"url": "/a", "tags": ["x", ["y", {"z": 1}]], "more": {"k": None, "b": b"\x00\xff"}}],
    [msgpack.ExtType(0, b"\x65\x5f\x00\x00\x00\x00\x00\x07"), {"log": "x", 7: "an int key"}],
    [[1700000000, {"fluent_bit": "metadata"}], {"message": "caf\xe9".encode("latin-1")}],  # not UTF-8
    ["2024-01-01T00:00:00Z", {}],
]


def decoded_and_charged(stream: bytes, limit: int = 10 ** 9):
    with Admission(limit_bytes=limit).admit(0) as ticket:
        return decode_event_stream(stream, ticket=ticket), ticket.bytes


@pytest.mark.parametrize("entry", ENTRIES)
def test_a_one_entry_stream_decodes_and_charges_as_the_general_decoder(entry, monkeypatch):
    stream = msgpack.packb(entry, use_bin_type=False)
    quick = decoded_and_charged(stream)
    monkeypatch.setattr(records_module, "ONE_ENTRY_BYTES", -1)  # every stream through the Unpacker
    assert decoded_and_charged(stream) == quick
    assert quick[1] > 0


@pytest.mark.parametrize("stream", [msgpack.packb([1, 2]), msgpack.packb([1, {"a": 1}, 3]), b"\x92\x01",
                                    msgpack.packb([1, {"a": 1}]) + b"\x01", b"\xc1", b"",
                                    msgpack.packb([1, {"a": 1}]) * 2, b"\x92\x01\x81\x91\x01\x02"])
def test_a_small_stream_that_is_not_one_entry_is_answered_as_ever(stream, monkeypatch):
    def outcome():
        try:
            return decoded_and_charged(stream)
        except InvalidRequest as error:
            return str(error)

    quick = outcome()
    monkeypatch.setattr(records_module, "ONE_ENTRY_BYTES", -1)
    assert outcome() == quick


def test_a_one_entry_stream_over_the_budget_is_refused_as_the_general_decoder_does(monkeypatch):
    stream = msgpack.packb(ENTRIES[1])
    (_, charged) = decoded_and_charged(stream)
    assert decoded_and_charged(stream, charged)[1] == charged  # exactly the budget fits
    with pytest.raises(Overloaded) as quick:
        decoded_and_charged(stream, charged - VALUE_BYTES)
    monkeypatch.setattr(records_module, "ONE_ENTRY_BYTES", -1)
    with pytest.raises(Overloaded) as general:
        decoded_and_charged(stream, charged - VALUE_BYTES)
    assert str(quick.value) == str(general.value)


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
    model = SimpleNamespace(name="m")
    scores = np.array([0.1, 0.9995, 0.5, 1.0, 0.3], dtype=np.float32)
    flags = scores > 0.999
    whole, split = Metrics(), Metrics()
    whole.observe_outcome(SimpleNamespace(notes=[], models=[model], scores=scores, is_anomaly=flags,
                                          model_index=np.zeros(5, np.uint32)), "grpc")
    split.observe_outcome(SimpleNamespace(notes=[], models=[model, model], scores=scores, is_anomaly=flags,
                                          model_index=np.array([0, 1, 0, 1, 1], np.uint32)), "grpc")
    assert metric_values(whole) == metric_values(split)
    assert metric_values(whole)['logscore_anomalies_total{model="m"}'] == 2


def test_the_sessions_inner_run_answers_as_its_public_run(shop_model_path):
    model = Model.load(shop_model_path)
    batch = model.featurizer.transform(shop_lines(40, seed=12), dense=True)
    for ours, public in zip(run_graph(model.session, batch), model.session.run(GRAPH_OUTPUTS, graph_inputs(batch))):
        np.testing.assert_array_equal(ours, public)
