"""Task metrics computed with numpy: accuracy, F1 (positive class 1), Matthews correlation, Pearson, Spearman."""
from __future__ import annotations

import math

import numpy as np

METRICS_BY_TASK = {
    "sst-2": ["accuracy"], "sst2": ["accuracy"],
    "cola": ["matthews"],
    "mrpc": ["f1", "accuracy"],
    "rte": ["accuracy"], "qnli": ["accuracy"],
    "sts-b": ["pearson", "spearman"], "stsb": ["pearson", "spearman"],
}


def _arrays(preds, labels):
    p = np.asarray(preds).reshape(-1)
    y = np.asarray(labels).reshape(-1)
    if p.shape != y.shape:
        raise ValueError(f"predictions ({p.shape[0]}) and labels ({y.shape[0]}) differ in length")
    return p, y


def accuracy(preds, labels) -> float:
    p, y = _arrays(preds, labels)
    return float((p == y).mean()) if p.size else 0.0


def f1(preds, labels) -> float:
    """F1 of the positive class (label 1); 0.0 when there is no true or predicted positive."""
    p, y = _arrays(preds, labels)
    tp = float(((p == 1) & (y == 1)).sum())
    fp = float(((p == 1) & (y != 1)).sum())
    fn = float(((p != 1) & (y == 1)).sum())
    return 2 * tp / (2 * tp + fp + fn) if tp else 0.0


def matthews(preds, labels) -> float:
    """Matthews correlation coefficient (binary labels 0/1); 0.0 when undefined (a constant row/column)."""
    p, y = _arrays(preds, labels)
    tp = float(((p == 1) & (y == 1)).sum())
    tn = float(((p != 1) & (y != 1)).sum())
    fp = float(((p == 1) & (y != 1)).sum())
    fn = float(((p != 1) & (y == 1)).sum())
    denom = math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    return (tp * tn - fp * fn) / denom if denom else 0.0


def pearson(preds, labels) -> float:
    p, y = _arrays(preds, labels)
    p = p.astype(np.float64) - p.mean()
    y = y.astype(np.float64) - y.mean()
    denom = math.sqrt(float((p * p).sum()) * float((y * y).sum()))
    return float((p * y).sum()) / denom if denom else 0.0


def _ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n with ties given their average rank (as scipy.stats.rankdata does)."""
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    ranks = np.empty(len(x), dtype=np.float64)
    i = 0
    while i < len(xs):
        j = i
        while j + 1 < len(xs) and xs[j + 1] == xs[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return ranks


def spearman(preds, labels) -> float:
    p, y = _arrays(preds, labels)
    return pearson(_ranks(p.astype(np.float64)), _ranks(y.astype(np.float64)))


_FUNCS = {"accuracy": accuracy, "f1": f1, "matthews": matthews, "pearson": pearson, "spearman": spearman}


def compute_metrics(names, preds, labels) -> dict[str, float]:
    """{name: value} for each metric name in `names`."""
    out = {}
    for n in names:
        if n not in _FUNCS:
            raise ValueError(f"unknown metric {n!r}; known: {', '.join(_FUNCS)}")
        out[n] = _FUNCS[n](preds, labels)
    return out
