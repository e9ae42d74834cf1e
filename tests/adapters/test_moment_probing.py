"""Moment Probing / MP+ — the unit-test properties of specs/adapters/moment_probing.md §11, plus save/load,
the no-merge error and the tiny BERT encoder / GPT-2 causal LM backbones."""
import pytest
import torch
from torch import nn

from reparam.adapters.moment_probing import (MomentProbingConfig, MomentProbingHead, MomentProbingModel,
                                             cross_covariance)
from reparam.core.errors import AdapterFileError, ConfigError, ReparamError


def tiny_bert_encoder(seed=0):
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    return BertModel(BertConfig(vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                intermediate_size=64, max_position_embeddings=32, hidden_dropout_prob=0.0,
                                attention_probs_dropout_prob=0.0), add_pooling_layer=False).eval()


def tiny_gpt2(seed=0):
    from transformers import GPT2Config, GPT2Model

    torch.manual_seed(seed)
    return GPT2Model(GPT2Config(vocab_size=60, n_embd=32, n_layer=2, n_head=2, n_positions=32, resid_pdrop=0.0,
                                embd_pdrop=0.0, attn_pdrop=0.0)).eval()


def tiny_llama_causal_lm(seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=60, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32)).eval()


def small_config(**kw):
    return MomentProbingConfig(num_classes=3, hidden_size=32, proj_dim=64, num_heads=4, **kw)


def batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 60, (3, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0  # one padded row
    return ids, mask


def test_vit_b16_shapes_and_parameter_counts():
    """§11.1 shapes [B,3,128,128] -> [B,3,31,31] -> 2883, logits [B,C]; §11.5 both parameter conventions."""
    head = MomentProbingHead(MomentProbingConfig(num_classes=1000, hidden_size=768))
    x = torch.randn(2, 197, 768)
    cls, tokens, mask = head.split_tokens(x, None)
    s = head.second_order(tokens, mask)
    assert tokens.shape == (2, 196, 768) and s.shape == (2, 3, 128, 128)
    assert head.convs(s).shape == (2, 3, 31, 31) and head.classifier2.in_features == 2883
    assert head(x).shape == (2, 1000)
    assert head.parameter_counts() == {"all": 4_047_146, "readme": 3_653_000}


@pytest.mark.parametrize("center", ["scalar", "per_channel"])
def test_cross_covariance_matches_explicit_loop(center):
    """§11.3 in float64, with a padded sample: S_ab = (1/N) P̃ᵀQ̃ by loops, columns of unit norm."""
    g = torch.Generator().manual_seed(1)
    p, q = (torch.randn(2, 7, 5, generator=g, dtype=torch.float64) for _ in range(2))
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[1, 5:] = False
    s = cross_covariance(p, q, mask, center)
    for b in range(2):
        n = int(mask[b].sum())
        pb, qb = p[b, :n], q[b, :n]
        pc = pb - (pb.mean() if center == "scalar" else pb.mean(0))
        qc = qb - (qb.mean() if center == "scalar" else qb.mean(0))
        expected = torch.zeros(5, 5, dtype=torch.float64)
        for i in range(5):
            for j in range(5):
                expected[i, j] = sum(pc[t, i] * qc[t, j] for t in range(n)) / n
        expected = expected / expected.norm(dim=0, keepdim=True)
        torch.testing.assert_close(s[b], expected)
        torch.testing.assert_close(s[b].norm(dim=0), torch.ones(5, dtype=torch.float64))


def test_pair_modes():
    assert small_config().head_pairs() == [(0, 1), (1, 2), (2, 3)]
    assert small_config(pairs="n/2").head_pairs() == [(0, 2), (1, 3)]
    assert len(small_config(pairs="cn2").head_pairs()) == 6
    assert MomentProbingHead(small_config(pairs="cn2")).classifier2.in_features == 6 * 3 * 3  # 16 -> 7 -> 3


@pytest.mark.parametrize("make_backbone,class_token", [(tiny_bert_encoder, "first"), (tiny_gpt2, "last")])
@pytest.mark.parametrize("psrp", [False, True])
def test_frozen_backbone_after_optimizer_step(make_backbone, class_token, psrp):
    """§11.2: after a step every backbone parameter is bit-identical; the head (and PSRP) changed."""
    model = MomentProbingModel(make_backbone(), small_config(psrp=psrp, class_token=class_token))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(not p.requires_grad for p in model.backbone.parameters())
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    ids, mask = batch()
    logits = model(ids, mask)
    assert logits.shape == (3, 3)
    nn.functional.cross_entropy(logits, torch.tensor([0, 1, 2])).backward()
    opt.step()
    after = model.state_dict()
    assert any(k.startswith("psrp.") for k in before) == psrp
    for k in before:
        assert torch.equal(before[k], after[k]) == k.startswith("backbone."), k


@pytest.mark.parametrize("make_backbone", [tiny_bert_encoder, tiny_gpt2, tiny_llama_causal_lm])
def test_psrp_zero_init_is_identity_and_default_is_not(make_backbone):
    """§11.4: psrp_zero_init=True gives exactly the frozen backbone's tokens; the reference init does not."""
    ids, mask = batch()
    backbone = make_backbone()
    backbone = getattr(backbone, "base_model", backbone)
    with torch.no_grad():
        plain = backbone(input_ids=ids, attention_mask=mask).last_hidden_state
        zero = MomentProbingModel(backbone, small_config(psrp=True, psrp_zero_init=True))
        assert len(zero.psrp) == 2
        assert torch.equal(backbone(input_ids=ids, attention_mask=mask).last_hidden_state, plain)
        for h in zero.hooks:
            h.remove()
        MomentProbingModel(backbone, small_config(psrp=True))
        assert not torch.allclose(backbone(input_ids=ids, attention_mask=mask).last_hidden_state, plain)


def test_padding_does_not_change_logits():
    """Padded tokens are masked out of both moments: extra padding leaves a sample's logits unchanged."""
    model = MomentProbingModel(tiny_bert_encoder(), small_config())
    ids, mask = batch()
    short = model(ids[:1, :8], mask[:1, :8])
    padded_ids = torch.cat([ids[:1, :8], torch.zeros(1, 4, dtype=torch.long)], 1)
    padded = model(padded_ids, torch.cat([mask[:1, :8], torch.zeros(1, 4, dtype=torch.long)], 1))
    torch.testing.assert_close(padded, short, atol=1e-5, rtol=0)


@pytest.mark.parametrize("make_backbone,psrp",
                         [(tiny_bert_encoder, True), (tiny_llama_causal_lm, True), (tiny_bert_encoder, False)])
def test_save_load_round_trip(tmp_path, make_backbone, psrp):
    class_token = "first" if make_backbone is tiny_bert_encoder else "last"
    model = MomentProbingModel(make_backbone(), small_config(psrp=psrp, class_token=class_token))
    ids, mask = batch()
    with torch.no_grad():
        expected = model(ids, mask)
    model.save(tmp_path / "mp")
    loaded = MomentProbingModel.load(make_backbone(), tmp_path / "mp")
    assert loaded.config == model.config
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids, mask), expected, atol=0, rtol=0)
    assert not any(k.startswith("backbone.") for k in loaded.trainable_state())


def test_errors(tmp_path):
    with pytest.raises(ConfigError, match="pairs"):
        small_config(pairs="all")
    with pytest.raises(ConfigError, match="proj_dim"):
        MomentProbingConfig(num_classes=2, hidden_size=8, proj_dim=10, num_heads=4)
    with pytest.raises(ReparamError, match="cannot be folded"):
        MomentProbingModel(tiny_bert_encoder(), small_config()).merge()
    with pytest.raises(AdapterFileError, match="not found"):
        MomentProbingModel.load(tiny_bert_encoder(), tmp_path / "missing")
    MomentProbingModel(tiny_bert_encoder(), small_config(psrp=True)).save(tmp_path / "mpp")
    with pytest.raises(ReparamError, match="do not fit"):
        MomentProbingModel.load(tiny_gpt2(), tmp_path / "mpp")


# --- the registered method: reparam.adapt on a model's task head ---------------------------------------------

def tiny_bert_classifier(seed=0):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    return BertForSequenceClassification(BertConfig(
        vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=32, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=3)).eval()


def mp_adapted(psrp, seed=0):
    import reparam

    model = tiny_bert_classifier(seed)
    torch.manual_seed(seed + 1)
    return reparam.adapt(model, reparam.make_config("moment_probing", proj_dim=64, num_heads=4, psrp=psrp),
                         targets="classifier")


def batch():
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 60, (3, 9), generator=g)
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[1, 6:] = 0
    mask[2, 4:] = 0
    return ids, mask


@pytest.mark.parametrize("psrp", [False, True])
def test_registered_head_equals_the_standalone_model(psrp):
    model = mp_adapted(psrp)
    adapter = model.classifier.adapters["default"]
    twin = MomentProbingModel(tiny_bert_classifier(), small_config(psrp=psrp))
    twin.head.load_state_dict(adapter.head.state_dict())
    twin.psrp.load_state_dict(adapter.psrp.state_dict())
    assert len(adapter.psrp) == (2 if psrp else 0)
    ids, mask = batch()
    torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits, twin(ids, mask), rtol=0, atol=0)


def test_registered_trains_only_the_head_and_saves_loads(tmp_path):
    import reparam

    model = mp_adapted(psrp=True)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("classifier.adapters.default.") for n in trainable)
    for p in model.classifier.adapters["default"].psrp.parameters():  # make PSRP non-trivial
        torch.nn.init.normal_(p, std=0.2)
    ids, mask = batch()
    want = model(input_ids=ids, attention_mask=mask).logits
    reparam.save_adapter(model, tmp_path / "mp")
    fresh = reparam.load_adapter(tiny_bert_classifier(), tmp_path / "mp")
    torch.testing.assert_close(fresh(input_ids=ids, attention_mask=mask).logits, want, rtol=0, atol=0)


def test_registered_disable_unload_and_no_merge():
    import reparam

    ids, mask = batch()
    plain = tiny_bert_classifier()(input_ids=ids, attention_mask=mask).logits
    model = mp_adapted(psrp=True)
    for p in model.classifier.adapters["default"].psrp.parameters():
        torch.nn.init.normal_(p, std=0.2)
    with reparam.disabled(model):  # the plain model: original head, PSRP hooks inactive
        torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits, plain, rtol=0, atol=0)
    with pytest.raises(ReparamError, match="moment_probing: nothing to merge.*merge_active=False"):
        reparam.merge(model)
    reparam.unload(model, merge_active=False)  # hooks removed with the adapter
    torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits, plain, rtol=0, atol=0)


def test_registered_errors():
    import reparam
    from reparam.core.errors import TargetError

    with pytest.raises(TargetError, match="moment_probing needs a Hugging Face model with a task head"):
        reparam.adapt(nn.Sequential(nn.Linear(4, 3)), reparam.make_config("moment_probing"), targets=["0"])
    with pytest.raises(ConfigError, match="proj_dim / num_heads must be at least 7"):
        reparam.make_config("moment_probing", proj_dim=16, num_heads=4)
    model = mp_adapted(psrp=False)
    with pytest.raises(ReparamError, match="runs only inside the model's forward"):
        model.classifier(torch.randn(2, 32))


def test_finetune_cli_targets_the_head(tmp_path, minilm_path, glue_dir):
    import json

    from reparam.cli.main import main

    out = tmp_path / "mp"
    code = main(["finetune", "--method", "moment_probing", "--model", str(minilm_path), "--data",
                 str(glue_dir / "SST-2"), "--set", "psrp=true", "--limit", "8", "--eval-limit", "4", "--max-steps",
                 "2", "--max-length", "16", "--batch-size", "4", "--quiet", "-o", str(out)])
    assert code == 0
    saved = json.loads((out / "reparam_adapter.json").read_text())
    assert saved["method"] == "moment_probing" and saved["modules"] == ["classifier"]
    assert saved["modules_to_save"] == [] and saved["config"]["psrp"] is True


def test_registered_on_a_causal_lm_classifier_uses_the_last_token():
    import reparam
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(0)
    model = LlamaForSequenceClassification(LlamaConfig(
        vocab_size=60, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=32, num_labels=3, pad_token_id=0)).eval()
    twin_backbone = LlamaForSequenceClassification(model.config).eval()
    twin_backbone.load_state_dict(model.state_dict())
    reparam.adapt(model, reparam.make_config("moment_probing", proj_dim=64, class_token="last", psrp=True),
                  targets="score")
    adapter = model.score.adapters["default"]
    twin = MomentProbingModel(twin_backbone, small_config(class_token="last", psrp=True))
    twin.head.load_state_dict(adapter.head.state_dict())
    twin.psrp.load_state_dict(adapter.psrp.state_dict())
    ids, mask = batch()
    got = model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got, twin(ids, mask), rtol=0, atol=0)
    assert got.shape == (3, 3)
