"""The unit-test properties of specs/adapters/lora.md §6, plus rsLoRA/PiSSA/DoRA specifics."""
import copy
import math

import pytest
import torch

import reparam
from reparam.core.svd import svd_split
from tests.helpers import MixedKinds, TinyMLP, randomize_adapters


def adapted(method="lora", dtype=torch.float32, **fields):
    torch.manual_seed(0)
    base = TinyMLP(dtype=dtype)
    model = reparam.adapt(copy.deepcopy(base), reparam.make_config(method, **fields), targets=["fc1", "fc2"])
    return base, model


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_identity_at_init_bitwise(mode):
    base, model = adapted(r=4, alpha=8)
    getattr(base, mode)(), getattr(model, mode)()
    x = torch.randn(5, 16)
    assert torch.equal(model(x), base(x))


def test_gradient_pattern_at_init():
    _, model = adapted(r=4)
    model(torch.randn(7, 16)).pow(2).sum().backward()
    a = model.fc1.adapters.default.lora_A
    b = model.fc1.adapters.default.lora_B
    assert torch.count_nonzero(a.grad) == 0
    assert torch.count_nonzero(b.grad) > 0


def test_scaling_lora_vs_rslora():
    assert reparam.LoraConfig(r=4, alpha=16).scale == 4.0
    assert reparam.LoraConfig(r=4, alpha=16, use_rslora=True).scale == 8.0
    assert reparam.make_config("rslora", r=4, alpha=16).scale == 8.0
    _, model = adapted("rslora", r=4, alpha=16)
    assert model.fc1.adapters.default.scale == 8.0


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-10)])
def test_merge_round_trip(dtype, tol):
    base, model = adapted(r=4, alpha=8, dtype=dtype)
    randomize_adapters(model)
    x = torch.randn(6, 16, dtype=dtype)
    w0 = base.fc1.weight.detach().clone()
    unmerged = model(x)
    reparam.merge(model)
    assert model.fc1.merged_adapters == ["default"]
    torch.testing.assert_close(model(x), unmerged, atol=tol, rtol=0)
    reparam.unmerge(model)
    assert (model.fc1.weight - w0).abs().max() <= 1e-6 * w0.abs().max()
    torch.testing.assert_close(model(x), unmerged, atol=tol, rtol=0)


def test_merged_weight_closed_form():
    base, model = adapted(r=3, alpha=6)
    randomize_adapters(model)
    ad = model.fc2.adapters.default
    expected = base.fc2.weight + 2.0 * ad.lora_B @ ad.lora_A
    reparam.merge(model)
    torch.testing.assert_close(model.fc2.weight, expected, atol=1e-6, rtol=0)


def test_bf16_merge_rounds_once():
    base, model = adapted(r=4, alpha=8)
    randomize_adapters(model)
    model.to(torch.bfloat16)
    for ad in (model.fc1.adapters.default, model.fc2.adapters.default):
        ad.float()  # adapters stay float32 on a bf16 model
    w = model.fc1.weight.detach().clone()
    delta = model.fc1.adapters.default.delta_weight(model.fc1)
    x = torch.randn(4, 16, dtype=torch.bfloat16)
    unmerged = model(x).float()
    reparam.merge(model)
    assert torch.equal(model.fc1.weight, (w.float() + delta).to(torch.bfloat16))
    # the merged bf16 model differs from the unmerged one only by bf16 rounding of the weights
    assert (model(x).float() - unmerged).abs().max() < 0.05 * unmerged.abs().max()


def test_refuses_to_merge_nan():
    _, model = adapted(r=2)
    with torch.no_grad():
        model.fc2.adapters.default.lora_B.fill_(float("nan"))
    w = model.fc2.weight.detach().clone()
    with pytest.raises(reparam.ReparamError, match="fc2.*NaN/Inf"):
        reparam.merge(model)
    assert torch.equal(model.fc2.weight, w)


def test_parameter_count():
    _, model = adapted(r=5)
    s = reparam.trainable_summary(model)
    assert s.per_module["fc1"] == 5 * (16 + 24)
    assert s.per_module["fc2"] == 5 * (24 + 24)
    assert s.trainable == 5 * (16 + 24) + 5 * (24 + 24)
    assert s.total == sum(p.numel() for p in model.parameters())


def test_parameter_names_unchanged():
    base, model = adapted(r=2)
    names = {n for n, _ in model.named_parameters()}
    assert {n for n, _ in base.named_parameters()} <= names
    assert "fc1.adapters.default.lora_A" in names
    assert isinstance(model.fc1, torch.nn.Linear)
    model.load_state_dict(base.state_dict(), strict=False)  # a base checkpoint loads with no remapping


def test_dropout_only_on_adapter_input_and_skipped_at_zero():
    _, model = adapted(r=2, dropout=0.0)
    assert model.fc1.adapters.default.dropout is None
    _, model = adapted(r=2, dropout=0.5)
    randomize_adapters(model)
    x = torch.randn(4, 16)
    model.eval()
    torch.testing.assert_close(model(x), model(x))


def test_gaussian_init():
    _, model = adapted(r=4, init="gaussian")
    a = model.fc2.adapters.default.lora_A
    assert abs(a.std().item() - 0.25) < 0.08 and torch.count_nonzero(model.fc2.adapters.default.lora_B) == 0


def test_pissa_exact_start_float64():
    base, model = adapted("pissa", r=4, alpha=8, dtype=torch.float64)
    ad, layer = model.fc1.adapters.default, model.fc1
    s = ad.scale
    torch.testing.assert_close(layer.weight + s * ad.lora_B @ ad.lora_A, base.fc1.weight, atol=1e-10, rtol=0)
    x = torch.randn(5, 16, dtype=torch.float64)
    torch.testing.assert_close(model(x), base(x), atol=1e-10, rtol=0)
    sigma = torch.linalg.svdvals(base.fc1.weight)[:4]
    btb, aat = ad.lora_B.T @ ad.lora_B, ad.lora_A @ ad.lora_A.T
    for m in (btb, aat):
        torch.testing.assert_close(m, torch.diag(sigma / s), atol=1e-10, rtol=0)


def test_pissa_float32_start_and_disable_gives_residual():
    base, model = adapted("pissa", r=4, alpha=8)
    x = torch.randn(5, 16)
    y0 = base(x)
    torch.testing.assert_close(model(x), y0, atol=1e-5 * y0.abs().max().item(), rtol=0)
    with reparam.disabled(model):
        assert (model(x) - y0).abs().max() > 1e-3  # W_res, not W0 (lora.md pitfall)


def test_pissa_export_formula():
    base, model = adapted("pissa", r=3, alpha=6)
    randomize_adapters(model)
    ad = model.fc2.adapters.default
    b2 = torch.cat([ad.lora_B, ad.lora_B0], 1)
    a2 = torch.cat([ad.lora_A, -ad.lora_A0], 0)
    w_lora = base.fc2.weight + ad.scale * b2 @ a2
    torch.testing.assert_close(w_lora, model.fc2.weight + ad.scale * ad.lora_B @ ad.lora_A, atol=1e-5, rtol=0)


def test_pissa_delete_restores_base():
    base, model = adapted("pissa", r=4)
    reparam.delete_adapter(model, "default")
    torch.testing.assert_close(model.fc1.weight, base.fc1.weight, atol=1e-6, rtol=0)
    assert type(model.fc1) is torch.nn.Linear


def test_pissa_rank_too_large_is_an_error():
    with pytest.raises(ValueError, match=r"r=20 exceeds min\(d_in, d_out\)=16"):
        adapted("pissa", r=20)


def test_pissa_fast_svd_variant():
    base, model = adapted("pissa", r=4, init="pissa_niter_4")
    x = torch.randn(5, 16)
    torch.testing.assert_close(model(x), base(x), atol=1e-4, rtol=0)


def test_svd_split_minor_and_cache():
    w = torch.randn(12, 9, dtype=torch.float64)
    U, S, Vh, res = svd_split(w, 3, "minor", torch.float64)
    torch.testing.assert_close(res + (U * S) @ Vh, w, atol=1e-12, rtol=0)
    assert torch.allclose(S, torch.linalg.svdvals(w)[-3:])
    from reparam.core import svd as svd_mod
    assert svd_mod.svd(w, torch.float64) is svd_mod.svd(w, torch.float64)


def test_dora_init_identity_and_closed_form():
    base, model = adapted("dora", r=4, alpha=8)
    x = torch.randn(5, 16)
    torch.testing.assert_close(model(x), base(x), atol=1e-6, rtol=0)
    ad = model.fc1.adapters.default
    torch.testing.assert_close(ad.magnitude, base.fc1.weight.norm(dim=1))
    randomize_adapters(model)
    v = base.fc1.weight + ad.scale * ad.lora_B @ ad.lora_A
    w_dora = ad.magnitude[:, None] * v / v.norm(dim=1, keepdim=True)
    h = torch.nn.functional.linear(x, w_dora, base.fc1.bias)
    torch.testing.assert_close(model.fc1(x), h, atol=1e-5, rtol=0)
    y = model(x)
    reparam.merge(model)
    torch.testing.assert_close(model.fc1.weight, w_dora, atol=1e-5, rtol=0)
    torch.testing.assert_close(model(x), y, atol=1e-5, rtol=0)
    reparam.unmerge(model)
    torch.testing.assert_close(model.fc1.weight, base.fc1.weight, atol=1e-6, rtol=0)


def test_dora_rejects_embeddings():
    with pytest.raises(reparam.TargetError, match="'emb'.*dora.*linear"):
        reparam.adapt(MixedKinds(), reparam.make_config("dora"), targets=["emb"])


@pytest.mark.parametrize("method", ["lora", "rslora"])
def test_all_layer_kinds_merge_exactly(method):
    torch.manual_seed(0)
    model = MixedKinds()
    ids = torch.randint(1, 50, (3, 7))
    ids[0, :2] = 0  # padding index
    y0 = model(ids)
    reparam.adapt(model, reparam.make_config(method, r=2, alpha=4), targets=["emb", "proj", "conv1", "conv2", "lin"])
    torch.testing.assert_close(model(ids), y0, atol=0, rtol=0)
    randomize_adapters(model, std=0.3)
    y = model(ids)
    assert (y - y0).abs().max() > 1e-3
    for name in ("emb", "proj", "conv1", "conv2", "lin"):
        layer = getattr(model, name)
        assert layer.adapters.default.delta_weight(layer).shape == layer.weight.shape
    reparam.merge(model)
    torch.testing.assert_close(model(ids), y, atol=1e-5, rtol=0)
    plain = reparam.unload(model)
    assert type(plain.proj).__name__ == "Conv1D" and not hasattr(plain.proj, "adapters")
    torch.testing.assert_close(plain(ids), y, atol=1e-5, rtol=0)


def test_conv1d_layout_delta_is_transposed():
    model = MixedKinds()
    reparam.adapt(model, reparam.make_config("lora", r=2, alpha=2), targets=["proj"])
    randomize_adapters(model)
    ad = model.proj.adapters.default
    torch.testing.assert_close(ad.delta_weight(model.proj), (ad.lora_B @ ad.lora_A).T)
    assert ad.lora_A.shape == (2, 12) and ad.lora_B.shape == (10, 2)


def test_scale_math():
    assert math.isclose(reparam.LoraConfig(r=9, alpha=3, use_rslora=True).scale, 1.0)


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_gradients_equal_dense_closed_form(method):
    """The adapter's gradients (A, B, input) equal those of the dense layer W0 + ΔW."""
    _, model = adapted(method, r=3, alpha=6, dtype=torch.float64)
    randomize_adapters(model)
    layer, ad = model.fc1, model.fc1.adapters.default
    x = torch.randn(5, 16, dtype=torch.float64, requires_grad=True)
    layer(x).sin().sum().backward()
    got = (ad.lora_A.grad.clone(), ad.lora_B.grad.clone(), x.grad.clone())
    A, B = ad.lora_A.detach().clone().requires_grad_(), ad.lora_B.detach().clone().requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    W = layer.weight + ad.scale * B @ A
    if method == "dora":
        W = ad.magnitude.detach()[:, None] * W / W.norm(dim=1, keepdim=True).detach()
    torch.nn.functional.linear(x2, W, layer.bias).sin().sum().backward()
    for g, ref in zip(got, (A.grad, B.grad, x2.grad)):
        torch.testing.assert_close(g, ref, atol=1e-10, rtol=0)
