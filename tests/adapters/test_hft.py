"""HFT (specs/adapters/hft.md): the unit-test properties of §10, plus merge / save / load / training-loop checks."""
import math
from collections import Counter

import pytest
import torch

import reparam
from reparam.adapters.hft import HftRounds, category, hft_parameters, sample_half, select_round
from reparam.core.errors import ConfigError
from reparam.training import TrainConfig, train
from reparam.training.callbacks import TrainState
from tests.training.tiny import synthetic_data, tiny_bert

ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
FFN = ("gate_proj", "up_proj", "down_proj")


def tiny_llama(layers=4, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=layers,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32)
    return LlamaForCausalLM(cfg)


def llama_names(layers):
    return [f"model.layers.{i}.self_attn.{m}" for i in range(layers) for m in ATTN] + \
           [f"model.layers.{i}.mlp.{m}" for i in range(layers) for m in FFN]


def per_layer(chosen, kinds):
    return Counter(n.split(".")[2] for n in chosen if n.rsplit(".", 1)[1] in kinds)


def test_category_of_names():
    assert category("model.layers.3.self_attn.q_proj") == ("3", "attention")
    assert category("bert.encoder.layer.1.attention.output.dense") == ("1", "attention")
    assert category("bert.encoder.layer.1.output.dense") == ("1", "ffn")
    assert category("classifier") == ("", "other")


def test_exact_half_per_category():  # §10.1
    layers = 4
    cfg = reparam.make_config("hft")
    for round_index in range(5):
        chosen = sample_half(llama_names(layers), cfg, round_index)
        assert all(c == 2 for c in per_layer(chosen, ATTN).values()) and len(per_layer(chosen, ATTN)) == layers
        ffn = per_layer(chosen, FFN)
        assert sum(ffn.values()) == 3 * layers // 2 and set(ffn.values()) <= {1, 2}
        assert sorted(ffn.values()) == [1, 1, 2, 2]  # 2-of-3 in half of the layers, 1-of-3 in the other half


def test_reproducible_and_redrawn():  # §10.3
    names, cfg = llama_names(4), reparam.make_config("hft", seed=7)
    assert sample_half(names, cfg, 0) == sample_half(names, reparam.make_config("hft", seed=7), 0)
    draws = {frozenset(sample_half(names, cfg, r)) for r in range(6)}
    assert len(draws) >= 5


@pytest.mark.parametrize("ratio", [0.25, 0.3, 0.75])
def test_ratio_option(ratio):  # §10.5
    names = llama_names(3)
    chosen = sample_half(names, reparam.make_config("hft", ratio=ratio), 1)
    for kinds in (ATTN, FFN):
        n = len(kinds)
        counts = per_layer(chosen, kinds)
        assert all(math.floor(ratio * n) <= counts.get(str(i), 0) <= math.ceil(ratio * n) for i in range(3))
        assert sum(counts.values()) == math.floor(ratio * n * 3 + 0.5)  # category total: round(r·N)


def test_param_granularity_counts():
    names = llama_names(3)
    chosen = sample_half(names, reparam.make_config("hft", granularity="param"), 0)
    assert len(chosen) == math.floor(0.5 * len(names) + 0.5)


def test_bad_config_names_field():
    with pytest.raises(ConfigError, match="ratio"):
        reparam.make_config("hft", ratio=1.5)
    with pytest.raises(ConfigError, match="granularity"):
        reparam.make_config("hft", granularity="element")


def adapted_llama():
    model = tiny_llama().double()
    reparam.adapt(model, reparam.make_config("hft"), targets="all-linear")
    return model


def test_identity_at_init_merge_unload_and_save_load(tmp_path):
    model = tiny_llama().double()
    ids = torch.randint(0, 64, (2, 9))
    base = model(ids).logits
    reparam.adapt(model, reparam.make_config("hft"), targets="all-linear")
    torch.testing.assert_close(model(ids).logits, base, rtol=0, atol=0)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.05)
    adapted = model(ids).logits
    assert not torch.allclose(adapted, base)
    # merge: W0 + ΔW exactly (closed form in float64)
    layer = model.model.layers[0].self_attn.q_proj
    expected = layer.weight.detach() + layer.adapters["default"].weight_delta.detach()
    reparam.merge(model)
    torch.testing.assert_close(layer.weight.detach(), expected, rtol=0, atol=0)
    torch.testing.assert_close(model(ids).logits, adapted, rtol=0, atol=1e-12)
    reparam.unmerge(model)
    torch.testing.assert_close(model(ids).logits, adapted, rtol=0, atol=1e-12)
    reparam.save_adapter(model, tmp_path / "a")
    fresh = reparam.load_adapter(tiny_llama().double(), tmp_path / "a")
    torch.testing.assert_close(fresh(ids).logits, adapted, rtol=0, atol=0)
    plain = reparam.unload(fresh)
    assert type(plain.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    torch.testing.assert_close(plain(ids).logits, adapted, rtol=0, atol=1e-12)


def run_round(model, steps=2, lr=1e-2):
    """Plain loop with HftRounds: AdamW over everything trainable after adapt, as reparam's loop builds it."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW([{"params": params, "weight_decay": 0.1}], lr=lr)
    state = TrainState(model, opt, total_steps=steps)
    cb = HftRounds()
    cb.on_train_begin(state)
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(1))
    for _ in range(steps):
        cb.on_step_begin(state)
        model(ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
        state.global_step += 1
    return opt, state


def test_frozen_really_frozen_and_optimizer_hygiene():  # §10.2, §10.4
    model = adapted_llama()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt, state = run_round(model)
    chosen = set(state.history[0]["hft_trainable"])
    assert chosen == sample_half(list(hft_parameters(model, "default")), reparam.make_config("hft"), 0)
    selected = {id(p) for m, ps in hft_parameters(model, "default").items() if m in chosen for p in ps}
    in_groups = {id(p) for g in opt.param_groups for p in g["params"]}
    assert in_groups == selected
    assert {id(p) for p in opt.state} == selected
    for n, p in model.named_parameters():
        module = n.split(".adapters.")[0]
        if ".adapters." in n and module in chosen:
            assert not torch.equal(p, before[n]), n
        else:
            assert torch.equal(p, before[n]), n


def test_new_round_resets_state_and_switches_selection():  # §4, pitfall 2
    model = adapted_llama()
    opt, state = run_round(model, steps=1)
    cb = HftRounds()
    state.epoch = 1.0
    cb.rounds = {"default": 0}
    cb.groups = [[p for ps in hft_parameters(model, "default").values() for p in ps]]
    cb.on_step_begin(state)
    assert state.history[-1]["hft_round"] == 1
    assert not opt.state  # stale moments of the previous round dropped
    round1 = select_round(model, "default", 1)
    assert {id(p) for g in opt.param_groups for p in g["params"]} == \
           {id(p) for m, ps in hft_parameters(model, "default").items() if m in round1 for p in ps}


def test_reparam_train_on_bert_runs_rounds():
    model = tiny_bert(vocab_size=200)
    reparam.adapt(model, reparam.make_config("hft", rounds="epoch"), targets="all-linear",
                  modules_to_save=["classifier"])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    result = train(model, synthetic_data(n=16), config=TrainConfig(epochs=2, batch_size=8, lr=1e-2, progress=False))
    history = result.history if hasattr(result, "history") else result["history"]
    rounds = [e for e in history if "hft_round" in e]
    assert [e["hft_round"] for e in rounds] == [0, 1]
    touched = set(rounds[0]["hft_trainable"]) | set(rounds[1]["hft_trainable"])
    for n, p in model.named_parameters():
        if ".adapters." in n and n.split(".adapters.")[0] not in touched:
            assert torch.equal(p, before[n]), n
    assert not torch.equal(model.classifier.weight, before["classifier.weight"])
