"""Unified adapters (sequential / parallel / scaled parallel) and prefix math: specs/adapters/unified_adapters.md §8."""
import copy

import pytest
import torch
from torch import nn

import reparam
from reparam.adapters.unified_adapters import (PrefixEncoder, bottleneck_param_count, gated_prefix_attention,
                                                prefix_attention, prefix_param_count)
from reparam.core.errors import ConfigError, ReparamError
from tests.helpers import TinyMLP, randomize_adapters
from tests.training.tiny import tiny_bert

METHODS = ["sequential_adapter", "parallel_adapter", "scaled_parallel_adapter"]


class ToyBlock(nn.Module):
    """Post-LN FFN sub-layer: out = LN(h1 + FFN(h1)), FFN a single Linear so it is one adaptable module."""

    def __init__(self, d=12, dtype=torch.float64):
        super().__init__()
        self.ffn = nn.Linear(d, d, dtype=dtype)
        self.norm = nn.LayerNorm(d, dtype=dtype)

    def forward(self, h1):
        return self.norm(h1 + self.ffn(h1))


def adapter_by_hand(b, z):
    """§2.1 in float64: s · Up(ReLU(Down(z))) (no LN, dropout 0)."""
    h = torch.relu(z @ b.down.weight.double().T + b.down.bias.double())
    return b.scale.double() * (h @ b.up.weight.double().T + b.up.bias.double())


# --- §8.1 prefix ⇔ gated decomposition -------------------------------------------------------------------------

def test_prefix_concat_equals_gated_decomposition():
    g = torch.Generator().manual_seed(0)
    q, K, V = (torch.randn(2, 3, 5, 8, generator=g, dtype=torch.float64) for _ in range(3))
    P_k, P_v = (torch.randn(2, 3, 4, 8, generator=g, dtype=torch.float64) for _ in range(2))
    mask = torch.zeros(2, 1, 1, 5, dtype=torch.float64)
    mask[0, ..., -2:] = -1e4  # padding on the first sequence
    causal = torch.full((5, 5), -1e9, dtype=torch.float64).triu(1)  # decoder mask must not hide the prefix
    for m in (None, mask, mask + causal):
        concat = prefix_attention(q, K, V, P_k, P_v, scale=8 ** -0.5, mask=m)
        gated = gated_prefix_attention(q, K, V, P_k, P_v, scale=8 ** -0.5, mask=m)
        torch.testing.assert_close(concat, gated, atol=1e-6, rtol=0)
    # a wrong scale inside λ breaks the equivalence (§7.4): the test can fail
    assert (gated_prefix_attention(q, K, V, P_k, P_v, scale=1.0) - prefix_attention(q, K, V, P_k, P_v, 8 ** -0.5)
            ).abs().max() > 1e-3


# --- §8.2 identity at init -------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", METHODS)
def test_lora_init_is_identity_on_bert(method):
    base = tiny_bert(300)
    model = reparam.adapt(copy.deepcopy(base), reparam.make_config(method, r=8, init="lora"),
                          targets="attention.output.dense,output.dense")
    ids = torch.randint(0, 300, (2, 9))
    base.eval(), model.eval()
    torch.testing.assert_close(model(ids).logits, base(ids).logits, atol=0, rtol=0)
    assert (model.bert.encoder.layer[0].output.dense.adapters.default.bottleneck.up.weight == 0).all()


def test_bert_init_is_a_small_perturbation():
    base = tiny_bert(300)
    model = reparam.adapt(copy.deepcopy(base), reparam.make_config("sequential_adapter", r=8),
                          targets="output.dense")
    ids = torch.randint(0, 300, (2, 9))
    diff = (model.eval()(ids).logits - base.eval()(ids).logits).abs().max()
    assert 0 < diff < 0.1


# --- §8.3 placement semantics ----------------------------------------------------------------------------------

@pytest.mark.parametrize("method", METHODS)
def test_placement_semantics_float64(method):
    torch.manual_seed(0)
    base = ToyBlock()
    model = reparam.adapt(copy.deepcopy(base), reparam.make_config(method, r=5), targets=["ffn"])
    randomize_adapters(model, std=0.3)
    b = model.ffn.adapters.default.bottleneck
    h1 = torch.randn(7, 12, dtype=torch.float64)
    f = base.ffn(h1)
    if method == "sequential_adapter":
        expected = base.norm(h1 + f + adapter_by_hand(b, f))
    else:
        expected = base.norm(h1 + f + adapter_by_hand(b, h1))  # s inside adapter_by_hand
    assert float(b.scale) == (4.0 if method == "scaled_parallel_adapter" else 1.0)
    torch.testing.assert_close(model(h1), expected, atol=1e-12, rtol=0)


@pytest.mark.parametrize("layernorm", ["in", "out"])
def test_layernorm_options(layernorm):
    torch.manual_seed(0)
    model = reparam.adapt(ToyBlock(), reparam.make_config("parallel_adapter", r=3, layernorm=layernorm, scale=2.0),
                          targets=["ffn"])
    randomize_adapters(model)
    b = model.ffn.adapters.default.bottleneck
    z = torch.randn(4, 12, dtype=torch.float64)
    ln = lambda t: nn.functional.layer_norm(t, (12,), b.norm.weight.double(), b.norm.bias.double())  # noqa: E731
    expected = adapter_by_hand(b, ln(z)) if layernorm == "in" else ln(adapter_by_hand(b, z))
    torch.testing.assert_close(b(z), expected, atol=1e-12, rtol=0)


def test_learnable_scalar_trains():
    torch.manual_seed(0)
    model = reparam.adapt(TinyMLP(), reparam.make_config("parallel_adapter", r=4, scale="learnable", init="bert"),
                          targets=["fc1"])
    b = model.fc1.adapters.default.bottleneck
    assert b.scale.requires_grad and b.scale.item() == 1.0
    model(torch.randn(3, 16)).sum().backward()
    assert b.scale.grad is not None and b.scale.grad.abs() > 0
    assert model.fc1.weight.grad is None


# --- §8.4 prefix MLP collapse ----------------------------------------------------------------------------------

def test_prefix_mlp_collapse_gives_same_attention():
    torch.manual_seed(0)
    enc = PrefixEncoder(prefix_len=4, d_model=16, n_layers=3, n_heads=2, d_mid=20).double().eval()
    const = enc.collapse()
    assert not hasattr(const, "mlp") and sum(p.numel() for p in const.parameters()) == 3 * prefix_param_count(4, 16)
    q, K, V = (torch.randn(2, 2, 5, 8, dtype=torch.float64) for _ in range(3))
    for layer in range(3):
        with_mlp, collapsed = enc()[layer], const()[layer]
        torch.testing.assert_close(prefix_attention(q, K, V, with_mlp[0], with_mlp[1], 0.3),
                                   prefix_attention(q, K, V, collapsed[0], collapsed[1], 0.3), atol=1e-12, rtol=0)
    # heads split per layer as [L, 2, n_heads, l, d_head]: layer 1 keys are columns 2·d..3·d of the flat prefix
    torch.testing.assert_close(enc()[1, 0].transpose(0, 1).reshape(4, 16), enc.flat()[:, 32:48])


def test_prefix_mlp_param_count():
    l, d, L, d_mid = 4, 16, 3, 20
    enc = PrefixEncoder(l, d, L, n_heads=2, d_mid=d_mid)
    expected = l * d + d * d_mid + d_mid + d_mid * 2 * L * d + 2 * L * d  # §3
    assert sum(p.numel() for p in enc.parameters()) == expected


# --- §8.5 parameter counts -------------------------------------------------------------------------------------

@pytest.mark.parametrize("layernorm", ["none", "in"])
def test_adapter_param_count(layernorm):
    model = reparam.adapt(tiny_bert(300), reparam.make_config("parallel_adapter", r=8, layernorm=layernorm),
                          targets="attention.output.dense")
    per_module = reparam.trainable_summary(model).per_module
    assert set(per_module.values()) == {bottleneck_param_count(32, 8, layernorm != "none")}
    assert len(per_module) == 2  # one per layer


def test_mam_sized_budget_equals_sum():
    """MAM on a toy config: collapsed prefix on every attention + scaled parallel adapter at every FFN (§2.4)."""
    model = reparam.adapt(tiny_bert(300), reparam.make_config("scaled_parallel_adapter", r=16),
                          targets="output.dense", exclude=["attention.output.dense"])
    prefix = PrefixEncoder(30, 32, n_layers=2, n_heads=2, mlp=False)
    total = reparam.trainable_summary(model).trainable + sum(p.numel() for p in prefix.parameters())
    # the FFN output projection is 64 -> 32: Down reads its 64-d input
    assert total == 2 * bottleneck_param_count(64, 16, d_out=32) + 2 * prefix_param_count(30, 32)


# --- merge, save/load, errors, causal LM -----------------------------------------------------------------------

def test_merge_is_refused_and_unload_without_merge_restores_base(tmp_path):
    base = tiny_bert(300)
    model = reparam.adapt(copy.deepcopy(base), reparam.make_config("parallel_adapter", r=4), targets="output.dense")
    with pytest.raises(ReparamError, match="parallel_adapter.*non-linear.*cannot be merged"):
        reparam.merge(model)
    torch.testing.assert_close(model.bert.encoder.layer[0].output.dense.weight,
                               base.bert.encoder.layer[0].output.dense.weight, atol=0, rtol=0)
    plain = reparam.unload(model, merge_active=False)
    assert not any(".adapters." in n for n, _ in plain.named_parameters())


@pytest.mark.parametrize("method,fields", [("sequential_adapter", {"layernorm": "in"}),
                                           ("scaled_parallel_adapter", {"scale": "learnable"})])
def test_save_load_round_trip(tmp_path, method, fields):
    base = tiny_bert(300)
    model = reparam.adapt(copy.deepcopy(base), reparam.make_config(method, r=6, **fields),
                          targets="attention.output.dense,output.dense", modules_to_save=["classifier"])
    randomize_adapters(model)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 0:
                p.fill_(1.7)
    reparam.save_adapter(model, tmp_path / "ad")
    loaded = reparam.load_adapter(copy.deepcopy(base), tmp_path / "ad")
    ids = torch.randint(0, 300, (2, 9))
    torch.testing.assert_close(loaded.eval()(ids).logits, model.eval()(ids).logits, atol=0, rtol=0)


@pytest.mark.parametrize("field,value,msg", [("r", 0, "r"), ("layernorm", "post", "layernorm"),
                                             ("init", "xavier", "init"), ("scale", "big", "scale"),
                                             ("dropout", 1.5, "dropout"), ("bn", 4, "unknown field")])
def test_bad_config_names_field(field, value, msg):
    with pytest.raises(ConfigError, match=msg):
        reparam.make_config("parallel_adapter", **{field: value})


def test_causal_lm_from_config_trains():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32)
    base = LlamaForCausalLM(cfg)
    model = reparam.adapt(copy.deepcopy(base), reparam.make_config("scaled_parallel_adapter", r=8),
                          targets="o_proj,down_proj")
    ids = torch.randint(0, 100, (2, 10))
    torch.testing.assert_close(model(ids).logits, base(ids).logits, atol=0, rtol=0)  # LoRA init: exact
    model(ids, labels=ids).loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert grads and all(".adapters." in n for n in grads)
    assert any(g.abs().sum() > 0 for n, g in grads.items() if "up.weight" in n)


def test_gpt2_conv1d_sequential_identity_and_training():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    base = GPT2LMHeadModel(GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=2, n_positions=32,
                                      resid_pdrop=0, embd_pdrop=0, attn_pdrop=0)).eval()
    model = reparam.adapt(copy.deepcopy(base), reparam.make_config("sequential_adapter", r=4, init="lora"),
                          targets="attn.c_proj,mlp.c_proj")
    ids = torch.randint(0, 100, (2, 8))
    torch.testing.assert_close(model(ids).logits, base(ids).logits, atol=0, rtol=0)
    assert model.transformer.h[0].mlp.c_proj.adapters.default.bottleneck.down.in_features == 32  # reads c_proj's output
    randomize_adapters(model)
    assert (model(ids).logits - base(ids).logits).abs().max() > 1e-4
