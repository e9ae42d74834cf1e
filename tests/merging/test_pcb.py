"""PCB-merging (specs/merge/pcb.md): closed forms, spec properties 1-5, streaming == in memory, validation."""
import math

import pytest
import torch
import yaml
from safetensors.torch import load_file

from merge_fixtures import make_models, save_model
from reparam.merging import merge_models, merge_state_dicts
from reparam.merging.errors import MergeConfigError
from reparam.merging.methods.pcb import balance, clip_positions, drop_weights, pcb_merge
from reparam.merging import pcb_components, pcb_search
from reparam.merging.methods.pcb_search import cma_es
from reparam.merging.threshold import StreamingOrderStats, kth_smallest


def reference_pcb(T, r, eps, lam=1.0, lam_i=None, inter="raw"):
    """The spec's pseudo-code in plain Python floats over rows T (lists): the merged delta (a list)."""
    n, d = len(T), len(T[0])

    def minmax(row):  # None for a constant row (spec pitfall: weight 0 for the whole row)
        lo_, hi_ = min(row), max(row)
        return None if hi_ == lo_ else [(x - lo_) / (hi_ - lo_) for x in row]

    A = [[abs(x) for x in row] for row in T]
    lo = [sorted(a)[int(d * eps)] for a in A]
    hi = [sorted(a)[int(d * (1 - eps)) - 1] for a in A]
    Ac = [[min(max(x, lo[i]), hi[i]) for x in A[i]] for i in range(n)]
    Tc = [[math.copysign(a, t) if t != 0 else 0.0 for a, t in zip(Ac[i], T[i])] for i in range(n)]
    M = [minmax(a) for a in Ac]
    total = [sum(T[j][c] for j in range(n)) for c in range(d)]
    signed = [sum(math.copysign(M[j][c], T[j][c]) if M[j] and T[j][c] != 0 else 0.0 for j in range(n))
              for c in range(d)]
    S = []
    for i in range(n):
        if M[i] is None:
            S.append([0.0] * d)
            continue
        other = total if inter == "raw" else signed
        beta = [math.exp(n * M[i][c] ** 2) * math.tanh(T[i][c] * other[c]) for c in range(d)]
        q = sorted(beta)[int(d * (1 - r))]
        S.append(minmax([max(b, q) for b in beta]) or [0.0] * d)
    w = lam_i or [1.0] * n
    out = []
    for c in range(d):
        num = sum(w[i] * S[i][c] * Tc[i][c] for i in range(n))
        out.append(num / max(sum(S[i][c] for i in range(n)), 1e-12) * (lam if lam_i is None else 1.0))
    return out


def _flat(sd, keys):
    return torch.cat([sd[k].reshape(-1) for k in keys])


def _rows(base, models, keys):
    b = _flat(base, keys).double()
    return [(_flat(m, keys).double() - b).tolist() for m in models]


def _toy(n, sizes=((3, 4), (5,)), seed=0, scale=0.5, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    base = {f"layers.{j}.w": torch.randn(s, generator=g, dtype=dtype) for j, s in enumerate(sizes)}
    models = [{k: v + scale * torch.randn(v.shape, generator=g, dtype=dtype) for k, v in base.items()}
              for _ in range(n)]
    return base, models


def test_single_model_by_hand():
    # N = 1, eps_clip 0: lo = 0, hi = 0.4, minmax(A) = [.25, 1, .5, 0], beta_c = exp(m_c^2) tanh(tau_c^2)
    # = [0.0106, 0.431, 0.0513, 0]; q = 3rd smallest = 0.0513: only coordinate 1 has s > 0 (s = 1).
    base = {"w": torch.zeros(4)}
    tau = torch.tensor([0.1, -0.4, 0.2, 0.0])
    out = pcb_merge(base, [{"w": tau}], pcb_ratio=0.5, eps_clip=0.0, lambda_=1.5)
    assert torch.equal(out["w"], torch.tensor([0.0, -0.6, 0.0, 0.0]))


@pytest.mark.parametrize("inter", ["raw", "normalized"])
@pytest.mark.parametrize("r,eps", [(0.3, 0.1), (0.5, 0.0), (1.0, 0.05)])
def test_global_closed_form(inter, r, eps):
    base, models = _toy(3, seed=1)
    keys = sorted(base)
    want = reference_pcb(_rows(base, models, keys), r, eps, lam=0.8, inter=inter)
    out = pcb_merge(base, models, pcb_ratio=r, eps_clip=eps, lambda_=0.8, inter=inter)
    got = (_flat(out, keys) - _flat(base, keys)).tolist()
    assert got == pytest.approx(want, abs=1e-12)
    assert sum(x != 0 for x in want) > 0


def test_tensor_scope_and_per_task_lambdas_closed_form():
    base, models = _toy(3, sizes=((4, 5), (7,)), seed=2)
    lam_i = [1.2, 0.5, 2.0]
    out = pcb_merge(base, models, pcb_ratio=0.4, eps_clip=0.1, lambda_per_task=lam_i, scope="tensor")
    for k in base:
        want = reference_pcb(_rows(base, models, [k]), 0.4, 0.1, lam_i=lam_i)
        assert (out[k] - base[k]).reshape(-1).tolist() == pytest.approx(want, abs=1e-12), k


def test_many_models_use_float64():
    # exp(61 * 1) = 3e26 is fine in float32, but the spec asks for float64 above 60 models (overflow near 88);
    # with 90 models float32 would give inf * 0 = nan.
    base, models = _toy(90, sizes=((6,), (4,)), seed=3, dtype=torch.float32)
    keys = sorted(base)
    out = pcb_merge(base, models, pcb_ratio=0.5, eps_clip=0.0)
    assert all(torch.isfinite(v).all() for v in out.values())
    got = (_flat(out, keys).double() - _flat(base, keys).double()).tolist()
    assert got == pytest.approx(reference_pcb(_rows(base, models, keys), 0.5, 0.0), abs=1e-6)


def test_identical_models_keep_all_but_the_minimum():
    # property 1 (and "one model with itself"): copies of theta_1 give tau_c_1 where s > 0, 0 elsewhere;
    # with r = 1 and eps_clip = 0 only the minimum-beta coordinate(s) differ from theta_1.
    base, models = make_models(1, seed=4)
    keys = [k for k in sorted(base) if base[k].is_floating_point()]
    theta0, theta1 = _flat(base, keys), _flat(models[0], keys)
    for n in (1, 2, 3):
        out = pcb_merge(base, [models[0]] * n, pcb_ratio=1.0, eps_clip=0.0)
        merged = _flat(out, keys)
        dropped = merged == theta0
        assert int(dropped.sum()) == 1  # one minimum on random data
        assert torch.allclose(merged[~dropped], theta1[~dropped], rtol=0, atol=1e-6)  # s tau / s: rounding only
        assert torch.equal(out["model.position_ids"], base["model.position_ids"])
    sparse = pcb_merge(base, [models[0]] * 2, pcb_ratio=0.1, eps_clip=0.0)
    kept = _flat(sparse, keys) != _flat(base, keys)
    d = kept.numel()
    assert 0 < int(kept.sum()) <= d - int(d * 0.9)
    assert torch.allclose(_flat(sparse, keys)[kept], _flat(models[0], keys)[kept], rtol=0, atol=1e-6)


def _clipped(T, eps):
    d = T.shape[1]
    i_lo, i_hi = clip_positions(d, eps)
    srt = T.abs().sort(dim=1).values
    return srt[:, i_lo:i_lo + 1], srt[:, i_hi:i_hi + 1]


def test_clipping_weights_and_sign_conflicts():
    g = torch.Generator().manual_seed(5)
    T = torch.randn(4, 2000, generator=g, dtype=torch.float64) * 1e-2
    T[:, :50] = 0.0  # zeros stay zero
    r, eps = 0.3, 0.01
    lo, hi = _clipped(T, eps)
    Tc, beta = balance(T, lo, hi, "raw")
    # property 5: |tau_c| in [lo, hi] on non-zero entries, signs kept
    nz = T != 0
    assert torch.equal(Tc.sign(), T.sign())
    assert bool(((Tc.abs() >= lo) & (Tc.abs() <= hi))[nz].all())
    d = T.shape[1]
    q = beta.sort(dim=1).values[:, int(d * (1 - r))][:, None]
    s = drop_weights(beta, q, beta.amax(1, keepdim=True), hi > lo)
    # property 3: 0 <= s <= 1, max 1 per row, at most d - floor(d (1 - r)) non-zero
    assert bool((s >= 0).all() and (s <= 1).all())
    assert torch.equal(s.amax(1), torch.ones(4, dtype=s.dtype))
    assert bool(((s > 0).sum(1) <= d - int(d * (1 - r))).all())
    # property 4: at least r*d positive betas per row -> every sign conflict with sum_j tau_j gets s = 0
    assert bool(((beta > 0).sum(1) >= r * d).all())
    conflict = T * T.sum(0, keepdim=True) < 0
    assert int(conflict.sum()) > 100 and not bool(s[conflict].any())
    # zeros of tau: beta = exp(0) * tanh(0) = 0
    assert not bool(beta[~nz].any())


def test_convex_combination():
    # property 2: with lambda_i = 1, merged coordinates with sum_i s_i > 0 lie in [min_i tau_c_i, max_i tau_c_i]
    base, models = _toy(4, sizes=((40, 25),), seed=6, scale=1e-2)
    k = "layers.0.w"
    out = pcb_merge(base, models, pcb_ratio=0.5, eps_clip=0.02, lambda_per_task=[1.0] * 4)
    T = torch.stack([(m[k] - base[k]).reshape(-1) for m in models])
    lo, hi = _clipped(T, 0.02)
    Tc = T.sign() * T.abs().clamp(lo, hi)
    merged = (out[k] - base[k]).reshape(-1)
    live = merged != 0
    assert int(live.sum()) > 500
    tol = 1e-15
    assert bool((merged[live] >= Tc.amin(0)[live] - tol).all() and (merged[live] <= Tc.amax(0)[live] + tol).all())


@pytest.mark.filterwarnings("ignore:pcb")  # tensor scope: small tensors keep nothing at r = 0.1
def test_permutation_invariance():
    base, models = make_models(3, seed=7)
    for scope in ("global", "tensor"):
        want = pcb_merge(base, models, pcb_ratio=0.2, eps_clip=0.01, scope=scope)
        for perm in ((2, 0, 1), (1, 2, 0)):
            got = pcb_merge(base, [models[i] for i in perm], pcb_ratio=0.2, eps_clip=0.01, scope=scope)
            for k in want:
                assert torch.allclose(got[k], want[k], rtol=0, atol=1e-6), (scope, k)
        two = pcb_merge(base, models[:2], scope=scope)
        swapped = pcb_merge(base, models[1::-1], scope=scope)
        assert all(torch.equal(two[k], swapped[k]) for k in two)  # two-term sums commute exactly


def test_model_equal_to_base_gets_weight_zero():
    base, models = _toy(3, seed=8)
    models[1] = {k: v.clone() for k, v in base.items()}
    keys = sorted(base)
    with pytest.warns(UserWarning, match=r"whole model: no entry kept for model\(s\) \[1\]"):
        out = pcb_merge(base, models, pcb_ratio=0.5, eps_clip=0.0)
    got = (_flat(out, keys) - _flat(base, keys)).tolist()
    assert got == pytest.approx(reference_pcb(_rows(base, models, keys), 0.5, 0.0), abs=1e-12)


def test_order_stats_signed_and_float64_match_kthvalue():
    g = torch.Generator().manual_seed(9)
    for dtype in (torch.float32, torch.float64):
        chunks = [torch.randn(700, generator=g, dtype=dtype) * 1e-3, torch.zeros(40, dtype=dtype),
                  -torch.zeros(30, dtype=dtype), torch.full((25,), -0.5, dtype=dtype),
                  torch.randn(300, generator=g, dtype=dtype) * 1e3]
        total = sum(c.numel() for c in chunks)
        ranks = [1, 2, 300, 380, 400, 420, 700, 701, total - 1, total]
        sel = StreamingOrderStats(ranks, dtype)
        for _ in range(sel.passes):
            for c in chunks:
                sel.feed(c)
            sel.next_pass()
        assert sel.passes == (4 if dtype == torch.float64 else 2)
        want = [kth_smallest(torch.cat(chunks), k) for k in ranks]
        got = sel.values()
        assert got == want and [math.copysign(1, x) for x in got] == [math.copysign(1, x) for x in want]


def _config(bpath, paths, params, model_params=None):
    return {"merge_method": "pcb", "base_model": str(bpath), "parameters": params,
            "models": [{"model": str(p), "parameters": dict(model_params or {})} for p in paths]}


@pytest.mark.filterwarnings("ignore:pcb")  # tensor scope: the 1-element logit_scale keeps nothing
@pytest.mark.parametrize("params", [{}, {"scope": "tensor", "pcb_ratio": 0.3},
                                    {"inter": "normalized", "eps_clip": 0.01, "lambda": 1.3}])
def test_yaml_streaming_equals_in_memory(tmp_path, models_on_disk, params):
    base, models, bpath, paths = models_on_disk
    yml = tmp_path / "merge.yml"
    yml.write_text(yaml.safe_dump(_config(bpath, paths, params)))
    out = merge_models(yml, tmp_path / "out", progress=False, max_shard_size=600)
    got = {}
    for f in sorted(out.glob("*.safetensors")):
        got.update(load_file(str(f)))
    want = merge_state_dicts("pcb", base, models, params)
    assert got.keys() == want.keys()
    for k in want:
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k
    assert not torch.equal(got["lm_head.weight"], base["lm_head.weight"])


def test_streaming_equals_in_memory_float64_1e5(tmp_path):
    # property 5: the multi-sweep global statistics equal the in-memory ones bit for bit (float64: 4 sweeps)
    base, models = _toy(3, sizes=((250, 200), (200, 249), (200,)), seed=10, scale=1e-3)
    bpath = save_model(base, tmp_path / "base", shards=2)
    paths = [save_model(m, tmp_path / f"m{i}") for i, m in enumerate(models)]
    params = {"pcb_ratio": 0.1, "eps_clip": 0.01}
    out = merge_models(_config(bpath, paths, params), tmp_path / "out", progress=False)
    got = load_file(str(out / "model.safetensors"))
    want = merge_state_dicts("pcb", base, models, params)
    assert sum(v.numel() for v in want.values()) >= 1e5
    assert all(got[k].dtype == torch.float64 and torch.equal(got[k], want[k]) for k in want)


@pytest.mark.parametrize("params,model_params,match", [
    ({"density": 0.5}, {}, r"unknown parameter\(s\) 'density'; valid: eps_clip, inter, lambda, pcb_ratio, scope"),
    ({}, {"density": 0.5}, r"model .*unknown parameter\(s\) 'density'; valid: weight"),
    ({"pcb_ratio": 0.0}, {}, r"pcb_ratio .* must be in \(0, 1\], got 0.0"),
    ({"pcb_ratio": 1.5}, {}, r"pcb_ratio .* must be in \(0, 1\]"),
    ({"pcb_ratio": "all"}, {}, r"pcb_ratio must be a number, got 'all'"),
    ({"eps_clip": 0.5}, {}, r"eps_clip .* must be in \[0, 0.5\), got 0.5"),
    ({"inter": "softmax"}, {}, r"inter must be one of 'raw', 'normalized', got 'softmax'"),
    ({"scope": "layer"}, {}, r"scope must be one of 'global', 'tensor', got 'layer'"),
    ({"lambda": 2.0}, {"weight": 1.2}, r"either the global 'lambda' or per-model 'weight'"),
    ({"pcb_ratio": [0.1, 0.3]}, {}, r"pcb scope 'global' needs one pcb_ratio for the whole model: tensor "),
])
def test_parameter_errors(params, model_params, match):
    base, models = make_models(2, seed=11)
    with pytest.raises(MergeConfigError, match=match):
        merge_state_dicts("pcb", base, models, params, model_params)


def test_needs_base_and_errors_before_writing(tmp_path, models_on_disk):
    base, models, bpath, paths = models_on_disk
    with pytest.raises(MergeConfigError, match="'pcb' needs a base_model"):
        merge_state_dicts("pcb", None, models)
    cfg = _config(bpath, paths, {"inter": "nope"})
    with pytest.raises(MergeConfigError, match="tensor 'lm_head.weight'.*inter must be one of"):
        merge_models(cfg, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_es_components_equal_pcb_merge_and_search_recovers_lambdas():
    base, models = make_models(3, seed=12)
    params = {"pcb_ratio": 0.3, "eps_clip": 0.01}
    parts = pcb_components(base, models, params)
    lam_star = [0.9, 1.2, 1.05]
    target = pcb_merge(base, models, pcb_ratio=0.3, eps_clip=0.01, lambda_per_task=lam_star)
    got = parts.merge(lam_star)
    assert got.keys() == target.keys() and all(torch.equal(got[k], target[k]) for k in target)
    single = pcb_merge(base, models, pcb_ratio=0.3, eps_clip=0.01, lambda_=1.4)
    assert all(torch.equal(parts.merge(lambda_=1.4)[k], single[k]) for k in single)
    keys = [k for k in base if base[k].is_floating_point()]
    seen = []

    def evaluate(sd):  # a stand-in validation metric: closeness to the lambda* merge
        seen.append(sd)
        return -sum(float(((sd[k] - target[k]) ** 2).sum()) for k in keys)

    res = pcb_search(base, models, evaluate, params=params, budget=120, seed=1)
    assert len(res.history) == len(seen) == 120
    assert res.lambdas == pytest.approx(lam_star, abs=0.02)
    assert all(0.8 <= x <= 1.3 for x, _ in res.history for x in x)
    again = pcb_search(base, models, evaluate, params=params, budget=120, seed=1)
    assert again.lambdas == res.lambdas  # seeded


def test_cma_es_box_and_budget():
    # maximum of -(x - c)^2 outside the box in dimension 0: the search ends on that bound (clipping)
    c = [2.0, 0.3]
    hist = cma_es(lambda x: -sum((a - b) ** 2 for a, b in zip(x, c)), [0.0, 0.0], -1.0, 1.0, budget=151)
    assert len(hist) == 151
    best = max(hist, key=lambda h: h[1])[0]
    assert best[0] == 1.0 and best[1] == pytest.approx(0.3, abs=1e-3)


def test_es_errors():
    base, models = make_models(2, seed=13)
    with pytest.raises(MergeConfigError, match="bounds must satisfy lower < upper"):
        pcb_search(base, models, lambda sd: 0.0, bounds=(1.3, 0.8))
    with pytest.raises(MergeConfigError, match="init has 3 values for 2 models"):
        pcb_search(base, models, lambda sd: 0.0, init=[1.0, 1.0, 1.0])
    with pytest.raises(MergeConfigError, match="optimizer must be 'cma' or 'ngopt'"):
        pcb_search(base, models, lambda sd: 0.0, optimizer="adam")
    with pytest.raises(MergeConfigError, match="got 1 lambdas for 2 models"):
        pcb_components(base, models).merge([1.0])
    try:
        import nevergrad  # noqa: F401
    except ImportError:
        with pytest.raises(MergeConfigError, match="'ngopt' needs the nevergrad package"):
            pcb_search(base, models, lambda sd: 0.0, optimizer="ngopt", budget=2)
