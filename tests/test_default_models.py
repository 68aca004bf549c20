"""Every shipped model loads and scores; the Apache model meets its acceptance figures."""

from pathlib import Path

import numpy as np
import pytest

from logscore.model import Model

from .generate import ATTACKS, attack_lines, blog_lines

MODELS = sorted((Path(__file__).resolve().parents[1] / "models").glob("*.onnx"))


def test_models_are_shipped():
    assert any(p.name == "apache-access.onnx" for p in MODELS)


@pytest.mark.parametrize("path", MODELS, ids=lambda p: p.name)
def test_shipped_model_contract(path):
    model = Model.load(path)
    meta = model.metadata
    assert (path.parent / f"{path.stem}.md").exists(), "every shipped model has a model card"
    assert 0 < meta["calibration"]["threshold"] <= 1
    result = model.score(["", "\xff garbage", "x" * 100_000, {"message": None}], explain=3)
    assert np.all((result.scores >= 0) & (result.scores <= 1))
    assert len(result.explanations) == 4


@pytest.fixture(scope="module")
def apache_model():
    return Model.load(Path(__file__).resolve().parents[1] / "models" / "apache-access.onnx")


def test_normal_lines_in_training_style_stay_below_threshold(apache_model):
    result = apache_model.score(blog_lines(5000, seed=2))
    assert result.is_anomaly.mean() <= 0.01


def test_injected_attacks_are_flagged(apache_model):
    attacks = attack_lines(blog_lines(2000, seed=3), 800, seed=4)
    result = apache_model.score([line for _, line in attacks])
    for family in ATTACKS:
        flags = [flag for (f, _), flag in zip(attacks, result.is_anomaly) if f == family]
        assert np.mean(flags) >= 0.9, f"{family}: {np.mean(flags):.3f} flagged"
