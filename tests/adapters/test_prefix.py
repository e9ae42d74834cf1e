"""Prefix tuning wired into Hugging Face attention: specs/adapters/unified_adapters.md §1, §2.3, §5, §7, §8."""
import copy

import pytest
import torch

import reparam
from reparam.adapters.prefix import (collapse_prefix, gated_prefix_attention, mlp_param_count, prefix_attention,
                                     prefix_param_count)
from reparam.core.errors import ConfigError, ReparamError, TargetError
from tests.training.tiny import tiny_bert


def prefix_bert(seed=0, **fields):
    base = tiny_bert(300, seed=seed).eval()
    torch.manual_seed(seed + 1)
    model = reparam.adapt(copy.deepcopy(base), reparam.make_config("prefix_tuning", **{"prefix_len": 5, "mid_dim": 16,
                                                                                       **fields}),
                          modules_to_save=["classifier"]).eval()
    return base, model


def tiny_llama(kv_heads=2, **extra):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=kv_heads,
                                        max_position_embeddings=64, **extra)).eval()


def padded_batch():
    ids = torch.randint(0, 300, (2, 9), generator=torch.Generator().manual_seed(3))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, 6:] = 0
    return ids, mask


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


# --- the wiring: the model's attention equals the closed form --------------------------------------------------

def test_bert_attention_equals_concat_form_with_padding():
    _, model = prefix_bert()
    ids, mask = padded_batch()
    attention = model.bert.encoder.layer[1].attention.self
    seen = {}
    attention.register_forward_hook(lambda m, args, kwargs, out: seen.update(h=kwargs.get("hidden_states", args[0] if args else None), out=out[0]),
                                    with_kwargs=True)
    model(ids, attention_mask=mask)
    h = seen["h"]
    split = lambda t: t.view(2, 9, 2, 16).transpose(1, 2)  # noqa: E731  (batch, heads, tokens, d_head)
    q, K, V = (split(lin(h)) for lin in (attention.query, attention.key, attention.value))
    P_k, P_v = attention.key.adapters.default.prefix_part.prefix_kv()
    P_k, P_v = (p.view(5, 2, 16).transpose(0, 1) for p in (P_k, P_v))
    additive = (1.0 - mask[:, None, None, :].float()) * torch.finfo(torch.float32).min
    expected = prefix_attention(q, K, V, P_k, P_v, scale=16 ** -0.5, mask=additive)
    torch.testing.assert_close(seen["out"], expected.transpose(1, 2).reshape(2, 9, 32), atol=1e-5, rtol=0)


def test_padding_does_not_change_the_unpadded_rows():
    _, model = prefix_bert()
    ids, mask = padded_batch()
    padded = model(ids, attention_mask=mask).logits[1]
    torch.testing.assert_close(model(ids[1:, :6]).logits[0], padded, atol=1e-5, rtol=0)


def test_causal_lm_prefix_is_visible_and_causality_kept():
    base = tiny_llama()
    model = reparam.adapt(copy.deepcopy(base), reparam.make_config("prefix_tuning", prefix_len=3, mid_dim=16)).eval()
    ids = torch.randint(0, 100, (2, 10), generator=torch.Generator().manual_seed(1))
    out = model(ids).logits
    assert (out[:, 0] - base(ids).logits[:, 0]).abs().max() > 1e-3  # the first token sees the prefix (§7.5)
    later = ids.clone()
    later[:, -1] = (later[:, -1] + 1) % 100
    torch.testing.assert_close(model(later).logits[:, :-1], out[:, :-1], atol=0, rtol=0)  # no peeking ahead
    model.config._attn_implementation = "reparam_prefix_eager"  # the model's own eager attention, same math
    torch.testing.assert_close(model(ids).logits, out, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kv_heads", [4, 2])  # 2: grouped-query attention, the prefix split into the key heads
def test_generation_with_cache_equals_without(kv_heads):
    model = reparam.adapt(tiny_llama(kv_heads), reparam.make_config("prefix_tuning", prefix_len=3, mid_dim=16))
    ids = torch.randint(0, 100, (2, 6), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    kw = dict(max_new_tokens=6, do_sample=False, attention_mask=mask, pad_token_id=0)
    cached = model.generate(ids, use_cache=True, **kw)
    torch.testing.assert_close(cached, model.generate(ids, use_cache=False, **kw), atol=0, rtol=0)
    # and each step's logits are the full forward's
    full = model(cached[:, :-1]).logits[:, -6:]
    steps = model.generate(ids, use_cache=True, output_logits=True, return_dict_in_generate=True, **kw).logits
    torch.testing.assert_close(torch.stack(steps, 1), full, atol=1e-4, rtol=0)


# --- §8.4 MLP collapse, §3 / §8.5 parameter counts, save / load ------------------------------------------------

def test_mlp_param_count_and_collapse(tmp_path):
    _, model = prefix_bert()
    head = 32 * 2 + 2
    assert reparam.trainable_summary(model).trainable == mlp_param_count(5, 32, 16, n_layers=2) + head
    ids, mask = padded_batch()
    before = model(ids, attention_mask=mask).logits
    with_mlp = reparam.save_adapter(model, tmp_path / "mlp").stat().st_size
    collapse_prefix(model)
    torch.testing.assert_close(model(ids, attention_mask=mask).logits, before, atol=0, rtol=0)
    assert reparam.trainable_summary(model).trainable == 2 * prefix_param_count(5, 32) + head
    assert reparam.save_adapter(model, tmp_path / "const").stat().st_size < with_mlp
    for folder in ("mlp", "const"):
        loaded = reparam.load_adapter(tiny_bert(300).eval(), tmp_path / folder).eval()
        torch.testing.assert_close(loaded(ids, attention_mask=mask).logits, before, atol=1e-6, rtol=0)
    with pytest.raises(ReparamError, match="no prefix MLP to collapse"):
        collapse_prefix(model)


def test_no_mlp_prefix_is_learned_directly():
    _, model = prefix_bert(mlp=False)
    trainable = {n: p.shape for n, p in model.named_parameters() if p.requires_grad and ".adapters." in n}
    assert set(trainable.values()) == {torch.Size([5, 64])} and len(trainable) == 2


# --- training, switching, removal ------------------------------------------------------------------------------

def test_only_the_prefix_and_head_train():
    _, model = prefix_bert()
    model.train()
    ids, mask = padded_batch()
    torch.nn.functional.cross_entropy(model(ids, attention_mask=mask).logits, torch.tensor([0, 1])).backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert grads and all(".prefix_part.mlp." in n or n.startswith("classifier.") for n in grads)
    assert any("mlp.embedding" in n for n in grads)


def test_disable_unload_and_merge_refusal():
    base, model = prefix_bert()
    ids, mask = padded_batch()
    expected = base(ids, attention_mask=mask).logits
    assert (model(ids, attention_mask=mask).logits - expected).abs().max() > 1e-6
    with reparam.disabled(model):
        torch.testing.assert_close(model(ids, attention_mask=mask).logits, expected, atol=1e-6, rtol=0)
    with pytest.raises(ReparamError, match="cannot be merged.*collapse_prefix"):
        reparam.merge(model)
    reparam.unload(model, merge_active=False)
    assert model.config._attn_implementation == base.config._attn_implementation
    torch.testing.assert_close(model(ids, attention_mask=mask).logits, expected, atol=1e-6, rtol=0)


def test_two_prefixes_stack_and_deleting_one_keeps_the_other():
    base, model = prefix_bert()
    torch.manual_seed(5)
    reparam.adapt(model, reparam.make_config("prefix_tuning", prefix_len=2, mlp=False), name="other")
    ids, mask = padded_batch()
    reparam.set_active(model, "other")
    only_other = model(ids, attention_mask=mask).logits
    reparam.set_active(model, ["default", "other"])
    both = model(ids, attention_mask=mask).logits
    assert (both - only_other).abs().max() > 1e-6
    reparam.delete_adapter(model, "default")
    assert model.config._attn_implementation.startswith("reparam_prefix_")
    torch.testing.assert_close(model(ids, attention_mask=mask).logits, only_other, atol=0, rtol=0)
    reparam.delete_adapter(model, "other")
    assert model.config._attn_implementation == "sdpa"
    torch.testing.assert_close(model(ids, attention_mask=mask).logits, base(ids, attention_mask=mask).logits,
                               atol=0, rtol=0)


def test_prefix_follows_model_to():
    _, model = prefix_bert()
    model.to("meta")
    assert {p.device.type for p in model.parameters()} == {"meta"}


# --- errors ----------------------------------------------------------------------------------------------------

def test_wrong_target_names_the_module_and_leaves_the_model_untouched():
    base = tiny_bert(300)
    with pytest.raises(TargetError, match=r"'bert.encoder.layer.0.attention.self.query' is not the key projection"):
        reparam.adapt(base, reparam.make_config("prefix_tuning"), targets="query")
    assert not any(".adapters." in n for n, _ in base.named_parameters())
    assert base.config._attn_implementation == "sdpa" and not getattr(base, "reparam_adapters", {})


def test_unsupported_attention_implementation_is_named():
    model = tiny_llama()
    model.config._attn_implementation = "flex_attention"
    with pytest.raises(ReparamError, match="attention implementation 'flex_attention'.*sdpa or eager"):
        reparam.adapt(model, reparam.make_config("prefix_tuning"))
    assert model.config._attn_implementation == "flex_attention"


@pytest.mark.parametrize("field,value", [("prefix_len", 0), ("mid_dim", -1), ("mlp", "yes"), ("dropout", 1.0)])
def test_bad_config_names_field(field, value):
    with pytest.raises(ConfigError, match=f"prefix_tuning: invalid {field}="):
        reparam.make_config("prefix_tuning", **{field: value})


def test_finetune_cli_targets_the_key_projections(tmp_path, minilm_path, glue_dir):
    import json

    from reparam.cli.main import main

    out = tmp_path / "prefix"
    code = main(["finetune", "--method", "prefix_tuning", "--model", str(minilm_path), "--data",
                 str(glue_dir / "SST-2"), "--set", "prefix_len=4", "--set", "mid_dim=8", "--limit", "8",
                 "--eval-limit", "4", "--max-steps", "2", "--max-length", "16", "--batch-size", "4", "--quiet",
                 "-o", str(out)])
    assert code == 0
    saved = json.loads((out / "reparam_adapter.json").read_text())
    assert saved["method"] == "prefix_tuning" and saved["modules_to_save"] == ["classifier"]
    assert saved["modules"] == [f"bert.encoder.layer.{i}.attention.self.key" for i in range(6)]


def test_missing_causal_mask_is_built_aligned_to_the_last_query():
    """A causal module handed no mask (a mask builder that skipped it) gets the explicit causal mask, prefix visible,
    aligned to the last query when a cache makes the keys longer than the queries."""
    from reparam.adapters.prefix import prefix_attention_forward

    model = reparam.adapt(tiny_llama(), reparam.make_config("prefix_tuning", prefix_len=3, mid_dim=16))
    attention = model.model.layers[0].self_attn
    g = torch.Generator().manual_seed(4)
    q = torch.randn(2, 4, 3, 8, generator=g)
    k, v = (torch.randn(2, 2, 5, 8, generator=g) for _ in range(2))  # 2 cached positions in front of 3 queries
    causal = torch.zeros(3, 5).masked_fill(torch.ones(3, 5, dtype=torch.bool).triu(3), torch.finfo(torch.float32).min)
    explicit, _ = prefix_attention_forward(attention, q, k, v, causal[None, None], scaling=8 ** -0.5, dropout=0.0)
    implicit, _ = prefix_attention_forward(attention, q, k, v, None, scaling=8 ** -0.5, dropout=0.0)
    torch.testing.assert_close(implicit, explicit, atol=0, rtol=0)
