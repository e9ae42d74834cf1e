"""SORSA: the unit-test properties of specs/adapters/sorsa.md §11, plus files, PEFT export, training hooks,
the CLI and the SVD progress bar."""
import copy
import json

import pytest
import torch

import reparam
from reparam.adapters.sorsa import OrthonormalStep
from reparam.core import svd as svd_mod
from reparam.training import TrainConfig, TrainState, method_callbacks, train
from tests.helpers import MixedKinds, TinyMLP, randomize_adapters
from tests.training.tiny import synthetic_data, tiny_bert


def adapted(dtype=torch.float32, targets=("fc1", "fc2"), **fields):
    torch.manual_seed(0)
    base = TinyMLP(dtype=dtype)
    model = reparam.adapt(copy.deepcopy(base), reparam.make_config("sorsa", **fields), targets=list(targets))
    return base, model


def orth_loss_by_hand(adapters):
    """L_orth of §5 written out: mean over the 2n tensors of ‖V_pᵀ V_p − I‖_F and ‖U_pᵀ U_p − I‖_F."""
    norms = []
    for ad in adapters:
        eye = torch.eye(ad.sorsa_A.shape[0], dtype=ad.sorsa_A.dtype)
        norms += [torch.sqrt(((ad.sorsa_A @ ad.sorsa_A.T - eye) ** 2).sum()),
                  torch.sqrt(((ad.sorsa_B.T @ ad.sorsa_B - eye) ** 2).sum())]
    return sum(norms) / len(norms)


def perturb_singular_vectors(model, std=0.05, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith(("sorsa_A", "sorsa_B")):
                p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std)


# --- §11.1 exact start, §11.6 scale convention ---------------------------------------------------------------

@pytest.mark.parametrize("alpha", [None, 8.0])
def test_exact_start_float64(alpha):
    base, model = adapted(torch.float64, r=4, alpha=alpha)
    s = 1.0 if alpha is None else alpha / 4
    for name in ("fc1", "fc2"):
        layer, ad = getattr(model, name), getattr(model, name).adapters.default
        assert ad.scale == s
        rebuilt = layer.weight + s * (ad.sorsa_B * ad.sorsa_S) @ ad.sorsa_A
        torch.testing.assert_close(rebuilt, getattr(base, name).weight, atol=1e-10, rtol=0)
    x = torch.randn(5, 16, dtype=torch.float64)
    torch.testing.assert_close(model(x), base(x), atol=1e-10, rtol=0)


def test_exact_start_float32_and_singular_values():
    base, model = adapted(r=4)
    x = torch.randn(5, 16)
    y0 = base(x)
    torch.testing.assert_close(model(x), y0, atol=1e-5 * y0.abs().max().item(), rtol=0)
    ad = model.fc2.adapters.default
    torch.testing.assert_close(ad.sorsa_S, torch.linalg.svdvals(base.fc2.weight)[:4], atol=1e-6, rtol=0)
    with reparam.disabled(model):  # the layer holds W_r, not W0 (§10)
        assert (model(x) - y0).abs().max() > 1e-3


def test_scale_convention_true_residual():
    base, model = adapted(r=4, alpha=8.0)  # s = 2
    ad = model.fc1.adapters.default
    assert ad.scale == 2.0
    U, S, Vh = torch.linalg.svd(base.fc1.weight.double(), full_matrices=False)
    true_residual = base.fc1.weight.double() - (U[:, :4] * S[:4]) @ Vh[:4]
    torch.testing.assert_close(model.fc1.weight.double(), true_residual, atol=1e-6, rtol=0)
    torch.testing.assert_close(ad.sorsa_S, S[:4].float() / 2, atol=1e-6, rtol=0)


def test_conv1d_layout():
    torch.manual_seed(0)
    model = MixedKinds()
    ids = torch.randint(1, 50, (3, 7))
    y0 = model(ids)
    w0 = model.proj.weight.detach().clone()  # d_in x d_out
    reparam.adapt(model, reparam.make_config("sorsa", r=3), targets=["proj"])
    ad = model.proj.adapters.default
    assert ad.sorsa_A.shape == (3, 12) and ad.sorsa_B.shape == (10, 3)
    torch.testing.assert_close(model(ids), y0, atol=1e-5, rtol=0)
    torch.testing.assert_close(model.proj.weight + ad.delta_weight(model.proj), w0, atol=1e-6, rtol=0)


# --- §11.2 orthonormal at init, the regulariser ---------------------------------------------------------------

def test_orthonormal_at_init_and_sgd_on_regulariser_reduces_it():
    _, model = adapted(r=4)
    assert reparam.regularizer(model).item() <= 1e-5
    perturb_singular_vectors(model)
    start = reparam.regularizer(model).item()
    assert start > 1e-2
    params = [p for n, p in model.named_parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.05)
    for _ in range(5):
        opt.zero_grad()
        reparam.regularizer(model).backward()
        opt.step()
    assert reparam.regularizer(model).item() < 0.8 * start


def test_regulariser_is_mean_over_matrices_float64():
    _, model = adapted(torch.float64, r=4)
    perturb_singular_vectors(model)
    ads = [model.fc1.adapters.default, model.fc2.adapters.default]
    torch.testing.assert_close(reparam.regularizer(model), orth_loss_by_hand(ads), atol=1e-12, rtol=0)
    # a second SORSA adapter is averaged on its own; names= picks one adapter's term
    reparam.adapt(model, reparam.make_config("sorsa", r=2), targets=["fc2"], name="other")
    reparam.set_active(model, ["default", "other"])
    perturb_singular_vectors(model, seed=1)
    other = orth_loss_by_hand([model.fc2.adapters.other])
    torch.testing.assert_close(reparam.regularizer(model, names="other"), other, atol=1e-12, rtol=0)
    torch.testing.assert_close(reparam.regularizer(model), orth_loss_by_hand(ads) + other, atol=1e-12, rtol=0)


# --- §11.3 the regulariser is applied after clipping, with step size γ ----------------------------------------

@pytest.mark.parametrize("divide", [False, True])
def test_regulariser_step_after_clipping_plain_sgd(divide):
    gamma, lr, accumulation = 0.3, 0.1, 4
    _, model = adapted(torch.float64, r=4, gamma=gamma, divide_reg_by_accumulation=divide)
    perturb_singular_vectors(model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5)  # η_t = η_base / 2
    reg_params = [p for n, p in model.named_parameters() if n.endswith(("sorsa_A", "sorsa_B"))]
    reg_grads = torch.autograd.grad(reparam.regularizer(model), reg_params)
    before = [p.detach().clone() for p in reg_params]

    model(torch.randn(8, 16, dtype=torch.float64)).pow(2).sum().backward()
    torch.nn.utils.clip_grad_norm_(params, 1e-8)  # the task gradient is clipped to ~0
    state = TrainState(model, opt, sched, config=TrainConfig(grad_accum=accumulation, progress=False))
    OrthonormalStep().before_optimizer_step(state)
    opt.step()
    factor = gamma / lr / (accumulation if divide else 1)
    eta_t = lr / 2
    for p, p0, g in zip(reg_params, before, reg_grads):
        torch.testing.assert_close(p - p0, -eta_t * factor * g, atol=eta_t * 1.5e-8, rtol=0)


def test_train_loop_applies_regulariser_once_per_step_unclipped():
    torch.manual_seed(0)
    model = tiny_bert(200)
    reparam.adapt(model, reparam.make_config("sorsa", r=4, gamma=0.01), targets=["query", "value"],
                  modules_to_save=["classifier"])
    perturb_singular_vectors(model, std=0.2)
    assert [type(cb) for cb in method_callbacks(model)] == [OrthonormalStep]
    assert method_callbacks(model, [OrthonormalStep()]) == []  # one of each type
    named = {n: p for n, p in model.named_parameters() if n.endswith(("sorsa_A", "sorsa_B"))}
    reg = dict(zip(named, torch.autograd.grad(reparam.regularizer(model), list(named.values()))))
    before = {n: p.detach().clone() for n, p in named.items()}
    lr = 1e-3
    cfg = TrainConfig(lr=lr, max_steps=1, batch_size=8, grad_accum=2, warmup_ratio=0.0, schedule="constant",
                      max_grad_norm=1e-8, progress=False)
    train(model, synthetic_data(16), cfg)
    # AdamW's first step is -lr·g/(|g| + eps): where γ/η·∇L_orth dominates the clipped (≤ 1e-8) task gradient,
    # each entry moves by -lr·sign(∇L_orth); without the regulariser it would follow the task gradient instead.
    checked = 0
    for n, p in named.items():
        g = reg[n] * 0.01 / lr
        big = g.abs() > 1e-4
        checked += int(big.sum())
        torch.testing.assert_close((p - before[n])[big], -lr * g[big].sign(), atol=1e-3 * lr, rtol=0)
    assert checked > 100


def test_weight_decay_on_sorsa_tensors_warns():
    torch.manual_seed(0)
    model = tiny_bert(200)
    reparam.adapt(model, reparam.make_config("sorsa", r=2), targets=["query"])
    with pytest.warns(UserWarning, match=r"weight-decays .*sorsa_.*weight_decay=0"):
        train(model, synthetic_data(8), TrainConfig(max_steps=1, batch_size=8, weight_decay=0.1, progress=False))


# --- §11.4 trainable count, §11.5 merge -----------------------------------------------------------------------

def test_trainable_count_and_frozen_residual():
    _, model = adapted(r=5)
    s = reparam.trainable_summary(model)
    assert s.per_module == {"fc1": 5 * (16 + 24 + 1), "fc2": 5 * (24 + 24 + 1)}
    assert s.trainable == 5 * (16 + 24 + 1) + 5 * (24 + 24 + 1)
    assert not model.fc1.weight.requires_grad and not model.fc1.bias.requires_grad


def test_gradients_equal_dense_closed_form():
    _, model = adapted(torch.float64, r=3, alpha=6.0)
    perturb_singular_vectors(model)
    layer, ad = model.fc1, model.fc1.adapters.default
    x = torch.randn(5, 16, dtype=torch.float64, requires_grad=True)
    layer(x).sin().sum().backward()
    A, S, B = (t.detach().clone().requires_grad_() for t in (ad.sorsa_A, ad.sorsa_S, ad.sorsa_B))
    x2 = x.detach().clone().requires_grad_()
    W = layer.weight + ad.scale * (B * S) @ A
    torch.nn.functional.linear(x2, W, layer.bias).sin().sum().backward()
    for g, ref in zip((ad.sorsa_A.grad, ad.sorsa_S.grad, ad.sorsa_B.grad, x.grad), (A.grad, S.grad, B.grad, x2.grad)):
        torch.testing.assert_close(g, ref, atol=1e-10, rtol=0)


def test_merge_unmerge_unload_and_delete():
    base, model = adapted(r=4)
    randomize_adapters(model, std=0.05)
    x = torch.randn(6, 16)
    w_r = model.fc1.weight.detach().clone()
    y = model(x)
    reparam.merge(model)
    ad = model.fc1.adapters.default
    torch.testing.assert_close(model.fc1.weight, w_r + ad.scale * (ad.sorsa_B * ad.sorsa_S) @ ad.sorsa_A,
                               atol=1e-6, rtol=0)
    torch.testing.assert_close(model(x), y, atol=1e-5, rtol=0)
    reparam.unmerge(model)
    torch.testing.assert_close(model.fc1.weight, w_r, atol=1e-6, rtol=0)
    plain = reparam.unload(copy.deepcopy(model))
    assert type(plain.fc1) is torch.nn.Linear
    torch.testing.assert_close(plain(x), y, atol=1e-5, rtol=0)
    reparam.delete_adapter(model, "default")  # removed unmerged: W0 comes back
    torch.testing.assert_close(model.fc1.weight, base.fc1.weight, atol=1e-6, rtol=0)
    torch.testing.assert_close(model(x), base(x), atol=1e-5, rtol=0)


# --- files: onto the original checkpoint, without an SVD; PEFT export -----------------------------------------

def test_save_load_onto_original_checkpoint_without_svd(tmp_path, monkeypatch):
    base, model = adapted(r=4, alpha=8.0)
    randomize_adapters(model, std=0.05)
    x = torch.randn(6, 16)
    y = model(x)
    reparam.save_adapter(model, tmp_path)

    def no_svd(*args, **kwargs):
        raise AssertionError("load_adapter must rebuild the residual from the saved factors, not by an SVD")

    monkeypatch.setattr(torch.linalg, "svd", no_svd)
    loaded = reparam.load_adapter(copy.deepcopy(base), tmp_path)
    torch.testing.assert_close(loaded(x), y, atol=1e-5, rtol=0)
    torch.testing.assert_close(loaded.fc2.weight, model.fc2.weight, atol=1e-6, rtol=0)


@pytest.mark.parametrize("alpha", [None, 8.0])
def test_export_loads_in_peft_on_original_weights(tmp_path, alpha):
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    bert = tiny_bert(100, num_labels=3).eval()
    model = reparam.adapt(copy.deepcopy(bert), reparam.make_config("sorsa", r=4, alpha=alpha),
                          targets=["query", "value", "output.dense"], modules_to_save=["classifier"])
    randomize_adapters(model, std=0.05)
    ids = torch.randint(1, 100, (3, 10), generator=torch.Generator().manual_seed(1))
    ours = model(input_ids=ids).logits
    reparam.export_peft(model, tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["r"] == 8 and cfg["lora_alpha"] == 8 and not cfg["use_rslora"]  # rank 2r, scale 1 on W0
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(bert), tmp_path).eval()(input_ids=ids).logits
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)


# --- bad input ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fields, message", [
    (dict(r=0), "sorsa: invalid r=0"),
    (dict(alpha=-1.0), "sorsa: invalid alpha=-1.0"),
    (dict(gamma=-1e-4), "sorsa: invalid gamma=-0.0001"),
    (dict(dropout=1.0), "sorsa: invalid dropout=1.0"),
    (dict(divide_reg_by_accumulation="yes"), "invalid divide_reg_by_accumulation='yes'"),
    (dict(init="pissa"), "unknown field.*'init'.*method 'sorsa'"),
])
def test_bad_config_names_the_field(fields, message):
    with pytest.raises(reparam.ConfigError, match=message):
        reparam.make_config("sorsa", **fields)


def test_bad_targets_name_the_module():
    with pytest.raises(reparam.ConfigError, match=r"sorsa on fc1: r=20 exceeds min\(d_in, d_out\)=16"):
        adapted(r=20)
    with pytest.raises(reparam.TargetError, match="'emb'.*sorsa.*linear"):
        reparam.adapt(MixedKinds(), reparam.make_config("sorsa", r=2), targets=["emb"])


def test_zero_learning_rate_is_an_error():
    _, model = adapted(r=2)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
    with pytest.raises(reparam.ConfigError, match="learning rate > 0"):
        OrthonormalStep().before_optimizer_step(TrainState(model, opt, config=None))


# --- CLI ------------------------------------------------------------------------------------------------------

def test_cli_finetune_on_glue_then_export(tmp_path, minilm_path, glue_dir, capsys):
    from reparam.cli.main import main

    out = tmp_path / "sorsa"
    code = main(["finetune", "--method", "sorsa", "--model", str(minilm_path), "--data", str(glue_dir / "SST-2"),
                 "--r", "2", "--targets", "query,value", "--set", "gamma=1e-3", "--limit", "16",
                 "--eval-limit", "8", "--max-steps", "2", "--max-length", "24", "--quiet", "-o", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert '"alpha": null' in printed and '"gamma": 0.001' in printed  # the CLI keeps s = 1
    saved = json.loads((out / "reparam_adapter.json").read_text())
    assert saved["method"] == "sorsa" and saved["config"]["r"] == 2
    assert main(["export", str(out), "--format", "peft", "-o", str(tmp_path / "peft")]) == 0
    assert json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["r"] == 4


# --- the SVD progress bar (reparam/core/svd.py) ---------------------------------------------------------------

@pytest.fixture
def progress_setting():
    old = svd_mod.set_progress(None)
    yield
    svd_mod.set_progress(old)


def test_progress_bar_forced_auto_and_silent(capsys, monkeypatch, progress_setting):
    monkeypatch.delenv("REPARAM_SVD_PROGRESS", raising=False)
    adapted(r=2)  # automatic mode, tiny model: silent
    assert "SVD" not in capsys.readouterr().err
    svd_mod.set_progress(True)
    adapted(r=2)
    err = capsys.readouterr().err
    assert "sorsa: SVD" in err and "2/2" in err
    adapted(r=2)  # a second adapt call on a fresh copy: its own bar
    assert "2/2" in capsys.readouterr().err
    reparam.adapt(TinyMLP(), reparam.make_config("lora"), targets=["fc1", "fc2"])  # decomposes nothing
    assert "SVD" not in capsys.readouterr().err
    svd_mod.set_progress(None)
    monkeypatch.setattr(svd_mod, "AUTO_MIN_WORK", 0)  # "large" model: automatic mode shows it
    monkeypatch.setattr(svd_mod, "AUTO_DELAY_S", 0.0)
    adapted(r=2)
    assert "sorsa: SVD" in capsys.readouterr().err
    monkeypatch.setenv("REPARAM_SVD_PROGRESS", "0")
    adapted(r=2)
    assert "SVD" not in capsys.readouterr().err


def test_one_svd_per_weight_and_cache_shared(monkeypatch):
    calls = []
    real = torch.linalg.svd
    monkeypatch.setattr(torch.linalg, "svd", lambda w, **kw: calls.append(tuple(w.shape)) or real(w, **kw))
    adapted(r=2)
    assert calls == [(24, 16), (24, 24)]
    calls.clear()
    torch.manual_seed(0)
    mlp = TinyMLP()
    sigma = svd_mod.svd(mlp.fc1.weight)[1]  # e.g. a rank choice before adapting: the adapter reuses it
    reparam.adapt(mlp, reparam.make_config("sorsa", r=2), targets=["fc1"])
    assert calls == [(24, 16)]
    torch.testing.assert_close(mlp.fc1.adapters.default.sorsa_S, sigma[:2])
