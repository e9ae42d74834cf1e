"""Parity with mergekit 0.1.5 itself: the same YAML file goes through ``mergekit.merge.run_merge`` and
``reparam.merge_models`` on tiny Llama models, and every output tensor is compared.

Deterministic methods agree bit for bit (generalized task arithmetic) or within two float32 ulps (linear,
slerp). Where reparam deliberately differs (stated in the method docstrings and in
``reparam/merging/__init__.py``) a test pins the difference down: DARE masks (different random streams,
compared statistically), float32 compute for bfloat16 inputs, the gradient position of the post-block
tensors, top-k when density * numel < 1, top-k tie-breaking, and the rows kept by vocabulary truncation.
"""
import random
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from mergekit.config import MergeConfiguration  # noqa: E402
from mergekit.merge import run_merge  # noqa: E402
from mergekit.options import MergeOptions  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from reparam.merging import merge_models  # noqa: E402

POST_BLOCK = ("model.norm.weight", "lm_head.weight")


def _delta(shape, gen):
    """Deltas bounded away from 0 (|d| in [0.005, 0.015]), so a dropped entry is told from a kept one."""
    sign = torch.randint(0, 2, shape, generator=gen) * 2 - 1
    return sign * (0.5 + torch.rand(shape, generator=gen)) * 0.01


@contextmanager
def own_rng():
    """Leave the global generators as they were (model init and mergekit's random_seed reseed them)."""
    states = random.getstate(), np.random.get_state()
    with torch.random.fork_rng():
        yield
    random.setstate(states[0])
    np.random.set_state(states[1])


def _llama_config(tie: bool = False) -> LlamaConfig:
    return LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                       tie_word_embeddings=tie)


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """A 2-layer Llama (hidden 64, untied head) base and three fine-tuned copies, in float32 and bfloat16."""
    root = tmp_path_factory.mktemp("llamas")
    with own_rng():
        torch.manual_seed(0)
        model = LlamaForCausalLM(_llama_config())
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    gen = torch.Generator().manual_seed(1)
    variants = {"base": base}
    for i in range(3):
        variants[f"ft{i}"] = {k: v + _delta(v.shape, gen) for k, v in base.items()}
    paths = {}
    for dtype, tag in ((torch.float32, "f32"), (torch.bfloat16, "bf16")):
        for name, sd in variants.items():
            model.load_state_dict(sd)
            model.to(dtype).save_pretrained(root / f"{name}-{tag}")
            model.float()
            paths[f"{name}-{tag}"] = str(root / f"{name}-{tag}")
    return paths


def run_mergekit(cfg: dict, out: Path, seed: int | None = None, **options) -> dict:
    with own_rng():
        run_merge(MergeConfiguration.model_validate(cfg), str(out),
                  MergeOptions(random_seed=seed, copy_tokenizer=False, write_model_card=False, quiet=True, **options))
    return load_file(str(out / "model.safetensors"))


def run_both(tmp_path: Path, cfg: dict, mergekit_cfg: dict | None = None, seed: int | None = None):
    """Write `cfg` as one YAML file, merge it with both tools; returns (mergekit, reparam) state dicts."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    yml = tmp_path / "merge.yml"
    yml.write_text(yaml.safe_dump(cfg))
    mk = run_mergekit(mergekit_cfg or yaml.safe_load(yml.read_text()), tmp_path / "mergekit", seed)
    rp = load_file(str(merge_models(yml, tmp_path / "reparam", progress=False) / "model.safetensors"))
    assert mk.keys() == rp.keys()
    for k in mk:
        assert mk[k].dtype == rp[k].dtype and mk[k].shape == rp[k].shape, k
    return mk, rp


def load(zoo, name) -> dict:
    return load_file(str(Path(zoo[name]) / "model.safetensors"))


def assert_same(mk: dict, rp: dict, keys=None, atol=2e-7, rtol=2.4e-7):
    for k in keys if keys is not None else mk:
        torch.testing.assert_close(rp[k], mk[k], atol=atol, rtol=rtol, msg=lambda m: f"{k}: {m}")


def _config(zoo, method, models, params=None, base="base-f32", **extra):  # zoo: name -> folder
    cfg = {"merge_method": method, "models": [{"model": zoo[m], "parameters": p} if p else {"model": zoo[m]}
                                              for m, p in models],
           "dtype": "float32", **extra}
    if params:
        cfg["parameters"] = params
    if base:
        cfg["base_model"] = zoo[base]
    return cfg


# (method, base, [(model, per-model parameters)], global parameters, exact): exact means bit-identical
# output (generalized task arithmetic: same float32 operations in the same order); otherwise within two
# float32 ulps (linear: mergekit fuses w*x+acc with addcmul; slerp: reparam computes in float64).
DETERMINISTIC = [
    ("linear", None, [("ft0-f32", {"weight": 0.5}), ("ft1-f32", {"weight": 1.0}), ("ft2-f32", {"weight": 2.0})],
     None, False),
    ("linear", None, [("ft0-f32", {"weight": 0.3}), ("ft1-f32", {"weight": 0.2})], {"normalize": False}, False),
    ("task_arithmetic", "base-f32", [("ft0-f32", {"weight": 1.0}), ("ft1-f32", {"weight": -0.5}),
                                     ("ft2-f32", {"weight": 0.7})], {"lambda": 0.8}, True),
    ("task_arithmetic", "base-f32", [("ft0-f32", {"weight": 1.0}), ("ft1-f32", {"weight": 3.0})],
     {"normalize": True}, True),
    ("ties", "base-f32", [("ft0-f32", {"weight": 1.0, "density": 0.3}), ("ft1-f32", {"weight": 0.5, "density": 0.5}),
                          ("ft2-f32", {"weight": 0.8, "density": 0.9})], {"lambda": 1.2}, True),
    ("ties", "base-f32", [("ft0-f32", {"weight": 1.0, "density": 0.4}), ("ft1-f32", {"weight": 0.7, "density": 0.6})],
     {"normalize": False, "rescale": True}, True),  # rescale: L1-norm matching in both
    # per-tensor values: gradients over the blocks and name filters (post-block tensors get the fallback
    # value here; see test_gradient_position_of_post_block_tensors)
    ("ties", "base-f32", [("ft0-f32", {"weight": [{"filter": "mlp", "value": 0.3}, {"value": 1.0}],
                                       "density": [{"filter": "layers", "value": [0.2, 0.8]}, {"value": 0.5}]}),
                          ("ft1-f32", {"weight": 1.0, "density": 0.5})], None, True),
    # density 1: no random drop, so DARE is deterministic (and its defaults differ from TIES')
    ("dare_ties", "base-f32", [("ft0-f32", {"weight": 1.0, "density": 1.0}), ("ft1-f32", {"weight": 0.6})], None,
     True),
    ("dare_linear", "base-f32", [("ft0-f32", {"weight": 1.0}), ("ft1-f32", {"weight": 0.6})], {"normalize": True},
     True),
    ("breadcrumbs", "base-f32", [("ft0-f32", {"weight": 1.0, "density": 0.7, "gamma": 0.05}),
                                 ("ft1-f32", {"weight": 0.5, "density": 0.8})], None, True),
    ("breadcrumbs_ties", "base-f32", [("ft0-f32", {"weight": 1.0, "density": 0.6, "gamma": 0.1}),
                                      ("ft1-f32", {"weight": 1.0, "density": 0.6, "gamma": 0.1})], None, True),
    ("slerp", "base-f32", [("base-f32", None), ("ft0-f32", None)], {"t": 0.3}, False),
    ("slerp", "base-f32", [("base-f32", None), ("ft1-f32", None)],
     {"t": [{"filter": "self_attn", "value": [0.0, 1.0]}, {"filter": "mlp", "value": [1.0, 0.3]}, {"value": 0.6}]},
     False),
]


@pytest.mark.parametrize("method,base,models,params,exact", DETERMINISTIC,
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(DETERMINISTIC)])
def test_deterministic_methods_match(tmp_path, zoo, method, base, models, params, exact):
    mk, rp = run_both(tmp_path, _config(zoo, method, models, params, base=base))
    if exact:
        for k in mk:
            assert torch.equal(rp[k], mk[k]), k
    else:
        assert_same(mk, rp)
    if base:  # the merge did something
        assert not all(torch.equal(rp[k], v) for k, v in load(zoo, base).items())


def test_weight_defaults_to_one(tmp_path, zoo):
    """mergekit requires `weight` for ties; reparam defaults it to 1.0 (deliberate difference)."""
    cfg = _config(zoo, "ties", [("ft0-f32", {"density": 0.5}), ("ft1-f32", {"density": 0.3})])
    with_weights = _config(zoo, "ties", [("ft0-f32", {"density": 0.5, "weight": 1.0}),
                                         ("ft1-f32", {"density": 0.3, "weight": 1.0})])
    mk, rp = run_both(tmp_path, cfg, mergekit_cfg=with_weights)
    assert all(torch.equal(rp[k], mk[k]) for k in mk)


def test_gradient_position_of_post_block_tensors(tmp_path, zoo):
    """mergekit 0.1.x plans every pre- and post-block tensor (embeddings, final norm, LM head) at t = 0 of a
    gradient; reparam does the same, so the same YAML gives the same tensors there too."""
    mk, rp = run_both(tmp_path, _config(zoo, "slerp", [("base-f32", None), ("ft0-f32", None)], {"t": [0.2, 0.8]}))
    assert_same(mk, rp)
    base, ft = load(zoo, "base-f32"), load(zoo, "ft0-f32")
    for k in POST_BLOCK:  # t = 0.2 there: the base side of the interpolation, not the last value 0.8
        torch.testing.assert_close(rp[k], base[k] + 0.2 * (ft[k] - base[k]), atol=2e-3, rtol=0)


def test_topk_keeps_floor_of_density_times_numel(tmp_path, zoo):
    """Deliberate difference: with density * numel < 1 (here the 64-entry norms at density 0.01) reparam
    keeps floor(density * numel) = 0 entries, as the spec's exact-count rule says; mergekit 0.1.5 keeps one."""
    mk, rp = run_both(tmp_path, _config(zoo, "ties", [("ft0-f32", {"weight": 1.0, "density": 0.01})]))
    base, ft = load(zoo, "base-f32"), load(zoo, "ft0-f32")
    small = [k for k in mk if int(0.01 * mk[k].numel()) == 0]
    assert small and all(k.endswith("norm.weight") for k in small)
    for k in mk:
        if k not in small:
            assert torch.equal(rp[k], mk[k]), k
            continue
        assert torch.equal(rp[k], base[k]), k
        changed = (mk[k] != base[k]).nonzero().flatten()
        assert changed.tolist() == [int((ft[k] - base[k]).abs().argmax())], k


def test_topk_ties_broken_by_lower_index(tmp_path, zoo):
    """Deliberate difference: bfloat16 deltas repeat magnitudes, so the top-k boundary falls inside a run of
    equal |delta|. mergekit's unstable argsort picks any of them; reparam the lowest flat indices. Both keep
    the same number of entries, and outputs can differ only where |delta| equals the boundary value."""
    cfg = _config(zoo, "ties", [("ft0-bf16", {"weight": 1.0, "density": 0.3})], base="base-bf16")
    mk, rp = run_both(tmp_path, cfg)  # dtype float32: the deltas of bf16 values are exact
    base, ft = load(zoo, "base-bf16"), load(zoo, "ft0-bf16")
    boundary_ties = 0
    for k in mk:
        mag = (ft[k].float() - base[k].float()).abs().flatten()
        n_keep = int(0.3 * mag.numel())
        boundary = mag.sort(descending=True).values[n_keep - 1]
        kept_rp = (rp[k] != base[k].float()).flatten()
        kept_mk = (mk[k] != base[k].float()).flatten()
        assert int(kept_rp.sum()) == int(kept_mk.sum()), k
        differs = (rp[k] != mk[k]).flatten()
        assert bool((mag[differs] == boundary).all()), k
        assert torch.equal(kept_rp & (mag != boundary), mag > boundary), k
        at_boundary = (mag == boundary).nonzero().flatten()
        chosen = kept_rp[at_boundary]
        assert torch.equal(chosen, chosen.sort(descending=True).values), k  # a prefix of the run, by index
        boundary_ties += int(at_boundary.numel() > 1)
    assert boundary_ties > 0


def test_bfloat16_inputs_are_merged_in_float32(tmp_path, zoo):
    """Deliberate difference: reparam computes every merge in float32 and casts once, whatever `dtype` says;
    mergekit computes in `dtype`. So with `dtype: bfloat16` reparam equals mergekit's `dtype: float32` run
    (bit for bit), while mergekit's bfloat16 arithmetic drifts (within two bfloat16 ulps of each tensor's
    largest entry here) and lands further from the float64 result."""
    weights = [1.0, -0.5, 0.7]
    models = [(f"ft{i}-bf16", {"weight": w}) for i, w in enumerate(weights)]
    cfg = {**_config(zoo, "task_arithmetic", models, {"lambda": 0.8}, base="base-bf16"), "dtype": "bfloat16"}
    in_f32 = {**cfg, "dtype": "float32", "out_dtype": "bfloat16"}
    mk_bf16, rp = run_both(tmp_path / "bf16", cfg)
    mk_f32, _ = run_both(tmp_path / "f32", cfg, mergekit_cfg=in_f32)
    base, fts = load(zoo, "base-bf16"), [load(zoo, f"ft{i}-bf16") for i in range(3)]
    err_rp = err_mk = 0.0
    for k in rp:
        assert rp[k].dtype == torch.bfloat16 and torch.equal(rp[k], mk_f32[k]), k
        scale = float(rp[k].float().abs().max())  # cancellation: judge against the tensor's largest entry
        torch.testing.assert_close(mk_bf16[k], rp[k], rtol=0, atol=2**-7 * scale)
        ref = base[k].double() + 0.8 * sum(w * (ft[k].double() - base[k].double()) for w, ft in zip(weights, fts))
        err_rp += float((rp[k].double() - ref).abs().sum())
        err_mk += float((mk_bf16[k].double() - ref).abs().sum())
    assert sum(int((mk_bf16[k] != rp[k]).sum()) for k in rp) > 0
    assert err_rp < 0.9 * err_mk


def _changed(out: dict, base: dict) -> dict:
    """Entries a merge moved (every delta is >= 0.005 in size, so dropped ones are exactly unchanged)."""
    return {k: (out[k].float() - base[k].float()).abs() > 0.0025 for k in out}


def test_dare_masks_differ_but_statistics_agree(tmp_path, zoo):
    """Deliberate difference: DARE masks come from a generator per (seed, model, tensor) in reparam and from
    the global torch stream in mergekit, so they cannot match. With `rescale_mode: l1` (mergekit's rescale)
    both follow the same closed form given their own mask, keep the same fraction, and move the same L1 mass;
    reparam's default rescale (1/density, the paper's) keeps E[merged delta] = delta instead."""
    models = [("ft0-f32", {"weight": 1.0, "density": 0.3})]
    mk_cfg = _config(zoo, "dare_linear", models)
    mk, rp = run_both(tmp_path, {**mk_cfg, "parameters": {"rescale_mode": "l1"}}, mergekit_cfg=mk_cfg, seed=7)
    base, ft = load(zoo, "base-f32"), load(zoo, "ft0-f32")
    total = sum(v.numel() for v in base.values())
    for out in (mk, rp):
        kept = _changed(out, base)
        assert abs(sum(int(m.sum()) for m in kept.values()) / total - 0.3) < 0.01
        for k, m in kept.items():
            delta = ft[k] - base[k]
            scale = delta.abs().sum() / (delta * m).abs().sum()
            torch.testing.assert_close(out[k], base[k] + delta * m * scale, rtol=1e-5, atol=1e-6)
            if m.numel() >= 2048:
                assert abs(float(scale) * 0.3 - 1) < 0.2, k
    agree = sum(int((a == b).sum()) for a, b in zip(_changed(mk, base).values(), _changed(rp, base).values()))
    assert abs(agree / total - (0.3**2 + 0.7**2)) < 0.02  # independent masks, not the same ones

    paper = load_file(str(merge_models(mk_cfg, tmp_path / "inverse_keep", progress=False) / "model.safetensors"))
    moved = sent = 0.0
    for k, m in _changed(paper, base).items():
        delta = ft[k] - base[k]
        torch.testing.assert_close(paper[k], base[k] + delta * m / 0.3, rtol=1e-5, atol=1e-6)
        moved += float((paper[k] - base[k]).abs().sum())
        sent += float(delta.abs().sum())
    assert abs(moved / sent - 1) < 0.03  # mergekit's L1 rescale matches this mass exactly per tensor


def test_dare_ties_kept_coordinates_agree(tmp_path, zoo):
    """Two models, DARE then sign election: a coordinate moves when either model keeps it, so both tools move
    1 - (1 - 0.3)(1 - 0.5) = 65% of the coordinates, each with its own masks."""
    models = [("ft0-f32", {"weight": 1.0, "density": 0.3}), ("ft1-f32", {"weight": 0.8, "density": 0.5})]
    mk_cfg = _config(zoo, "dare_ties", models)
    mk, rp = run_both(tmp_path, {**mk_cfg, "parameters": {"rescale_mode": "l1"}}, mergekit_cfg=mk_cfg, seed=3)
    base = load(zoo, "base-f32")
    total = sum(v.numel() for v in base.values())
    fractions = [sum(int(m.sum()) for m in _changed(out, base).values()) / total for out in (mk, rp)]
    assert all(abs(f - 0.65) < 0.01 for f in fractions), fractions
    assert any(not torch.equal(mk[k], rp[k]) for k in mk)


def _llama(tmp_path: Path, name: str, seed: int, *, tie: bool, vocab: int = 96) -> str:
    """A fresh tiny Llama, perturbed by `seed` (seed 0: the unperturbed base), saved under tmp_path/name."""
    with own_rng():
        torch.manual_seed(0)
        model = LlamaForCausalLM(_llama_config(tie))
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(_delta(p.shape, gen) if seed else 0)
        if vocab != 96:
            model.resize_token_embeddings(vocab)
    model.save_pretrained(tmp_path / name)
    return str(tmp_path / name)


def test_tied_embeddings(tmp_path):
    """A tied Llama stores only the embedding; both tools merge it once and write only it."""
    paths = {name: _llama(tmp_path, name, seed, tie=True) for name, seed in (("base", 0), ("a", 1), ("b", 2))}
    cfg = _config(paths, "ties", [("a", {"weight": 1.0, "density": 0.5}), ("b", {"weight": 0.5, "density": 0.5})],
                  base="base")
    mk, rp = run_both(tmp_path / "merge", cfg)
    assert "lm_head.weight" not in rp and all(torch.equal(rp[k], mk[k]) for k in mk)


def test_vocab_mismatch_truncate(tmp_path):
    """A fine-tune that added 4 tokens. mergekit (`unsafe_truncate_embeddings`) merges the 96 common rows and
    drops the others; reparam (`on_vocab_mismatch: truncate`) merges the same rows identically and keeps the
    new ones, copied from the model that has them (deliberate difference: the spec's rule), with the output
    config's vocab_size raised to match."""
    paths = {"base": _llama(tmp_path, "base", 0, tie=False), "big": _llama(tmp_path, "big", 1, tie=False, vocab=100),
             "a": _llama(tmp_path, "a", 2, tie=False)}
    models = [("big", {"weight": 1.0, "density": 0.5}), ("a", {"weight": 0.7, "density": 0.5})]
    cfg = _config(paths, "ties", models, base="base")
    yml = tmp_path / "merge.yml"
    yml.write_text(yaml.safe_dump({**cfg, "on_vocab_mismatch": "truncate"}))
    mk = run_mergekit(cfg, tmp_path / "mk", unsafe_truncate_embeddings=True)
    with pytest.warns(UserWarning, match=r"rows \[96, 100\) copied from .*big"):
        out = merge_models(yml, tmp_path / "rp", progress=False)
    rp, big = load_file(str(out / "model.safetensors")), load(paths, "big")
    for k in mk:
        if k in ("model.embed_tokens.weight", "lm_head.weight"):
            assert mk[k].shape[0] == 96 and rp[k].shape[0] == 100
            assert torch.equal(rp[k][:96], mk[k]) and torch.equal(rp[k][96:], big[k][96:]), k
        else:
            assert torch.equal(rp[k], mk[k]), k
    assert LlamaForCausalLM.from_pretrained(out).config.vocab_size == 100
