"""Unified adapters (sequential / parallel / scaled parallel) and prefix math: specs/adapters/unified_adapters.md §8."""
import copy

import pytest
import torch
from torch import nn

import reparam
from reparam.adapters.unified_adapters import bottleneck_param_count
from reparam.core.errors import ConfigError, ReparamError, TargetError
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


def test_parallel_ffn_adapter_on_bert_reads_h1():
    """§2.2 / pitfall 1 on BERT, whose FFN is intermediate.dense -> act -> output.dense: the adapter on output.dense
    reads h1 (the input of `intermediate`), and the block output is LN(h1 + FFN(h1) + s·Adapter(h1))."""
    base = tiny_bert(300).eval()
    model = reparam.adapt(copy.deepcopy(base), reparam.make_config("scaled_parallel_adapter", r=5),
                          targets="output.dense", exclude="attention.output.dense").eval()
    randomize_adapters(model, std=0.3)
    block = model.bert.encoder.layer[1]
    seen = {}
    block.intermediate.register_forward_pre_hook(lambda m, args: seen.update(h1=args[0]))
    block.output.register_forward_hook(lambda m, args, out: seen.update(out=out))
    model(torch.randint(0, 300, (2, 7)))
    h1, b = seen["h1"], block.output.dense.adapters.default.bottleneck
    assert b.down.in_features == 32  # h1's width, not the 64-d activation output.dense reads
    plain = base.bert.encoder.layer[1]
    ffn = plain.output.dense(plain.intermediate(h1))
    expected = block.output.LayerNorm(h1 + ffn + adapter_by_hand(b, h1.double()).float())
    torch.testing.assert_close(seen["out"], expected, atol=1e-5, rtol=0)


def test_parallel_adapters_on_llama_read_the_sublayer_inputs():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=2)).eval()
    model = reparam.adapt(copy.deepcopy(base), reparam.make_config("parallel_adapter", r=4),
                          targets="o_proj,down_proj").eval()
    randomize_adapters(model, std=0.3)
    layer, plain = model.model.layers[0], base.model.layers[0]
    seen = {}
    for key, module in (("mlp", layer.mlp), ("attn", layer.self_attn)):
        module.register_forward_pre_hook(lambda m, args, kwargs, key=key: seen.update(
            {key + "_in": kwargs.get("hidden_states", args[0] if args else None)}), with_kwargs=True)
        module.register_forward_hook(lambda m, args, out, key=key: seen.update(
            {key + "_out": out[0] if isinstance(out, tuple) else out}))
    model(torch.randint(0, 100, (2, 6)))
    h = seen["mlp_in"]
    expected = plain.mlp(h) + adapter_by_hand(layer.mlp.down_proj.adapters.default.bottleneck, h.double()).float()
    torch.testing.assert_close(seen["mlp_out"], expected, atol=1e-5, rtol=0)
    assert layer.self_attn.o_proj.adapters.default.reads == "self_attn"
    x = seen["attn_in"]  # the attention block's input: Adapter(x) joins the attention output (§2.2)
    extra = seen["attn_out"] - plain.self_attn(x, position_embeddings=model.model.rotary_emb(x, torch.arange(6)[None]),
                                              attention_mask=None)[0]
    torch.testing.assert_close(extra, adapter_by_hand(layer.self_attn.o_proj.adapters.default.bottleneck,
                                                      x.double()).float(), atol=1e-5, rtol=0)


def test_input_from_self_and_a_missing_module():
    model = reparam.adapt(tiny_bert(300), reparam.make_config("parallel_adapter", r=4, input_from="self"),
                          targets="output.dense", exclude="attention.output.dense")
    assert model.bert.encoder.layer[0].output.dense.adapters.default.bottleneck.down.in_features == 64
    base = tiny_bert(300)
    with pytest.raises(TargetError, match="no module 'ffn_in' beside 'bert.encoder.layer.0.attention.output.dense'"):
        reparam.adapt(base, reparam.make_config("parallel_adapter", r=4, input_from="ffn_in"), targets="output.dense")
    assert not any(".adapters." in n for n, _ in base.named_parameters())


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


# --- §8.5 parameter counts -------------------------------------------------------------------------------------

@pytest.mark.parametrize("layernorm", ["none", "in"])
def test_adapter_param_count(layernorm):
    model = reparam.adapt(tiny_bert(300), reparam.make_config("parallel_adapter", r=8, layernorm=layernorm),
                          targets="attention.output.dense")
    per_module = reparam.trainable_summary(model).per_module
    assert set(per_module.values()) == {bottleneck_param_count(32, 8, layernorm != "none")}
    assert len(per_module) == 2  # one per layer


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
