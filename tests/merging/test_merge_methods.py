import math

import pytest
import torch

from merge_fixtures import make_models
from reparam.merging import (breadcrumbs_merge, dare_merge, della_merge, linear_merge, merge_state_dicts,
                           model_stock_merge, slerp, slerp_merge, task_arithmetic, ties_merge)
from reparam.merging.errors import MergeConfigError
from reparam.merging.sparsify import magnitude

INT = "model.position_ids"


def _eq(a, b, **kw):
    assert a.keys() == b.keys()
    for k in a:
        if kw:
            torch.testing.assert_close(a[k], b[k], **kw)
        else:
            assert torch.equal(a[k], b[k]), k


def _delta(sd, base):
    return {k: sd[k].float() - base[k].float() for k in base if base[k].is_floating_point()}


# ---- linear ---------------------------------------------------------------------------------------------------
def test_linear_properties():
    base, (a, b) = make_models(2)
    _eq(linear_merge([a, a]), a)
    _eq(linear_merge([a, b], weights=[1, 0]), a)
    uni = linear_merge([a, b])
    for k in a:
        if a[k].is_floating_point():
            assert torch.allclose(uni[k], torch.stack([a[k], b[k]]).mean(0), atol=1e-7)
    _eq(linear_merge([a, b], weights=[0.3, 0.7]), linear_merge([a, b], weights=[3.0, 7.0]), atol=1e-6, rtol=0)
    with pytest.raises(MergeConfigError, match="sum to 0"):
        linear_merge([a, b], weights=[1, -1])
    assert torch.equal(uni[INT], a[INT])


# ---- task arithmetic ------------------------------------------------------------------------------------------
def test_task_arithmetic_properties():
    base, (a, b) = make_models(2)
    _eq(task_arithmetic(base, [a, b], lambda_=0.0), base)
    _eq(task_arithmetic(base, [a]), a, atol=1e-6, rtol=0)
    one = task_arithmetic(base, [a, b])
    half = task_arithmetic(base, [a, b], lambda_=0.5)
    da, db = _delta(a, base), _delta(b, base)
    for k in da:
        assert torch.allclose(one[k] - base[k], da[k] + db[k], atol=1e-6)
        assert torch.allclose(half[k] - base[k], 0.5 * (one[k] - base[k]), atol=1e-6)
    # negation round trip: (a + b) - b == a
    _eq(task_arithmetic(base, [a, b, b], weights=[1, 1, -1]), a, atol=1e-6, rtol=0)
    _eq(task_arithmetic(base, [b, a]), one, atol=1e-6, rtol=0)


# ---- TIES -----------------------------------------------------------------------------------------------------
def _vec_models(*vs):
    base = {"w": torch.zeros(len(vs[0]))}
    return base, [{"w": torch.tensor(v)} for v in vs]


def test_ties_hand_example():
    base, ms = _vec_models([3.0, -1.0, 0.5, 0.0], [-2.0, -2.0, 1.0, 0.0])
    assert ties_merge(base, ms)["w"].tolist() == [3.0, -1.5, 0.75, 0.0]
    assert ties_merge(base, ms, normalize=False)["w"].tolist() == [3.0, -3.0, 1.5, 0.0]


def test_ties_reduces_to_task_arithmetic():
    base, (a, b, c) = make_models(3)
    _eq(ties_merge(base, [a], density=1.0), task_arithmetic(base, [a]))
    _eq(ties_merge(base, [a], density=1.0), a, atol=1e-6, rtol=0)
    # identical copies: mean gives theta_0 + trim(tau), sum gives N times that
    once = ties_merge(base, [a], density=0.3)
    _eq(ties_merge(base, [a, a, a], density=0.3), once)
    tri = ties_merge(base, [a, a, a], density=0.3, normalize=False)
    for k in _delta(a, base):
        assert torch.allclose(tri[k] - base[k], 3 * (once[k] - base[k]), atol=1e-6)


@pytest.mark.parametrize("scope", ["tensor", "global"])
def test_ties_sign_and_permutation(scope):
    base, ms = make_models(3, seed=3)
    out = ties_merge(base, ms, density=0.4, scope=scope)
    _eq(ties_merge(base, ms[::-1], density=0.4, scope=scope), out, atol=1e-7, rtol=0)
    for k, dm in _delta(out, base).items():
        taus = torch.stack([_delta(m, base)[k] for m in ms])
        assert (dm.abs() <= taus.abs().amax(0) + 1e-6).all()
        if scope == "tensor":
            trimmed = torch.stack([magnitude(t, 0.4) for t in taus])
            gamma = torch.where(trimmed.sum(0) >= 0, 1.0, -1.0)
            assert ((dm == 0) | (dm.sign() == gamma)).all()
            assert ((dm != 0) == ((trimmed.sign() == gamma).any(0))).all()


def test_ties_global_trims_whole_model():
    base, (a,) = make_models(1, seed=4)
    out = ties_merge(base, [a], density=0.25, scope="global", topk_mode="exact")
    da, do = _delta(a, base), _delta(out, base)
    total = sum(v.numel() for v in da.values())
    kept = sum(int((v != 0).sum()) for v in do.values())
    assert kept == int(0.25 * total)
    thr = ties_merge(base, [a], density=0.25, scope="global", topk_mode="threshold")
    assert sum(int((v != 0).sum()) for v in _delta(thr, base).values()) == int(0.25 * total) + 1
    smallest_kept = min(v[v != 0].abs().min() for v in do.values() if (v != 0).any())
    largest_dropped = max(da[k][do[k] == 0].abs().max() for k in da if (do[k] == 0).any())
    assert smallest_kept >= largest_dropped


# ---- DARE -----------------------------------------------------------------------------------------------------
def test_dare_properties():
    base, (a, b) = make_models(2)
    _eq(dare_merge(base, [a, b], density=1.0), task_arithmetic(base, [a, b]))
    _eq(dare_merge(base, [a, b], density=1.0, ties=True), ties_merge(base, [a, b], density=1.0, normalize=False))
    r1 = dare_merge(base, [a, b], density=0.5, seed=3)
    _eq(dare_merge(base, [a, b], density=0.5, seed=3), r1)
    r2 = dare_merge(base, [a, b], density=0.5, seed=4)
    assert any(not torch.equal(r1[k], r2[k]) for k in r1 if r1[k].is_floating_point())
    assert torch.equal(r1[INT], base[INT])
    # excluded keys are copied from the base
    ex = dare_merge(base, [a, b], density=0.5, exclude=["lm_head"])
    assert torch.equal(ex["lm_head.weight"], base["lm_head.weight"])


def test_dare_single_model_expectation():
    base = {"w": torch.zeros(4)}
    model = {"w": torch.tensor([1.0, -2.0, 0.5, 3.0])}
    outs = torch.stack([dare_merge(base, [model], density=0.5, seed=s)["w"] for s in range(2000)])
    assert torch.allclose(outs.mean(0), model["w"], atol=5 * 3 * math.sqrt(1 / 2000))


# ---- Breadcrumbs / DELLA ---------------------------------------------------------------------------------------
def test_breadcrumbs_and_della():
    base, (a, b) = make_models(2)
    _eq(breadcrumbs_merge(base, [a, b], density=1.0), task_arithmetic(base, [a, b]))
    out = breadcrumbs_merge(base, [a], density=0.5, gamma=0.1)
    for k, d in _delta(out, base).items():
        n = d.numel()
        assert int((d != 0).sum()) == int(0.5 * n)
    bt = breadcrumbs_merge(base, [a, b], density=0.7, ties=True)
    assert bt.keys() == base.keys()
    _eq(della_merge(base, [a, b], density=1.0), ties_merge(base, [a, b], density=1.0))
    _eq(della_merge(base, [a, b], density=1.0, linear=True), task_arithmetic(base, [a, b]))
    d1 = della_merge(base, [a, b], density=0.5, epsilon=0.1, seed=1)
    _eq(della_merge(base, [a, b], density=0.5, epsilon=0.1, seed=1), d1)
    with pytest.raises(MergeConfigError, match="epsilon"):
        della_merge(base, [a, b], density=0.9, epsilon=0.15)


# ---- SLERP ----------------------------------------------------------------------------------------------------
def test_slerp_properties():
    base, (a,) = make_models(1)
    _eq(slerp_merge(base, a, t=0.0), base, atol=1e-6, rtol=0)
    _eq(slerp_merge(base, a, t=1.0), a, atol=1e-6, rtol=0)
    _eq(slerp_merge(a, a, t=0.3), a, atol=1e-6, rtol=0)
    v0 = torch.tensor([1.0, 0.0])
    v1 = torch.tensor([0.0, 1.0])
    for t in (0.1, 0.5, 0.8):
        assert abs(slerp(t, v0, v1).norm().item() - 1) < 1e-6
    assert torch.allclose(slerp(0.5, v0, v1), (v0 + v1) / math.sqrt(2))
    assert torch.allclose(slerp(0.25, v0, 2 * v0), (0.75 + 0.5) * v0)  # parallel: lerp
    with pytest.raises(MergeConfigError, match="'t' is required"):
        merge_state_dicts("slerp", base, [a], {}, {})


def test_slerp_gradient_and_filter():
    base, (a,) = make_models(1)
    out = slerp_merge(base, a, t=[0.0, 1.0])  # layer 0 -> t=0, layer 1 -> t=1
    assert torch.allclose(out["model.layers.0.mlp.weight"], base["model.layers.0.mlp.weight"], atol=1e-6)
    assert torch.allclose(out["model.layers.1.mlp.weight"], a["model.layers.1.mlp.weight"], atol=1e-6)
    out = slerp_merge(base, a, t=[{"filter": "mlp", "value": 1.0}, {"value": 0.0}])
    assert torch.allclose(out["model.layers.0.mlp.bias"], a["model.layers.0.mlp.bias"], atol=1e-6)
    assert torch.allclose(out["lm_head.weight"], base["lm_head.weight"], atol=1e-6)


# ---- Model Stock ----------------------------------------------------------------------------------------------
def test_model_stock_properties():
    base = {"w": torch.zeros(4)}
    same = {"w": torch.tensor([1.0, 2.0, 0.0, 0.0])}
    assert torch.allclose(model_stock_merge(base, [same, same])["w"], same["w"])
    ortho = [{"w": torch.tensor([1.0, 0.0, 0.0, 0.0])}, {"w": torch.tensor([0.0, 1.0, 0.0, 0.0])}]
    assert torch.allclose(model_stock_merge(base, ortho)["w"], base["w"])
    # cos = 0.5 -> t = 2/3
    m1 = {"w": torch.tensor([1.0, 0.0, 0.0, 0.0])}
    m2 = {"w": torch.tensor([0.5, math.sqrt(3) / 2, 0.0, 0.0])}
    avg = (m1["w"] + m2["w"]) / 2
    assert torch.allclose(model_stock_merge(base, [m1, m2])["w"], 2 / 3 * avg, atol=1e-6)
    b, ms = make_models(3)
    _eq(model_stock_merge(b, ms), model_stock_merge(b, ms[::-1]), atol=1e-6, rtol=0)
    fw = model_stock_merge(b, ms, filter_wise=True)
    assert fw.keys() == b.keys()
    with pytest.raises(MergeConfigError, match="at least 2"):
        model_stock_merge(b, ms[:1])


# ---- common properties ----------------------------------------------------------------------------------------
CASES = [
    ("linear", None, {}, {}), ("task_arithmetic", "b", {"lambda": 0.7}, {}),
    ("ties", "b", {}, {"density": 0.5}), ("dare_linear", "b", {}, {"density": 0.5}),
    ("dare_ties", "b", {}, {"density": 0.5}), ("breadcrumbs", "b", {}, {"density": 0.5}),
    ("breadcrumbs_ties", "b", {}, {"density": 0.5}), ("della", "b", {}, {"density": 0.5}),
    ("della_linear", "b", {}, {"density": 0.5}), ("model_stock", "b", {}, {}),
]


@pytest.mark.parametrize("method,has_base,params,mparams", CASES)
def test_common_properties(method, has_base, params, mparams):
    base, ms = make_models(3, seed=5, dtype=torch.bfloat16)
    out = merge_state_dicts(method, base if has_base else None, ms, params, mparams, seed=1)
    assert out.keys() == base.keys()
    for k in base:
        assert out[k].shape == base[k].shape and out[k].dtype == base[k].dtype
    assert torch.equal(out[INT], base[INT])
    if method not in ("dare_linear", "dare_ties", "della", "della_linear"):  # masks are per model index
        perm = merge_state_dicts(method, base if has_base else None, ms[::-1], params, mparams, seed=1)
        for k in base:
            torch.testing.assert_close(perm[k].float(), out[k].float(), atol=1e-2, rtol=1e-2)


def test_unknown_parameter_names_valid_ones():
    base, ms = make_models(2)
    with pytest.raises(MergeConfigError, match=r"'densty'.*valid: density, weight"):
        merge_state_dicts("ties", base, ms, {}, {"densty": 0.5})
    with pytest.raises(MergeConfigError, match="unknown merge_method 'tie'.*ties"):
        merge_state_dicts("tie", base, ms)
