"""The formulas mergekit documents for its generalized task arithmetic methods, written out independently
(argsort-based trimming, weights before election, weighted disjoint mean), against reparam's kernels on
tie-free data. Not a substitute for parity runs against a real mergekit install."""
import pytest
import torch

from merge_fixtures import make_models
from reparam.merging import merge_state_dicts


def _ref_trim(delta, density, gamma=None):
    if density >= 1:
        return delta
    flat = delta.reshape(-1)
    n = flat.numel()
    order = flat.abs().argsort()  # ascending
    keep = torch.zeros(n)
    if gamma is None:
        keep[order[n - int(density * n):]] = 1
    else:
        n_top = int(gamma * n)
        n_bot = n - int(density * n) - n_top
        if n_bot < 0:
            n_top, n_bot = n_top + n_bot, 0
        keep[order[n_bot:n - n_top]] = 1
    return (flat * keep).reshape(delta.shape)


def _ref_gta(base, models, weights, densities, *, consensus, normalize, lam, gamma=None):
    out = {}
    for k, b in base.items():
        if not b.is_floating_point():
            out[k] = b
            continue
        deltas = torch.stack([_ref_trim(m[k] - b, d, gamma) for m, d in zip(models, densities)])
        w = torch.tensor(weights).reshape(-1, *([1] * b.dim()))
        wd = deltas * w
        if consensus:
            majority = torch.where(wd.sum(0) >= 0, 1.0, -1.0)
            mask = (wd.sign() == majority).float()
            mixed, div = (wd * mask).sum(0), (w * mask).sum(0)
            div[div == 0] = 1
        else:
            mixed, div = wd.sum(0), w.sum(0)
            div[div.abs() < 1e-8] = 1
        if normalize:
            mixed = mixed / div
        out[k] = b + lam * mixed
    return out


@pytest.mark.parametrize("method,consensus,normalize,gamma", [
    ("ties", True, True, None), ("ties", True, False, None), ("task_arithmetic", False, False, None),
    ("breadcrumbs", False, False, 0.2), ("breadcrumbs_ties", True, True, 0.2),
])
def test_matches_mergekit_formulas(method, consensus, normalize, gamma):
    base, ms = make_models(3, seed=9)
    weights, densities = [0.5, 1.0, -0.3], [0.3, 0.6, 1.0]
    params = {"normalize": normalize, "lambda": 0.8}
    mp = {"weight": weights}
    if method != "task_arithmetic":
        mp["density"] = densities
    else:
        densities = [1.0] * 3
    if gamma is not None:
        mp["gamma"] = gamma
    got = merge_state_dicts(method, base, ms, params, mp)
    want = _ref_gta(base, ms, weights, densities, consensus=consensus, normalize=normalize, lam=0.8, gamma=gamma)
    for k in base:
        torch.testing.assert_close(got[k], want[k], atol=1e-6, rtol=0)


def test_linear_matches_mergekit_formula():
    _, ms = make_models(3, seed=2)
    w = [0.2, 0.5, 0.3]
    got = merge_state_dicts("linear", None, ms, {}, {"weight": w})
    for k in ms[0]:
        if ms[0][k].is_floating_point():
            want = sum(wi * m[k] for wi, m in zip(w, ms)) / sum(w)
            torch.testing.assert_close(got[k], want, atol=1e-6, rtol=0)
