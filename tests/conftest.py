import os

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

from .generate import shop_lines


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
