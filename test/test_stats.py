"""torchrl_depeff.stats against rliable (Agarwal et al. 2021) and hand-computed values."""
from __future__ import annotations

import numpy as np
import pytest

from torchrl_depeff.stats import interval_estimate, iqm, poi_interval_estimate, probability_of_improvement

rliable = pytest.importorskip("rliable")
from rliable import library as rly, metrics  # noqa: E402


@pytest.fixture
def scores():
    rng = np.random.default_rng(3)
    return rng.normal(size=(7, 3)) * np.array([1.0, 5.0, 0.1]) + np.array([0.0, 10.0, -2.0])


def test_iqm_matches_rliable_and_trims_outliers(scores):
    assert iqm(scores) == pytest.approx(metrics.aggregate_iqm(scores), abs=1e-12)
    x = np.array([1.0, 2.0, 3.0, 4.0, 1e6, -1e6, 2.5, 3.5])
    assert iqm(x) == pytest.approx(2.75)  # the two outliers are trimmed, the mean is not robust
    assert np.mean(x) != pytest.approx(2.75)


def test_interval_matches_rliable(scores):
    point, low, high = interval_estimate(scores, iqm, reps=4000, seed=0)
    their_point, their_ci = rly.get_interval_estimates({"a": scores}, lambda s: np.array([metrics.aggregate_iqm(s)]),
                                                        reps=4000)
    assert point == pytest.approx(float(their_point["a"][0]), abs=1e-12)
    width = float(their_ci["a"][1, 0] - their_ci["a"][0, 0])
    assert low == pytest.approx(float(their_ci["a"][0, 0]), abs=0.1 * width)
    assert high == pytest.approx(float(their_ci["a"][1, 0]), abs=0.1 * width)
    assert low < point < high


def test_probability_of_improvement_matches_rliable(scores):
    other = scores + np.array([0.3, -1.0, 0.05])
    assert probability_of_improvement(scores, other) == pytest.approx(metrics.probability_of_improvement(scores, other),
                                                                      abs=1e-12)
    assert probability_of_improvement(other, scores) == pytest.approx(1 - probability_of_improvement(scores, other))
    point, low, high = poi_interval_estimate(scores, other, reps=3000, seed=1)
    their_point, their_ci = rly.get_interval_estimates({"x,y": (scores, other)},
                                                        lambda x, y: np.array([metrics.probability_of_improvement(x, y)]),
                                                        reps=3000)
    assert point == pytest.approx(float(their_point["x,y"][0]), abs=1e-12)
    width = float(their_ci["x,y"][1, 0] - their_ci["x,y"][0, 0])
    assert low == pytest.approx(float(their_ci["x,y"][0, 0]), abs=0.15 * width)
    assert high == pytest.approx(float(their_ci["x,y"][1, 0]), abs=0.15 * width)


def test_ties_and_hand_values():
    assert probability_of_improvement([1.0, 1.0], [1.0, 1.0]) == 0.5
    assert probability_of_improvement([[3.0, 0.0], [4.0, 0.0]], [[1.0, 1.0], [3.0, 1.0]]) == pytest.approx((0.875 + 0) / 2)


@pytest.mark.parametrize("bad, match", [([], "non-empty"), ([[np.nan]], "non-finite"), (np.zeros((2, 2, 2)), "runs, tasks")])
def test_bad_scores_named(bad, match):
    with pytest.raises(ValueError, match=match):
        iqm(bad)


def test_mismatched_tasks_and_bad_options():
    with pytest.raises(ValueError, match="same tasks"):
        probability_of_improvement(np.zeros((2, 2)), np.zeros((2, 3)))
    with pytest.raises(ValueError, match="confidence"):
        interval_estimate([1.0, 2.0], confidence=1.5)
    with pytest.raises(ValueError, match="reps"):
        interval_estimate([1.0, 2.0], reps=0)
