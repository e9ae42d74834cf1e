"""DAREx-q (spec darex.md): rescale by 1/q, per-key q, validation and output-change searches for q."""
import math

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from merge_fixtures import make_models
from reparam.merging import dare_merge, merge_models, merge_state_dicts
from reparam.merging.darex_q import (DroppedDeltas, calibration_windows, mean_without_outlier, search_1d,
                                     search_q_output_change, search_q_validation)
from reparam.merging.errors import MergeConfigError, MergeValidationError
from reparam.merging.methods.darex import darex, darex_merge
from reparam.merging.methods.dare import dare
from reparam.merging.sparsify import generator_for
from reparam.training.data import TextClassificationData

W = "model.layers.0.mlp.weight"


def _eq(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# ---- the drop-and-rescale ---------------------------------------------------------------------------------------
def test_q_equal_density_is_dare_and_q_one_is_drop_only():
    base, ms = make_models(2, seed=3)
    for seed in (0, 7):
        _eq(darex_merge(base, ms, density=0.3, q=0.3, weights=[1.0, 0.6], seed=seed),
            dare_merge(base, ms, density=0.3, weights=[1.0, 0.6], seed=seed))
        _eq(darex_merge(base, ms, density=0.3, q=1.0, seed=seed),
            dare_merge(base, ms, density=0.3, rescale=False, seed=seed))
    # without q or q_per_key the rescale is DARE's
    _eq(darex_merge(base, ms, density=0.4, seed=2), dare_merge(base, ms, density=0.4, seed=2))


def test_fixed_mask_output_scales_as_one_over_q():
    delta = torch.randn(64, 32, generator=torch.Generator().manual_seed(0))
    outs = {q: darex(delta, 0.1, q, generator_for(5, 0, "w")) for q in (0.1, 0.25, 0.5, 1.0)}
    mask = outs[1.0] != 0
    assert 0 < int(mask.sum()) < delta.numel()
    for q, out in outs.items():
        assert torch.equal(out != 0, mask)  # same mask whatever q
        torch.testing.assert_close(out * q, outs[1.0])
    norms = [float(outs[q].norm()) for q in sorted(outs)]
    assert all(a > b for a, b in zip(norms, norms[1:]))
    # the mask is DARE's for the same generator
    assert torch.equal(darex(delta, 0.1, 0.1, generator_for(5, 0, "w")), dare(delta, 0.1, generator_for(5, 0, "w")))


def test_expectation_is_density_over_q_times_delta():
    delta = torch.tensor([1.0, -2.0, 0.5, 3.0])
    density, q, m = 0.3, 0.6, 4000
    outs = torch.stack([darex(delta, density, q, generator_for(s, 0, "w")) for s in range(m)])
    # each entry is delta/q with probability density: mean density/q*delta, sd |delta|/q*sqrt(d(1-d)/m)
    sd = delta.abs() / q * math.sqrt(density * (1 - density) / m)
    assert ((outs.mean(0) - density / q * delta).abs() <= 5 * sd).all()


def test_q_per_key_bias_rule_and_mean_fallback():
    base, (a,) = make_models(1, seed=4)
    drop_only = darex_merge(base, [a], density=0.5, q=1.0, seed=1)
    per_key = {W: 0.8, "model.layers.1.mlp.weight": 0.6}
    got = darex_merge(base, [a], density=0.5, q_per_key=per_key, seed=1)
    with_q = darex_merge(base, [a], density=0.5, q_per_key=per_key, q=0.9, seed=1)
    expect = {W: 0.8, "model.layers.0.mlp.bias": 0.8, "model.layers.1.mlp.weight": 0.6,
              "model.layers.1.mlp.bias": 0.6, "lm_head.weight": 0.7, "model.layers.0.norm.weight": 0.7}
    for key, q in expect.items():
        kept = drop_only[key] - base[key]
        torch.testing.assert_close(got[key] - base[key], kept / q)
        fallback = 0.9 if key in ("lm_head.weight", "model.layers.0.norm.weight") else q
        torch.testing.assert_close(with_q[key] - base[key], kept / fallback)
    assert torch.equal(got["model.position_ids"], base["model.position_ids"])


def test_bad_q_names_the_problem():
    base, (a,) = make_models(1)
    with pytest.raises(MergeConfigError, match=r"tensor '.*': q=0.2 is below density=0.5"):
        darex_merge(base, [a], density=0.5, q=0.2)
    with pytest.raises(MergeConfigError, match=r"q must be a number in \(0, 1\], got 1.5"):
        darex_merge(base, [a], density=0.5, q=1.5)
    with pytest.raises(MergeConfigError, match=r"q_per_key\['x'\] must be a number in \(0, 1\], got 0"):
        darex_merge(base, [a], density=0.5, q_per_key={"x": 0})
    with pytest.raises(MergeConfigError, match=r"q_per_key names tensor\(s\) that are not merged: 'no.such.key'"):
        darex_merge(base, [a], density=0.5, q_per_key={W: 0.7, "no.such.key": 0.7})
    with pytest.raises(MergeConfigError, match=r"not merged: 'lm_head.weight'"):  # excluded = not merged
        darex_merge(base, [a], density=0.5, q_per_key={"lm_head.weight": 0.7}, exclude=["lm_head"])
    with pytest.raises(MergeConfigError, match=r"'qq'.*valid: density, q, q_per_key, weight"):
        merge_state_dicts("darex", base, [a], {}, {"qq": 0.7})


def test_yaml_streaming_equals_in_memory(tmp_path, models_on_disk):
    base, models, bpath, paths = models_on_disk
    cfg = {"merge_method": "darex", "base_model": str(bpath), "seed": 3,
           "models": [{"model": str(paths[0]), "parameters": {"density": 0.2, "q_per_key": {W: 0.5}}},
                      {"model": str(paths[1]), "parameters": {"density": 0.3, "weight": 0.5}}],
           "parameters": {"q": 0.6}}
    (tmp_path / "c.yml").write_text(yaml.safe_dump(cfg))
    out = merge_models(tmp_path / "c.yml", tmp_path / "out", progress=False, max_shard_size=600)
    got = {}
    for f in sorted(out.glob("*.safetensors")):
        got.update(load_file(str(f)))
    want = merge_state_dicts("darex", base, models[:2], {}, {"density": [0.2, 0.3], "weight": [1.0, 0.5],
                                                           "q": 0.6, "q_per_key": [{W: 0.5}, None]}, seed=3)
    _eq(got, want)


# ---- searching q -------------------------------------------------------------------------------------------------
def test_search_1d_coarse_then_fine():
    calls = []

    def score(x):
        calls.append(x)
        return -(x - 0.37) ** 2

    best, results = search_1d(score, 0.0, 1.0, step=0.1, decay=0.1, patience=1)
    assert best == 0.37
    # coarse: 0.0 .. 0.4 improve, 0.5 and 0.6 are two misses > patience; fine: 0.31 .. 0.49 around 0.4
    assert calls[:7] == [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6]
    assert calls[7] == 0.31 and len(calls) == len(set(calls)) == len(results)
    assert max(calls) <= 1.0
    with pytest.raises(MergeConfigError, match="step > 0"):
        search_1d(score, 0.0, 1.0, step=0)


class EmbedSum(torch.nn.Module):
    """Regression model: the sum of one learned scalar per token (masked)."""

    def __init__(self, vocab=40):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, 1)

    def forward(self, input_ids, attention_mask):
        return (self.embed(input_ids)[..., 0] * attention_mask).sum(1, keepdim=True)


def _tiny_pair(seed=0):
    torch.manual_seed(seed)
    ft = EmbedSum()
    base = {k: v.detach().clone() for k, v in ft.state_dict().items()}
    with torch.no_grad():
        ft.embed.weight.add_(torch.randn_like(ft.embed.weight))
    return ft, base


def test_search_q_validation_finds_the_q_of_the_labels():
    # labels are the outputs of the DAREx-q model with q* = 0.47 (seed 0): the dev loss is exactly 0 there and
    # grows with |1/q - 1/q*|, so the coarse pass must land on 0.5 and the fine pass on 0.47
    ft, base = _tiny_pair()
    target_sd = darex_merge(base, [ft.state_dict()], density=0.2, q=0.47, seed=0)
    target = EmbedSum()
    target.load_state_dict(target_sd)
    g = torch.Generator().manual_seed(1)
    rows = [torch.randint(0, 40, (int(torch.randint(3, 9, (1,), generator=g)),), generator=g).tolist()
            for _ in range(30)]
    with torch.no_grad():
        labels = [float(target(torch.tensor([r]), torch.ones(1, len(r)))) for r in rows]
    data = TextClassificationData({"input_ids": rows}, labels, num_labels=1, metric_names=["pearson"])
    before = ft.embed.weight.detach().clone()
    q, table = search_q_validation(ft, base, data, density=0.2, metric="loss")
    assert q == 0.47
    scores = dict(table)
    assert scores[0.47] == pytest.approx(0.0, abs=1e-10) and scores[0.2] < scores[0.5] < 0
    assert torch.equal(ft.embed.weight, before)  # fine-tuned weights restored
    with pytest.raises(MergeConfigError, match="metric 'accuracy' is not reported.*loss, pearson"):
        search_q_validation(ft, base, data, density=0.2, metric="accuracy")


class ConstantInput(torch.nn.Module):
    """Embeddings of ones (identical in base and fine-tuned model) through a bias-free Linear."""

    def __init__(self, n_in=64, n_out=8):
        super().__init__()
        self.embed = torch.nn.Embedding(10, n_in)
        torch.nn.init.ones_(self.embed.weight)
        self.proj = torch.nn.Linear(n_in, n_out, bias=False)

    def forward(self, input_ids, attention_mask):
        return self.proj(self.embed(input_ids))


def test_search_q_output_change_finds_the_zero_change_q():
    # each output row r of proj sees sum_j delta_rj: kept entries sum to A, dropped ones to B (masks of seed 0),
    # so the pruned row differs from the fine-tuned one by A/q - (A + B): zero at q = A / (A + B) = 0.47
    torch.manual_seed(0)
    model = ConstantInput()
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    density, a, b = 0.3, 0.47, 0.53
    kept = darex(torch.ones(8, 64), density, 1.0, generator_for(0, 0, "proj.weight")) != 0
    k = kept.sum(1, keepdim=True).float()
    assert ((k > 0) & (k < 64)).all()
    with torch.no_grad():
        model.proj.weight.add_(torch.where(kept, a / k, b / (64 - k)))
    inputs = torch.randint(0, 10, (6, 5), generator=torch.Generator().manual_seed(0))
    q, table = search_q_output_change(model, base, inputs, density, seeds=(0,), batch_size=4)
    assert q == 0.47
    scores = dict(table)
    assert scores[0.47] > -1e-6 and scores[0.3] < -0.1  # DARE's q changes every row by A/0.3 - 1 = 0.57
    assert torch.equal(model.proj.weight, base["proj.weight"] + torch.where(kept, a / k, b / (64 - k)))


def test_dropped_deltas_write_exactly_the_merged_model(tmp_path):
    ft, base = _tiny_pair(seed=2)
    save_file(base, str(tmp_path / "base.safetensors"))
    ft_sd = {k: v.clone() for k, v in ft.state_dict().items()}
    for src in (base, tmp_path / "base.safetensors"):
        with DroppedDeltas(ft, src, 0.1, seeds=(0, 5), model_index=1) as drops:
            drops.apply(0.35, 5)
            merged = darex_merge(base, [base, ft_sd], density=[1.0, 0.1], q=[1.0, 0.35], weights=[0.0, 1.0],
                                 seed=5)
            assert torch.equal(ft.embed.weight, merged["embed.weight"])
        assert torch.equal(ft.embed.weight, ft_sd["embed.weight"])


def test_search_input_errors():
    ft, base = _tiny_pair()
    with pytest.raises(MergeConfigError, match=r"density must be in \(0, 1\)"):
        DroppedDeltas(ft, base, 1.0)
    with pytest.raises(MergeValidationError, match=r"not in the base model: embed.weight; exclude them"):
        DroppedDeltas(ft, {}, 0.5)
    with pytest.raises(MergeValidationError, match=r"tensor 'embed.weight': base has shape \[3, 1\]"):
        DroppedDeltas(ft, {"embed.weight": torch.zeros(3, 1)}, 0.5)
    with pytest.raises(MergeConfigError, match="density <= lo <= hi <= 1"):
        search_q_output_change(ft, base, torch.zeros(2, 3, dtype=torch.long), 0.5, lo=0.3)
    assert DroppedDeltas(ft, {}, 0.5, exclude=["embed"]).targets == {}


def test_mean_without_outlier_and_calibration_windows():
    assert mean_without_outlier([1.0, 2.0, 3.0, 10.0]) == 2.0
    assert mean_without_outlier([1.0, 5.0]) == 3.0  # fewer than 3 values: plain mean

    def tok(text, add_special_tokens):
        assert add_special_tokens is False
        return {"input_ids": [int(w) for w in text.split()]}

    texts = [" ".join(str(i) for i in range(j, j + 10)) for j in range(0, 100, 10)]
    win = calibration_windows(texts, tok, n=7, length=12, seed=3)
    assert win.shape == (7, 12)
    assert all(torch.equal(row, torch.arange(int(row[0]), int(row[0]) + 12)) for row in win)
    assert torch.equal(win, calibration_windows(texts, tok, n=7, length=12, seed=3))
    assert not torch.equal(win, calibration_windows(texts, tok, n=7, length=12, seed=4))
    with pytest.raises(ValueError, match="give 10 tokens, fewer than one window of 12"):
        calibration_windows(texts[:1], tok, length=12)
