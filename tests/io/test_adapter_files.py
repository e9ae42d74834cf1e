"""save_adapter / load_adapter: round trips, atomic writes, and clear errors on bad files."""
import copy
import json

import pytest
import torch

import reparam
from reparam.io import adapter_files, files
from tests.helpers import MixedKinds, TinyMLP, randomize_adapters


def trained(method="lora", **fields):
    torch.manual_seed(0)
    base = TinyMLP()
    model = reparam.adapt(copy.deepcopy(base), reparam.make_config(method, **fields), targets="all-linear",
                          modules_to_save=["classifier"])
    randomize_adapters(model)
    with torch.no_grad():
        model.classifier.weight.add_(0.5)
    return base, model


@pytest.mark.parametrize("method", ["lora", "rslora", "dora", "pissa"])
def test_round_trip(method, tmp_path):
    base, model = trained(method, r=3, alpha=6)
    x = torch.randn(4, 16)
    reparam.save_adapter(model, tmp_path)
    saved = json.loads((tmp_path / "reparam_adapter.json").read_text())
    assert saved["method"] == method and saved["config"]["r"] == 3 and saved["modules"] == ["fc1", "fc2"]
    assert saved["base_fingerprint"]["fc1"]["shape"] == [24, 16]
    loaded = reparam.load_adapter(copy.deepcopy(base), tmp_path)
    torch.testing.assert_close(loaded(x), model(x), atol=1e-5 if method == "pissa" else 1e-6, rtol=0)
    assert reparam.trainable_summary(loaded).trainable == reparam.trainable_summary(model).trainable


def test_all_layer_kinds_round_trip(tmp_path):
    torch.manual_seed(0)
    base = MixedKinds()
    model = reparam.adapt(copy.deepcopy(base), reparam.LoraConfig(r=2), targets=["emb", "proj", "conv1", "conv2"])
    randomize_adapters(model)
    reparam.save_adapter(model, tmp_path)
    ids = torch.randint(0, 50, (2, 5))
    torch.testing.assert_close(reparam.load_adapter(copy.deepcopy(base), tmp_path)(ids), model(ids))


def test_crash_mid_save_keeps_previous_adapter(tmp_path, monkeypatch):
    base, model = trained(r=2)
    reparam.save_adapter(model, tmp_path)
    before = (tmp_path / "reparam_adapter.safetensors").read_bytes()
    randomize_adapters(model, seed=5)

    def crash(tensors, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(files, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        reparam.save_adapter(model, tmp_path)
    assert (tmp_path / "reparam_adapter.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["reparam_adapter.json", "reparam_adapter.safetensors"]
    reparam.load_adapter(copy.deepcopy(base), tmp_path)


def test_wrong_base_model_shape(tmp_path):
    _, model = trained(r=2)
    reparam.save_adapter(model, tmp_path)
    other = TinyMLP(hidden=32)
    with pytest.raises(reparam.BaseModelMismatch, match=r"module fc1 has weight shape \[32, 16\].*\[24, 16\]"):
        reparam.load_adapter(other, tmp_path)
    assert not hasattr(other.fc1, "adapters")


def test_wrong_base_model_weights(tmp_path):
    _, model = trained(r=2)
    reparam.save_adapter(model, tmp_path)
    torch.manual_seed(123)
    other = TinyMLP()
    with pytest.raises(reparam.BaseModelMismatch, match="module fc1 has different weights.*check_base=False"):
        reparam.load_adapter(other, tmp_path)
    reparam.load_adapter(other, tmp_path, check_base=False)


def test_missing_module_in_model(tmp_path):
    _, model = trained(r=2)
    reparam.save_adapter(model, tmp_path)
    with pytest.raises(reparam.BaseModelMismatch, match="not in Sequential: fc1, fc2, classifier"):
        reparam.load_adapter(torch.nn.Sequential(torch.nn.Linear(16, 24)), tmp_path)


def test_truncated_file(tmp_path):
    base, model = trained(r=2)
    reparam.save_adapter(model, tmp_path)
    path = tmp_path / "reparam_adapter.safetensors"
    path.write_bytes(path.read_bytes()[:-40])
    with pytest.raises(reparam.AdapterFileError, match="reparam_adapter.safetensors: corrupted, truncated"):
        reparam.load_adapter(copy.deepcopy(base), tmp_path)


@pytest.mark.parametrize("content", [b"", b"not a safetensors file at all", b"\xff" * 64])
def test_garbage_file(tmp_path, content):
    (tmp_path / "reparam_adapter.safetensors").write_bytes(content)
    with pytest.raises(reparam.AdapterFileError, match="reparam_adapter.safetensors: (corrupted|truncated)"):
        reparam.load_adapter(TinyMLP(), tmp_path)


def test_plain_safetensors_without_config(tmp_path):
    files.write_safetensors(tmp_path / "reparam_adapter.safetensors", {"x": torch.zeros(2)})
    with pytest.raises(reparam.AdapterFileError, match="no reparam config in its metadata"):
        reparam.load_adapter(TinyMLP(), tmp_path)


def test_missing_directory_and_peft_hint(tmp_path):
    with pytest.raises(reparam.AdapterFileError, match="no such adapter directory"):
        reparam.load_adapter(TinyMLP(), tmp_path / "nope")
    (tmp_path / "adapter_config.json").write_text("{}")
    with pytest.raises(reparam.AdapterFileError, match="PEFT adapter: use reparam.import_peft"):
        reparam.load_adapter(TinyMLP(), tmp_path)


def rewrite(path, edit_tensors=None, edit_config=None):
    tensors, meta = files.read_safetensors(path)
    config = json.loads(meta["reparam"])
    if edit_tensors:
        edit_tensors(tensors)
    if edit_config:
        edit_config(config)
    files.write_safetensors(path, tensors, {"reparam": json.dumps(config)})


def test_missing_and_unexpected_tensors_are_named(tmp_path):
    base, model = trained(r=2)
    reparam.save_adapter(model, tmp_path)
    path = tmp_path / "reparam_adapter.safetensors"
    rewrite(path, lambda t: (t.pop("fc2.lora_B"), t.__setitem__("fc9.lora_A", torch.zeros(1))))
    target = copy.deepcopy(base)
    with pytest.raises(reparam.AdapterFileError, match=r"missing tensors: fc2.lora_B; tensors matching nothing in the model: fc9.lora_A"):
        reparam.load_adapter(target, tmp_path)
    assert not hasattr(target.fc1, "adapters") and not getattr(target, "reparam_adapters", {})


def test_shape_mismatch_is_named(tmp_path):
    base, model = trained(r=2)
    reparam.save_adapter(model, tmp_path)
    rewrite(tmp_path / "reparam_adapter.safetensors", lambda t: t.__setitem__("fc1.lora_A", torch.zeros(3, 16)))
    with pytest.raises(reparam.AdapterFileError, match=r"tensor fc1.lora_A has shape \[3, 16\], the model expects \[2, 16\]"):
        reparam.load_adapter(copy.deepcopy(base), tmp_path)


def test_unknown_config_field_in_file(tmp_path):
    base, model = trained(r=2)
    reparam.save_adapter(model, tmp_path)
    rewrite(tmp_path / "reparam_adapter.safetensors", edit_config=lambda c: c["config"].update(rnak=4))
    with pytest.raises(reparam.AdapterFileError, match=r"unknown field\(s\) 'rnak'"):
        reparam.load_adapter(copy.deepcopy(base), tmp_path)


def test_read_adapter_reports_format(tmp_path):
    _, model = trained(r=2)
    reparam.save_adapter(model, tmp_path)
    rewrite(tmp_path / "reparam_adapter.safetensors", edit_config=lambda c: c.update(format="other/9"))
    with pytest.raises(reparam.AdapterFileError, match="unsupported format 'other/9'"):
        adapter_files.read_adapter(tmp_path)
