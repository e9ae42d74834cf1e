"""LoRA adapters as merge inputs (adapter_source.py) and merged in adapter space (adapter_merge.py)."""
import copy
import json
import math

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

import reparam
from reparam.core.errors import AdapterFileError, BaseModelMismatch
from reparam.merging import merge_models
from reparam.merging.adapter_merge import REPORT_FILE, truncated_factors
from reparam.merging.adapter_source import AdapterSource, prefix_rule
from reparam.merging.errors import MergeConfigError, MergeValidationError
from reparam.merging.io import SafetensorsSource
from tests.helpers import MixedKinds, randomize_adapters

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

# MixedKinds: emb (Embedding) and proj (HF Conv1D) store d_in x d_out; conv1/conv2 are convolutions.
LAYOUT = {"emb": "transposed", "proj": "transposed", "conv1": "conv", "conv2": "conv", "lin": "plain"}
TARGETS = {"lora": list(LAYOUT), "rslora": list(LAYOUT), "pissa": ["proj", "lin"], "dora": ["proj", "lin"]}


def _in_layout(update, module, shape):
    """s·B A (d_out x d_in·k) in the layout of the module's weight."""
    kind = LAYOUT[module]
    return update.T if kind == "transposed" else update.reshape(shape) if kind == "conv" else update


@pytest.mark.parametrize("method", list(TARGETS))
def test_reparam_adapter_source_is_base_plus_scaled_product(tmp_path, method):
    torch.manual_seed(0)
    model = MixedKinds().double()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    save_file(base, str(tmp_path / "base.safetensors"))
    r, alpha = 2, 3.0
    reparam.adapt(model, reparam.make_config(method, r=r, alpha=alpha), targets=TARGETS[method])
    randomize_adapters(model, std=0.3)
    reparam.save_adapter(model, tmp_path / "adapter")
    src = AdapterSource(tmp_path / "adapter", SafetensorsSource(tmp_path / "base.safetensors"))
    assert sorted(src.keys()) == sorted(base)
    s = alpha / (math.sqrt(r) if method == "rslora" else r)
    layers = dict(model.named_modules())
    for key, W0 in base.items():
        module = key.rsplit(".", 1)[0]
        want = W0
        if key.endswith(".weight") and module in TARGETS[method]:
            a = layers[module].adapters["default"]
            BA = a.lora_B.flatten(1) @ a.lora_A.flatten(1)
            if method == "pissa":  # the adapter applies to W0 with its initial factors moved out
                BA = BA - a.lora_B0 @ a.lora_A0
            update = _in_layout(s * BA, module, W0.shape)
            want = W0 + update
            if method == "dora":  # m · V / ‖V‖ per output row, rows of the d_out x d_in matrix
                V = _in_layout(want, module, W0.shape)  # (transposing twice is the identity)
                want = _in_layout(a.magnitude[:, None] * V / V.norm(dim=1, keepdim=True), module, W0.shape)
        got = src.get(key)
        assert got.dtype == torch.float64
        torch.testing.assert_close(got, want, atol=1e-12, rtol=0, msg=key)
    merged = reparam.unload(model).state_dict()  # reparam's own merge of the adapter agrees
    for key in base:
        torch.testing.assert_close(src.get(key), merged[key], atol=1e-12, rtol=0, msg=key)


def _tiny_bert(dtype=torch.float32, seed=0):
    cfg = transformers.BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=24, max_position_embeddings=16, num_labels=2)
    torch.manual_seed(seed)
    return transformers.BertForSequenceClassification(cfg).to(dtype).eval()


PEFT_VARIANTS = {
    "lora": dict(r=2, lora_alpha=4, target_modules=["query", "value", "word_embeddings"]),
    "rslora_patterns": dict(r=2, lora_alpha=4, use_rslora=True, target_modules=["query", "value"],
                            rank_pattern={"query": 3}, alpha_pattern={"value": 7}),
    "dora": dict(r=2, lora_alpha=4, use_dora=True, target_modules=["query", "dense"]),
}


@pytest.mark.parametrize("variant", list(PEFT_VARIANTS))
def test_peft_adapter_source_matches_peft_merge(tmp_path, variant):
    bert = _tiny_bert(torch.float64)
    # The checkpoint lacks the architecture prefix the adapter's module names have (bert.encoder...).
    base = {k[len("bert."):]: v.clone() for k, v in bert.state_dict().items() if k.startswith("bert.")}
    save_file(base, str(tmp_path / "base.safetensors"))
    torch.manual_seed(1)
    pm = peft.get_peft_model(bert, peft.LoraConfig(init_lora_weights=False, **PEFT_VARIANTS[variant]))
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_magnitude" in name:
                p.mul_(1 + 0.2 * torch.rand_like(p))
    pm.save_pretrained(tmp_path / "adapter")
    src = AdapterSource(tmp_path / "adapter", SafetensorsSource(tmp_path / "base.safetensors"))
    assert src.rule == ("bert.", "")
    q = "encoder.layer.1.attention.self.query.weight"
    layer = pm.base_model.model.bert.encoder.layer[1].attention.self.query
    B, A = layer.lora_B["default"].weight, layer.lora_A["default"].weight
    if variant == "lora":
        torch.testing.assert_close(src.get(q), base[q] + 2.0 * B @ A, atol=1e-12, rtol=0)  # s = 4/2
    if variant == "rslora_patterns":
        assert A.shape[0] == 3
        torch.testing.assert_close(src.get(q), base[q] + 4 / math.sqrt(3) * B @ A, atol=1e-12, rtol=0)
    merged = pm.merge_and_unload().state_dict()
    changed = 0
    for key in base:
        got = src.get(key)
        torch.testing.assert_close(got, merged["bert." + key].to(got.dtype), atol=1e-12, rtol=0, msg=key)
        changed += not torch.equal(got, base[key])
    assert changed == len(src.lora) > 0


def test_prefix_rule_drops_or_adds_one_prefix():
    keys = {"bert.encoder.q.weight", "bert.encoder.v.weight", "classifier.weight"}
    assert prefix_rule(["encoder.q", "encoder.v"], keys) == ("", "bert.")
    assert prefix_rule(["bert.encoder.q", "classifier"], keys) == ("", "")
    assert prefix_rule(["model.bert.encoder.q", "model.bert.encoder.v"], keys) == ("model.", "")


# ---- adapter-space merges on a tiny BERT (float32) ------------------------------------------------------------

@pytest.fixture(scope="module")
def bert_adapters(tmp_path_factory):
    """A base checkpoint and three adapters: two PEFT (one rsLoRA, head in modules_to_save), one reparam."""
    root = tmp_path_factory.mktemp("bert")
    _tiny_bert().save_pretrained(root / "base")
    torch.manual_seed(1)
    pm = peft.get_peft_model(_tiny_bert(), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["query", "value"],
                                                           task_type="SEQ_CLS", init_lora_weights=False))
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "modules_to_save" in name:
                p.add_(0.5 * torch.randn_like(p))
    pm.save_pretrained(root / "peft_a")
    pm = peft.get_peft_model(_tiny_bert(), peft.LoraConfig(r=4, lora_alpha=3, use_rslora=True,
                                                           target_modules=["query", "key", "dense"],
                                                           init_lora_weights=False))
    pm.save_pretrained(root / "peft_b")
    model = reparam.adapt(_tiny_bert(), reparam.make_config("lora", r=3, alpha=6), targets=["value"],
                          modules_to_save=["classifier"])
    randomize_adapters(model, std=0.3, seed=2)
    with torch.no_grad():
        model.classifier.weight.add_(0.5)
    reparam.save_adapter(model, root / "ours")
    return root


def _config(root, method, weights, params=None, **extra):
    return {"merge_method": method, "base_model": str(root / "base"), "parameters": dict(params or {}),
            "models": [{"model": str(root / name), "parameters": {"weight": w, **p}}
                       for name, (w, p) in zip(("peft_a", "peft_b", "ours"), weights)], **extra}


def _logits(model, seed=3):
    ids = torch.randint(1, 40, (3, 9), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_exact_concatenation_loads_in_peft_with_the_dense_merge_logits(bert_adapters, tmp_path):
    root = bert_adapters
    cfg = _config(root, "task_arithmetic", [(0.7, {}), (0.5, {}), (-0.3, {})], {"lambda": 0.9})
    dense = merge_models(cfg, tmp_path / "dense", progress=False)
    out = merge_models({**cfg, "output": "adapter"}, tmp_path / "adapter", progress=False)
    peft_cfg = json.loads((out / "adapter_config.json").read_text())
    report = json.loads((out / REPORT_FILE).read_text())
    # query: peft_a (2) + peft_b (4); value: peft_a (2) + ours (3); padded to one rank, scale α/r = 1
    assert peft_cfg["r"] == peft_cfg["lora_alpha"] == 6 and report["mode"] == "exact"
    assert report["modules"]["bert.encoder.layer.0.attention.self.value"]["rank"] == 5
    want = _logits(transformers.BertForSequenceClassification.from_pretrained(dense))
    loaded = peft.PeftModel.from_pretrained(transformers.BertForSequenceClassification.from_pretrained(root / "base"),
                                            out).eval()
    torch.testing.assert_close(_logits(loaded), want, atol=1e-5, rtol=0)
    ours = reparam.import_peft(transformers.BertForSequenceClassification.from_pretrained(root / "base"), out)
    torch.testing.assert_close(_logits(ours), want, atol=1e-5, rtol=0)
    assert not torch.allclose(want, _logits(transformers.BertForSequenceClassification.from_pretrained(root / "base")))


def _as_model(adapter_dir, base_dir):
    """The merged weights an adapter folder stands for (base + its update), as a state dict."""
    src = AdapterSource(adapter_dir, SafetensorsSource(base_dir))
    return {k: src.get(k) for k in src.keys()}


def test_linear_exact_and_svd_adapters_reproduce_the_dense_merges(bert_adapters, tmp_path):
    root = bert_adapters
    cfg = _config(root, "linear", [(1.0, {}), (2.0, {}), (1.0, {})])
    dense = load_file(str(merge_models(cfg, tmp_path / "dense", progress=False) / "model.safetensors"))
    exact = _as_model(merge_models({**cfg, "output": "adapter"}, tmp_path / "exact", progress=False), root / "base")
    full = _as_model(merge_models({**cfg, "output": "adapter", "adapter_rank": 64}, tmp_path / "full",
                                  progress=False), root / "base")
    for key, want in dense.items():
        torch.testing.assert_close(exact[key].float(), want, atol=2e-6, rtol=0, msg=key)
        torch.testing.assert_close(full[key].float(), want, atol=2e-6, rtol=0, msg=key)
    with pytest.raises(MergeConfigError, match="normalize: false and weights summing to 4.0"):
        merge_models({**cfg, "output": "adapter", "parameters": {"normalize": False}}, tmp_path / "bad")


@pytest.mark.parametrize("d_out,d_in", [(7, 5), (4, 9)])
def test_truncated_factors_error_is_the_tail_of_the_singular_values(d_out, d_in):
    g = torch.Generator().manual_seed(0)
    k = min(d_out, d_in)
    U, _ = torch.linalg.qr(torch.randn(d_out, k, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(d_in, k, generator=g, dtype=torch.float64))
    sigma = torch.arange(k, 0, -1, dtype=torch.float64) * 1.5
    delta = U @ torch.diag(sigma) @ V.T
    for rank in range(1, k + 2):
        B, A, res_sq, norm_sq = truncated_factors(delta, rank, torch.float64)
        assert B.shape == (d_out, min(rank, k)) and A.shape == (min(rank, k), d_in)
        tail = sigma[rank:].square().sum()
        assert math.isclose(norm_sq, float(sigma.square().sum()), rel_tol=1e-12)
        assert math.isclose(res_sq, float(tail), rel_tol=1e-9, abs_tol=1e-20)
        torch.testing.assert_close((delta - B @ A).square().sum(), tail, atol=1e-20, rtol=1e-9)
    torch.testing.assert_close(B @ A, delta, atol=1e-12, rtol=0)  # full rank: exact


def test_ties_svd_adapter_reports_the_measured_error(bert_adapters, tmp_path):
    root = bert_adapters
    cfg = _config(root, "ties", [(1.0, {"density": 0.5})] * 3)
    dense = load_file(str(merge_models(cfg, tmp_path / "dense", progress=False) / "model.safetensors"))
    with pytest.raises(MergeConfigError, match="'ties' has no exact adapter form.*adapter_rank: N"):
        merge_models({**cfg, "output": "adapter"}, tmp_path / "adapter")
    assert not (tmp_path / "adapter").exists()
    out = merge_models({**cfg, "output": "adapter", "adapter_rank": 2}, tmp_path / "adapter", progress=False)
    report = json.loads((out / REPORT_FILE).read_text())
    assert report["mode"] == "truncated_svd" and json.loads((out / "adapter_config.json").read_text())["r"] == 2
    got = _as_model(out, root / "base")
    base = load_file(str(root / "base" / "model.safetensors"))
    res_total = norm_total = 0.0
    for module, entry in report["modules"].items():
        key = module + ".weight"
        delta, approx = dense[key] - base[key], got[key] - base[key]
        res, norm = float((delta - approx).norm()), float(delta.norm())
        assert entry["rank"] == 2 and math.isclose(entry["relative_error"], res / norm, rel_tol=1e-3)
        res_total, norm_total = res_total + res ** 2, norm_total + norm ** 2
    assert 0.05 < report["overall_relative_error"] < 1
    assert math.isclose(report["overall_relative_error"], math.sqrt(res_total / norm_total), rel_tol=1e-3)
    torch.testing.assert_close(got["classifier.weight"], dense["classifier.weight"], atol=1e-6, rtol=0)


# ---- errors ---------------------------------------------------------------------------------------------------

@pytest.fixture
def mixed_adapter(tmp_path):
    torch.manual_seed(0)
    model = MixedKinds()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    reparam.adapt(model, reparam.make_config("lora", r=2, alpha=2), targets=["proj", "lin"])
    randomize_adapters(model)
    reparam.save_adapter(model, tmp_path / "adapter")
    return base, tmp_path / "adapter"


def _bad_base(tmp_path, base, **changes):
    sd = {k: v for k, v in base.items() if changes.get(k, 0) is not None}
    sd.update({k: v for k, v in changes.items() if v is not None})
    save_file(sd, str(tmp_path / "bad.safetensors"))
    return SafetensorsSource(tmp_path / "bad.safetensors")


def test_mismatched_base_and_unknown_modules_are_named(tmp_path, mixed_adapter):
    base, adapter = mixed_adapter
    with pytest.raises(MergeValidationError, match=r"module 'lin'.*\[4, 5\] update.*'lin.weight'.*shape \[4, 6\]"):
        AdapterSource(adapter, _bad_base(tmp_path, base, **{"lin.weight": torch.zeros(4, 6)}))
    with pytest.raises(MergeValidationError, match="adapted module.*no weight in base model.*: proj"):
        AdapterSource(adapter, _bad_base(tmp_path, base, **{"proj.weight": None}))
    other = _bad_base(tmp_path, base, **{"lin.weight": base["lin.weight"] + 1})
    with pytest.raises(BaseModelMismatch, match="module lin was trained on other weights"):
        AdapterSource(adapter, other).get("lin.weight")
    AdapterSource(adapter, other, check_base=False).get("lin.weight")


def test_failed_merges_write_nothing(tmp_path, mixed_adapter):
    base, adapter = mixed_adapter
    save_file(base, str(tmp_path / "base.safetensors"))
    save_file({**base, "lin.weight": base["lin.weight"] + 1}, str(tmp_path / "other.safetensors"))
    cfg = {"merge_method": "task_arithmetic", "base_model": str(tmp_path / "other.safetensors"),
           "models": [{"model": str(adapter)}]}
    for output in ("model", "adapter"):
        with pytest.raises(BaseModelMismatch, match="module lin"):
            merge_models({**cfg, "output": output}, tmp_path / "out", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "base.safetensors", "other.safetensors"]
    merge_models({**cfg, "adapter_check_base": False}, tmp_path / "out", progress=False)
    cfg["base_model"] = str(tmp_path / "base.safetensors")
    bad = [({"adapter_rank": 4}, "adapter_rank is only used with output: adapter"),
           ({"output": "adapter", "models": [{"model": str(adapter)}, {"model": str(tmp_path / "other.safetensors")}]},
            "not adapter folders: .*other.safetensors"),
           ({"base_model": None}, "is an adapter: merging it needs the base_model"),
           ({"output": "lora"}, "output must be 'model' or 'adapter'")]
    for change, message in bad:
        with pytest.raises(MergeConfigError, match=message):
            merge_models({**cfg, **change}, tmp_path / "out2", progress=False)
    assert not (tmp_path / "out2").exists()


def test_dora_has_no_exact_form_and_unsupported_peft_options_are_named(tmp_path, mixed_adapter):
    base, _ = mixed_adapter
    save_file(base, str(tmp_path / "base.safetensors"))
    model = MixedKinds()
    model.load_state_dict(base)
    reparam.adapt(model, reparam.make_config("dora", r=2), targets=["lin"])
    reparam.save_adapter(model, tmp_path / "dora")
    cfg = {"merge_method": "linear", "base_model": str(tmp_path / "base.safetensors"), "output": "adapter",
           "models": [{"model": str(tmp_path / "dora")}]}
    with pytest.raises(MergeConfigError, match="DoRA adapter.*dora have no exact"):
        merge_models(cfg, tmp_path / "out")
    merge_models({**cfg, "adapter_rank": 2}, tmp_path / "out", progress=False)
    reparam.export_peft(reparam.adapt(copy.deepcopy(model), reparam.make_config("lora"), targets=["proj"],
                                      name="x"), tmp_path / "peft", name="x")
    peft_cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    (tmp_path / "peft" / "adapter_config.json").write_text(json.dumps({**peft_cfg, "init_lora_weights": "pissa"}))
    with pytest.raises(AdapterFileError, match="init_lora_weights='pissa'.*modified base"):
        AdapterSource(tmp_path / "peft", SafetensorsSource(tmp_path / "base.safetensors"))


def test_cli_merge_prints_the_report(bert_adapters, tmp_path, capsys):
    from reparam.cli.main import main

    cfg = _config(bert_adapters, "dare_ties", [(1.0, {"density": 0.6})] * 3, output="adapter", adapter_rank=3)
    (tmp_path / "merge.yml").write_text(yaml.safe_dump(cfg))
    assert main(["merge", str(tmp_path / "merge.yml"), "-o", str(tmp_path / "out"), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    report = json.loads((tmp_path / "out" / REPORT_FILE).read_text())
    assert f"overall relative error {report['overall_relative_error']:.3e}" in printed
    assert "merged adapter written to" in printed and "bert.encoder.layer" in printed
    (tmp_path / "merge.yml").write_text(yaml.safe_dump({**cfg, "adapter_rank": 0}))
    assert main(["merge", str(tmp_path / "merge.yml"), "-o", str(tmp_path / "out2")]) == 2
    assert "adapter_rank must be a positive integer or 'exact', got 0" in capsys.readouterr().err
