import os
import subprocess
import sys

import pytest
from hypothesis import settings

# Property-based tests: CI runs a fixed set of examples (the same every run, no example database
# written into the tree); LOGSCORE_FUZZ_EXAMPLES=N explores N random examples per test instead.
settings.register_profile("fixed", derandomize=True, database=None)
settings.register_profile("explore", database=None,
                          max_examples=int(os.environ.get("LOGSCORE_FUZZ_EXAMPLES") or 0) or 100)
settings.load_profile("explore" if os.environ.get("LOGSCORE_FUZZ_EXAMPLES") else "fixed")

from logscore.features import load_spec
from logscore.training.train import TrainOptions, save_model, train

from .generate import shop_lines, timed_shop_lines
from .sidecar_process import ROOT


@pytest.fixture(scope="session")
def shop_training_lines():
    return shop_lines(4000, seed=0)


@pytest.fixture(scope="session")
def shop_model_path(tmp_path_factory, shop_training_lines):
    """A rarity model trained on the generated shop's access log."""
    model, _ = train(shop_training_lines, TrainOptions(spec=load_spec(None, "access"), name="shop",
                                                       target_fpr=0.01))
    path = tmp_path_factory.mktemp("models") / "shop.onnx"
    save_model(model, path)
    return path


@pytest.fixture(scope="session")
def behaviour_model(tmp_path_factory):
    """A model trained by the real CLI with window (1 s) and client detectors on 20 minutes of traffic."""
    directory = tmp_path_factory.mktemp("behaviour")
    training = directory / "train.log"
    training.write_text("\n".join(timed_shop_lines(1200, 3.0)) + "\n")
    models = directory / "models"
    models.mkdir()
    path = models / "shop.onnx"
    done = subprocess.run([sys.executable, "-m", "logscore", "train", "--input", str(training), "--out", str(path),
                           "--windows", "--window-s", "1", "--entities"], capture_output=True, text=True,
                          timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    return path
