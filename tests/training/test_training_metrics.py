import math

import numpy as np
import pytest
from scipy import stats

from reparam.training.metrics import accuracy, compute_metrics, f1, matthews, pearson, spearman


def test_accuracy_and_f1_closed_form():
    y = [1, 1, 1, 0, 0, 0, 1, 0]
    p = [1, 0, 1, 1, 0, 0, 1, 1]
    # tp=3 fn=1 fp=2 tn=2
    assert accuracy(p, y) == 5 / 8
    assert f1(p, y) == pytest.approx(2 * 3 / (2 * 3 + 2 + 1))
    assert f1([0, 0], [0, 0]) == 0.0  # no positives anywhere


def test_matthews_closed_form():
    y = [1, 1, 1, 0, 0, 0, 1, 0]
    p = [1, 0, 1, 1, 0, 0, 1, 1]
    tp, tn, fp, fn = 3, 2, 2, 1
    expect = (tp * tn - fp * fn) / math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    assert matthews(p, y) == pytest.approx(expect)
    assert matthews(y, y) == pytest.approx(1.0)
    assert matthews([1 - v for v in y], y) == pytest.approx(-1.0)
    assert matthews([1] * 8, y) == 0.0  # undefined -> 0, as GLUE reports it


def test_correlations_match_scipy():
    rng = np.random.default_rng(0)
    x = rng.normal(size=200)
    y = 0.6 * x + rng.normal(size=200)
    assert pearson(x, y) == pytest.approx(stats.pearsonr(x, y)[0], abs=1e-12)
    assert spearman(x, y) == pytest.approx(stats.spearmanr(x, y)[0], abs=1e-12)
    # ties: STS-B scores repeat
    xt = np.round(x)
    yt = np.round(y * 2) / 2
    assert spearman(xt, yt) == pytest.approx(stats.spearmanr(xt, yt)[0], abs=1e-12)
    assert pearson([1, 1, 1], [1, 2, 3]) == 0.0


def test_compute_metrics_names():
    out = compute_metrics(["f1", "accuracy"], [1, 0], [1, 1])
    assert out == {"f1": pytest.approx(2 / 3), "accuracy": 0.5}
    with pytest.raises(ValueError, match="unknown metric 'bleu'"):
        compute_metrics(["bleu"], [1], [1])
    with pytest.raises(ValueError, match="differ in length"):
        accuracy([1, 0], [1])
