"""PEFT files both ways: our export loads in PEFT with the same logits; PEFT's files load in reparam."""
import copy
import json

import pytest
import torch

import reparam
from tests.helpers import randomize_adapters

peft = pytest.importorskip("peft")


@pytest.fixture(scope="module")
def bert(minilm_path):
    from transformers import AutoModelForSequenceClassification, logging

    logging.set_verbosity_error()
    torch.manual_seed(0)
    return AutoModelForSequenceClassification.from_pretrained(minilm_path, num_labels=3).eval()


@pytest.fixture(scope="module")
def ids():
    g = torch.Generator().manual_seed(1)
    return torch.randint(1000, 5000, (3, 10), generator=g)


@pytest.fixture(scope="module")
def gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=100, n_positions=32)
    return GPT2LMHeadModel(cfg).eval()


@pytest.mark.parametrize("method", ["lora", "rslora", "dora", "pissa"])
def test_export_loads_in_peft_with_same_logits(bert, ids, method, tmp_path):
    model = reparam.adapt(copy.deepcopy(bert), reparam.make_config(method, r=4, alpha=8),
                          targets=["query", "value", "output.dense"], modules_to_save=["classifier"])
    randomize_adapters(model, std=0.05)
    with torch.no_grad():
        model.classifier.bias.add_(1.0)
    ours = model(input_ids=ids).logits
    reparam.export_peft(model, tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["task_type"] == "SEQ_CLS" and cfg["use_dora"] == (method == "dora")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(bert), tmp_path).eval()(input_ids=ids).logits
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)
    if method == "pissa":
        assert cfg["r"] == 8 and cfg["lora_alpha"] == 16  # rank 2r on the original W0, same scale


def test_export_without_saved_head_loads_in_peft(bert, ids, tmp_path):
    """No modules_to_save: PEFT must not look for classifier weights in the file (task_type left unset)."""
    model = reparam.adapt(copy.deepcopy(bert), reparam.LoraConfig(r=4, alpha=8), targets=["query", "value"])
    randomize_adapters(model, std=0.05)
    ours = model(input_ids=ids).logits
    reparam.export_peft(model, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["task_type"] is None
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(bert), tmp_path).eval()(input_ids=ids).logits
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kwargs", [dict(), dict(use_rslora=True), dict(use_dora=True), dict(init_lora_weights="gaussian")])
def test_import_adapter_written_by_peft(bert, ids, kwargs, tmp_path):
    cfg = peft.LoraConfig(r=4, lora_alpha=16, target_modules=["query", "key", "dense"], task_type="SEQ_CLS", **kwargs)
    torch.manual_seed(3)
    pm = peft.get_peft_model(copy.deepcopy(bert), cfg)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n or "magnitude" in n or "modules_to_save" in n:
                p.add_(torch.randn_like(p) * 0.05)
    pm.eval()
    theirs = pm(input_ids=ids).logits
    pm.save_pretrained(tmp_path)
    model = reparam.import_peft(copy.deepcopy(bert), tmp_path)
    torch.testing.assert_close(model(input_ids=ids).logits, theirs, atol=1e-5, rtol=0)
    rec = model.reparam_adapters["default"]
    assert rec.modules_to_save == ["classifier"]
    assert "classifier" not in rec.modules and "bert.pooler.dense" in rec.modules


def test_gpt2_conv1d_and_embedding_both_ways(gpt2, tmp_path):
    ids = torch.randint(0, 100, (2, 9))
    model = reparam.adapt(copy.deepcopy(gpt2), reparam.LoraConfig(r=2, alpha=4), targets=["c_attn", "c_proj", "wte"])
    randomize_adapters(model, std=0.1)
    ours = model(input_ids=ids).logits
    reparam.export_peft(model, tmp_path / "out")
    assert json.loads((tmp_path / "out" / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(gpt2), tmp_path / "out").eval()(input_ids=ids).logits
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)
    back = reparam.import_peft(copy.deepcopy(gpt2), tmp_path / "out")
    torch.testing.assert_close(back(input_ids=ids).logits, ours, atol=1e-6, rtol=0)


def test_import_errors_name_keys(bert, tmp_path):
    pm = peft.get_peft_model(copy.deepcopy(bert), peft.LoraConfig(r=2, target_modules=["query"]))
    pm.save_pretrained(tmp_path)
    from reparam.io.files import read_safetensors, write_safetensors

    path = tmp_path / "adapter_model.safetensors"
    tensors, _ = read_safetensors(path)
    missing = "base_model.model.bert.encoder.layer.3.attention.self.query.lora_B.weight"
    tensors.pop(missing)
    tensors["base_model.model.bert.encoder.layer.9.attention.self.query.lora_A.weight"] = torch.zeros(2, 384)
    write_safetensors(path, tensors)
    target = copy.deepcopy(bert)
    with pytest.raises(reparam.AdapterFileError, match=r"adapter_model.safetensors: tensors matching nothing in the model: .*layer\.9"):
        reparam.import_peft(target, tmp_path)
    assert not getattr(target, "reparam_adapters", {})
    tensors.pop("base_model.model.bert.encoder.layer.9.attention.self.query.lora_A.weight")
    write_safetensors(path, tensors)
    with pytest.raises(reparam.AdapterFileError, match=r"missing tensors: bert.encoder.layer.3.attention.self.query.lora_B"):
        reparam.import_peft(copy.deepcopy(bert), tmp_path)


def test_import_rejects_other_peft_types(tmp_path):
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "IA3"}))
    with pytest.raises(reparam.AdapterFileError, match="adapter_config.json: peft_type 'IA3' is not supported"):
        reparam.import_peft(torch.nn.Linear(2, 2), tmp_path)
    (tmp_path / "adapter_config.json").write_text("{broken")
    with pytest.raises(reparam.AdapterFileError, match="adapter_config.json: not valid JSON"):
        reparam.import_peft(torch.nn.Linear(2, 2), tmp_path)


def test_import_rank_and_alpha_patterns_written_by_peft(bert, ids, tmp_path):
    # Suffix pattern, full-name regex and a plain module name, as PEFT matches them (first matching key wins).
    rank_pattern = {"value": 2, r"bert\.encoder\.layer\.1\..*query": 6}
    alpha_pattern = {"bert.encoder.layer.0.attention.self.query": 3.0, "value": 10}
    cfg = peft.LoraConfig(r=4, lora_alpha=16, target_modules=["query", "value"], task_type="SEQ_CLS", rank_pattern=rank_pattern,
                          alpha_pattern=alpha_pattern)
    torch.manual_seed(4)
    pm = peft.get_peft_model(copy.deepcopy(bert), cfg)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.add_(torch.randn_like(p) * 0.05)
    theirs = pm.eval()(input_ids=ids).logits
    pm.save_pretrained(tmp_path / "peft")
    model = reparam.import_peft(copy.deepcopy(bert), tmp_path / "peft")
    torch.testing.assert_close(model(input_ids=ids).logits, theirs, atol=1e-5, rtol=0)
    layers = dict(model.named_modules())
    for m in model.reparam_adapters["default"].modules:  # each module has PEFT's rank and scale
        ref = dict(pm.named_modules())["base_model.model." + m]
        ours = layers[m].adapters["default"]
        assert ours.lora_A.shape == ref.lora_A["default"].weight.shape and ours.scale == ref.scaling["default"]
    assert {layers[f"bert.encoder.layer.{i}.attention.self.{k}"].adapters["default"].lora_A.shape[0]
            for i in (0, 1) for k in ("query", "value")} == {2, 4, 6}
    reparam.save_adapter(model, tmp_path / "ours")
    loaded = reparam.load_adapter(copy.deepcopy(bert), tmp_path / "ours")
    torch.testing.assert_close(loaded(input_ids=ids).logits, theirs, atol=1e-5, rtol=0)
    reparam.export_peft(loaded, tmp_path / "again")  # and back to PEFT with the same per-module ranks / alphas
    again = peft.PeftModel.from_pretrained(copy.deepcopy(bert), tmp_path / "again").eval()
    torch.testing.assert_close(again(input_ids=ids).logits, theirs, atol=1e-5, rtol=0)


def test_adalora_export_round_trips_through_import(tmp_path):
    from reparam.training import train
    from tests.helpers import bert_adapted, quiet
    from tests.training.tiny import synthetic_data, tiny_bert

    model = bert_adapted("adalora", 0, r=4, target_r=2, alpha=8.0, tinit=1, tfinal=2, target_total_rank=5)
    train(model, synthetic_data(24), quiet(max_steps=8))
    ids = torch.randint(1, 300, (2, 9), generator=torch.Generator().manual_seed(3))
    ours = model.eval()(input_ids=ids).logits
    reparam.export_peft(model, tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["rank_pattern"]  # the allocation left modules at different ranks
    back = reparam.import_peft(tiny_bert(300), tmp_path).eval()
    torch.testing.assert_close(back(input_ids=ids).logits, ours, atol=1e-5, rtol=0)


def test_bad_rank_pattern_names_the_file(bert, tmp_path):
    pm = peft.get_peft_model(copy.deepcopy(bert), peft.LoraConfig(r=2, target_modules=["query"]))
    pm.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**cfg, "rank_pattern": {"query(": 2}}))
    with pytest.raises(reparam.AdapterFileError, match=r"adapter_config.json: .*r_pattern.*'query\('"):
        reparam.import_peft(copy.deepcopy(bert), tmp_path)
