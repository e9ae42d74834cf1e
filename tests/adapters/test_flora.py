"""FLoRA (specs/adapters/flora.md): the unit-test properties of §11, plus merge/unload, save/load, CLI and errors."""
import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import reparam
from reparam.adapters.flora import tucker_to_tensor
from reparam.core.errors import AdapterFileError, ConfigError, TargetError
from tests.helpers import MixedKinds, TinyMLP, randomize_adapters


class ConvNet(nn.Module):
    """A strided, padded conv2d (optionally grouped), a 1x1 conv and a linear head."""

    def __init__(self, groups=1, dtype=torch.float32):
        super().__init__()
        self.conv = nn.Conv2d(8, 12, 3, stride=2, padding=1, dilation=1, groups=groups, dtype=dtype)
        self.point = nn.Conv2d(12, 6, 1, dtype=dtype)
        self.head = nn.Linear(6, 4, dtype=dtype)

    def forward(self, x):
        return self.head(self.point(torch.relu(self.conv(x))).mean(dim=(2, 3)))


def adapted(model, targets, method="flora", **fields):
    torch.manual_seed(0)
    return reparam.adapt(copy.deepcopy(model), reparam.make_config(method, **fields), targets=targets)


# --- §11.1 identity at init -----------------------------------------------------------------------------------

@pytest.mark.parametrize("conv_forward", ["merged", "separate"])
def test_identity_at_init_linear_and_conv2d(conv_forward):
    torch.manual_seed(0)
    mlp, net = TinyMLP(), ConvNet()
    x, img = torch.randn(5, 16), torch.randn(2, 8, 9, 9)
    model = adapted(mlp, ["fc1", "fc2"], r=4, scale=4.0)
    assert torch.equal(model(x), mlp(x))
    conv_model = adapted(net, ["conv", "point"], r=4, scale=4.0, conv_forward=conv_forward)
    torch.testing.assert_close(conv_model(img), net(img), atol=1e-6, rtol=0)  # merged path: conv(x, W0 + 0)
    ad = conv_model.conv.adapters.default
    assert torch.count_nonzero(ad.core) == 0 and all(torch.count_nonzero(f) == f.numel() for f in ad.factors)


def test_factor_init_is_kaiming_normal_a_sqrt3():
    model = reparam.adapt(nn.Sequential(nn.Linear(4096, 8)), reparam.make_config("flora", r=16), targets=nn.Linear)
    U_in = model[0].adapters.default.factors[0]
    assert abs(U_in.std().item() - 1 / math.sqrt(2 * 16)) < 0.02 / math.sqrt(32)  # std = 1/sqrt(2 r_n), §4
    assert abs(U_in.mean().item()) < 0.01


# --- §11.2 Tucker correctness ---------------------------------------------------------------------------------

def test_tucker_chain_matches_einsum_conv2d_and_linear():
    g = torch.Generator().manual_seed(0)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    G, U_in, U_out, U_h, U_w = rnd(3, 4, 2, 1), rnd(5, 3), rnd(7, 4), rnd(3, 2), rnd(2, 1)
    full = tucker_to_tensor(G, [U_in, U_out, U_h, U_w]).transpose(0, 1)
    torch.testing.assert_close(full, torch.einsum("abcd,ia,ob,hc,wd->oihw", G, U_in, U_out, U_h, U_w),
                               atol=1e-12, rtol=0)
    G2 = rnd(3, 4)
    torch.testing.assert_close(tucker_to_tensor(G2, [U_in, U_out]).transpose(0, 1), U_out @ G2.T @ U_in.T,
                               atol=1e-12, rtol=0)


def test_adapter_delta_and_forward_match_closed_form_float64():
    torch.manual_seed(0)
    net = ConvNet(dtype=torch.float64)
    model = adapted(net, ["conv", "head"], r=3, scale=2.5, conv_forward="separate")
    randomize_adapters(model, std=0.3)
    conv, head = model.conv.adapters.default, model.head.adapters.default
    G, (U_in, U_out, U_h, U_w) = conv.core, conv.factors
    expected = 2.5 * torch.einsum("abcd,ia,ob,hc,wd->oihw", G, U_in, U_out, U_h, U_w)
    torch.testing.assert_close(conv.delta_weight(model.conv), expected, atol=1e-12, rtol=0)
    x = torch.randn(4, 6, dtype=torch.float64)
    dW = 2.5 * head.factors[1] @ head.core.T @ head.factors[0].T
    torch.testing.assert_close(model.head(x), F.linear(x, net.head.weight + dW, net.head.bias), atol=1e-12, rtol=0)


# --- §11.3 merge equivalence ----------------------------------------------------------------------------------

@pytest.mark.parametrize("groups", [1, 4])
@pytest.mark.parametrize("conv_forward", ["merged", "separate"])
def test_merge_equivalence_strided_padded_grouped_conv(groups, conv_forward):
    torch.manual_seed(0)
    net = ConvNet(groups=groups)
    model = adapted(net, ["conv", "point", "head"], r=4, scale=4.0, conv_forward=conv_forward)
    randomize_adapters(model, std=0.2)
    assert model.conv.adapters.default.factors[0].shape == (8 // groups, 4)  # input mode = C_in / groups (§10.1)
    img = torch.randn(2, 8, 9, 9)
    dW = model.conv.adapters.default.delta_weight(model.conv)
    W0, b0 = net.conv.weight, net.conv.bias
    two_convs = net.conv(img) + F.conv2d(img, dW, None, 2, 1, 1, groups)
    one_conv = F.conv2d(img, W0 + dW, b0, 2, 1, 1, groups)
    torch.testing.assert_close(two_convs, one_conv, atol=1e-5, rtol=0)
    torch.testing.assert_close(model.conv(img), one_conv, atol=1e-5, rtol=0)
    y = model(img)
    reparam.merge(model)
    torch.testing.assert_close(model.conv.weight, W0 + dW, atol=1e-6, rtol=0)
    torch.testing.assert_close(model(img), y, atol=1e-5, rtol=0)
    reparam.unmerge(model)
    torch.testing.assert_close(model.conv.weight, W0, atol=1e-6, rtol=0)
    plain = reparam.unload(model)
    assert type(plain.conv) is nn.Conv2d and not any(".adapters." in n for n, _ in plain.named_parameters())
    torch.testing.assert_close(plain(img), y, atol=1e-5, rtol=0)


def test_merged_and_separate_conv_paths_agree_in_value_and_gradient():
    torch.manual_seed(0)
    net, img = ConvNet(groups=4), torch.randn(2, 8, 9, 9)
    grads = []
    for mode in ("merged", "separate"):
        model = adapted(net, ["conv", "point"], r=3, conv_forward=mode)
        randomize_adapters(model, std=0.2)
        assert model.conv.adapters.default.computes_layer_output == (mode == "merged")
        model(img).square().sum().backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], atol=1e-5, rtol=1e-4)


# --- §11.4 parameter count and gradient flow --------------------------------------------------------------------

def test_parameter_count_and_gradients_only_to_core_and_factors():
    torch.manual_seed(0)
    net = ConvNet(groups=4)
    model = adapted(net, ["conv", "point", "head"], r=4, kernel_r=2)
    counts = {m: sum(p.numel() for p in getattr(model, m).adapters.default.parameters()) for m in ("conv", "point", "head")}
    assert counts["conv"] == 4 * 4 * 2 * 2 + (2 * 4 + 12 * 4 + 3 * 2 + 3 * 2)  # Π r_n + Σ n_n r_n, n_in = 8/4
    assert counts["point"] == 4 * 4 * 1 * 1 + (12 * 4 + 6 * 4 + 1 + 1)  # 1x1 kernel: r_h = r_w = 1 (§7)
    assert counts["head"] == 4 * 4 + 6 * 4 + 4 * 4
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{m}.adapters.default.{k}" for m in counts
                         for k, _ in getattr(model, m).adapters.default.named_parameters()}
    img = torch.randn(2, 8, 9, 9)
    model(img).sum().backward()  # G = 0: only the cores receive gradient (§10.3)
    for m in counts:
        ad = getattr(model, m).adapters.default
        assert ad.core.grad.abs().sum() > 0 and all(f.grad.abs().sum() == 0 for f in ad.factors)
    model.zero_grad()
    randomize_adapters(model)
    model(img).sum().backward()
    for n, p in model.named_parameters():
        assert (p.grad is not None and p.grad.abs().sum() > 0) == (n in trainable), n


# --- §11.5 linear reduction -----------------------------------------------------------------------------------

def test_identity_core_reduces_to_lora():
    torch.manual_seed(0)
    mlp, x = TinyMLP(dtype=torch.float64), torch.randn(5, 16, dtype=torch.float64)
    flora = adapted(mlp, ["fc1", "fc2"], r=4, scale=3.0)
    lora = adapted(mlp, ["fc1", "fc2"], "lora", r=4, alpha=12.0)  # s = α/r = 3
    with torch.no_grad():
        for name in ("fc1", "fc2"):
            fl, lo = getattr(flora, name).adapters.default, getattr(lora, name).adapters.default
            fl.core.copy_(torch.eye(4))
            lo.lora_A.copy_(fl.factors[0].T)
            lo.lora_B.copy_(fl.factors[1])
    torch.testing.assert_close(flora(x), lora(x), atol=1e-12, rtol=0)
    torch.testing.assert_close(flora.fc2.adapters.default.delta_weight(flora.fc2),
                               lora.fc2.adapters.default.delta_weight(lora.fc2), atol=1e-12, rtol=0)


# --- layer kinds, dropout, save/load, errors ---------------------------------------------------------------------

def test_conv1d_conv3d_and_hf_conv1d_layout():
    torch.manual_seed(1)
    mixed, ids = MixedKinds(), torch.randint(1, 50, (3, 7))
    model = adapted(mixed, ["proj", "conv1", "conv2", "lin"], r=2, kernel_r=3)
    assert model.proj.adapters.default.delta_weight(model.proj).shape == mixed.proj.weight.shape  # 12 x 10
    assert [f.shape[1] for f in model.conv2.adapters.default.factors] == [2, 2, 3, 2]  # r_w capped at k_w = 2
    randomize_adapters(model)
    y = model(ids)
    torch.testing.assert_close(reparam.unload(model)(ids), y, atol=1e-5, rtol=0)
    conv3 = nn.Conv3d(4, 6, (3, 3, 2), padding=1, groups=2)
    vol = torch.randn(1, 4, 5, 5, 4)
    model3 = adapted(nn.Sequential(conv3), nn.Conv3d, r=2)
    randomize_adapters(model3)
    dW = model3[0].adapters.default.delta_weight(model3[0])
    assert dW.shape == conv3.weight.shape
    torch.testing.assert_close(model3(vol), F.conv3d(vol, conv3.weight + dW, conv3.bias, padding=1, groups=2),
                               atol=1e-5, rtol=0)


def test_dropout_applies_to_update_branch_only():
    torch.manual_seed(0)
    net, img = ConvNet(), torch.randn(2, 8, 9, 9)
    model = adapted(net, ["conv"], r=3, dropout=0.5)
    assert not model.conv.adapters.default.computes_layer_output  # dropout needs the separate branch
    randomize_adapters(model)
    model.train()
    with reparam.disabled(model):
        assert torch.equal(model(img), net(img))
    assert not torch.equal(model(img), model(img))  # dropout active in training
    model.eval()
    model_no_drop = adapted(net, ["conv"], r=3)
    model_no_drop.load_state_dict(model.state_dict())
    torch.testing.assert_close(model(img), model_no_drop(img), atol=1e-5, rtol=0)


def test_bf16_base_uses_the_float32_update_branch():
    torch.manual_seed(0)
    net, img = ConvNet(), torch.randn(2, 8, 9, 9)
    model = adapted(net, ["conv"], r=3)
    randomize_adapters(model)
    low = adapted(copy.deepcopy(net).to(torch.bfloat16), ["conv"], r=3)
    ad = low.conv.adapters.default
    assert not ad.computes_layer_output and ad.core.dtype == torch.float32  # W0 + ΔW in bf16 would round ΔW
    ad.load_state_dict(model.conv.adapters.default.state_dict())
    y = model(img)
    torch.testing.assert_close(low(img.bfloat16()).float(), y, atol=0.05 * y.abs().max().item(), rtol=0)


def test_save_load_round_trip(tmp_path):
    torch.manual_seed(0)
    net, img = ConvNet(groups=4), torch.randn(2, 8, 9, 9)
    model = adapted(net, ["conv", "point", "head"], r=3, scale=4.0, dropout=0.01)
    randomize_adapters(model)
    model.eval()
    reparam.save_adapter(model, tmp_path / "a")
    meta = json.loads((tmp_path / "a" / "reparam_adapter.json").read_text())
    assert meta["method"] == "flora" and meta["config"]["scale"] == 4.0
    fresh = reparam.load_adapter(copy.deepcopy(net).eval(), tmp_path / "a")
    assert torch.equal(fresh(img), model(img))


def test_config_and_target_errors():
    for field, value in [("r", 0), ("kernel_r", -1), ("dropout", 1.0), ("conv_forward", "fused")]:
        with pytest.raises(ConfigError, match=f"flora: invalid {field}="):
            reparam.make_config("flora", **{field: value})
    with pytest.raises(ConfigError, match="unknown field.*'alpha'"):
        reparam.make_config("flora", alpha=8)
    with pytest.raises(AdapterFileError, match="'flora' has no PEFT LoRA export"):
        reparam.export_peft(adapted(TinyMLP(), ["fc1"]), "unused")
    with pytest.raises(TargetError, match="'emb'.*flora.*linear, conv"):
        reparam.adapt(MixedKinds(), reparam.make_config("flora"), targets=["emb"])


def test_cli_finetune_on_glue(tmp_path, minilm_path, glue_dir, capsys):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, BertConfig

    from reparam.cli.main import main

    tokenizer = AutoTokenizer.from_pretrained(minilm_path)
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=32, num_labels=2)
    AutoModelForSequenceClassification.from_config(cfg).save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    out = tmp_path / "adapter"
    code = main(["finetune", "--model", str(tmp_path / "model"), "--data", str(glue_dir / "SST-2"), "--method", "flora",
                 "--r", "2", "--set", "scale=2.0", "--max-steps", "2", "--limit", "16", "--eval-limit", "16",
                 "--max-length", "32", "--quiet", "--output", str(out)])
    assert code == 0, capsys.readouterr()
    meta = json.loads((out / "reparam_adapter.json").read_text())
    assert meta["method"] == "flora" and meta["config"]["scale"] == 2.0 and len(meta["modules"]) == 13
    fresh = reparam.load_adapter(AutoModelForSequenceClassification.from_pretrained(tmp_path / "model"), out)
    cores = [p for n, p in fresh.named_parameters() if n.endswith("adapters.default.core")]
    assert len(cores) == 13 and any(c.abs().sum() > 0 for c in cores)  # two steps moved the zero-initialised cores
