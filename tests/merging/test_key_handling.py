"""Key handling rules of specs/merge/README.md: `on_mismatch: skip` (with its warning), `on_vocab_mismatch:
truncate` (common rows merged, the rest copied from the first model that has them) and tied weights (merged
once, written again under each tied name, counted once in global statistics)."""
import json

import pytest
import torch

from merge_fixtures import load_folder, make_models, save_model
from reparam.merging import merge_models, merge_state_dicts
from reparam.merging.errors import MergeConfigError, MergeValidationError

EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"


def _config(method, bpath, paths, params=None, model_params=None, **extra):
    cfg = {"merge_method": method, "base_model": str(bpath), "parameters": dict(params or {}),
           "models": [{"model": str(p), "parameters": dict(model_params or {})} for p in paths], **extra}
    return cfg


# ---------------------------------------------------------------- on_mismatch: skip

def test_skip_copies_base_and_warns_listing_every_tensor(tmp_path):
    base, (m0, m1) = make_models(2, seed=3)
    m0 = {k: v for k, v in m0.items() if k != HEAD}  # missing
    m1 = {**m1, "model.layers.0.mlp.bias": torch.zeros(9), "extra.weight": torch.ones(2)}  # shape; extra key
    paths = [save_model(m0, tmp_path / "m0"), save_model(m1, tmp_path / "m1")]
    bpath = save_model(base, tmp_path / "base")
    with pytest.raises(MergeValidationError) as e:
        merge_models(_config("task_arithmetic", bpath, paths), tmp_path / "strict", progress=False)
    assert all(s in str(e.value) for s in (HEAD, "model.layers.0.mlp.bias", "[9]", "extra.weight"))

    with pytest.warns(UserWarning) as rec:
        out = merge_models(_config("task_arithmetic", bpath, paths, on_mismatch="skip"), tmp_path / "out",
                           progress=False)
    msg = "\n".join(str(w.message) for w in rec)
    assert "2 tensor(s) copied from" in msg and str(bpath) in msg
    assert f"tensor {HEAD!r} is missing" in msg and "has shape [9]" in msg
    assert "1 tensor(s) not in" in msg and "extra.weight" in msg
    got = load_folder(out)
    assert set(got) == set(base)
    for k in (HEAD, "model.layers.0.mlp.bias"):
        assert torch.equal(got[k], base[k]), k
    k = "model.layers.1.mlp.weight"
    torch.testing.assert_close(got[k], base[k] + (m0[k] - base[k]) + (m1[k] - base[k]))


def test_skip_without_problems_is_silent(recwarn):
    base, models = make_models(2, seed=4)
    merge_state_dicts("task_arithmetic", base, models, on_mismatch="skip")
    assert not [w for w in recwarn if "on_mismatch" in str(w.message)]


# ---------------------------------------------------------------- on_vocab_mismatch: truncate

def _grow(sd, rows, seed):
    """Copy of sd whose embedding and LM head have `rows` rows (new rows random: tokens added by a fine-tune)."""
    g = torch.Generator().manual_seed(seed)
    out = dict(sd)
    for k in (EMBED, HEAD):
        v = sd[k]
        out[k] = torch.cat([v[:rows], torch.randn(max(0, rows - v.shape[0]), *v.shape[1:], generator=g)])
    return out


def _narrow(sd, rows):
    return {k: v[:rows] if k in (EMBED, HEAD) else v for k, v in sd.items()}


def test_vocab_mismatch_is_an_error_with_a_hint(tmp_path):
    base, (m0,) = make_models(1, seed=5)
    bpath, p0 = save_model(base, tmp_path / "base"), save_model(_grow(m0, 18, 1), tmp_path / "m0")
    with pytest.raises(MergeValidationError, match=r"'model.embed_tokens.weight'.*\[18, 8\].*on_vocab_mismatch"):
        merge_models(_config("ties", bpath, [p0]), tmp_path / "out", progress=False)


@pytest.mark.parametrize("method,params,mparams", [
    ("ties", {"scope": "global"}, {"density": 0.4}),  # statistics over the merged (common) rows only
    ("dare_ties", {}, {"density": 0.5}),  # masks of the common rows: same generator as without new rows
])
def test_truncate_merges_common_rows_and_copies_the_rest(tmp_path, method, params, mparams):
    base, (m0, m1, m2) = make_models(3, seed=6)
    models = [_grow(m0, 18, 1), m1, _grow(m2, 20, 2)]  # 16 common rows; 16-17 from m0, 18-19 from m2
    bpath = save_model(base, tmp_path / "base")
    (bpath / "config.json").write_text(json.dumps({"model_type": "toy", "vocab_size": 16}))
    paths = [save_model(m, tmp_path / f"m{i}", shards=2) for i, m in enumerate(models)]
    cfg = _config(method, bpath, paths, params, mparams, on_vocab_mismatch="truncate", seed=3)
    with pytest.warns(UserWarning, match=r"rows \[0, 16\) merged; rows \[16, 18\) copied from .*m0, "
                                         r"rows \[18, 20\) copied from .*m2"):
        out = merge_models(cfg, tmp_path / "out", progress=False, max_shard_size=400)
    got = load_folder(out)
    want = merge_state_dicts(method, base, [_narrow(m, 16) for m in models], params, mparams, seed=3)
    for k in want:
        if k in (EMBED, HEAD):
            assert got[k].shape == (20, 8)
            assert torch.equal(got[k][:16], want[k]), k
            assert torch.equal(got[k][16:18], models[0][k][16:18]) and torch.equal(got[k][18:], models[2][k][18:])
        else:
            assert torch.equal(got[k], want[k]), k
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 20
    with pytest.warns(UserWarning, match="on_vocab_mismatch"):
        in_memory = merge_state_dicts(method, base, models, params, mparams, seed=3, on_vocab_mismatch="truncate")
    assert all(torch.equal(in_memory[k], got[k]) for k in got)


def test_truncate_rows_missing_from_a_model_come_from_the_base(tmp_path):
    base, (m0,) = make_models(1, seed=7)
    small = _narrow(m0, 14)
    with pytest.warns(UserWarning, match=r"rows \[14, 16\) copied from base"):
        got = merge_state_dicts("task_arithmetic", base, [small], on_vocab_mismatch="truncate")
    for k in (EMBED, HEAD):
        assert torch.equal(got[k][14:], base[k][14:])
        torch.testing.assert_close(got[k][:14], small[k])


def test_truncate_does_not_cover_other_tensors(tmp_path):
    base, (m0,) = make_models(1, seed=8)
    bad = {**m0, "model.layers.0.mlp.weight": torch.zeros(9, 8)}  # rows differ, but it is not a vocabulary
    with pytest.raises(MergeValidationError, match=r"'model.layers.0.mlp.weight'.*\[9, 8\]"):
        merge_state_dicts("ties", base, [bad], on_vocab_mismatch="truncate")
    with pytest.raises(MergeConfigError, match=r"on_vocab_mismatch must be 'error' or 'truncate', got 'pad'"):
        merge_models(_config("ties", tmp_path, [tmp_path], on_vocab_mismatch="pad"), tmp_path / "o")


# ---------------------------------------------------------------- tied weights

def _tie(sd, *keys):
    """T5-style sharing: every key in `keys` holds the first one's tensor (one storage, as state_dict gives)."""
    return {**sd, **{k: sd[keys[0]] for k in keys[1:]}}


def test_tied_weights_stay_tied_under_random_masks():
    base, models = make_models(2, seed=9)
    tb, tms = _tie(base, HEAD, EMBED), [_tie(m, HEAD, EMBED) for m in models]
    got = merge_state_dicts("dare_ties", tb, tms, {}, {"density": 0.5}, seed=1)
    assert got[EMBED] is got[HEAD]  # merged once, re-tied
    one_differs = [dict(tms[0], **{EMBED: tms[0][EMBED] + 0.01}), tms[1]]  # not tied in every model
    untied = merge_state_dicts("dare_ties", tb, one_differs, {}, {"density": 0.5}, seed=1)
    assert not torch.equal(untied[EMBED], untied[HEAD])


def test_tied_weights_count_once_in_global_statistics():
    """As the TIES reference code: drop the duplicate before the whole-model threshold, restore it after."""
    base, models = make_models(3, seed=10)
    names = (HEAD, EMBED, "model.shared.weight")
    tb, tms = _tie({**base, names[2]: base[HEAD]}, *names), [_tie({**m, names[2]: m[HEAD]}, *names) for m in models]
    got = merge_state_dicts("ties", tb, tms, {"scope": "global"}, {"density": 0.2})
    dedup = merge_state_dicts("ties", {k: v for k, v in tb.items() if k not in names[1:]},
                              [{k: v for k, v in m.items() if k not in names[1:]} for m in tms],
                              {"scope": "global"}, {"density": 0.2})
    for k, v in dedup.items():
        assert torch.equal(got[k], v), k
    assert torch.equal(got[EMBED], dedup[HEAD]) and torch.equal(got["model.shared.weight"], dedup[HEAD])


def test_tied_weights_on_disk_follow_the_model_config(tmp_path):
    base, models = make_models(2, seed=11)
    sds = [{**sd, HEAD: sd[EMBED].clone()} for sd in [base] + models]  # two files' worth, same values
    folders = [save_model(sd, tmp_path / f"in{i}", shards=2) for i, sd in enumerate(sds)]
    cfg = _config("dare_linear", folders[0], folders[1:], {}, {"density": 0.5}, seed=2)
    tied = load_folder(merge_models(cfg, tmp_path / "tied", progress=False, max_shard_size=300))
    assert torch.equal(tied[EMBED], tied[HEAD])
    head_only = merge_state_dicts("dare_linear", *[{k: v for k, v in sd.items() if k != EMBED} for sd in sds[:1]],
                                  [{k: v for k, v in sd.items() if k != EMBED} for sd in sds[1:]], {},
                                  {"density": 0.5}, seed=2)
    assert torch.equal(tied[HEAD], head_only[HEAD])  # merged once, under the first name
    for f in folders:  # the config says the head is its own parameter: merged on its own, own mask
        (f / "config.json").write_text(json.dumps({"model_type": "toy", "tie_word_embeddings": False}))
    untied = load_folder(merge_models(cfg, tmp_path / "untied", progress=False))
    assert not torch.equal(untied[EMBED], untied[HEAD])
    assert torch.equal(untied[HEAD], tied[HEAD])


def test_excluding_one_of_tied_tensors_is_an_error():
    base, models = make_models(1, seed=12)
    with pytest.raises(MergeConfigError, match=r"'lm_head.weight' and 'model.embed_tokens.weight' are tied"):
        merge_state_dicts("ties", _tie(base, HEAD, EMBED), [_tie(models[0], HEAD, EMBED)], exclude=["embed"])
    got = merge_state_dicts("ties", _tie(base, HEAD, EMBED), [_tie(models[0], HEAD, EMBED)],
                            exclude=["embed", "lm_head"])
    assert torch.equal(got[EMBED], base[HEAD]) and got[HEAD] is got[EMBED]  # copied from the base, still tied
