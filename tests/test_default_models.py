"""Every shipped model loads and scores; the Apache model meets its acceptance figures."""

from pathlib import Path

import numpy as np
import pytest

from logscore.model import Model
from logscore.parsers import parse_access

from .generate import ATTACKS, attack_lines, blog_lines

ROOT = Path(__file__).resolve().parents[1]
MODELS = sorted((ROOT / "models").glob("*.onnx"))


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
    return Model.load(ROOT / "models" / "apache-access.onnx")


def test_normal_lines_in_training_style_stay_below_threshold(apache_model):
    result = apache_model.score(blog_lines(5000, seed=2))
    assert result.is_anomaly.mean() <= 0.01


def test_injected_attacks_are_flagged(apache_model):
    attacks = attack_lines(blog_lines(2000, seed=3), 800, seed=4)
    result = apache_model.score([line for _, line in attacks])
    for family in ATTACKS:
        flags = [flag for (f, _), flag in zip(attacks, result.is_anomaly) if f == family]
        assert np.mean(flags) >= 0.9, f"{family}: {np.mean(flags):.3f} flagged"


def test_a_fluentd_record_with_null_referer_and_agent_scores_as_its_raw_line(apache_model):
    """Fluentd's apache2 parser sends null for a combined line's "-" "-" (and for a common line's missing
    pair). The shipped model predated models recording their access layout and read such records as
    common-format lines: through real Fluentd, 187 of 9,999 records of its own log scored up to 0.99
    where their raw lines scored less. It now records combined (scripts/set_access_layout.py)."""
    lines = [line.rsplit(' "', 2)[0] + ' "-" "-"' for line in blog_lines(300, seed=5)]
    records = []
    for line in lines:
        fields = parse_access(line)[0]
        records.append({"host": fields["remote_addr"], "user": None, "method": fields["method"],
                        "path": fields["url"], "code": int(fields["status"]), "size": int(fields["bytes"]),
                        "referer": None, "agent": None})
    assert apache_model.metadata["featurizer"]["access_layout"] == "combined"
    np.testing.assert_array_equal(apache_model.score(records).scores, apache_model.score(lines).scores)


def test_the_layout_script_rewrites_metadata_only_and_keeps_a_recorded_layout(tmp_path):
    """scripts/set_access_layout.py wrote the shipped model's layout: run again it writes the same bytes,
    and it refuses to change a layout a model records."""
    import subprocess
    import sys

    import onnx

    from logscore.artifact import read_artifact
    from logscore.training.behaviour import sealed

    shipped, script = ROOT / "models" / "apache-access.onnx", ROOT / "scripts" / "set_access_layout.py"
    artifact = read_artifact(shipped)  # the shipped model as it was before it recorded its layout:
    before = {**artifact.metadata, "featurizer": {k: v for k, v in artifact.metadata["featurizer"].items()
                                                  if k != "access_layout"}}
    (tmp_path / "before.onnx").write_bytes(sealed(onnx.ModelProto.FromString(artifact.model_bytes),
                                                  before)[0].SerializeToString())
    again = subprocess.run([sys.executable, str(script), str(tmp_path / "before.onnx"), "--layout", "combined",
                            "--out", str(tmp_path / "again.onnx")], capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    assert (tmp_path / "again.onnx").read_bytes() == shipped.read_bytes()
    other = subprocess.run([sys.executable, str(script), str(shipped), "--layout", "common",
                            "--out", str(tmp_path / "other.onnx")], capture_output=True, text=True)
    assert other.returncode == 2 and "already records access_layout 'combined'" in other.stderr
    assert not (tmp_path / "other.onnx").exists()


def test_the_layout_script_refuses_a_model_that_reads_no_agent_without_a_traceback(tmp_path):
    """--from-log on an access model whose spec reads no user agent raised KeyError 'access_layout'."""
    import importlib.util

    from logscore.errors import ConfigError
    from logscore.features import load_spec

    from .generate import shop_lines

    loaded = importlib.util.spec_from_file_location("set_access_layout", ROOT / "scripts" / "set_access_layout.py")
    script = importlib.util.module_from_spec(loaded)
    loaded.loader.exec_module(script)
    spec = load_spec(None, "access")
    no_agent = {**spec, "fields": [f for f in spec["fields"] if f["field"] != "user_agent"]}
    (tmp_path / "access.log").write_text("\n".join(shop_lines(50, seed=3)) + "\n")
    with pytest.raises(ConfigError, match="reads no user agent"):
        script.layout_of_log(str(tmp_path / "access.log"), no_agent)
