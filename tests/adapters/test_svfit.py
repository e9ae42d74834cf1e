"""SVFit (specs/adapters/svfit.md): the unit-test properties of §11, plus save/load, PEFT export and errors."""
import copy
import json

import pytest
import torch

import reparam
from reparam.adapters.svfit import energy_rank
from reparam.core import svd as svd_mod
from reparam.io.files import read_safetensors
from tests.helpers import MixedKinds, TinyMLP, adapt_tiny_mlp, randomize_adapters


def adapted(dtype=torch.float32, targets=("fc1", "fc2"), **fields):
    return adapt_tiny_mlp("svfit", dtype, targets, **fields)


def perturb_sigma(model, std=0.3, seed=0):
    """Move every trainable σ̂ (or δ) away from its start (σ̂ = σ_r at init hides bugs)."""
    randomize_adapters(model, std=std, seed=seed)


def count_svds(monkeypatch):
    calls = []
    real = torch.linalg.svd
    monkeypatch.setattr(torch.linalg, "svd", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


# --- §11.1 exact start --------------------------------------------------------------------------------------

@pytest.mark.parametrize("fields", [dict(r=5), dict(), dict(rank_mode="energy"),
                                    dict(r=4, parameterization="multiplicative")])
def test_exact_start_float64(fields):
    base, model = adapted(torch.float64, **fields)
    x = torch.randn(6, 16, dtype=torch.float64)
    torch.testing.assert_close(model(x), base(x), atol=1e-10, rtol=0)


def test_exact_start_float32_and_conv1d_layout():
    base, model = adapted(r=6)
    x = torch.randn(6, 16)
    y0 = base(x)
    torch.testing.assert_close(model(x), y0, atol=1e-5 * y0.abs().max().item(), rtol=0)
    torch.manual_seed(1)
    mixed = MixedKinds()
    ids = torch.randint(1, 50, (3, 7))
    y0 = mixed(ids)
    reparam.adapt(mixed, reparam.make_config("svfit", r=3), targets=["proj", "lin"])  # proj: HF Conv1D
    ad = mixed.proj.adapters.default
    assert ad.left_vectors.shape == (10, 3) and ad.right_vectors.shape == (3, 12)
    torch.testing.assert_close(mixed(ids), y0, atol=1e-5 * y0.abs().max().item(), rtol=0)
    perturb_sigma(mixed)
    y = mixed(ids)
    assert ad.delta_weight(mixed.proj).shape == mixed.proj.weight.shape == (12, 10)
    reparam.merge(mixed)
    torch.testing.assert_close(mixed(ids), y, atol=1e-5, rtol=0)


def test_disabled_runs_the_residual_and_delete_restores_w0():
    base, model = adapted(r=4)
    x = torch.randn(5, 16)
    with reparam.disabled(model):
        assert (model(x) - base(x)).abs().max() > 1e-2  # W_e, not W0 (as PiSSA)
    perturb_sigma(model)
    reparam.delete_adapter(model, "default")
    torch.testing.assert_close(model.fc1.weight, base.fc1.weight, atol=1e-6, rtol=0)
    assert type(model.fc1) is torch.nn.Linear
    _, model = adapted(r=4)
    perturb_sigma(model)
    plain = reparam.unload(model, merge_active=False)
    torch.testing.assert_close(plain(x), base(x), atol=1e-5, rtol=0)


# --- §11.2 trainable count ----------------------------------------------------------------------------------

def test_trainable_count_and_frozen_parts():
    _, model = adapted(r=5)
    s = reparam.trainable_summary(model)
    assert s.per_module == {"fc1": 5, "fc2": 5} and s.trainable == 10
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable == ["fc1.adapters.default.sigma", "fc2.adapters.default.sigma"]
    ad = model.fc1.adapters.default
    for t in (ad.left_vectors, ad.right_vectors, ad.sigma0, model.fc1.weight, model.fc1.bias):
        assert not t.requires_grad
    assert float(reparam.regularizer(model)) == 0.0  # spec §6: no extra loss
    _, full = adapted(r=None)  # default: every singular value, min(d_in, d_out) per matrix
    assert reparam.trainable_summary(full).per_module == {"fc1": 16, "fc2": 24}
    _, mult = adapted(r=3, parameterization="multiplicative")
    assert [n for n, p in mult.named_parameters() if p.requires_grad][0] == "fc1.adapters.default.sigma_gain"
    assert reparam.trainable_summary(mult).trainable == 6


# --- §11.3 gradient -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("parameterization", ["additive", "multiplicative"])
@pytest.mark.parametrize("r", [4, None])  # 4: the factored path x V_r σ̂ U_rᵀ; all 24: the dense W_e + U diag(σ̂) Vᵀ
def test_gradient_is_projected_weight_gradient(parameterization, r):
    _, model = adapted(torch.float64, r=r, parameterization=parameterization)
    perturb_sigma(model)
    layer, ad = model.fc2, model.fc2.adapters.default
    assert ad.computes_layer_output == (r is None)
    x = torch.randn(7, 24, dtype=torch.float64, requires_grad=True)
    layer(x).sin().sum().backward()
    U, Vh = ad.left_vectors, ad.right_vectors
    W = (layer.weight + (U * ad.sigma_hat()) @ Vh).detach().requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    torch.nn.functional.linear(x2, W, layer.bias).sin().sum().backward()
    G = W.grad
    d_sigma = torch.einsum("oi,or,ri->r", G, U, Vh)  # (U_r[:, i])ᵀ G V_r[:, i]
    if parameterization == "additive":
        torch.testing.assert_close(ad.sigma.grad, d_sigma, atol=1e-10, rtol=0)
    else:  # σ̂ = σ_r (1 + δ)
        torch.testing.assert_close(ad.sigma_gain.grad, ad.sigma0 * d_sigma, atol=1e-10, rtol=0)
    torch.testing.assert_close(x.grad, x2.grad, atol=1e-10, rtol=0)
    assert ad.left_vectors.grad is None and layer.weight.grad is None


# --- §11.4 merge --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-10)])
def test_merge_round_trip_and_closed_form(dtype, tol):
    base, model = adapted(dtype, r=5)
    perturb_sigma(model)
    x = torch.randn(6, 16, dtype=dtype)
    ad = model.fc1.adapters.default
    w_e = model.fc1.weight.detach().clone()
    unmerged = model(x)
    reparam.merge(model)
    torch.testing.assert_close(model(x), unmerged, atol=tol, rtol=0)
    on_w0 = base.fc1.weight + (ad.left_vectors * (ad.sigma - ad.sigma0)) @ ad.right_vectors  # W0 + U(σ̂−σ_r)Vᵀ
    torch.testing.assert_close(model.fc1.weight, on_w0, atol=tol, rtol=0)
    reparam.unmerge(model)
    assert (model.fc1.weight - w_e).abs().max() <= 1e-6 * base.fc1.weight.abs().max()
    torch.testing.assert_close(model(x), unmerged, atol=tol, rtol=0)


def test_merged_weight_keeps_top_singular_vectors():
    base, model = adapted(torch.float64, r=4)
    ad = model.fc2.adapters.default
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # positive, sorted, still above σ_5: the top-4 triplets keep their vectors
        ad.sigma.copy_((ad.sigma0 * (1 + torch.rand(4, generator=g, dtype=torch.float64))).sort(descending=True).values)
    reparam.merge(model)
    U, S, Vh = torch.linalg.svd(model.fc2.weight.detach())
    torch.testing.assert_close(S[:4], ad.sigma.detach(), atol=1e-10, rtol=0)
    eye = torch.eye(4, dtype=torch.float64)
    torch.testing.assert_close((U[:, :4].T @ ad.left_vectors).abs(), eye, atol=1e-8, rtol=0)
    torch.testing.assert_close((Vh[:4] @ ad.right_vectors.T).abs(), eye, atol=1e-8, rtol=0)
    torch.testing.assert_close(S[4:], torch.linalg.svdvals(base.fc2.weight)[4:], atol=1e-10, rtol=0)


# --- §11.5 energy rank rule ---------------------------------------------------------------------------------

@pytest.mark.parametrize("tau,r", [(0.95, 1), (0.99, 2), (0.99995, 3), (1.0, 3)])
def test_energy_rank_rule(tau, r):
    sigma = torch.tensor([10.0, 2.0, 0.1])
    assert energy_rank(sigma, tau) == r
    torch.manual_seed(0)
    Q1, _ = torch.linalg.qr(torch.randn(3, 3, dtype=torch.float64))
    Q2, _ = torch.linalg.qr(torch.randn(3, 3, dtype=torch.float64))
    layer = torch.nn.Linear(3, 3, dtype=torch.float64)
    with torch.no_grad():
        layer.weight.copy_(Q1 @ torch.diag(sigma.double()) @ Q2.T)
    model = torch.nn.Sequential(layer)
    x = torch.randn(4, 3, dtype=torch.float64)
    y0 = model(x)
    cfg = reparam.make_config("svfit", rank_mode="energy", energy=tau)
    reparam.adapt(model, cfg, targets=["0"])
    assert cfg.ranks == {"0": r} and reparam.trainable_summary(model).trainable == r
    torch.testing.assert_close(layer.adapters.default.sigma0, sigma.double()[:r], atol=1e-12, rtol=0)
    torch.testing.assert_close(model(x), y0, atol=1e-12, rtol=0)


def test_energy_rank_is_capped_by_r():
    _, model = adapted(rank_mode="energy", energy=1.0, r=2)
    assert model.reparam_adapters["default"].config.ranks == {"fc1": 2, "fc2": 2}


# --- the shared SVD, save / load, PEFT ----------------------------------------------------------------------

def test_one_cached_svd_per_matrix(monkeypatch):
    calls = count_svds(monkeypatch)
    adapted(rank_mode="energy")  # rank choice and split share one decomposition
    assert len(calls) == 2
    torch.manual_seed(0)
    model = TinyMLP()
    svd_mod.svd(model.fc1.weight)  # decomposed before (say by another method): the cached result is used
    reparam.adapt(model, reparam.make_config("svfit", r=3), targets=["fc1"])
    assert len(calls) == 3


@pytest.mark.parametrize("fields", [dict(r=4), dict(rank_mode="energy", energy=0.9),
                                    dict(r=3, parameterization="multiplicative"),
                                    dict(rank_mode="energy", energy=0.9, save_basis=False,
                                         parameterization="multiplicative")])
def test_save_load_onto_original_checkpoint(fields, tmp_path, monkeypatch):
    base, model = adapted(**fields)
    perturb_sigma(model)
    x = torch.randn(5, 16)
    y = model(x)
    reparam.save_adapter(model, tmp_path)
    saved = json.loads((tmp_path / "reparam_adapter.json").read_text())["config"]
    expected = {m: energy_rank(torch.linalg.svdvals(getattr(base, m).weight), 0.9) for m in ("fc1", "fc2")}
    assert saved["ranks"] == (expected if "energy" in fields else {})  # §5: the r chosen per matrix is logged
    tensors, _ = read_safetensors(tmp_path / "reparam_adapter.safetensors")
    saves_basis = fields.get("save_basis", True)
    basis = {"left_vectors", "right_vectors", "sigma0"} if saves_basis else set()
    trained = "sigma_gain" if "parameterization" in fields else "sigma"
    assert {k.rsplit(".", 1)[1] for k in tensors} == basis | {trained}
    calls = count_svds(monkeypatch)
    loaded = reparam.load_adapter(copy.deepcopy(base), tmp_path)
    assert len(calls) == (0 if saves_basis else 2)  # saved U_r, σ_r, V_rᵀ rebuild W_e without an SVD
    torch.testing.assert_close(loaded(x), y, atol=1e-6, rtol=0)
    torch.testing.assert_close(loaded.fc1.weight, model.fc1.weight, atol=1e-6, rtol=0)


@pytest.fixture(scope="module")
def tiny_bert():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=60, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=24, max_position_embeddings=16, num_labels=3)
    return BertForSequenceClassification(cfg).eval()


@pytest.mark.parametrize("fields", [dict(r=4), dict(rank_mode="energy", energy=0.8)])
def test_peft_export_is_a_lora_on_the_original_weight(tiny_bert, fields, tmp_path):
    peft = pytest.importorskip("peft")
    ids = torch.randint(1, 60, (2, 9), generator=torch.Generator().manual_seed(1))
    model = reparam.adapt(copy.deepcopy(tiny_bert), reparam.make_config("svfit", **fields),
                          targets=["query", "value", "dense"], modules_to_save=["classifier"])
    perturb_sigma(model, std=0.5)
    ours = model(input_ids=ids).logits
    reparam.export_peft(model, tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(tiny_bert), tmp_path).eval()(input_ids=ids).logits
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)
    assert cfg["lora_alpha"] == cfg["r"] and not cfg["use_rslora"]  # scale 1
    if "energy" in fields:
        assert len(set(model.reparam_adapters["default"].config.ranks.values())) > 1 and cfg["rank_pattern"]
        assert cfg["alpha_pattern"] == cfg["rank_pattern"]
    else:  # one rank everywhere: a plain LoRA that reparam imports back
        assert cfg["r"] == 4 and cfg["rank_pattern"] == {}
        back = reparam.import_peft(copy.deepcopy(tiny_bert), tmp_path)
        torch.testing.assert_close(back(input_ids=ids).logits, ours, atol=1e-5, rtol=0)


# --- errors and the command line ----------------------------------------------------------------------------

@pytest.mark.parametrize("fields,message", [
    (dict(r=0), "svfit: invalid r=0"),
    (dict(rank_mode="auto"), "invalid rank_mode='auto': must be one of fixed, energy"),
    (dict(energy=1.5), r"invalid energy=1.5: must be in \(0, 1\]"),
    (dict(parameterization="log"), "invalid parameterization='log'"),
    (dict(save_basis="no"), "invalid save_basis='no'"),
    (dict(ranks={"fc1": 3}), "invalid ranks=.*fixed"),
    (dict(rank_mode="energy", ranks={"fc1": 0}), "invalid ranks=.*positive"),
    (dict(alpha=8), "unknown field.*'alpha'"),
])
def test_config_errors(fields, message):
    with pytest.raises(reparam.ConfigError, match=message):
        reparam.make_config("svfit", **fields)


def test_layer_errors_name_the_module():
    with pytest.raises(reparam.ConfigError, match=r"svfit on fc1: r=17 exceeds min\(d_in, d_out\)=16"):
        adapted(r=17)
    with pytest.raises(reparam.TargetError, match="'emb'.*svfit.*linear"):
        reparam.adapt(MixedKinds(), reparam.make_config("svfit"), targets=["emb"])
    model = TinyMLP()
    torch.nn.init.zeros_(model.fc2.weight)
    with pytest.raises(reparam.ReparamError, match="svfit on fc2: the weight is zero"):
        reparam.adapt(model, reparam.make_config("svfit", rank_mode="energy"), targets=["fc2"])
    with pytest.raises(reparam.ConfigError, match="svfit on fc1: rank_mode='energy' but ranks has no entry"):
        reparam.adapt(TinyMLP(), reparam.make_config("svfit", rank_mode="energy"), targets=["fc1"], init=False)


def test_cli_finetune_export_end_to_end(tmp_path, minilm_path, glue_dir):
    from transformers import AutoModelForSequenceClassification

    from reparam.cli.finetune import build_config
    from reparam.cli.main import main

    assert build_config("svfit", None, None, None, []).r is None  # the method's default: all singular values
    assert build_config("svfit", 4, None, None, ["rank_mode=energy"]).ranks == {}
    assert (build_config("lora", None, None, None, []).r, build_config("lora", None, None, None, []).alpha) == (8, 16.0)
    out = tmp_path / "svfit"
    assert main(["finetune", "--model", str(minilm_path), "--data", str(glue_dir / "SST-2"), "--method", "svfit",
                 "--targets", "query,value", "--set", "rank_mode=energy", "--limit", "16", "--eval-limit", "8",
                 "--max-steps", "2", "--max-length", "24", "--batch-size", "8", "--lr", "1e-2", "--quiet",
                 "--output", str(out)]) == 0
    assert main(["export", str(out), "-o", str(tmp_path / "peft")]) == 0
    ranks = json.loads((out / "reparam_adapter.json").read_text())["config"]["ranks"]
    assert len(ranks) == 12 and all(0 < k <= 384 for k in ranks.values())
    ids = torch.tensor([[101, 2023, 3185, 2001, 2307, 102]])
    model = reparam.load_adapter(AutoModelForSequenceClassification.from_pretrained(minilm_path, num_labels=2), out)
    peft = pytest.importorskip("peft")
    pm = peft.PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(minilm_path, num_labels=2),
                                        tmp_path / "peft")
    with torch.no_grad():
        torch.testing.assert_close(pm.eval()(input_ids=ids).logits, model.eval()(input_ids=ids).logits,
                                   atol=1e-5, rtol=0)
