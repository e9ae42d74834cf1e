"""Targets, registry, several named adapters, switching, disabling, deleting, unloading, summaries."""
import copy
import re

import pytest
import torch
from torch import nn

import reparam
from tests.helpers import TinyMLP, randomize_adapters


@pytest.fixture()
def base():
    torch.manual_seed(0)
    return TinyMLP()


def test_target_forms(base):
    names = lambda t: [n for n, _ in reparam.explain(base, t)]  # noqa: E731
    assert names("all-linear") == ["fc1", "fc2"]  # the classifier head is left alone
    assert names(["fc1"]) == ["fc1"]
    assert names("fc1,fc2") == ["fc1", "fc2"]
    assert names(["re:fc[12]"]) == ["fc1", "fc2"]
    assert names([re.compile("fc2|classifier")]) == ["fc2", "classifier"]
    assert names([nn.LayerNorm]) == ["norm"]
    assert reparam.explain(base, ["fc1"])[0][1] == "Linear(24x16)"


def test_suffix_matching_on_nested_names():
    model = nn.Sequential()
    model.add_module("block", nn.ModuleDict({"query": nn.Linear(4, 4), "subquery": nn.Linear(4, 4)}))
    assert [n for n, _ in reparam.explain(model, ["query"])] == ["block.query"]


def test_target_matching_nothing_names_it(base):
    with pytest.raises(reparam.TargetError, match=r"'qeury'.*matched no module of TinyMLP"):
        reparam.adapt(base, reparam.LoraConfig(), targets=["fc1", "qeury"])
    assert not any(isinstance(m, reparam.core.layers.AdaptedLayer) for m in base.modules())


def test_unsupported_layer_kind_names_module(base):
    with pytest.raises(reparam.TargetError, match=r"module 'norm' is a LayerNorm\(24\).*lora"):
        reparam.adapt(base, reparam.LoraConfig(), targets=["norm"])


def test_bad_regex_is_an_error(base):
    with pytest.raises(reparam.TargetError, match="not a valid regex"):
        reparam.explain(base, ["re:fc[1"])


def test_registry_and_unknown_fields():
    assert {"lora", "rslora", "pissa", "dora"} <= set(reparam.methods())
    assert reparam.methods()["lora"].config_cls is reparam.LoraConfig
    with pytest.raises(reparam.ConfigError, match=r"unknown field\(s\) 'rank' for method 'lora'; valid fields: r, alpha"):
        reparam.make_config("lora", rank=8)
    with pytest.raises(reparam.ConfigError, match="unknown method 'loar'"):
        reparam.make_config("loar")
    with pytest.raises(reparam.ConfigError, match="invalid r=0"):
        reparam.LoraConfig(r=0)
    with pytest.raises(reparam.ConfigError, match="invalid init='svd'"):
        reparam.LoraConfig(init="svd")


def test_only_adapters_and_saved_modules_train(base):
    reparam.adapt(base, reparam.LoraConfig(r=2), targets="all-linear", modules_to_save=["classifier"])
    trainable = sorted(n for n, p in base.named_parameters() if p.requires_grad)
    assert trainable == ["classifier.bias", "classifier.weight", "fc1.adapters.default.lora_A",
                         "fc1.adapters.default.lora_B", "fc2.adapters.default.lora_A", "fc2.adapters.default.lora_B"]
    s = reparam.trainable_summary(base)
    assert s.per_module["classifier"] == 24 * 8 + 8
    assert "trainable params" in str(s)


def test_named_adapters_switch_disable_delete(base):
    x = torch.randn(3, 16)
    y0 = base(x)
    model = copy.deepcopy(base)
    reparam.adapt(model, reparam.LoraConfig(r=2), targets=["fc1"], name="a")
    reparam.adapt(model, reparam.LoraConfig(r=3), targets=["fc1", "fc2"], name="b")
    randomize_adapters(model)
    assert reparam.active_adapters(model) == ["b"]
    yb = model(x)
    reparam.set_active(model, "a")
    ya = model(x)
    assert not torch.allclose(ya, yb)
    assert model.fc2.active_adapters == []
    assert not model.fc1.adapters.b.lora_A.requires_grad and model.fc1.adapters.a.lora_A.requires_grad
    with reparam.disabled(model):
        assert torch.equal(model(x), y0)
    assert torch.equal(model(x), ya)
    reparam.set_active(model, ["a", "b"])  # both at once: deltas add
    a_only = model.fc1.adapters.a.delta_weight(model.fc1) + model.fc1.adapters.b.delta_weight(model.fc1)
    torch.testing.assert_close(model.fc1(x), torch.nn.functional.linear(x, base.fc1.weight + a_only, base.fc1.bias))
    reparam.delete_adapter(model, "a")
    assert "a" not in model.fc1.adapters and reparam.active_adapters(model) == ["b"]
    torch.testing.assert_close(model(x), yb)
    reparam.delete_adapter(model, "b")
    assert type(model.fc1) is nn.Linear and torch.equal(model(x), y0)
    with pytest.raises(reparam.ReparamError, match="no adapter named 'b'"):
        reparam.set_active(model, "b")


def test_duplicate_adapter_name(base):
    reparam.adapt(base, reparam.LoraConfig(r=2), targets=["fc1"])
    with pytest.raises(reparam.ReparamError, match="already has an adapter named 'default'"):
        reparam.adapt(base, reparam.LoraConfig(r=2), targets=["fc1"])


def test_disable_unmerges_first(base):
    x = torch.randn(3, 16)
    y0 = base(x)
    reparam.adapt(base, reparam.LoraConfig(r=2), targets="all-linear")
    randomize_adapters(base)
    reparam.merge(base)
    with reparam.disabled(base):
        torch.testing.assert_close(base(x), y0, atol=1e-6, rtol=0)


def test_unload_returns_plain_model_with_delta(base):
    x = torch.randn(3, 16)
    reparam.adapt(base, reparam.LoraConfig(r=2), targets="all-linear")
    randomize_adapters(base)
    y = base(x)
    plain = reparam.unload(base)
    assert all(not hasattr(m, "adapters") for m in plain.modules())
    assert type(plain.fc1) is nn.Linear
    assert set(plain.state_dict()) == set(TinyMLP().state_dict())
    torch.testing.assert_close(plain(x), y, atol=1e-6, rtol=0)


def test_regularizer_zero_without_terms(base):
    reparam.adapt(base, reparam.LoraConfig(r=2), targets="all-linear")
    assert reparam.regularizer(base).item() == 0.0


def test_deepcopy_and_pickle_of_adapted_model(base, tmp_path):
    reparam.adapt(base, reparam.LoraConfig(r=2), targets="all-linear")
    randomize_adapters(base)
    x = torch.randn(2, 16)
    torch.testing.assert_close(copy.deepcopy(base)(x), base(x))
    torch.save(base, tmp_path / "m.pt")
    loaded = torch.load(tmp_path / "m.pt", weights_only=False)
    torch.testing.assert_close(loaded(x), base(x))


def test_adapters_follow_the_model_training_mode(base):
    base.eval()
    reparam.adapt(base, reparam.LoraConfig(r=2, dropout=0.5), targets="all-linear")
    assert not base.fc1.adapters.default.training
    randomize_adapters(base)
    x = torch.randn(3, 16)
    assert torch.equal(base(x), base(x))
