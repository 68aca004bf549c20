import pytest

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
