"""Weight Compander: the unit-test properties of specs/adapters/weight_compander.md §8, plus conv layouts,
learned scales, files, merge/unload, errors and the CLI."""
import copy
import json
import re

import pytest
import torch

import reparam
from reparam.adapters.weight_compander import compand, expand
from tests.helpers import MixedKinds, TinyMLP
from tests.training.tiny import tiny_bert

FUNCTIONS = ["tanh", "mulaw"]


def adapted(dtype=torch.float32, targets=("fc1", "fc2"), seed=0, **fields):
    torch.manual_seed(seed)
    base = TinyMLP(dtype=dtype)
    model = reparam.adapt(copy.deepcopy(base), reparam.make_config("weight_compander", **fields),
                          targets=list(targets))
    return base, model


def perturb(model, std=0.2, seed=1):
    """Move every latent Θ (and learned scale) away from its init, as training would."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".adapters." in n:
                p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std * (p.detach().std() if p.numel() > 1
                                                                                  else 1.0))


# --- §8.1 function properties ---------------------------------------------------------------------------------

@pytest.mark.parametrize("function", FUNCTIONS)
def test_function_properties(function):
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        b = float(torch.rand((), generator=g, dtype=torch.float64)) * 2 + 0.01
        a = b * (1 + float(torch.rand((), generator=g, dtype=torch.float64)) * 4 + 1e-3)  # a > b > 0
        grid = torch.linspace(-8, 8, 4001, dtype=torch.float64) * b  # tanh(±8) is still resolved in float64
        y = compand(grid, a, b, function)
        torch.testing.assert_close(compand(-grid, a, b, function), -y, atol=0, rtol=0)  # odd
        assert (y[1:] > y[:-1]).all()  # strictly increasing
        assert compand(torch.zeros(1, dtype=torch.float64), a, b, function).item() == 0.0
        if function == "tanh":
            assert y.abs().max() <= a
        h = 1e-6
        slope = (compand(torch.tensor(h, dtype=torch.float64), a, b, function)
                 - compand(torch.tensor(-h, dtype=torch.float64), a, b, function)) / (2 * h)
        assert abs(float(slope) - a / b) < 1e-5 * a / b  # f'(0) = a/b > 1: expanding near 0


# --- §8.2 init identity ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("function", FUNCTIONS)
def test_init_identity(function):
    base, model = adapted(function=function)
    for name in ("fc1", "fc2"):
        ad = model.get_submodule(name).adapters.default
        assert ad.clipped == 0  # κ_a = 3: a = 3σ bounds every entry of a uniform init
        torch.testing.assert_close(ad.companded_weight(), base.get_submodule(name).weight, atol=1e-6, rtol=0)
        sigma = float(base.get_submodule(name).weight.detach().std())
        a, b = ad.scales()
        assert a.item() == pytest.approx(3 * sigma) and b.item() == pytest.approx(1.5 * sigma)
        assert ad.saturated_fraction() == 0.0  # §7.3 monitor: no latent beyond 3b at init
    x = torch.randn(5, 16)
    torch.testing.assert_close(model(x), base(x), atol=1e-6, rtol=0)
    assert str(reparam.trainable_summary(model)).startswith(f"trainable params: {16 * 24 + 24 * 24:,}")
    ad = model.fc1.adapters.default
    with torch.no_grad():
        ad.wc_theta[0, 0] = 10 * ad.scales()[1]
    assert ad.saturated_fraction() == pytest.approx(1 / ad.wc_theta.numel())


def test_init_identity_on_tiny_bert_and_clipping_is_reported():
    base = tiny_bert(100)  # N(0, 0.02²) init: κ_a = 3 would clip the ~0.3% beyond 3σ, so κ_a = 6 here
    model = reparam.adapt(copy.deepcopy(base), reparam.make_config("weight_compander", kappa_a=6.0),
                          targets="all-linear")
    assert all(m.adapters.default.clipped == 0 for _, m in reparam.core.model.adapted_layers(model))
    ids = torch.randint(0, 100, (2, 9))
    torch.testing.assert_close(model(ids).logits, base(ids).logits, atol=1e-5, rtol=0)
    # a small κ_a clips: counted, warned about, and the clipped entries sit at ±0.999a
    with pytest.warns(UserWarning) as caught:
        _, small = adapted(kappa_a=1.0, kappa_b=0.5)
    messages = " | ".join(str(w.message) for w in caught)
    assert re.search(r"fc1: \d+ of 384 weights exceed", messages) and re.search(r"fc2: \d+ of 576", messages)
    ad, W0 = small.fc1.adapters.default, _.fc1.weight
    a = ad.scales()[0]
    assert ad.clipped == int((W0.abs() > 0.999 * a).sum()) > 0
    torch.testing.assert_close(ad.companded_weight().abs().max(), 0.999 * a, atol=1e-6, rtol=0)


# --- §8.3 gradient chain rule ---------------------------------------------------------------------------------

@pytest.mark.parametrize("function", FUNCTIONS)
def test_gradient_is_f_prime_times_weight_gradient(function):
    base, model = adapted(torch.float64, targets=("fc1",), function=function)
    perturb(model)
    ad, x = model.fc1.adapters.default, torch.randn(7, 16, dtype=torch.float64)
    model(x).square().sum().backward()
    # ∂L/∂W from a plain copy carrying W = f(Θ)
    plain = copy.deepcopy(base)
    with torch.no_grad():
        plain.fc1.weight.copy_(ad.companded_weight())
    plain(x).square().sum().backward()
    theta = ad.wc_theta.detach().requires_grad_(True)
    f_prime = torch.autograd.grad(compand(theta, *ad.scales(), function).sum(), theta)[0]
    torch.testing.assert_close(ad.wc_theta.grad, f_prime * plain.fc1.weight.grad, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("function", FUNCTIONS)
def test_gradcheck_theta_and_learned_scales(function):
    _, model = adapted(torch.float64, targets=("fc1",), function=function, learn_scales=True)
    perturb(model)
    ad, layer = model.fc1.adapters.default, model.fc1
    assert {n for n, p in ad.named_parameters() if p.requires_grad} == {"wc_theta", "wc_log_b", "wc_u"}
    x = torch.randn(3, 16, dtype=torch.float64)

    def out(theta, log_b, u):
        with torch.no_grad():
            ad.wc_theta.copy_(theta), ad.wc_log_b.copy_(log_b), ad.wc_u.copy_(u)
        return torch.func.functional_call(ad, {"wc_theta": theta, "wc_log_b": log_b, "wc_u": u},
                                          (layer, x, torch.zeros(3, 24, dtype=torch.float64)))

    args = tuple(p.detach().clone().requires_grad_(True) for p in (ad.wc_theta, ad.wc_log_b, ad.wc_u))
    assert torch.autograd.gradcheck(out, args)
    a, b = ad.scales()
    assert a > b > 0


# --- §8.4 export / merge / unload -----------------------------------------------------------------------------

@pytest.mark.parametrize("learn_scales", [False, True])
def test_export_matches_reparameterised_forward(learn_scales):
    base, model = adapted(learn_scales=learn_scales)
    perturb(model)
    x = torch.randn(6, 16)
    y = model(x)
    assert (y - base(x)).abs().max() > 1e-3
    reparam.merge(model)
    torch.testing.assert_close(model.fc1.weight, model.fc1.adapters.default.companded_weight(), atol=0, rtol=0)
    torch.testing.assert_close(model(x), y, atol=1e-6, rtol=0)
    reparam.unmerge(model)
    torch.testing.assert_close(model.fc2.weight, base.fc2.weight, atol=0, rtol=0)  # W0 given back exactly
    plain = reparam.unload(model)
    assert type(plain.fc1) is torch.nn.Linear and not any(".adapters." in n for n, _ in plain.named_parameters())
    torch.testing.assert_close(plain(x), y, atol=1e-6, rtol=0)


def test_conv_and_conv1d_layouts_and_stacking():
    torch.manual_seed(0)
    base = MixedKinds()
    model = reparam.adapt(copy.deepcopy(base), reparam.make_config("weight_compander"),
                          targets=["proj", "conv1", "conv2", "lin"])
    ids = torch.randint(1, 50, (2, 7))
    torch.testing.assert_close(model(ids), base(ids), atol=1e-5, rtol=0)
    assert model.conv2.adapters.default.wc_theta.shape == base.conv2.weight.shape  # no flattening
    perturb(model)
    y = model(ids)
    by_hand = copy.deepcopy(base)
    with torch.no_grad():
        for n in ("proj", "conv1", "conv2", "lin"):
            by_hand.get_submodule(n).weight.copy_(model.get_submodule(n).adapters.default.companded_weight())
    torch.testing.assert_close(y, by_hand(ids), atol=1e-5, rtol=0)
    # behind a LoRA on the same layer, the compander adds the layer's op with f(Θ) − W0
    reparam.adapt(model, reparam.make_config("lora", r=2), targets=["lin"], name="lora")
    reparam.set_active(model, ["lora", "default"])
    torch.testing.assert_close(model(ids), y, atol=1e-5, rtol=0)  # LoRA's B = 0


# --- §8.5 density at zero -------------------------------------------------------------------------------------

def test_density_at_zero_is_lower_after_companding():
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        b = float(torch.rand((), generator=g)) + 0.1
        a = b * (1.5 + 3 * float(torch.rand((), generator=g)))
        theta = torch.randn(4000, generator=g, dtype=torch.float64) * b * 2
        w = compand(theta, a, b)
        lo, hi = 0.0, 10 * a  # the positive fixed point a·tanh(θ/b) = θ, by bisection
        for _ in range(200):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if a * torch.tanh(torch.tensor(mid / b, dtype=torch.float64)) > mid else (lo, mid)
        for eps in torch.linspace(1e-6, lo * 0.999, 50).tolist():
            assert int((w.abs() < eps).sum()) <= int((theta.abs() < eps).sum())
        assert w.abs().max() < a


# --- files, errors, CLI ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("fields", [{}, {"function": "mulaw", "learn_scales": True}])
def test_save_load_round_trip_onto_original_checkpoint(tmp_path, fields):
    base, model = adapted(**fields)
    perturb(model)
    x = torch.randn(4, 16)
    reparam.save_adapter(model, tmp_path / "wc")
    loaded = reparam.load_adapter(copy.deepcopy(base), tmp_path / "wc")
    torch.testing.assert_close(loaded(x), model(x), atol=0, rtol=0)
    assert loaded.fc1.adapters.default.config.to_dict() == model.fc1.adapters.default.config.to_dict()


@pytest.mark.parametrize("fields, match", [
    ({"function": "cubic"}, r"invalid function='cubic'"),
    ({"kappa_a": 1.0, "kappa_b": 1.5}, r"invalid kappa_a=1.0: must be > kappa_b=1.5"),
    ({"kappa_b": 0}, r"invalid kappa_b=0"),
    ({"learn_scales": "yes"}, r"invalid learn_scales"),
])
def test_bad_config_is_a_clear_error(fields, match):
    with pytest.raises(reparam.ConfigError, match=match):
        reparam.make_config("weight_compander", **fields)


def test_zero_weight_and_embedding_are_errors():
    torch.manual_seed(0)
    base = TinyMLP()
    with torch.no_grad():
        base.fc1.weight.zero_()
    with pytest.raises(reparam.ReparamError, match=r"fc1: the weight has no spread"):
        reparam.adapt(base, reparam.make_config("weight_compander"), targets=["fc1"])
    with pytest.raises(reparam.TargetError, match=r"'emb'.*adapts only linear, conv"):
        reparam.adapt(MixedKinds(), reparam.make_config("weight_compander"), targets=["emb"])


def test_cli_finetune_on_glue(tmp_path, minilm_path, glue_dir, capsys):
    from reparam.cli.main import main

    out = tmp_path / "wc"
    code = main(["finetune", "--method", "weight_compander", "--model", str(minilm_path), "--data",
                 str(glue_dir / "SST-2"), "--targets", "query,value", "--set", "learn_scales=true", "--set", "kappa_a=12", "--limit", "16",
                 "--eval-limit", "8", "--max-steps", "2", "--max-length", "24", "--quiet", "-o", str(out)])
    assert code == 0
    saved = json.loads((out / "reparam_adapter.json").read_text())
    assert saved["method"] == "weight_compander" and saved["config"]["learn_scales"] is True
    assert len(saved["modules"]) == 12
