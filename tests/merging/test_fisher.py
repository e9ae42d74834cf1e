"""Fisher-weighted averaging (spec fisher.md): the unit-test properties, closed forms, the sidecar plumbing of the
engine (header validation, streaming == in memory) and the parameter errors."""
import math

import pytest
import torch
from safetensors.torch import save_file

from merge_fixtures import make_models, save_model
from reparam.merging import MergeConfigError, MergeValidationError, fisher_merge, linear_merge, merge_models
from reparam.merging.io import SafetensorsSource

def float_keys(sd):
    return sorted(k for k, v in sd.items() if v.is_floating_point())


def random_fishers(models, seed=0, lo=1e-3):
    """Positive Fishers well above the floor, of very different scales per model."""
    g = torch.Generator().manual_seed(seed)
    return [{k: (torch.rand(m[k].shape, generator=g) + lo) * 10.0 ** (i - 1) for k in float_keys(m)}
            for i, m in enumerate(models)]


@pytest.fixture
def three():
    _, models = make_models(3, seed=3)
    return models, random_fishers(models)


def close(a, b, rtol=1e-6, atol=1e-6):
    return torch.allclose(a.double(), b.double(), rtol=rtol, atol=atol)


# --- spec unit-test properties -----------------------------------------------------------------------------------

def test_isotropic_is_the_weighted_average(three):
    models, _ = three
    ones = [{k: torch.ones(m[k].shape) for k in float_keys(m)} for m in models]
    weighted = fisher_merge(models, ones, weights=[1.0, 2.0, 3.0], normalize=False)
    assert all(torch.equal(weighted[k], v) for k, v in linear_merge(models, weights=[1.0, 2.0, 3.0]).items())
    plain = fisher_merge(models, ones, normalize=False)
    for k in float_keys(models[0]):
        assert close(plain[k], torch.stack([m[k] for m in models]).mean(0))


@pytest.mark.parametrize("normalize,favor_target", [(True, True), (False, True), (True, False), (False, False)])
def test_self_merge_returns_the_model(three, normalize, favor_target):
    models, fishers = three
    out = fisher_merge([models[0]] * 3, fishers, weights=[0.2, 1.0, 5.0], normalize=normalize,
                       favor_target=favor_target)
    assert all(close(out[k], models[0][k]) for k in models[0])


def test_target_fallback_when_the_other_fisher_is_zero(three):
    models, fishers = three
    zero = {k: torch.zeros_like(v) for k, v in fishers[1].items()}
    with pytest.warns(UserWarning, match=r"fisher\[model\[1\]\]: all merged coordinates are below the floor"):
        out = fisher_merge(models[:2], [fishers[0], zero], normalize=False)
    assert all(close(out[k], models[0][k]) for k in models[0])
    # every Fisher 0 (parameters the loss never uses): the target wins; without favor_target, the weighted average
    zeros = [{k: torch.zeros_like(v) for k, v in f.items()} for f in fishers[:2]]
    with pytest.warns(UserWarning):
        out = fisher_merge(models[:2], zeros, normalize=False)
        avg = fisher_merge(models[:2], zeros, weights=[1.0, 3.0], normalize=False, favor_target=False)
    assert all(close(v, models[0][k]) for k, v in out.items())
    assert all(close(avg[k], (models[0][k] + 3 * models[1][k]) / 4) for k in float_keys(models[0]))
    # normalised: zero on one tensor only -> the target's values there
    part = dict(fishers[1], **{"model.layers.0.mlp.weight": torch.zeros(8, 8)})
    out = fisher_merge(models[:2], [fishers[0], part])
    assert close(out["model.layers.0.mlp.weight"], models[0]["model.layers.0.mlp.weight"])
    assert not close(out["model.layers.1.mlp.weight"], models[0]["model.layers.1.mlp.weight"])


def test_normalised_merge_is_scale_invariant(three):
    models, fishers = three
    ref = fisher_merge(models, fishers)
    scaled = [{k: v * c for k, v in f.items()} for f, c in zip(fishers, (7.0, 0.5, 300.0))]
    out = fisher_merge(models, scaled)
    assert all(close(out[k], ref[k], rtol=1e-5) for k in ref)
    unnormalised = fisher_merge(models, scaled, normalize=False)
    assert not close(unnormalised["lm_head.weight"], ref["lm_head.weight"], rtol=1e-3)


def _reference(models, fishers, weights, normalize, floor, favor_target, epsilon):
    """The spec's pseudo-code, in float64, over all float keys."""
    keys = float_keys(models[0])
    coeffs = list(weights)
    if normalize:
        norms = [math.sqrt(sum(float((f[k].double() ** 2).sum()) for k in keys)) for f in fishers]
        coeffs = [c / (n + epsilon) for c, n in zip(coeffs, norms)]
    out = {}
    for k in keys:
        num = den = 0
        for i, (m, f) in enumerate(zip(models, fishers)):
            fk = f[k].double() + epsilon
            if i == 0 or not favor_target:
                fk = fk.clamp(min=floor)
            num = num + coeffs[i] * fk * m[k].double()
            den = den + coeffs[i] * fk
        out[k] = num / den
    return out


def test_closed_form_on_two_coordinates():
    a, b = {"w": torch.tensor([1.0, 2.0])}, {"w": torch.tensor([3.0, 6.0])}
    fa, fb = {"w": torch.tensor([1.0, 0.0])}, {"w": torch.tensor([3.0, 1e-9])}
    out = fisher_merge([a, b], [fa, fb], normalize=False)["w"]
    # coordinate 0: (1*1 + 3*3) / (1 + 3); coordinate 1: the target's Fisher is floored to 1e-6
    assert out[0].item() == pytest.approx(2.5, rel=1e-7)
    assert out[1].item() == pytest.approx((1e-6 * 2 + 1e-9 * 6) / (1e-6 + 1e-9), rel=1e-6)
    # normalised: c_a = 1/||F_a|| = 1, c_b = 1/||F_b|| = 1/3 -> coordinate 0 = (1 + 3) / (1 + 1) = 2
    assert fisher_merge([a, b], [fa, fb])["w"][0].item() == pytest.approx(2.0, rel=1e-7)
    # MergeLM variant: eps added to each Fisher and to each norm. c = 1/(1e-6 + eps), 1/(3e-6 + eps);
    # F + eps = 2e-6, 4e-6 -> equal products 1 and 1 -> the plain mean 2 (1.8 without eps in the norms, 2.2 without
    # eps in the Fishers)
    tiny = [{"w": torch.tensor([1e-6])}, {"w": torch.tensor([3e-6])}]
    out = fisher_merge([{"w": torch.tensor([1.0])}, {"w": torch.tensor([3.0])}], tiny, epsilon=1e-6, floor=0.0,
                       favor_target=False)["w"]
    assert out.item() == pytest.approx(2.0, rel=1e-6)


@pytest.mark.parametrize("options", [
    {}, {"normalize": False}, {"favor_target": False, "floor": 1e-2}, {"weights": [0.0, 1.0, 2.0]},
    {"epsilon": 1e-6, "floor": 0.0, "favor_target": False},  # MergeLM's variant
])
def test_matches_the_spec_pseudo_code(three, options):
    models, fishers = three
    fishers[1]["model.layers.0.norm.weight"][:4] = 0.0  # some coordinates at the floor
    kw = {"weights": [1.0, 1.0, 1.0], "normalize": True, "floor": 1e-6, "favor_target": True, "epsilon": 0.0}
    kw.update(options)
    ref = _reference(models, fishers, **kw)
    out = fisher_merge(models, fishers, **kw)
    assert all(close(out[k], ref[k], rtol=1e-5) for k in ref)
    assert out["model.position_ids"].dtype == torch.int64


def test_one_model_is_itself_and_order_only_matters_through_the_target(three):
    models, fishers = three
    alone = fisher_merge(models[:1], fishers[:1])
    assert all(close(alone[k], models[0][k]) for k in models[0])
    perm = [2, 0, 1]
    a = fisher_merge(models, fishers, favor_target=False)
    b = fisher_merge([models[i] for i in perm], [fishers[i] for i in perm], favor_target=False)
    assert all(close(a[k], b[k]) for k in a)


# --- sidecars through the streaming engine ---------------------------------------------------------------------

@pytest.fixture
def on_disk(tmp_path, three):
    models, fishers = three
    paths = [save_model(m, tmp_path / f"m{i}", shards=1 + i % 2) for i, m in enumerate(models)]
    sidecars = []
    for i, f in enumerate(fishers):
        save_file({k: v.contiguous() for k, v in f.items()}, str(tmp_path / f"fisher{i}.safetensors"))
        sidecars.append(tmp_path / f"fisher{i}.safetensors")
    return models, fishers, paths, sidecars


def config(paths, sidecars, **top):
    return {"merge_method": "fisher", "models": [{"model": str(p), "parameters": {"fisher": str(s), "weight": w}}
                                                 for p, s, w in zip(paths, sidecars, (1.0, 0.5, 2.0))], **top}


def test_streaming_equals_in_memory_bit_exact(tmp_path, on_disk):
    models, fishers, paths, sidecars = on_disk
    cfg = config(paths, sidecars, exclude=["lm_head"], parameters={"floor": 1e-4})
    out = merge_models(cfg, tmp_path / "out", progress=False)
    src = SafetensorsSource(out)
    streamed = {k: src.get(k) for k in src.keys()}
    mem = fisher_merge(models, fishers, weights=[1.0, 0.5, 2.0], floor=1e-4, exclude=["lm_head"])
    assert sorted(streamed) == sorted(mem)
    assert all(torch.equal(streamed[k], mem[k]) for k in mem)
    assert torch.equal(streamed["lm_head.weight"], models[0]["lm_head.weight"])  # head: the target's
    assert torch.equal(streamed["model.position_ids"], models[0]["model.position_ids"])
    # the sidecar paths as given also work from the in-memory API
    from_paths = fisher_merge(models, [str(s) for s in sidecars], weights=[1.0, 0.5, 2.0], floor=1e-4,
                              exclude=["lm_head"])
    assert all(torch.equal(from_paths[k], mem[k]) for k in mem)


def rewrite(path, fisher):
    save_file({k: v.contiguous() for k, v in fisher.items()}, str(path))


def test_sidecar_missing_tensor_names_file_and_key(tmp_path, on_disk):
    _, fishers, paths, sidecars = on_disk
    rewrite(sidecars[1], {k: v for k, v in fishers[1].items() if k != "model.layers.1.mlp.bias"})
    with pytest.raises(MergeValidationError) as e:
        merge_models(config(paths, sidecars), tmp_path / "out", progress=False)
    assert str(sidecars[1]) in str(e.value) and "'model.layers.1.mlp.bias' is missing" in str(e.value)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))
    # on_mismatch: skip -> that tensor is copied from the target; excluding it also makes the sidecar fit
    out = merge_models(config(paths, sidecars, on_mismatch="skip"), tmp_path / "skip", progress=False)
    assert torch.equal(SafetensorsSource(out).get("model.layers.1.mlp.bias"), on_disk[0][0]["model.layers.1.mlp.bias"])
    merge_models(config(paths, sidecars, exclude=["mlp.bias"]), tmp_path / "excl", progress=False)


def test_sidecar_shape_and_dtype_mismatch(tmp_path, on_disk):
    _, fishers, paths, sidecars = on_disk
    rewrite(sidecars[2], dict(fishers[2], **{"model.layers.0.mlp.weight": torch.ones(8, 4)}))
    with pytest.raises(MergeValidationError) as e:
        merge_models(config(paths, sidecars), tmp_path / "out", progress=False)
    msg = str(e.value)
    assert str(sidecars[2]) in msg and "'model.layers.0.mlp.weight'" in msg and "[8, 4]" in msg and "[8, 8]" in msg
    rewrite(sidecars[2], {k: v.to(torch.bfloat16) for k, v in fishers[2].items()})
    with pytest.raises(MergeValidationError, match="bfloat16.*float32 or float64"):
        merge_models(config(paths, sidecars), tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_config_errors(tmp_path, on_disk):
    _, _, paths, sidecars = on_disk
    cfg = config(paths, sidecars)
    del cfg["models"][1]["parameters"]["fisher"]
    with pytest.raises(MergeConfigError, match=r"has no 'fisher' parameter"):
        merge_models(cfg, tmp_path / "o", progress=False)
    with pytest.raises(MergeConfigError, match="nosuch.safetensors' does not exist"):
        merge_models(config(paths, [sidecars[0], tmp_path / "nosuch.safetensors", sidecars[2]]), tmp_path / "o",
                     progress=False)
    with pytest.raises(MergeConfigError, match="takes no base_model"):
        merge_models(dict(config(paths, sidecars), base_model=str(paths[0])), tmp_path / "o", progress=False)
    for params, match in [({"floor": -1.0}, "floor must be"), ({"normalise": True}, "no parameter 'normalise'"),
                          ({"favor_target": "yes"}, "favor_target must be true or false")]:
        with pytest.raises(MergeConfigError, match=match):
            merge_models(dict(config(paths, sidecars), parameters=params), tmp_path / "o", progress=False)
    bad = config(paths, sidecars)
    bad["models"][0]["parameters"]["weight"] = -1.0
    with pytest.raises(MergeConfigError, match="weight must be"):
        merge_models(bad, tmp_path / "o", progress=False)
    with pytest.raises(MergeConfigError, match="2 Fisher"):
        fisher_merge(on_disk[0], on_disk[1][:2])
    assert not (tmp_path / "o").exists()


def test_zero_fisher_cannot_be_normalised_and_floor_warning(three):
    models, fishers = three
    zero = {k: torch.zeros_like(v) for k, v in fishers[1].items()}
    with pytest.raises(MergeValidationError, match=r"fisher\[model\[1\]\] is zero on every merged tensor"), \
            pytest.warns(UserWarning, match="below the floor"):
        fisher_merge(models[:2], [fishers[0], zero])
    tiny = {k: torch.full_like(v, 1e-12) for k, v in fishers[0].items()}
    with pytest.warns(UserWarning, match=r"all merged coordinates are below the floor"):
        out = fisher_merge(models[:2], [tiny, fishers[1]])
    # the floored target gets c_0 * 1e-6 with c_0 = 1 / ||F_0|| huge: the merge silently copies the target (pitfall)
    assert all(close(out[k], models[0][k], rtol=1e-4) for k in float_keys(models[0]))
