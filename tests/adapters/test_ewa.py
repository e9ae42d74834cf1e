"""EWA: the unit-test properties of specs/adapters/ewa.md §9, plus layer selection, shared token partitions,
the training callback (Early EWA), merge/unload, files and the CLI."""
import copy
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import reparam
from reparam.adapters.ewa import EwaAdapter, ExpertsAveraging, TokenPartition, ewa_step
from reparam.training import TrainState, method_callbacks
from tests.training.tiny import tiny_bert


class Mlp(nn.Module):
    def __init__(self, d, h):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, h, dtype=torch.float64), nn.Linear(h, d, dtype=torch.float64)


class TinyViT(nn.Module):
    """timm-style blocks (blocks.i.mlp.fc1/fc2) with an attention-like linear that EWA must leave alone."""

    def __init__(self, d=6, h=10, depth=2):
        super().__init__()
        self.blocks = nn.ModuleList(nn.ModuleDict({"qkv": nn.Linear(d, d, dtype=torch.float64), "mlp": Mlp(d, h)})
                                    for _ in range(depth))

    def forward(self, x):
        for b in self.blocks:
            x = b["qkv"](x)
            x = x + b["mlp"].fc2(F.gelu(b["mlp"].fc1(x)))
        return x


def ewa_adapters(model):
    return [(n, m.adapters["default"]) for n, m in model.named_modules() if hasattr(m, "adapters")]


def randomize_experts(model, std=0.1, seed=0, identical=False):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, ad in ewa_adapters(model):
            for p in (ad.expert_weight, ad.expert_bias):
                noise = torch.randn(p.shape[1:] if identical else p.shape, generator=g, dtype=p.dtype) * std
                p.copy_(noise.expand_as(p))


def vit(**fields):
    torch.manual_seed(0)
    base = TinyViT()
    return base, reparam.adapt(copy.deepcopy(base), reparam.make_config("ewa", **fields))


@pytest.mark.parametrize("seed", range(5))
def test_rup_coverage_balanced(seed):  # §9.1
    g = torch.Generator().manual_seed(seed)
    T, E = int(torch.randint(1, 60, (1,), generator=g)), int(torch.randint(2, 9, (1,), generator=g))
    user = type("User", (), {"used_draw": 0})()
    chunks = TokenPartition().chunks(user, T, E, "cpu")
    assert len(chunks) == E
    assert sorted(torch.cat(chunks).tolist()) == list(range(T))
    sizes = [len(c) for c in chunks]
    assert max(sizes) - min(sizes) <= 1 and sum(sizes) == T


def test_selects_ffn_layers_of_every_other_block():
    _, model = vit()
    assert [n for n, _ in ewa_adapters(model)] == ["blocks.1.mlp.fc1", "blocks.1.mlp.fc2"]
    bert = reparam.adapt(tiny_bert(50), reparam.make_config("ewa", blocks="all"))
    names = [n for n, _ in ewa_adapters(bert)]
    assert names == [f"bert.encoder.layer.{i}.{m}.dense" for i in (0, 1) for m in ("intermediate", "output")]
    _, m3 = vit(blocks="0")
    assert [n for n, _ in ewa_adapters(m3)] == ["blocks.0.mlp.fc1", "blocks.0.mlp.fc2"]


@pytest.mark.parametrize("fields, word", [({"num_experts": 1}, "num_experts"), ({"share_rate": 1.5}, "share_rate"),
                                          ({"blocks": "odd"}, "blocks"), ({"expert_init": "x"}, "expert_init"),
                                          ({"ffn_pattern": "("}, "ffn_pattern")])
def test_bad_config_names_field(fields, word):
    with pytest.raises(reparam.ConfigError, match=word):
        reparam.make_config("ewa", **fields)


def test_no_ffn_layer_is_a_clear_error():
    with pytest.raises(reparam.ConfigError, match="ffn_pattern"):
        reparam.adapt(TinyViT(), reparam.make_config("ewa", blocks="7"))


def test_train_forward_matches_hand_written_moe_with_one_partition_per_block():
    base, model = vit(blocks="all")
    randomize_experts(model)
    x = torch.randn(3, 5, 6, dtype=torch.float64)
    model.train()
    y = model(x)
    # By hand: each token goes through ONE whole expert (fc1 and fc2 of the same e), using the recorded split.
    h = x
    for i, b in enumerate(base.blocks):
        h = b["qkv"](h)
        flat, out = h.reshape(-1, 6), torch.empty(15, 6, dtype=torch.float64)
        ad1 = model.blocks[i]["mlp"].fc1.adapters["default"]
        ad2 = model.blocks[i]["mlp"].fc2.adapters["default"]
        assert ad1.partition is ad2.partition
        for e, idx in enumerate(ad1.partition.perm.tensor_split(4)):
            z = F.linear(flat[idx], b["mlp"].fc1.weight + ad1.expert_weight[e], b["mlp"].fc1.bias + ad1.expert_bias[e])
            out[idx] = F.linear(F.gelu(z), b["mlp"].fc2.weight + ad2.expert_weight[e],
                                b["mlp"].fc2.bias + ad2.expert_bias[e])
        h = h + out.reshape(3, 5, 6)
    torch.testing.assert_close(y, h, atol=1e-12, rtol=0)
    y.sum().backward()  # every expert receives gradient
    assert all((ad.expert_weight.grad.flatten(1).abs().sum(1) > 0).all() for _, ad in ewa_adapters(model))


def test_identical_experts_equal_dense_ffn_for_any_partition():  # §9.2
    bert = tiny_bert(50)
    model = reparam.adapt(copy.deepcopy(bert).double(), reparam.make_config("ewa", blocks="all"))
    randomize_experts(model, identical=True)
    ids = torch.randint(0, 50, (2, 9))
    dense = reparam.unload(copy.deepcopy(model)).train()
    model.train()
    for _ in range(3):  # fresh permutations each call
        torch.testing.assert_close(model(ids).logits, dense(ids).logits, atol=1e-12, rtol=0)


def test_eval_is_deterministic_train_is_not():  # §9.5
    _, model = vit()
    randomize_experts(model)
    x = torch.randn(4, 7, 6, dtype=torch.float64)
    model.eval()
    torch.testing.assert_close(model(x), model(x), atol=0, rtol=0)
    model.train()
    assert not torch.allclose(model(x), model(x))


@pytest.mark.parametrize("beta", [0.0, 0.3, 0.5, 1.0])
def test_ewa_step_invariants(beta):  # §9.3
    base, model = vit(share_rate=beta)
    randomize_experts(model)
    before = {n: (ad.expert_weight.clone(), ad.expert_bias.clone()) for n, ad in ewa_adapters(model)}
    ewa_step(model)
    for n, ad in ewa_adapters(model):
        w0 = dict(base.named_parameters())[n + ".weight"]
        for old, new in zip(before[n], (ad.expert_weight, ad.expert_bias)):
            if old.dim() == 3:  # full expert weights P_e = W0 + D_e
                old, new = old + w0, new + w0
            torch.testing.assert_close(new.mean(0), old.mean(0), atol=1e-12, rtol=0)
            dev_old, dev_new = old - old.mean(0), new - new.mean(0)
            for e in range(4):
                torch.testing.assert_close(dev_new[e].norm(), (1 - beta) * dev_old[e].norm(), atol=1e-12, rtol=0)
            if beta == 0:
                assert torch.equal(new, old)
            if beta == 1:
                torch.testing.assert_close(new, new[:1].expand_as(new), atol=1e-12, rtol=0)


def test_others_only_conversion():
    E, bp = 4, 0.3
    p = torch.randn(E, 5, dtype=torch.float64)
    others = (1 - bp) * p + bp / (E - 1) * (p.sum(0) - p)
    beta = reparam.make_config("ewa").others_only_rate(bp, E)
    torch.testing.assert_close(others, (1 - beta) * p + beta * p.mean(0), atol=1e-12, rtol=0)


def test_callback_after_optimizer_step_and_early_ewa():
    _, model = vit(ewa_until_step=2, share_rate=0.5)
    randomize_experts(model)
    callbacks = method_callbacks(model)
    assert [type(c) for c in callbacks] == [ExpertsAveraging]
    ad = ewa_adapters(model)[0][1]
    spread = lambda: (ad.expert_weight - ad.expert_weight.mean(0)).norm().item()  # noqa: E731
    state = TrainState(model=model)
    for step, factor in [(0, 0.5), (1, 0.5), (2, 1.0), (3, 1.0)]:  # averaging stops at step ewa_until_step
        state.global_step, s = step, spread()
        callbacks[0].after_optimizer_step(state)
        assert spread() == pytest.approx(factor * s, rel=1e-9)


def test_conversion_merge_unload_loads_into_original_class():  # §9.4
    from transformers import BertForSequenceClassification

    bert = tiny_bert(50).double()
    model = reparam.adapt(copy.deepcopy(bert), reparam.make_config("ewa"))
    randomize_experts(model)
    model.eval()
    ids = torch.randint(0, 50, (2, 9))
    expected = model(ids).logits
    name = "bert.encoder.layer.1.intermediate.dense"
    ad = dict(ewa_adapters(model))[name]
    mean_w = (bert.get_submodule(name).weight + ad.expert_weight).mean(0)
    reparam.merge(model)
    torch.testing.assert_close(model.get_submodule(name).weight, mean_w, atol=1e-12, rtol=0)
    torch.testing.assert_close(model(ids).logits, expected, atol=1e-10, rtol=0)
    reparam.unmerge(model)
    torch.testing.assert_close(model.get_submodule(name).weight, bert.get_submodule(name).weight, atol=1e-12, rtol=0)
    plain = reparam.unload(model)
    fresh = tiny_bert(50, seed=5).double().eval()
    fresh.load_state_dict(plain.state_dict())  # strict: same names and shapes as the original class
    assert type(fresh) is BertForSequenceClassification
    torch.testing.assert_close(fresh(ids).logits, expected, atol=1e-10, rtol=0)


def test_independent_init_differs_per_expert():
    _, model = vit(expert_init="independent")
    ad = ewa_adapters(model)[0][1]
    assert not torch.allclose(ad.expert_weight[0], ad.expert_weight[1])
    assert ad.expert_weight.abs().max() > 0


def test_save_load_round_trip(tmp_path):
    base, model = vit(num_experts=3)
    randomize_experts(model)
    reparam.save_adapter(model, tmp_path / "ewa")
    loaded = reparam.load_adapter(copy.deepcopy(base), tmp_path / "ewa")
    for (n, a), (m, b) in zip(ewa_adapters(model), ewa_adapters(loaded)):
        assert n == m and torch.equal(a.expert_weight, b.expert_weight) and torch.equal(a.expert_bias, b.expert_bias)
    x = torch.randn(2, 4, 6, dtype=torch.float64)
    model.eval(), loaded.eval()
    torch.testing.assert_close(loaded(x), model(x), atol=0, rtol=0)
    assert json.loads((tmp_path / "ewa" / "reparam_adapter.json").read_text())["config"]["num_experts"] == 3


def test_cli_finetune_on_glue(tmp_path, minilm_path, glue_dir):
    from reparam.cli.main import main

    out = tmp_path / "ewa"
    code = main(["finetune", "--method", "ewa", "--model", str(minilm_path), "--data", str(glue_dir / "SST-2"),
                 "--set", "num_experts=2", "--set", "blocks=5", "--limit", "8", "--eval-limit", "4",
                 "--max-steps", "1", "--max-length", "16", "--batch-size", "4", "--quiet", "-o", str(out)])
    assert code == 0
    saved = json.loads((out / "reparam_adapter.json").read_text())
    assert saved["method"] == "ewa" and saved["config"]["num_experts"] == 2


def test_gpt2_conv1d_ffn_identical_experts_equal_dense_and_merge():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=40, n_positions=16, n_embd=16, n_layer=2, n_head=2, resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0)
    model = reparam.adapt(GPT2LMHeadModel(cfg).double(), reparam.make_config("ewa"))
    assert [n for n, _ in ewa_adapters(model)] == ["transformer.h.1.mlp.c_fc", "transformer.h.1.mlp.c_proj"]
    randomize_experts(model, identical=True)
    ids = torch.randint(0, 40, (2, 7))
    model.train()
    train_logits = model(ids).logits
    model.eval()
    torch.testing.assert_close(train_logits, model(ids).logits, atol=1e-12, rtol=0)
    randomize_experts(model, seed=1)
    expected = model(ids).logits
    reparam.merge(model)
    torch.testing.assert_close(model(ids).logits, expected, atol=1e-10, rtol=0)
