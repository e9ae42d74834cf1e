"""SoMA: the unit-test properties of specs/adapters/soma.md §10 (1-6), then save/load onto the original checkpoint,
PEFT export parity, gradients, config errors, the training loop and the CLI."""
import copy
import json
import math
import re

import pytest
import torch

import reparam
from reparam.adapters.soma import CosineWeightDecay
from reparam.core.layers import AdaptedLayer
from reparam.core.svd import svd_split
from reparam.training import TrainConfig, train
from reparam.training.callbacks import Callback, TrainState
from tests.helpers import TinyMLP, randomize_adapters
from tests.training.tiny import synthetic_data, tiny_bert


def soma_mlp(dtype=torch.float32, **fields):
    """TinyMLP (no blocks, so block_pattern=None) with SoMA on fc1 (24x16) and fc2 (24x24)."""
    torch.manual_seed(0)
    base = TinyMLP(dtype=dtype)
    config = reparam.make_config("soma", **{"r": 4, "alpha": 8.0, "block_pattern": None, **fields})
    return base, reparam.adapt(copy.deepcopy(base), config, targets=["fc1", "fc2"])


def bert(layers=2, hidden=32, vocab=100, seed=0):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
                     intermediate_size=2 * hidden, max_position_embeddings=32, num_labels=3,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(cfg).eval()


def block(name):
    found = re.search(r"\.layer\.(\d+)\.", name)
    return int(found.group(1)) if found else None


IDS = torch.randint(1, 100, (3, 9), generator=torch.Generator().manual_seed(1))


# --- §10.1 exact start ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_exact_start(dtype):
    base, model = soma_mlp(dtype)
    x = torch.randn(5, 16, dtype=dtype)
    y0 = base(x)
    atol = 1e-10 if dtype == torch.float64 else 1e-5 * y0.abs().max().item()
    torch.testing.assert_close(model(x), y0, atol=atol, rtol=0)
    ad = model.fc1.adapters.default
    assert ad.lora_A.abs().max() > 0 and ad.lora_B.abs().max() > 0  # not a zero init: the minor part moved


def test_exact_start_on_bert_all_linear():
    base = bert()
    model = reparam.adapt(copy.deepcopy(base), reparam.make_config("soma", r=4), targets="all-linear")
    y0 = base(input_ids=IDS).logits
    torch.testing.assert_close(model(input_ids=IDS).logits, y0, atol=1e-5 * y0.abs().max().item(), rtol=0)
    assert "bert.pooler.dense" not in model.reparam_adapters["default"].modules  # outside any block


# --- §10.2 minor selection -----------------------------------------------------------------------------------

@pytest.mark.parametrize("first_eigen", [False, True])
def test_minor_selection_and_closed_form(first_eigen):
    base, model = soma_mlp(torch.float64, r=4, alpha=8.0, first_eigen=first_eigen)
    for name in ("fc1", "fc2"):
        W0, layer = getattr(base, name).weight, getattr(model, name)
        ad, r, s = layer.adapters.default, 4, 2.0
        sigma = torch.linalg.svdvals(W0)
        k = len(sigma)
        moved, kept = (sigma[:r], sigma[r:]) if first_eigen else (sigma[k - r:], sigma[:k - r])
        sv_delta = torch.linalg.svdvals(s * ad.lora_B @ ad.lora_A)[:r]
        torch.testing.assert_close(sv_delta, moved, rtol=1e-6, atol=0)
        torch.testing.assert_close(torch.linalg.svdvals(layer.weight)[:k - r], kept, rtol=1e-6, atol=0)
        # A = diag(√(σ_m/s)) V_mᵀ, B = U_m diag(√(σ_m/s)): A Aᵀ = BᵀB = diag(σ_m/s), and W_res + s·B A = W0
        for gram in (ad.lora_A @ ad.lora_A.T, ad.lora_B.T @ ad.lora_B):
            torch.testing.assert_close(gram, torch.diag(moved / s), atol=1e-10, rtol=0)
        torch.testing.assert_close(layer.weight + s * ad.lora_B @ ad.lora_A, W0, atol=1e-10, rtol=0)


def test_first_eigen_is_pissa():
    _, soma = soma_mlp(torch.float64, first_eigen=True)
    torch.manual_seed(0)
    base = TinyMLP(dtype=torch.float64)
    pissa = reparam.adapt(base, reparam.make_config("pissa", r=4, alpha=8.0), targets=["fc1", "fc2"])
    for a, b in ((soma.fc2, pissa.fc2), (soma.fc1, pissa.fc1)):
        da, db = a.adapters.default, b.adapters.default
        torch.testing.assert_close(da.lora_B @ da.lora_A, db.lora_B @ db.lora_A, atol=1e-10, rtol=0)
        torch.testing.assert_close(a.weight, b.weight, atol=1e-10, rtol=0)


# --- §10.3 block freezing (and rank_ramp, which keys on the same block index) ----------------------------------

@pytest.fixture(scope="module")
def bert24():
    return bert(layers=24, hidden=16)


def test_block_freezing_24_blocks(bert24):
    model = reparam.adapt(copy.deepcopy(bert24), reparam.make_config("soma", r=2, start_lora_idx=8),
                          targets="all-linear", modules_to_save=["classifier"])
    adapted = model.reparam_adapters["default"].modules
    assert len(adapted) == 16 * 6 and {block(m) for m in adapted} == set(range(8, 24))
    for name, module in model.named_modules():
        if block(name + ".") is not None and block(name + ".") < 8:
            assert not isinstance(module, AdaptedLayer), name
    for name, p in model.named_parameters():
        if block(name) is not None and block(name) < 8:
            assert not p.requires_grad and ".adapters." not in name, name
    for m in adapted:
        ad = model.get_submodule(m).adapters.default
        assert ad.lora_A.requires_grad and ad.lora_B.requires_grad and ad.bias_delta.requires_grad
        assert not model.get_submodule(m).bias.requires_grad  # the base bias stays; the offset trains
    assert model.classifier.weight.requires_grad and not model.bert.pooler.dense.weight.requires_grad


def test_rank_ramp_and_its_peft_export(bert24, tmp_path):
    peft = pytest.importorskip("peft")
    config = reparam.make_config("soma", r=1, alpha=2.0, start_lora_idx=8, rank_ramp=True)
    model = reparam.adapt(copy.deepcopy(bert24), config, targets=["query", "value"], modules_to_save=["classifier"])
    expected = {8: 1, 11: 1, 12: 2, 15: 2, 16: 4, 19: 4, 20: 8, 23: 8}
    for b, rank in expected.items():
        ad = model.get_submodule(f"bert.encoder.layer.{b}.attention.self.query").adapters.default
        assert ad.lora_A.shape == (rank, 16) and ad.scale == 2.0 / rank
    randomize_adapters(model, std=0.05)
    ours = model(input_ids=IDS).logits
    reparam.export_peft(model, tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["r"] == 2 and cfg["lora_alpha"] == 4.0 and cfg["alpha_pattern"] == {}
    assert cfg["rank_pattern"][re.escape("bert.encoder.layer.20.attention.self.value")] == 16
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(bert24), tmp_path).eval()(input_ids=IDS).logits
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)


# --- §10.4 weight-decay schedule ------------------------------------------------------------------------------

def test_weight_decay_schedule_closed_form():
    p, q = torch.nn.Parameter(torch.zeros(2, 2)), torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.AdamW([{"params": [p], "weight_decay": 0.05}, {"params": [q], "weight_decay": 0.0}])
    state = TrainState(optimizer=opt, total_steps=10)
    cb = CosineWeightDecay(end=1e-5)
    cb.on_train_begin(state)
    for t, wd in ((0, 0.05), (5, 1e-5 + (0.05 - 1e-5) / 2), (10, 1e-5), (3, 1e-5 + (0.05 - 1e-5) * (1 + math.cos(0.3 * math.pi)) / 2)):
        state.global_step = t
        cb.on_step_begin(state)
        assert math.isclose(opt.param_groups[0]["weight_decay"], wd, rel_tol=1e-12)
        assert opt.param_groups[1]["weight_decay"] == 0.0  # a group without decay stays at 0
    resumed = CosineWeightDecay(end=1e-5)  # resume: wd0 comes from the checkpoint, not the annealed optimizer
    resumed.load_state_dict(cb.state_dict())
    resumed.on_train_begin(state)
    state.global_step = 0
    resumed.on_step_begin(state)
    assert opt.param_groups[0]["weight_decay"] == 0.05


class RecordWeightDecay(Callback):
    def __init__(self):
        self.seen = []

    def after_backward(self, state):
        self.seen.append([g["weight_decay"] for g in state.optimizer.param_groups])


@pytest.mark.parametrize("end", [1e-3, None])
def test_training_loop_anneals_by_itself(end):
    model = tiny_bert(vocab_size=200)
    reparam.adapt(model, reparam.make_config("soma", r=2, weight_decay_end=end), targets=["query", "value"],
                  modules_to_save=["classifier"])
    record = RecordWeightDecay()
    train(model, synthetic_data(n=16), TrainConfig(max_steps=4, batch_size=4, weight_decay=0.05, progress=False),
          callbacks=[record])
    expected = [0.05 if end is None else end + (0.05 - end) * (1 + math.cos(math.pi * t / 4)) / 2 for t in range(4)]
    assert [wd for wd, _ in record.seen] == pytest.approx(expected, rel=1e-12)
    assert all(no_decay == 0.0 for _, no_decay in record.seen)


# --- §10.5 merge ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-10)])
def test_merge_unmerge(dtype, tol):
    base, model = soma_mlp(dtype)
    randomize_adapters(model)  # A, B and the bias offset
    x = torch.randn(6, 16, dtype=dtype)
    w_res, b0 = model.fc1.weight.detach().clone(), model.fc1.bias.detach().clone()
    ad = model.fc1.adapters.default
    assert ad.bias_delta.abs().min() > 0
    y = model(x)
    reparam.merge(model)
    torch.testing.assert_close(model.fc1.weight, w_res + ad.scale * ad.lora_B @ ad.lora_A, atol=tol, rtol=0)
    torch.testing.assert_close(model.fc1.bias, b0 + ad.bias_delta, atol=tol, rtol=0)
    torch.testing.assert_close(model(x), y, atol=tol, rtol=0)
    reparam.unmerge(model)
    torch.testing.assert_close(model.fc1.weight, w_res, atol=tol, rtol=0)
    torch.testing.assert_close(model.fc1.bias, b0, atol=tol, rtol=0)
    plain = reparam.unload(model)
    assert type(plain.fc1) is torch.nn.Linear
    torch.testing.assert_close(plain(x), y, atol=tol, rtol=0)


def test_delete_and_unload_unmerged_give_w0_back():
    base, model = soma_mlp(torch.float64)
    randomize_adapters(model)
    reparam.delete_adapter(model, "default")
    for name in ("fc1", "fc2"):
        torch.testing.assert_close(getattr(model, name).weight, getattr(base, name).weight, atol=1e-12, rtol=0)
        assert torch.equal(getattr(model, name).bias, getattr(base, name).bias)


# --- §10.6 guard ----------------------------------------------------------------------------------------------

def test_randomized_svd_with_minor_part_is_an_error():
    with pytest.raises(ValueError, match="randomized SVD"):
        svd_split(torch.randn(8, 6), 2, "minor", niter=2)
    with pytest.raises(reparam.ConfigError, match="invalid init='soma_niter_4'.*first_eigen=True"):
        reparam.make_config("soma", init="soma_niter_4")
    base, model = soma_mlp(init="soma_niter_4", first_eigen=True)  # principal part: allowed (= PiSSA niter)
    x = torch.randn(5, 16)
    torch.testing.assert_close(model(x), base(x), atol=1e-4, rtol=0)


# --- files: reparam's own format and PEFT's -------------------------------------------------------------------

def test_save_load_onto_the_original_checkpoint(tmp_path):
    base = bert()
    model = reparam.adapt(copy.deepcopy(base), reparam.make_config("soma", r=3, start_lora_idx=1),
                          targets="all-linear", modules_to_save=["classifier"])
    randomize_adapters(model, std=0.05)
    ours = model(input_ids=IDS).logits
    reparam.save_adapter(model, tmp_path)
    tensors, cfg = reparam.io.adapter_files.read_adapter(tmp_path)
    q = "bert.encoder.layer.1.attention.self.query"
    assert {f"{q}.{k}" for k in ("lora_A", "lora_B", "lora_A0", "lora_B0", "bias_delta")} <= set(tensors)
    assert cfg["config"]["start_lora_idx"] == 1 and all(block(m) == 1 for m in cfg["modules"])
    fresh = reparam.load_adapter(copy.deepcopy(base), tmp_path).eval()
    torch.testing.assert_close(fresh(input_ids=IDS).logits, ours, atol=1e-5, rtol=0)
    torch.testing.assert_close(fresh.get_submodule(q).weight, model.get_submodule(q).weight, atol=1e-6, rtol=0)
    plain = reparam.unload(fresh)
    torch.testing.assert_close(plain(input_ids=IDS).logits, ours, atol=1e-5, rtol=0)


@pytest.mark.parametrize("bias", ["all", "none"])
def test_peft_export_parity(bias, tmp_path):
    peft = pytest.importorskip("peft")
    base = bert()
    model = reparam.adapt(copy.deepcopy(base), reparam.make_config("soma", r=4, alpha=8.0, bias=bias),
                          targets="all-linear", modules_to_save=["classifier"])
    randomize_adapters(model, std=0.05)
    ours = model(input_ids=IDS).logits
    reparam.export_peft(model, tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["r"] == 8 and cfg["lora_alpha"] == 16.0 and cfg.get("lora_bias", False) == (bias == "all")
    assert cfg["target_modules"] == model.reparam_adapters["default"].modules
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    torch.testing.assert_close(loaded(input_ids=IDS).logits, ours, atol=1e-5, rtol=0)
    merged = loaded.merge_and_unload()  # PEFT folds lora_B's bias into the base bias as reparam does
    torch.testing.assert_close(merged(input_ids=IDS).logits, ours, atol=1e-5, rtol=0)


# --- gradients, errors, warnings ------------------------------------------------------------------------------

def test_gradients_equal_dense_closed_form():
    _, model = soma_mlp(torch.float64)
    randomize_adapters(model)
    layer, ad = model.fc1, model.fc1.adapters.default
    x = torch.randn(5, 16, dtype=torch.float64, requires_grad=True)
    layer(x).sin().sum().backward()
    got = (ad.lora_A.grad.clone(), ad.lora_B.grad.clone(), ad.bias_delta.grad.clone(), x.grad.clone())
    A, B, db = (t.detach().clone().requires_grad_() for t in (ad.lora_A, ad.lora_B, ad.bias_delta))
    x2 = x.detach().clone().requires_grad_()
    W = layer.weight + ad.scale * B @ A
    torch.nn.functional.linear(x2, W, layer.bias + db).sin().sum().backward()
    for g, ref in zip(got, (A.grad, B.grad, db.grad, x2.grad)):
        torch.testing.assert_close(g, ref, atol=1e-10, rtol=0)


@pytest.mark.parametrize("fields,message", [
    (dict(bias="lora_only"), "invalid bias='lora_only'"),
    (dict(block_pattern="blocks"), "invalid block_pattern='blocks'.*one group"),
    (dict(block_pattern="(["), "invalid block_pattern.*not a valid regex"),
    (dict(block_pattern=None, start_lora_idx=2), "block_pattern=None.*start_lora_idx"),
    (dict(start_lora_idx=-1), "invalid start_lora_idx=-1"),
    (dict(r=0), "invalid r=0"),
    (dict(weight_decay_end=-1.0), "invalid weight_decay_end"),
    (dict(rank=4), "unknown field.*'rank'.*for method 'soma'"),
])
def test_config_errors_name_the_field(fields, message):
    with pytest.raises(reparam.ConfigError, match=message):
        reparam.make_config("soma", **fields)


def test_module_errors_name_the_module():
    with pytest.raises(reparam.ConfigError, match=r"none of the 2 targeted modules lies in a block.*'fc1'"):
        reparam.adapt(TinyMLP(), reparam.make_config("soma"), targets=["fc1", "fc2"])
    with pytest.raises(reparam.ConfigError, match=r"blocks \[0, 1\]"):
        reparam.adapt(bert(), reparam.make_config("soma", start_lora_idx=2), targets=["query"])
    with pytest.raises(reparam.ConfigError, match=r"soma on fc1: rank 20 exceeds min\(d_in, d_out\)=16"):
        soma_mlp(r=20)
    with pytest.raises(reparam.TargetError, match="'emb'.*soma.*linear"):
        from tests.helpers import MixedKinds
        reparam.adapt(MixedKinds(), reparam.make_config("soma", block_pattern=None), targets=["emb"])


def test_warns_when_the_minor_components_are_zero():
    torch.manual_seed(0)
    model = TinyMLP()
    with torch.no_grad():  # rank 2 < 16: the minor singular values are 0 up to round-off
        model.fc2.weight.copy_(torch.randn(24, 2) @ torch.randn(2, 24))
    with pytest.warns(UserWarning, match=r"soma on fc2: sigma_min/sigma_max = .* < 1e-6"):
        reparam.adapt(model, reparam.make_config("soma", r=2, block_pattern=None), targets=["fc1", "fc2"])


# --- the command line, end to end on a GLUE task folder ---------------------------------------------------------

def test_cli_finetune_on_glue(tmp_path, minilm_path, glue_dir, capsys):
    from transformers import AutoTokenizer

    from reparam.cli.main import main

    tokenizer = AutoTokenizer.from_pretrained(minilm_path)
    tiny = bert(layers=2, hidden=16, vocab=tokenizer.vocab_size)
    tiny.config.num_labels = 2
    tiny.classifier = torch.nn.Linear(16, 2)
    tiny.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    out = tmp_path / "adapter"
    code = main(["finetune", "--model", str(tmp_path / "model"), "--data", str(glue_dir / "SST-2"), "--method", "soma",
                 "--r", "2", "--set", "start_lora_idx=1", "--weight-decay", "0.05", "--max-steps", "2", "--limit", "16",
                 "--eval-limit", "16", "--max-length", "32", "--quiet", "--output", str(out)])
    assert code == 0, capsys.readouterr()
    cfg = json.loads((out / "reparam_adapter.json").read_text())
    assert cfg["method"] == "soma" and cfg["config"]["start_lora_idx"] == 1 and len(cfg["modules"]) == 6
    assert json.loads((out / "reparam_cli.json").read_text())["steps"] == 2
    from transformers import AutoModelForSequenceClassification

    fresh = reparam.load_adapter(AutoModelForSequenceClassification.from_pretrained(tmp_path / "model"), out)
    assert fresh.reparam_adapters["default"].config.method == "soma"


def test_one_svd_per_weight_also_for_conv1d(monkeypatch):
    """The exact SVD runs once per weight (the σ check and the split share the cache), Conv1D layout included."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    base = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=50, n_positions=16)).eval()
    calls = []
    real_svd = torch.linalg.svd
    monkeypatch.setattr(torch.linalg, "svd", lambda *a, **k: calls.append(a[0].shape) or real_svd(*a, **k))
    model = reparam.adapt(copy.deepcopy(base), reparam.make_config("soma", r=2, start_lora_idx=1), targets=["c_attn"])
    assert calls == [(48, 16)] and model.reparam_adapters["default"].modules == ["transformer.h.1.attn.c_attn"]
    ids = torch.randint(0, 50, (2, 7))
    y0 = base(input_ids=ids).logits
    torch.testing.assert_close(model(input_ids=ids).logits, y0, atol=1e-5 * y0.abs().max().item(), rtol=0)
    randomize_adapters(model)
    y = model(input_ids=ids).logits
    reparam.merge(model)
    torch.testing.assert_close(model(input_ids=ids).logits, y, atol=1e-5 * y.abs().max().item(), rtol=0)
