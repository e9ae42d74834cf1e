"""MAM adapter: prefix tuning at attention + scaled parallel FFN adapter (specs/adapters/unified_adapters.md §2.4)."""
import copy

import pytest
import torch

import reparam
from reparam.adapters.prefix import collapse_prefix, mlp_param_count, prefix_param_count
from reparam.adapters.unified_adapters import bottleneck_param_count
from reparam.core.errors import ReparamError, TargetError
from tests.helpers import randomize_adapters
from tests.training.tiny import tiny_bert


def test_mam_param_count_equals_sum():
    """MAM on a toy config: the prefix (MLP while training, 2·l·d per attention once collapsed) + a scaled parallel
    adapter reading h1 at every FFN (§2.4, §3, §8.5)."""
    model = reparam.adapt(tiny_bert(300), reparam.make_config("mam_adapter", prefix_len=6, mid_dim=10, r=16))
    ffn = 2 * bottleneck_param_count(32, 16)  # Down reads the 32-d h1, not the 64-d activation of output.dense
    assert reparam.trainable_summary(model).trainable == mlp_param_count(6, 32, 10, n_layers=2) + ffn
    collapse_prefix(model)
    assert reparam.trainable_summary(model).trainable == 2 * prefix_param_count(6, 32) + ffn
    assert model.reparam_adapters["default"].config.prefix_mlp is False


def test_mam_defaults_and_targets():
    model = reparam.adapt(tiny_bert(300), reparam.make_config("mam_adapter"))
    cfg = model.reparam_adapters["default"].config
    assert (cfg.prefix_len, cfg.mid_dim, cfg.r, cfg.scale, cfg.prefix_mlp) == (30, 800, 512, 4.0, True)
    assert model.reparam_adapters["default"].modules == [
        f"bert.encoder.layer.{i}.{m}" for i in range(2) for m in ("attention.self.key", "output.dense")]


def test_mam_is_prefix_tuning_plus_the_ffn_adapter_exactly():
    """With Up = 0 (LoRA init) MAM equals prefix tuning with the same prefix; a trained FFN adapter adds to it."""
    base = tiny_bert(300).eval()
    torch.manual_seed(1)
    mam = reparam.adapt(copy.deepcopy(base), reparam.make_config("mam_adapter", prefix_len=4, mid_dim=8, r=8)).eval()
    prefix = reparam.adapt(copy.deepcopy(base), reparam.make_config("prefix_tuning", prefix_len=4, mid_dim=8)).eval()
    source = mam.bert.encoder.layer[0].attention.self.key.adapters.default.prefix_part
    prefix.bert.encoder.layer[0].attention.self.key.adapters.default.prefix_part.load_state_dict(source.state_dict())
    ids = torch.randint(0, 300, (2, 7))
    torch.testing.assert_close(mam(ids).logits, prefix(ids).logits, atol=0, rtol=0)
    assert (mam(ids).logits - base(ids).logits).abs().max() > 1e-6  # the prefix does something
    with torch.no_grad():
        mam.bert.encoder.layer[1].output.dense.adapters.default.ffn.bottleneck.up.weight.normal_(std=0.1)  # not constant: LN would remove it
    assert (mam(ids).logits - prefix(ids).logits).abs().max() > 1e-4


def test_mam_save_load_merge_refusal_and_unload(tmp_path):
    base = tiny_bert(300).eval()
    model = reparam.adapt(copy.deepcopy(base), reparam.make_config("mam_adapter", prefix_len=3, mid_dim=8, r=4),
                          modules_to_save=["classifier"]).eval()
    randomize_adapters(model)
    ids = torch.randint(0, 300, (2, 7))
    out = model(ids).logits
    reparam.save_adapter(model, tmp_path / "mam")
    loaded = reparam.load_adapter(copy.deepcopy(base), tmp_path / "mam").eval()
    torch.testing.assert_close(loaded(ids).logits, out, atol=0, rtol=0)
    with pytest.raises(ReparamError, match="mam_adapter on bert.encoder.layer.0.attention.self.key: prefix tuning"):
        reparam.merge(loaded)
    reparam.unload(loaded, merge_active=False)
    assert loaded.config._attn_implementation == "sdpa"
    torch.testing.assert_close(loaded(ids).logits, base(ids).logits, atol=0, rtol=0)


def test_mam_needs_both_sides():
    with pytest.raises(TargetError, match="mam_adapter needs attention key projections"):
        reparam.adapt(tiny_bert(300), reparam.make_config("mam_adapter"), targets="key")


def test_mam_finetune_cli(tmp_path, minilm_path, glue_dir):
    import json

    from reparam.cli.main import main

    out = tmp_path / "mam"
    code = main(["finetune", "--method", "mam_adapter", "--model", str(minilm_path), "--data",
                 str(glue_dir / "SST-2"), "--set", "prefix_len=4", "--set", "mid_dim=8", "--set", "r=8", "--limit",
                 "8", "--eval-limit", "4", "--max-steps", "2", "--max-length", "16", "--batch-size", "4", "--quiet",
                 "-o", str(out)])
    assert code == 0
    saved = json.loads((out / "reparam_adapter.json").read_text())
    assert saved["method"] == "mam_adapter" and len(saved["modules"]) == 12
    assert {m.rsplit(".", 2)[-2] + "." + m.rsplit(".", 1)[-1] for m in saved["modules"]} == {"self.key", "output.dense"}


def test_mam_on_a_causal_lm_from_config():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2))
    reparam.adapt(model, reparam.make_config("mam_adapter", prefix_len=3, mid_dim=8, r=4))
    assert model.reparam_adapters["default"].modules == [
        f"model.layers.{i}.{m}" for i in range(2) for m in ("self_attn.k_proj", "mlp.down_proj")]
    assert model.model.layers[0].mlp.down_proj.adapters.default.ffn.reads == "mlp"
    ids = torch.randint(0, 100, (2, 8))
    model(ids, labels=ids).loss.backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert grads and all(".adapters." in n for n in grads)
    assert any("prefix_part.mlp" in n for n in grads) and any("ffn.bottleneck.up" in n for n in grads)  # Up = 0 at init: Down gets no gradient yet
