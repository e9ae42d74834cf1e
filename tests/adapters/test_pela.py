"""PELA (specs/adapters/pela.md): every §9 unit-test property, plus save/load, merge/unload, training, export."""
import pytest
import torch
from torch import nn

import reparam
from reparam.adapters.pela import (FeatureDistiller, PelaAdapter, export_factorised, load_factorised, pela_rank)
from reparam.core.errors import AdapterFileError, ConfigError
from reparam.core.model import adapted_layers
from tests.helpers import TinyMLP


class Block(nn.Module):
    def __init__(self, d, dtype):
        super().__init__()
        self.fc1 = nn.Linear(d, 2 * d, dtype=dtype)
        self.fc2 = nn.Linear(2 * d, d, dtype=dtype)
        self.norm = nn.LayerNorm(d, dtype=dtype)

    def forward(self, x):
        return self.norm(x + self.fc2(torch.relu(self.fc1(x))))


class TinyEncoder(nn.Module):
    """Two blocks named like HF encoders (`layers.0`, `layers.1`) and a head."""

    def __init__(self, d=12, n_out=3, dtype=torch.float32):
        super().__init__()
        self.layers = nn.ModuleList([Block(d, dtype) for _ in range(2)])
        self.head = nn.Linear(d, n_out, dtype=dtype)

    def forward(self, x):
        for block in self.layers:
            x = block(x)
        return self.head(x.mean(1))


def pela(model, **fields):
    return reparam.adapt(model, reparam.make_config("pela", **fields), targets=nn.Linear)


def adapters(model):
    return {n: layer.adapters["default"] for n, layer in adapted_layers(model)}


def test_rank_rule_and_parameter_count():  # §9.1
    assert pela_rank(768, 768, 2) == 192 and pela_rank(768, 3072, 3) == 204
    assert [pela_rank(768, 768, c) for c in (3, 2, 1.5)] == [128, 192, 256]
    assert [pela_rank(3072, 768, c) for c in (3, 2, 1.5)] == [204, 307, 409]
    layer = nn.Sequential(nn.Linear(60, 200))
    pela(layer, compression=3)
    assert layer[0].adapters["default"].r == 15  # floor(60·200 / (3·260)) = floor(15.38)
    trainable = sum(p.numel() for p in layer.parameters() if p.requires_grad)
    assert trainable == 15 * (60 + 200) + 200


def test_best_approximation_at_init():  # §9.2, float64
    torch.manual_seed(0)
    model = TinyMLP(d_in=20, hidden=30, dtype=torch.float64)
    W0 = model.fc2.weight.detach().clone()
    pela(model, r=7)
    a = model.fc2.adapters["default"]
    sigma = torch.linalg.svdvals(W0)
    err = ((a.weight_R @ a.weight_L - W0) ** 2).sum()
    assert torch.allclose(err, (sigma[7:] ** 2).sum(), rtol=1e-6)
    assert torch.allclose(a.weight_R.T @ a.weight_R, torch.diag(sigma[:7]), atol=1e-10)
    assert torch.allclose(a.weight_L @ a.weight_L.T, torch.diag(sigma[:7]), atol=1e-10)


def test_full_rank_reproduces_outputs():  # §9.3, float32
    torch.manual_seed(0)
    model, x = TinyEncoder(), torch.randn(4, 5, 12)
    ref = model(x)
    pela(model, r=12, min_out_features=1, name_omit=[])
    assert len(adapters(model)) == 5
    assert torch.allclose(model(x), ref, atol=1e-5)


def test_skipping():  # §9.4
    class Vision(nn.Module):
        def __init__(self):
            super().__init__()
            self.patch_embed = nn.Sequential(nn.Linear(8, 16))
            self.blocks = nn.ModuleList([nn.ModuleDict({"attn": nn.Linear(16, 16), "norm1": nn.Linear(16, 16)})])
            self.downsample = nn.Sequential(nn.Linear(16, 16))
            self.itm = nn.Linear(16, 2)  # out_features < 10
            self.head = nn.Linear(16, 16)

    model = Vision()
    pela(model, r=4)
    assert sorted(adapters(model)) == ["blocks.0.attn"]
    assert isinstance(model.head, nn.Linear) and not hasattr(model.head, "adapters")


def _full_rank_fd_model():
    torch.manual_seed(0)
    model = TinyEncoder(dtype=torch.float64)
    pela(model, r=12, min_out_features=1, name_omit=["head"])
    return model


def test_losses_full_rank_float64():  # §9.5
    model, x = _full_rank_fd_model(), torch.randn(3, 4, 12, dtype=torch.float64)
    distiller = FeatureDistiller(model, "default", model.reparam_adapters["default"].config)
    model.train()
    model(x)
    fd = distiller.pop_loss()
    assert len(distiller.teacher_h) == 0 and fd is not None and fd <= 1e-20
    distiller.remove()
    wpr = reparam.regularizer(model)
    assert wpr.item() == pytest.approx(1e-6, rel=1e-6)  # (δ − ε)², δ ≈ 1e-15
    deviation = max((a.weight_R @ a.weight_L - model.get_submodule(n).weight).abs().max()
                    for n, a in adapters(model).items())
    assert deviation < 1e-12
    # perturb one entry of one layer's W0: the max-norm's gradient touches row i* of W_R and column j* of W_L only
    layer = model.layers[1].fc1
    i, j = 5, 7
    with torch.no_grad():
        layer.weight[i, j] += 0.1
    reparam.regularizer(model).backward()
    a = layer.adapters["default"]
    assert a.weight_R.grad[i].abs().sum() > 0 and a.weight_L.grad[:, j].abs().sum() > 0
    assert torch.count_nonzero(a.weight_R.grad[torch.arange(24) != i]) == 0
    assert torch.count_nonzero(a.weight_L.grad[:, torch.arange(12) != j]) == 0
    # squared_to_eps also pulls the unperturbed layers' δ ≈ 0 up toward ε (not a hinge), through one entry each
    untouched = model.layers[0].fc1.adapters["default"]
    assert untouched.weight_R.grad.abs().sum() > 0


def test_regulariser_forms_and_weight():
    model = TinyMLP(dtype=torch.float64)
    pela(model, r=3, lambda_wpr=2.0)
    deltas = [(a.weight_R @ a.weight_L - model.get_submodule(n).weight).abs().max()
              for n, a in adapters(model).items()]
    expected = 2.0 * sum((d - 1e-3) ** 2 for d in deltas) / len(deltas)
    assert torch.allclose(reparam.regularizer(model), expected)
    hinge = TinyMLP(dtype=torch.float64)
    pela(hinge, r=24, min_out_features=1, wpr_form="hinge")
    assert reparam.regularizer(hinge).item() == 0.0  # exact layers: δ < ε, no penalty


def test_dense_export_and_merge_unmerge():  # §9.6
    torch.manual_seed(0)
    model, x = TinyEncoder(), torch.randn(2, 5, 12)
    W0 = model.layers[0].fc1.weight.detach().clone()
    pela(model, compression=1.5)
    for p in model.parameters():  # trained factors and bias offsets
        if p.requires_grad:
            p.data.add_(0.05 * torch.randn_like(p))
    factorised = model(x)
    reparam.merge(model)
    assert torch.allclose(model(x), factorised, atol=1e-5)
    reparam.unmerge(model)
    assert torch.equal(model.layers[0].fc1.weight, W0)
    assert torch.allclose(model(x), factorised, atol=1e-6)
    dense = reparam.unload(model)
    assert type(dense.layers[0].fc1) is nn.Linear and torch.allclose(dense(x), factorised, atol=1e-5)


def test_save_load_onto_original(tmp_path):
    torch.manual_seed(0)
    model, x = TinyEncoder(), torch.randn(2, 5, 12)
    fresh = TinyEncoder()
    fresh.load_state_dict(model.state_dict())
    pela(model)
    for a in adapters(model).values():
        a.bias_delta.data.normal_()
    expected = model(x)
    reparam.save_adapter(model, tmp_path / "a")
    loaded = reparam.load_adapter(fresh, tmp_path / "a")
    assert torch.allclose(loaded(x), expected, atol=1e-6)
    assert torch.equal(reparam.unload(loaded, merge_active=False).layers[1].fc2.weight, model.layers[1].fc2.weight)


def test_factorised_export_round_trip(tmp_path):
    torch.manual_seed(0)
    model, x = TinyEncoder(), torch.randn(2, 5, 12)
    pela(model, compression=2)
    for a in adapters(model).values():
        a.bias_delta.data.normal_()
    expected = model(x)
    export_factorised(model, tmp_path / "f")
    loaded = load_factorised(tmp_path / "f", TinyEncoder())
    assert isinstance(loaded.layers[0].fc1, nn.Sequential)
    assert loaded.layers[0].fc1[0].weight.shape == (pela_rank(12, 24, 2), 12)
    assert loaded.layers[0].fc1[0].bias is None and loaded.layers[0].fc1[1].bias is not None
    assert torch.allclose(loaded(x), expected, atol=1e-6)
    n_dense = sum(p.numel() for p in TinyEncoder().parameters())
    assert sum(p.numel() for p in loaded.parameters()) < n_dense
    with pytest.raises(AdapterFileError, match="does not fit"):
        load_factorised(tmp_path / "f", TinyEncoder(d=16))


def test_conv1d_factorised_export(tmp_path):
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    make = lambda: nn.Sequential(Conv1D(14, 12), nn.ReLU(), Conv1D(12, 14))  # noqa: E731  (d_out, d_in)
    model, x = make(), torch.randn(3, 12)
    reference = model(x)
    reparam.adapt(model, reparam.make_config("pela", r=12), targets=Conv1D)
    assert torch.allclose(model(x), reference, atol=1e-5)  # full rank: exact
    export_factorised(model, tmp_path / "c")
    assert torch.allclose(load_factorised(tmp_path / "c", make())(x), reference, atol=1e-5)


def test_hf_bert_export_round_trip(tmp_path):
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=16, num_labels=2)
    torch.manual_seed(0)
    model = BertForSequenceClassification(cfg).eval()
    ids = torch.randint(0, 50, (2, 7))
    reparam.adapt(model, reparam.make_config("pela"), modules_to_save=["classifier"])
    assert "bert.pooler.dense" in adapters(model) and "classifier" not in adapters(model)
    expected = model(input_ids=ids).logits
    export_factorised(model, tmp_path / "bert")
    loaded = load_factorised(tmp_path / "bert", BertForSequenceClassification(cfg).eval())
    assert torch.allclose(loaded(input_ids=ids).logits, expected, atol=1e-5)
    assert "pela_ranks" in (tmp_path / "bert" / "config.json").read_text()


def test_distillation_training_moves_student_toward_teacher():
    from reparam.training.callbacks import TrainState, method_callbacks

    torch.manual_seed(0)
    model, x = TinyEncoder(), torch.randn(8, 5, 12)
    pela(model, compression=4, alpha_fd=1.0, lambda_wpr=0.0)
    callbacks = method_callbacks(model)
    state = TrainState(model=model)
    for cb in callbacks:
        cb.on_train_begin(state)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    losses = []
    for _ in range(30):
        model(x)
        loss = reparam.regularizer(model)
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    for cb in callbacks:
        cb.on_train_end(state)
    assert losses[-1] < 0.5 * losses[0]
    assert not hasattr(model, "reparam_pela_distiller")
    assert reparam.regularizer(model).item() == 0.0  # no teacher outside training, λ_wpr = 0


def test_errors():
    with pytest.raises(ConfigError, match="compression"):
        reparam.make_config("pela", compression=1.0)
    with pytest.raises(ConfigError, match="wpr_form"):
        reparam.make_config("pela", wpr_form="l1")
    with pytest.raises(ConfigError, match="invalid r=0"):
        reparam.make_config("pela", r=0)
    with pytest.raises(ConfigError, match="block_pattern"):
        model = TinyMLP()
        pela(model)
        FeatureDistiller(model, "default", model.reparam_adapters["default"].config)
    with pytest.raises(AdapterFileError, match="no PEFT LoRA export"):
        model = TinyMLP()
        pela(model)
        reparam.export_peft(model, "/nonexistent/never-written")
    assert PelaAdapter.supported_kinds == ("linear",)
