"""HUT: the unit-test properties of specs/adapters/hut.md §9, plus modes, stacking, files, errors and the CLI."""
import copy
import json

import pytest
import torch
import torch.nn.functional as F

import reparam
from tests.helpers import MixedKinds, TinyMLP, randomize_adapters


def adapted(dtype=torch.float32, targets=("fc1", "fc2"), seed=0, **fields):
    torch.manual_seed(seed)
    base = TinyMLP(dtype=dtype)
    model = reparam.adapt(copy.deepcopy(base), reparam.make_config("hut", **fields), targets=list(targets))
    return base, model


def by_hand(ad, W0):
    """§1/§5 written out in float64: W0 ⊙ (1 + s·U V) or W0 ⊙ (U V)."""
    UV = ad.hut_U.double() @ ad.hut_V.double()
    return W0.double() * (UV if ad.pure else 1 + ad.scale * UV)


# --- §9.1 identity at init ------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["residual", "pure"])
def test_identity_at_init_float64(mode):
    base, model = adapted(torch.float64, r=4, mode=mode)
    ad = model.fc1.adapters.default
    if mode == "residual":
        assert (ad.hut_U == 0).all() and ad.hut_V.abs().sum() > 0
    else:  # U V = 1 although U's columns differ (§8.1)
        torch.testing.assert_close(ad.hut_U @ ad.hut_V, torch.ones(24, 16, dtype=torch.float64), atol=1e-12, rtol=0)
        assert (ad.hut_U[:, 0] - ad.hut_U[:, 1]).abs().max() > 1e-4
    x = torch.randn(5, 16, dtype=torch.float64)
    torch.testing.assert_close(model(x), base(x), atol=1e-12, rtol=0)


def test_conv1d_layout_identity_and_closed_form():
    torch.manual_seed(0)
    base = MixedKinds()
    model = reparam.adapt(copy.deepcopy(base), reparam.make_config("hut", r=3, alpha=6.0), targets=["proj", "lin"])
    ids = torch.randint(1, 50, (2, 7))
    torch.testing.assert_close(model(ids), base(ids))
    randomize_adapters(model)
    ad, W0 = model.proj.adapters.default, base.proj.weight  # Conv1D: W0 stored d_in x d_out
    assert ad.hut_U.shape == (10, 3) and ad.hut_V.shape == (3, 12) and ad.scale == 2.0
    x = torch.randn(4, 12)
    expected = x.double() @ by_hand(ad, W0.T).T + base.proj.bias.double()
    torch.testing.assert_close(model.proj(x).double(), expected, atol=1e-5, rtol=0)


# --- §9.2 merge equivalence, unmerge, unload ------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["residual", "pure"])
def test_merge_equivalence_unmerge_unload(mode):
    base, model = adapted(r=4, mode=mode)
    randomize_adapters(model, std=0.3)
    x = torch.randn(6, 16)
    y = model(x)
    assert (y - base(x)).abs().max() > 1e-2  # the adapter does something
    reparam.merge(model)
    torch.testing.assert_close(model.fc1.weight.double(), by_hand(model.fc1.adapters.default, base.fc1.weight),
                               atol=1e-6, rtol=0)
    torch.testing.assert_close(model(x), y, atol=1e-5, rtol=0)
    reparam.unmerge(model)
    torch.testing.assert_close(model.fc2.weight, base.fc2.weight, atol=1e-6, rtol=1e-5)
    plain = reparam.unload(model)
    assert type(plain.fc1) is torch.nn.Linear
    torch.testing.assert_close(plain(x), y, atol=1e-5, rtol=0)


def test_unmerge_where_multiplier_is_zero_is_an_error():
    _, model = adapted(r=2, mode="pure")
    with torch.no_grad():
        model.fc1.adapters.default.hut_U[0].zero_()  # row 0 of U V is 0: W0's row 0 is erased by the merge
    reparam.merge(model)
    with pytest.raises(reparam.ReparamError, match=r"fc1.*multiplier is 0 at 16 entries"):
        reparam.unmerge(model)
    assert model.fc1.merged_adapters == ["default"]  # nothing half-done


def test_delete_unmerged_gives_w0_back_and_disabled_runs_base():
    base, model = adapted(r=4)
    randomize_adapters(model)
    x = torch.randn(3, 16)
    with reparam.disabled(model):
        torch.testing.assert_close(model(x), base(x))
    reparam.delete_adapter(model, "default")
    assert type(model.fc1) is torch.nn.Linear
    torch.testing.assert_close(model(x), base(x))


# --- §9.3 sparsity preservation -------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["residual", "pure"])
def test_merged_weight_keeps_the_zero_pattern(mode):
    torch.manual_seed(1)
    base = TinyMLP()
    mask = torch.rand(base.fc2.weight.shape) < 0.5
    with torch.no_grad():
        base.fc2.weight[mask] = 0.0
    model = reparam.adapt(copy.deepcopy(base), reparam.make_config("hut", r=4, mode=mode), targets=["fc2"])
    randomize_adapters(model, std=1.0, seed=3)
    reparam.merge(model)
    W = model.fc2.weight
    assert (W[mask] == 0).all() and (W[~mask] != 0).all()
    # LoRA as the control: the same random update fills the zeros
    lora = reparam.adapt(copy.deepcopy(base), reparam.make_config("lora", r=4), targets=["fc2"])
    randomize_adapters(lora, std=1.0, seed=3)
    reparam.merge(lora)
    assert (lora.fc2.weight[mask] != 0).any()


# --- §9.4 gradient formula ------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode,alpha", [("residual", None), ("residual", 12.0), ("pure", None)])
def test_gradients_equal_closed_form_float64(mode, alpha):
    base, model = adapted(torch.float64, targets=("fc2",), r=3, mode=mode, alpha=alpha)
    randomize_adapters(model, std=0.5)
    ad, W0, b = model.fc2.adapters.default, base.fc2.weight, base.fc2.bias
    h = torch.randn(7, 24, dtype=torch.float64)
    w = torch.randn(7, 24, dtype=torch.float64)
    (model.fc2(h) * w).sum().backward()
    W_prime = by_hand(ad, W0).detach().requires_grad_(True)  # G = ∂L/∂W' from a dense layer
    (F.linear(h, W_prime, b) * w).sum().backward()
    GW0 = W_prime.grad * W0
    s = 1.0 if mode == "pure" else ad.scale
    assert s == (1.0 if alpha is None else 4.0)
    torch.testing.assert_close(ad.hut_U.grad, s * GW0 @ ad.hut_V.detach().T, atol=1e-10, rtol=0)
    torch.testing.assert_close(ad.hut_V.grad, s * ad.hut_U.detach().T @ GW0, atol=1e-10, rtol=0)
    assert W0.grad is None and not model.fc2.weight.requires_grad


# --- §9.5 symmetry trap (pure mode) ---------------------------------------------------------------------------

def multiplier_after_sgd(init_noise, steps=30):
    _, model = adapted(torch.float64, targets=("fc1", "fc2"), r=4, mode="pure", init_noise=init_noise)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.5)
    g = torch.Generator().manual_seed(0)
    x, target = (torch.randn(32, n, generator=g, dtype=torch.float64) for n in (16, 8))
    for _ in range(steps):
        opt.zero_grad()
        F.mse_loss(model(x), target).backward()
        opt.step()
    ad = model.fc1.adapters.default
    return ad.hut_U.detach(), (ad.hut_U @ ad.hut_V).detach()


def test_constant_init_stays_rank_one_and_perturbed_init_breaks_symmetry():
    U, UV = multiplier_after_sgd(init_noise=0.0)
    assert (U - U[:, :1]).abs().max() == 0  # every column identical after 30 SGD steps
    assert (UV - 1).abs().max() > 1e-3  # it did train
    sv = torch.linalg.svdvals(UV)
    assert sv[1] / sv[0] < 1e-12  # the learned multiplier is rank 1 whatever r is
    U, UV = multiplier_after_sgd(init_noise=reparam.make_config("hut").init_noise)  # the default
    sv = torch.linalg.svdvals(UV)
    assert (sv[1:4] / sv[0] > 1e-4).all()  # all r = 4 components are in use


# --- trainable set, optional bias, stacking -------------------------------------------------------------------

def test_trainable_count_is_lora_count():
    _, model = adapted(r=4)
    summary = reparam.trainable_summary(model)
    assert summary.trainable == 4 * (16 + 24) + 4 * (24 + 24)
    assert not model.fc1.weight.requires_grad and not model.fc1.bias.requires_grad


def test_trainable_bias_option_trains_merges_and_saves(tmp_path):
    base, model = adapted(r=2, bias=True)
    ad = model.fc1.adapters.default
    assert reparam.trainable_summary(model).per_module["fc1"] == 2 * (16 + 24) + 24
    with torch.no_grad():
        ad.bias_delta.normal_()
    x = torch.randn(3, 16)
    y = model(x)
    torch.testing.assert_close(model.fc1(x), base.fc1(x) + ad.bias_delta)  # U = 0: only the bias moved
    reparam.save_adapter(model, tmp_path)
    fresh = reparam.load_adapter(copy.deepcopy(base), tmp_path)
    torch.testing.assert_close(fresh(x), y)
    reparam.merge(model)
    torch.testing.assert_close(model.fc1.bias, base.fc1.bias + ad.bias_delta)
    torch.testing.assert_close(model(x), y, atol=1e-6, rtol=0)


def test_behind_another_adapter_uses_the_additive_path():
    base, model = adapted(r=3, seed=2)
    randomize_adapters(model, std=0.3)
    x = torch.randn(4, 16)
    y_hut_first = model.fc1(x)
    reparam.adapt(model, reparam.make_config("lora", r=2), targets=["fc1"], name="lora")
    randomize_adapters(model, std=0.3, seed=5)
    hut, lora = model.fc1.adapters.default, model.fc1.adapters.lora
    reparam.set_active(model, ["default", "lora"])
    first = model.fc1(x)  # HUT computes the whole output, LoRA adds to it
    reparam.set_active(model, ["lora", "default"])
    second = model.fc1(x)  # LoRA on the base output, then HUT adds x (W' − W0)ᵀ
    expected = x @ by_hand(hut, base.fc1.weight).float().T + base.fc1.bias + lora.lora_output(model.fc1, x)
    torch.testing.assert_close(first, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(second, expected, atol=1e-5, rtol=0)
    assert not torch.allclose(y_hut_first, first)


def test_bfloat16_base_computes_the_transformation_in_float32():
    base, model = adapted(r=2)
    model.to(torch.bfloat16)
    ad = model.fc1.adapters.default
    assert ad.hut_U.dtype == torch.bfloat16  # .to() converts everything; the multiplier is still formed wide
    with torch.no_grad():
        ad.hut_U.fill_(1e-3)
    assert ad.multiplier().dtype == torch.float32
    assert (ad.multiplier() != 1).all()  # 1 + 1e-3·UV is not rounded back to 1


# --- files ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["residual", "pure"])
def test_save_load_round_trip(tmp_path, mode):
    base, model = adapted(r=4, mode=mode)
    randomize_adapters(model)
    x = torch.randn(3, 16)
    reparam.save_adapter(model, tmp_path)
    saved = json.loads((tmp_path / "reparam_adapter.json").read_text())
    assert saved["method"] == "hut" and saved["config"]["mode"] == mode
    from reparam.io.files import read_safetensors

    tensors, _ = read_safetensors(tmp_path / "reparam_adapter.safetensors")
    assert sorted(tensors) == ["fc1.hut_U", "fc1.hut_V", "fc2.hut_U", "fc2.hut_V"]
    fresh = reparam.load_adapter(copy.deepcopy(base), tmp_path)
    torch.testing.assert_close(fresh(x), model(x), atol=0, rtol=0)


def test_peft_export_is_a_clear_error(tmp_path):
    _, model = adapted(r=2)
    with pytest.raises(reparam.AdapterFileError, match="'hut' has no PEFT LoRA export"):
        reparam.export_peft(model, tmp_path / "peft")
    assert not (tmp_path / "peft").exists()


# --- bad input ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fields,message", [
    ({"r": 0}, "invalid r=0"),
    ({"mode": "additive"}, "invalid mode='additive'.*residual, pure"),
    ({"mode": "pure", "alpha": 8.0}, "invalid alpha=8.0.*no scale"),
    ({"alpha": -1.0}, "invalid alpha=-1.0"),
    ({"init_noise": -0.1}, "invalid init_noise"),
    ({"bias": "yes"}, "invalid bias"),
    ({"dropout": 0.1}, "unknown field.*'dropout'"),
])
def test_bad_config_names_the_field(fields, message):
    with pytest.raises(reparam.ConfigError, match=message):
        reparam.make_config("hut", **fields)


def test_bad_targets_name_the_module():
    with pytest.raises(reparam.TargetError, match="'conv1'.*'hut' adapts only linear"):
        reparam.adapt(MixedKinds(), reparam.make_config("hut"), targets=["conv1"])


# --- CLI ------------------------------------------------------------------------------------------------------

def test_cli_finetune_on_glue(tmp_path, minilm_path, glue_dir, capsys):
    from reparam.cli.main import main

    out = tmp_path / "hut"
    code = main(["finetune", "--method", "hut", "--model", str(minilm_path), "--data", str(glue_dir / "SST-2"),
                 "--r", "2", "--targets", "query,value", "--set", "mode=pure", "--limit", "16",
                 "--eval-limit", "8", "--max-steps", "2", "--max-length", "24", "--quiet", "-o", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert '"mode": "pure"' in printed and '"alpha": null' in printed
    saved = json.loads((out / "reparam_adapter.json").read_text())
    assert saved["method"] == "hut" and saved["config"]["r"] == 2 and len(saved["modules"]) == 12
