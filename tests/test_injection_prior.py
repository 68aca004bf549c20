"""The injection prior (training/prior.py): a payload family spread over a first training log stays
unseen; a site whose requests carry such a character everywhere learns it."""

from __future__ import annotations

import random
from urllib.parse import quote

import pytest

from logscore.model import Model
from logscore.injection import injection_like

from .generate import ATTACKS, access_line, attack_lines, inject, shop_lines, shop_request
from .test_cli import logscore
from .test_decisions import trained


@pytest.mark.parametrize("text, marked", [
    ("shape id=9' a 9=9", True),  # a quote after a digit: SQL
    ("9'", True), ("^'a", True), (" '", True), ("a'--", True),
    ("a'a", False), ("a'", False), ("shape apellidos=a'a a", False),  # an apostrophe after a letter: language
    ("'a", False), ("character q='", False),  # the apostrophe's context is not in the text
    ("character q=<", True), ("/../", True), ("a/*", True), ("${a", True), ("a\x00", True), ("`a", True),
    ("parameter without '=': a", False),  # the feature's own name quotes "="
    ("value /about?filter={\"a\"}", False), ("shape /search?q=9' a", False),  # per page: as rare as the page
    ("/products/{id}", False), ("shape q=a a", False), ("character q=;", False), (None, False),
])
def test_injection_marks_are_read_in_their_context(text, marked):
    assert injection_like(text) is marked


def sql_family(lines: list[str], count: int, seed: int) -> list[str]:
    """``count`` of ``lines`` carrying one SQL injection payload each."""
    rng = random.Random(seed)
    return [inject(rng.choice(lines), rng.choice(ATTACKS["sql_injection"]), rng) for _ in range(count)]


def test_a_payload_family_in_three_percent_of_the_training_lines_stays_flagged(tmp_path):
    normal = shop_lines(3000, seed=120)
    family = sql_family(shop_lines(300, seed=121), 93, seed=122)  # 3 % of the training lines
    (tmp_path / "first.log").write_text("\n".join(normal + family) + "\n")
    result = logscore("train", "--input", tmp_path / "first.log", "--out", tmp_path / "prior.onnx",
                      "--target-fpr", 0.002)
    assert result.returncode == 0, result.stderr
    with_prior = Model.load(tmp_path / "prior.onnx")
    without, _ = trained(normal + family, tmp_path, "plain", target_fpr=0.002, injection_share=0.0)

    later = sql_family(shop_lines(400, seed=123), 300, seed=124)
    recall = lambda model: float(model.score(later).is_anomaly.mean())  # noqa: E731
    # Learned without the prior: every payload of the family was seen dozens of times. The few the
    # prior misses hold no mark ("1 UNION SELECT username, password FROM users").
    assert recall(with_prior) >= 0.85 and recall(without) <= 0.2, (recall(with_prior), recall(without))
    fresh = shop_lines(4000, seed=125)
    assert with_prior.score(fresh).is_anomaly.mean() <= 0.005

    prior = with_prior.artifact.metadata["training"]["injection_prior"]
    assert 60 <= prior["records"] <= 93 and prior["share"] == 0.01 and "'" in prior["marks"], prior
    assert set(prior["examples"]) <= set(family)
    assert without.artifact.metadata["training"]["injection_prior"] is None
    shown = logscore("inspect", tmp_path / "prior.onnx").stdout
    assert (f"set aside by the injection prior: {prior['records']} records" in shown
            and "(--injection-share 0.01)" in shown and prior["examples"][0][:60] in shown), shown


def test_a_site_whose_urls_all_carry_a_quote_learns_it(tmp_path):
    def quoted_lines(count: int, seed: int) -> list[str]:
        rng = random.Random(seed)  # a site that passes a quoted JSON filter in every request
        return [access_line(rng, method, f"{url}{'&' if '?' in url else '?'}filter="
                            + quote(f'{{"shop":"{rng.choice(["web", "app"])}"}}'))
                for method, url in (shop_request(rng) for _ in range(count))]

    model, metadata = trained(quoted_lines(3000, seed=130), tmp_path, "quoted", target_fpr=0.002)
    assert metadata["training"]["injection_prior"]["records"] == 0
    assert model.score(quoted_lines(3000, seed=131)).is_anomaly.mean() <= 0.005


def test_the_prior_marks_every_injection_like_key_once_over_many_batches():
    """KeyMarker.observe looks at each new key once, batch after batch (keys merged into those looked
    at, a value's keys named together): the keys it marks are those that naming every key of the
    whole sample at once marks."""
    import numpy as np

    from logscore.features import Featurizer, load_spec
    from logscore.training.prior import InjectionPrior

    normal = shop_lines(600, seed=81)
    lines = normal + [line for _, line in attack_lines(normal, 60, seed=82)]
    random.Random(83).shuffle(lines)
    featurizer = Featurizer(load_spec(None, "access"))
    featurizer.fit(lines)
    prior = InjectionPrior()
    for start in range(0, len(lines), 64):
        prior.observe(featurizer.transform(lines[start: start + 64], dense=False))
    whole = featurizer.transform(lines, dense=False)
    origins = whole.origins.resolve()
    expected = {int(key) for index, key in enumerate(whole.keys.tolist())
                if prior.marks(origins.entries[int(origins.entry_of_key[index])], int(key))}
    assert expected and set(prior.marked_keys().tolist()) == expected
    assert len(prior._looked_at) == len(np.unique(whole.keys)) and (np.diff(prior._looked_at) > 0).all()
