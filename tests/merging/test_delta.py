"""Task vectors / weight signatures as files (reparam.merging.delta): extract, apply, remove, layer selection,
fingerprints, atomic output, Robust Weight Signature properties (weight_signatures.md, "Unit-test properties")."""
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from merge_fixtures import make_models, save_model
from reparam.merging import apply_delta, delta_info, extract_delta, remove_delta
from reparam.merging.errors import MergeConfigError, MergeValidationError
from reparam.merging.io import SafetensorsSource
from reparam.merging.signatures import dequantize_linear, quantize_linear, signature

FLOAT_KEYS = ["model.embed_tokens.weight", "model.layers.0.mlp.weight", "model.layers.0.mlp.bias",
              "model.layers.0.norm.weight", "model.layers.1.mlp.weight", "model.layers.1.mlp.bias",
              "lm_head.weight", "logit_scale"]


def load_folder(folder: Path) -> dict:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def assert_same(a: dict, b: dict, keys=None):
    for k in keys or b:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


@pytest.fixture
def pair(tmp_path):
    """base (sharded in 3 files) and a fine-tuned model (2 files), float32."""
    base, (ft,) = make_models(1, seed=3)
    return base, ft, save_model(base, tmp_path / "base", shards=3), save_model(ft, tmp_path / "ft", shards=2)


def no_dot_files(folder: Path):
    return not [p.name for p in folder.iterdir() if p.name.startswith(".")]


# --- round trips ---------------------------------------------------------------------------------------------

def test_extract_then_apply_reproduces_finetuned_fp32(tmp_path, pair):
    base, ft, bpath, fpath = pair
    d = extract_delta(bpath, fpath, tmp_path / "tv.safetensors")
    stored = load_file(str(d))
    assert sorted(stored) == sorted(FLOAT_KEYS)  # the int64 buffer is not part of a delta
    for k in FLOAT_KEYS:
        assert torch.equal(stored[k], ft[k] - base[k])
    out = apply_delta(bpath, d, tmp_path / "out", max_shard_size=600)
    got = load_folder(out)
    assert_same(got, ft)
    assert (out / "model.safetensors.index.json").is_file()  # sharded output in the HF layout
    assert (out / "config.json").is_file() and (out / "tokenizer_config.json").is_file()
    assert no_dot_files(tmp_path)


def test_remove_after_apply_gives_base(tmp_path, pair):
    base, ft, bpath, fpath = pair
    d32 = extract_delta(bpath, fpath, tmp_path / "d32")  # a folder: the file is reparam_delta.safetensors
    assert d32 == tmp_path / "d32" / "reparam_delta.safetensors"
    patched = apply_delta(bpath, d32, tmp_path / "patched")
    back = load_folder(remove_delta(patched, d32, tmp_path / "back"))  # accepted: patched == finetuned
    for k in FLOAT_KEYS:  # float32 delta: within one float32 rounding of the base
        ulp = torch.finfo(torch.float32).eps * base[k].abs().clamp_min(ft[k].abs())
        assert ((back[k] - base[k]).abs() <= ulp).all(), k
    d64 = extract_delta(bpath, fpath, tmp_path / "d64.safetensors", dtype="float64")
    patched = apply_delta(bpath, d64, tmp_path / "p64")
    assert_same(load_folder(patched), ft)
    assert_same(load_folder(apply_delta(patched, d64, tmp_path / "b64", scale=-1.0)), base)  # bit-exact


def test_float64_delta_is_exact_where_float32_is_not(tmp_path):
    """Independent random pairs (not a fine-tune): a float32 delta loses bits, a float64 one never does."""
    g = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(64, 64, generator=g)}
    far = {"w": torch.randn(64, 64, generator=g) * 1e-3}
    d32 = extract_delta(base, far, tmp_path / "a.safetensors")
    assert not torch.equal(load_folder(apply_delta(base, d32, tmp_path / "o32", force=True))["w"], far["w"])
    d64 = extract_delta(base, far, tmp_path / "b.safetensors", dtype="float64")
    assert torch.equal(load_folder(apply_delta(base, d64, tmp_path / "o64"))["w"], far["w"])


def test_bf16_within_one_rounding(tmp_path):
    base, (ft,) = make_models(1, seed=4, dtype=torch.bfloat16)
    bpath, fpath = save_model(base, tmp_path / "b"), save_model(ft, tmp_path / "f")
    d = extract_delta(bpath, fpath, tmp_path / "d.safetensors")
    delta = load_file(str(d))
    got = load_folder(apply_delta(bpath, d, tmp_path / "o"))
    for k in FLOAT_KEYS:
        assert delta[k].dtype == torch.bfloat16 and got[k].dtype == torch.bfloat16
        assert torch.equal(delta[k], (ft[k].float() - base[k].float()).bfloat16())  # float32, rounded once
        assert torch.equal(got[k], (base[k].float() + delta[k].float()).bfloat16())
        ulp = 2.0 ** (torch.frexp(ft[k].float()).exponent - 8).float()
        assert ((got[k].float() - ft[k].float()).abs() <= ulp).all(), k
    exact = extract_delta(bpath, fpath, tmp_path / "d32.safetensors", dtype="float32")
    assert_same(load_folder(apply_delta(bpath, exact, tmp_path / "o32")), ft)


def test_streaming_sharded_equals_in_memory(tmp_path, pair, monkeypatch):
    base, ft, bpath, fpath = pair
    from_memory = load_file(str(extract_delta(base, ft, tmp_path / "mem.safetensors")))
    reads = []
    real_get = SafetensorsSource.get
    monkeypatch.setattr(SafetensorsSource, "get", lambda self, k: reads.append(k) or real_get(self, k))
    from_disk = load_file(str(extract_delta(bpath, fpath, tmp_path / "disk.safetensors")))
    assert_same(from_disk, from_memory)
    # tensor by tensor: one pass over both models for the fingerprints (in the header), one for the deltas
    assert sorted(reads) == sorted(FLOAT_KEYS * 4)
    assert_same(load_folder(apply_delta(base, tmp_path / "disk.safetensors", tmp_path / "o")), ft)


# --- layer selection -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("layers, exclude, expected", [
    ("0", (), ["model.layers.0.mlp.weight", "model.layers.0.mlp.bias", "model.layers.0.norm.weight"]),
    ("0-1", ["norm"], ["model.layers.0.mlp.weight", "model.layers.0.mlp.bias", "model.layers.1.mlp.weight",
                       "model.layers.1.mlp.bias"]),
    ([1, "lm_head"], (), ["model.layers.1.mlp.weight", "model.layers.1.mlp.bias", "lm_head.weight"]),
    ("model.layers.1.mlp,re:^logit|embed", (), ["model.layers.1.mlp.weight", "model.layers.1.mlp.bias",
                                               "logit_scale", "model.embed_tokens.weight"]),
    (None, [".*layers.*", "lm_head"], ["model.embed_tokens.weight", "logit_scale"]),
])
def test_layer_restriction_leaves_other_tensors_equal_to_base(tmp_path, pair, layers, exclude, expected):
    base, ft, bpath, fpath = pair
    d = extract_delta(bpath, fpath, tmp_path / "d.safetensors", layers=layers, exclude=exclude)
    assert sorted(load_file(str(d))) == sorted(expected)
    info = delta_info(d)
    assert sorted(info["tensors"]) == sorted(expected) and info["exclude"] == list(exclude)
    got = load_folder(apply_delta(bpath, d, tmp_path / "o"))
    assert_same(got, ft, expected)
    assert_same(got, base, [k for k in base if k not in expected])


def test_shallow_layers_pick_first_convs_and_skip_bn_stats(tmp_path):
    g = torch.Generator().manual_seed(0)
    shapes = {"features.0.weight": (4, 3, 3, 3), "features.0.bias": (4,), "features.2.weight": (4, 4, 3, 3),
              "features.2.running_mean": (4,), "features.10.weight": (4, 4, 3, 3), "features.10.bias": (4,),
              "classifier.weight": (2, 4)}
    base = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    ft = {k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in base.items()}
    d = extract_delta(base, ft, tmp_path / "a.safetensors", layers="shallow:2")
    assert sorted(load_file(str(d))) == ["features.0.bias", "features.0.weight", "features.2.weight"]
    d = extract_delta(base, ft, tmp_path / "b.safetensors", layers="features.2", bn_stats=True)
    assert sorted(load_file(str(d))) == ["features.2.running_mean", "features.2.weight"]
    with pytest.raises(MergeConfigError, match="has only 3 convolution layer"):
        extract_delta(base, ft, tmp_path / "c.safetensors", layers="shallow:4")


@pytest.mark.parametrize("layers, message", [
    ("7", "layers item '7' matches no floating-point tensor of base"),
    ("model.nope", "'model.nope' matches no"),
    ("re:(", "invalid regex"),
    ("shallow:0", "shallow:K with K a positive integer"),
    ("3-1", "empty block range"),
])
def test_layer_spec_errors(tmp_path, pair, layers, message):
    base, ft, _, _ = pair
    with pytest.raises(MergeConfigError, match=message):
        extract_delta(base, ft, tmp_path / "d.safetensors", layers=layers)
    assert not (tmp_path / "d.safetensors").exists()


# --- validation, fingerprints, atomic output -------------------------------------------------------------

def test_extract_mismatch_names_file_and_key(tmp_path, pair):
    base, ft, bpath, _ = pair
    bad = dict(ft, **{"lm_head.weight": torch.zeros(16, 9)})
    del bad["logit_scale"]
    bad["extra.weight"] = torch.zeros(3)
    save_model(bad, tmp_path / "bad")
    with pytest.raises(MergeValidationError) as e:
        extract_delta(bpath, tmp_path / "bad", tmp_path / "d.safetensors")
    msg = str(e.value)
    assert "'lm_head.weight'" in msg and "[16, 9]" in msg and "[16, 8]" in msg and "bad/model.safetensors" in msg
    assert "'logit_scale' is missing" in msg and "'extra.weight' is not in" in msg
    assert not (tmp_path / "d.safetensors").exists() and no_dot_files(tmp_path)
    # excluding the head makes the two models fit on what is left
    d = extract_delta(bpath, tmp_path / "bad", tmp_path / "d.safetensors", layers="0-1")
    assert len(delta_info(d)["tensors"]) == 5


def test_apply_shape_mismatch_from_headers_only(tmp_path, pair, monkeypatch):
    base, ft, bpath, fpath = pair
    d = extract_delta(bpath, fpath, tmp_path / "d.safetensors")
    other = save_model(dict(base, **{"model.layers.1.mlp.bias": torch.zeros(9)}), tmp_path / "other")

    def no_data(self, key):
        raise AssertionError("tensor data read during validation")

    monkeypatch.setattr(SafetensorsSource, "get", no_data)
    with pytest.raises(MergeValidationError, match=r"'model\.layers\.1\.mlp\.bias'.*other/model\.safetensors "
                                                   r"has shape \[9\].*d\.safetensors has shape \[8\]"):
        apply_delta(other, d, tmp_path / "out")
    assert not (tmp_path / "out").exists() and no_dot_files(tmp_path)


def test_fingerprint_mismatch_is_an_error_unless_forced(tmp_path, pair):
    base, ft, bpath, fpath = pair
    d = extract_delta(bpath, fpath, tmp_path / "d.safetensors")
    changed = dict(base, **{"model.layers.1.mlp.weight": base["model.layers.1.mlp.weight"] + 1.0})
    other = save_model(changed, tmp_path / "other", shards=2)
    with pytest.raises(MergeValidationError, match=r"other/model-0000\d-of-00002\.safetensors: tensor "
                                                   r"'model\.layers\.1\.mlp\.weight' is not from the models.*force"):
        apply_delta(other, d, tmp_path / "out", max_shard_size=300)  # fails after some shards were written
    assert not (tmp_path / "out").exists() and no_dot_files(tmp_path)
    got = load_folder(apply_delta(other, d, tmp_path / "out", force=True))
    delta = load_file(str(d))
    assert_same(got, {k: changed[k] + delta[k] for k in FLOAT_KEYS})


def test_bad_files_and_arguments(tmp_path, pair):
    base, ft, bpath, fpath = pair
    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, str(plain))
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    d = extract_delta(bpath, fpath, tmp_path / "d.safetensors")
    cases = [
        (lambda: apply_delta(bpath, plain, tmp_path / "o"), MergeValidationError,
         "plain.safetensors: not a reparam delta"),
        (lambda: apply_delta(bpath, junk, tmp_path / "o"), MergeValidationError, "junk.safetensors: corrupted"),
        (lambda: apply_delta(bpath, tmp_path / "none.safetensors", tmp_path / "o"), MergeConfigError, "no such file"),
        (lambda: apply_delta(bpath, d, tmp_path / "o", scale=float("nan")), MergeConfigError, "finite number"),
        (lambda: apply_delta(bpath, [d, d], tmp_path / "o", scale=[1.0]), MergeConfigError, "1 scale"),
        (lambda: apply_delta(bpath, d, bpath), MergeConfigError, "exists"),
        (lambda: extract_delta(bpath, fpath, d), MergeConfigError, "exists"),
        (lambda: extract_delta(bpath, fpath, tmp_path / "x.safetensors", dtype="int8"), MergeConfigError, "dtype"),
        (lambda: extract_delta(bpath, fpath, tmp_path / "x.safetensors", quantize=300), MergeConfigError, "quantize"),
        (lambda: extract_delta(tmp_path / "nope", fpath, tmp_path / "x.safetensors"), MergeConfigError,
         "does not exist"),
    ]
    for call, error, message in cases:
        with pytest.raises(error, match=message):
            call()
    assert not (tmp_path / "o").exists() and not (tmp_path / "x.safetensors").exists()


def test_failed_extract_leaves_nothing(tmp_path, pair):
    base, ft, _, _ = pair
    ft = dict(ft, **{"lm_head.weight": ft["lm_head.weight"].clone()})
    ft["lm_head.weight"][0, 0] = float("inf")
    with pytest.raises(MergeValidationError, match="'lm_head.weight': cannot quantise"):
        extract_delta(base, ft, tmp_path / "d.safetensors", quantize=16)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "ft"]


# --- Robust Weight Signatures ----------------------------------------------------------------------------

def test_signature_properties():
    g = torch.Generator().manual_seed(1)
    d, a = torch.randn(40, 30, generator=g), torch.randn(40, 30, generator=g)
    v = signature(d, a + 0.5 * d)
    assert abs(torch.nn.functional.cosine_similarity(v.reshape(1, -1), (a + 0.5 * d).reshape(1, -1)).item()) < 1e-5
    assert torch.count_nonzero(signature(a, a)) == 0  # theta_c = theta_std: no signature
    ortho = torch.stack([torch.ones(5), torch.zeros(5)]), torch.stack([torch.zeros(5), torch.ones(5)])
    assert torch.equal(signature(*ortho), ortho[0])  # d perpendicular to a: the signature is d itself
    assert torch.equal(signature(d, torch.zeros_like(d)), d)  # a = 0: v = d


def test_signature_files_patch_unpatch_compose(tmp_path):
    base, (std, rob1, rob2) = make_models(3, seed=7)
    paths = {n: save_model(m, tmp_path / n) for n, m in
             [("pre", base), ("std", std), ("rob1", rob1), ("rob2", rob2)]}
    layers = "0"
    s1 = extract_delta(paths["pre"], paths["rob1"], tmp_path / "s1.safetensors", clean=paths["std"], layers=layers)
    s2 = extract_delta(paths["pre"], paths["rob2"], tmp_path / "s2.safetensors", clean=paths["std"], layers=layers)
    info = delta_info(s1)
    assert info["kind"] == "signature" and info["clean"] == str(paths["std"])
    sig = load_file(str(s1))
    for k, v in sig.items():
        a = (std[k] - base[k]).reshape(-1)
        assert abs(torch.dot(v.reshape(-1).double(), a.double()) / (v.norm() * a.norm())) < 1e-5
    # patch theta_std (the clean model is accepted as a target), un-patch: back to theta_std
    patched = apply_delta(paths["std"], s1, tmp_path / "patched", scale=0.5)
    got = load_folder(patched)
    assert_same(got, std, [k for k in std if k not in sig])  # only the selected layers change
    back = load_folder(remove_delta(patched, s1, tmp_path / "back", scale=0.5, force=True))
    for k in sig:
        torch.testing.assert_close(back[k], std[k], rtol=0, atol=1e-6)
    # composition: both at once == one then the other (up to float32 rounding)
    both = load_folder(apply_delta(paths["std"], [s1, s2], tmp_path / "both", scale=[0.5, 0.5]))
    one = apply_delta(paths["std"], s1, tmp_path / "one", scale=0.5)
    seq = load_folder(apply_delta(one, s2, tmp_path / "seq", scale=0.5, force=True))
    for k in std:
        torch.testing.assert_close(both[k], seq[k], rtol=0, atol=1e-6)
    # theta_c = theta_std: the signature is zero and patching is a no-op
    zero = extract_delta(paths["pre"], paths["std"], tmp_path / "z.safetensors", clean=paths["std"])
    assert all(t.abs().max() == 0 for t in load_file(str(zero)).values())
    assert_same(load_folder(apply_delta(paths["std"], zero, tmp_path / "noop")), std)


@pytest.mark.parametrize("levels", [2, 5, 16, 256])
def test_linear_quantiser(levels):
    g = torch.Generator().manual_seed(levels)
    v = torch.randn(3000, generator=g)
    codes, rng = quantize_linear(v, levels)
    vq = dequantize_linear(codes, rng, levels)
    assert codes.dtype == torch.uint8 and vq.unique().numel() <= levels
    step = (v.max() - v.min()) / (levels - 1)
    assert (vq - v).abs().max() <= step / 2 * (1 + 1e-6)
    const = torch.full((4, 4), 0.25)
    assert torch.equal(dequantize_linear(*quantize_linear(const, levels), levels), const)  # min = max


def test_two_level_symmetric_is_sign_times_max():
    v = torch.tensor([-2.0, -0.5, 0.3, 2.0, 1.1])
    codes, rng = quantize_linear(v, 2)
    assert torch.equal(dequantize_linear(codes, rng, 2), v.sign() * 2.0)


def test_quantised_delta_file(tmp_path, pair):
    base, ft, bpath, fpath = pair
    d = extract_delta(bpath, fpath, tmp_path / "q.safetensors", quantize=16, layers="0-1")
    info = delta_info(d)
    assert info["quantization"] == {"method": "linear", "levels": 16}
    assert all(t["dtype"] == "U8" for t in info["tensors"].values())
    raw = load_file(str(d))
    got = load_folder(apply_delta(bpath, d, tmp_path / "o"))
    for k in info["tensors"]:
        delta = dequantize_linear(raw[k], raw[k + "@range"], 16)
        assert torch.equal(got[k], base[k] + delta)
        step = (ft[k] - base[k]).abs().max() * 2 / 15
        assert (got[k] - ft[k]).abs().max() <= step / 2 + 1e-6
