"""NOLA (specs/adapters/nola.md): the unit-test properties of §11, plus save/load, merge, PEFT export, errors."""
import copy
import math

import pytest
import torch

import reparam
from reparam.adapters import nola
from reparam.adapters.nola import MixBases, RandomBases
from reparam.io.files import read_safetensors
from tests.helpers import MixedKinds, adapt_tiny_mlp, randomize_adapters

SMALL = dict(r=4, num_basis_A=10, num_basis_B=12)


def adapted(dtype=torch.float32, targets=("fc1", "fc2"), **fields):
    return adapt_tiny_mlp("nola", dtype, targets, **{**SMALL, **fields})


def perturb(model, std=0.5, seed=0):
    """Random non-zero α, β (β = 0 at init hides bugs)."""
    randomize_adapters(model, std=std, seed=seed)


def explicit_factors(adapter):
    """A, B from bases materialised by plain autograd-visible code (reference for the custom Function)."""
    k, l = adapter.config.num_basis_A, adapter.config.num_basis_B
    A_basis = adapter.bases("A").materialise(adapter.coef_A)
    B_basis = adapter.bases("B").materialise(adapter.coef_B)
    A = adapter.offset_A + torch.einsum("b,boi->oi", adapter.coef_A, A_basis)
    assert A_basis.shape == (k, *adapter.a_shape) and B_basis.shape == (l, *adapter.b_shape)
    return A, torch.einsum("b,boi->oi", adapter.coef_B, B_basis), A_basis, B_basis


# --- §11.1 identity at init ---------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_identity_at_code_init(dtype):
    base, model = adapted(dtype)
    x = torch.randn(6, 16, dtype=dtype)
    assert torch.equal(model(x), base(x))
    ad = model.fc1.adapters.default
    assert ad.offset_A.abs().max() > 0 and ad.offset_A.abs().max() <= 1 / math.sqrt(16)  # Kaiming-uniform A_0


def test_vit_init_averages_the_bases():
    base, model = adapted(init="vit")
    ad = model.fc1.adapters.default
    assert torch.equal(ad.coef_A, torch.full((10,), 0.1)) and torch.equal(ad.coef_B, torch.full((12,), 1 / 12))
    assert torch.equal(ad.offset_A, torch.zeros_like(ad.offset_A))  # no offset
    x = torch.randn(6, 16)
    assert (model(x) - base(x)).abs().max() > 1e-4  # ΔW ≠ 0 at init (§4)


def test_first_gradient_reaches_beta_only():
    _, model = adapted()
    model(torch.randn(6, 16)).square().sum().backward()
    ad = model.fc1.adapters.default
    assert torch.equal(ad.coef_A.grad, torch.zeros(10)) and ad.coef_B.grad.abs().max() > 0  # §10.6


# --- §11.2 custom backward ----------------------------------------------------------------------------------

@pytest.mark.parametrize("chunks", [1, 3])
def test_gradcheck_of_the_generation_function(chunks):
    bases = RandomBases(seed=123, count=7, shape=(3, 5), chunks=chunks, cache=None)
    coef = torch.randn(7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda c: MixBases.apply(c, bases), (coef,))


def test_coefficient_gradients_match_materialised_bases():
    _, model = adapted(torch.float64)
    perturb(model)
    ad = model.fc2.adapters.default
    x = torch.randn(5, 24, dtype=torch.float64)
    weights = torch.randn(5, 24, dtype=torch.float64)
    (ad(model.fc2, x, torch.zeros(5, 24, dtype=torch.float64)) * weights).sum().backward()
    ours = ad.coef_A.grad.clone(), ad.coef_B.grad.clone()
    ad.zero_grad()
    A, B, _, _ = explicit_factors(ad)
    (ad.scale * (x @ A.T) @ B.T * weights).sum().backward()
    torch.testing.assert_close(ours, (ad.coef_A.grad, ad.coef_B.grad), atol=1e-12, rtol=1e-10)


def test_backward_regenerates_instead_of_keeping_bases(monkeypatch):
    calls = []
    real = nola.uniform_pieces
    monkeypatch.setattr(nola, "uniform_pieces", lambda *a: calls.append(a[0]) or real(*a))
    _, model = adapted(targets=["fc1"])
    seeds = {int(model.fc1.adapters.default.seed_A), int(model.fc1.adapters.default.seed_B)}
    calls.clear()
    model(torch.randn(3, 16)).sum().backward()
    assert sorted(calls) == sorted(list(seeds) * 2)  # each stack once in forward, once in backward


# --- §11.3 determinism / RNG hygiene ------------------------------------------------------------------------

def test_generation_is_bitwise_reproducible_and_chunking_free():
    one = RandomBases(7, 9, (4, 6), 1, None).materialise(torch.zeros(()))
    again = RandomBases(7, 9, (4, 6), 1, None).materialise(torch.zeros(()))
    chunked = torch.cat([b for _, b in RandomBases(7, 9, (4, 6), 4, None).pieces(torch.zeros(()))])
    assert torch.equal(one, again) and torch.equal(one, chunked)
    assert one.abs().max() <= 1 / 3 and one.std() > 0.1  # U(−1, 1)/√k, k = 9
    _, a = adapted(chunks=1)
    _, b = adapted(chunks=5)
    for m in (a, b):
        perturb(m)
    x = torch.randn(4, 16)
    torch.testing.assert_close(a(x), b(x), atol=1e-6, rtol=1e-6)  # same bases; only the summation order differs


def test_global_rng_untouched_and_seeds_distinct():
    _, model = adapted(init="vit")
    x = torch.randn(3, 16)
    state = torch.get_rng_state()
    model(x).sum().backward()
    assert torch.equal(torch.get_rng_state(), state)
    seeds = [int(getattr(model.get_submodule(m).adapters.default, f"seed_{f}"))
             for m in ("fc1", "fc2") for f in ("A", "B", "A0")]
    assert len(set(seeds)) == 6  # per layer and per factor (§10.5)


# --- §11.4 merge ------------------------------------------------------------------------------------------

def test_merge_unmerge_unload_closed_form():
    _, model = adapted()
    perturb(model)
    x = torch.randn(6, 16)
    y = model(x)
    W0 = model.fc1.weight.detach().clone()
    ad = model.fc1.adapters.default
    with torch.no_grad():
        A, B, _, _ = explicit_factors(ad)
    torch.testing.assert_close(ad.delta_weight(model.fc1), ad.scale * B @ A, atol=1e-6, rtol=1e-6)
    reparam.merge(model)
    torch.testing.assert_close(model(x), y, atol=1e-5, rtol=0)
    reparam.unmerge(model)
    torch.testing.assert_close(model.fc1.weight, W0, atol=1e-6, rtol=0)
    plain = reparam.unload(model)
    assert type(plain.fc1) is torch.nn.Linear
    torch.testing.assert_close(plain(x), y, atol=1e-5, rtol=0)


def test_conv1d_layout_merges():
    torch.manual_seed(1)
    mixed = MixedKinds()
    reparam.adapt(mixed, reparam.make_config("nola", **SMALL), targets=["proj"])  # HF Conv1D, weight d_in x d_out
    perturb(mixed)
    ids = torch.randint(1, 50, (3, 7))
    y = mixed(ids)
    reparam.merge(mixed)
    torch.testing.assert_close(mixed(ids), y, atol=1e-5, rtol=0)


# --- §11.5 parameter count and what is stored --------------------------------------------------------------

@pytest.mark.parametrize("r", [1, 4, 16])
def test_trainable_count_is_k_plus_l(r):
    _, model = adapted(r=r, targets=["fc1", "fc2", "classifier"])
    summary = reparam.trainable_summary(model)
    assert summary.per_module == {"fc1": 22, "fc2": 22, "classifier": 22}
    ad = model.fc1.adapters.default
    assert set(ad.state_dict()) == {"coef_A", "coef_B", "seed_A", "seed_B", "seed_A0"}
    assert all(ad.state_dict()[f"seed_{f}"].dtype == torch.int64 for f in ("A", "B", "A0"))


@pytest.mark.parametrize("cache", [False, True])
def test_save_load_regenerates_bit_identical(cache, tmp_path):
    base, model = adapted(cache_bases=cache)
    perturb(model)
    x = torch.randn(6, 16)
    y = model(x)
    path = reparam.save_adapter(model, tmp_path)
    tensors, _ = read_safetensors(path)
    assert sum(t.numel() for t in tensors.values()) == 2 * (10 + 12 + 3)  # coefficients + 3 seeds per layer
    loaded = reparam.load_adapter(copy.deepcopy(base), tmp_path)
    assert torch.equal(loaded(x), y)
    reparam.merge(loaded)
    torch.testing.assert_close(loaded(x), y, atol=1e-5, rtol=0)


def test_cached_bases_give_the_same_outputs_and_gradients(monkeypatch):
    _, plain = adapted()
    _, cached = adapted(cache_bases=True)
    for m in (plain, cached):
        perturb(m)
    x = torch.randn(4, 16)
    calls = []
    real = nola.uniform_pieces
    monkeypatch.setattr(nola, "uniform_pieces", lambda *a: calls.append(1) or real(*a))
    for m in (plain, cached):
        for _ in range(2):
            m(x).square().sum().backward()
    assert len(calls) == 16 + 4  # regenerate: 2 layers x 2 factors x (fwd + bwd) x 2 steps; cached: once each
    for p, q in zip(plain.parameters(), cached.parameters()):
        if p.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, atol=1e-6, rtol=1e-5)


# --- PEFT export, errors, CLI ------------------------------------------------------------------------------

@pytest.fixture
def tiny_bert():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=60, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=24, max_position_embeddings=16, num_labels=3)
    return BertForSequenceClassification(cfg).eval()


def test_peft_export_is_a_lora_on_the_original_weight(tiny_bert, tmp_path):
    peft = pytest.importorskip("peft")
    model = reparam.adapt(copy.deepcopy(tiny_bert), reparam.make_config("nola", **SMALL),
                          targets=["query", "value", "dense"], modules_to_save=["classifier"])
    perturb(model)
    ids = torch.randint(1, 60, (2, 9), generator=torch.Generator().manual_seed(1))
    ours = model.eval()(input_ids=ids).logits
    reparam.export_peft(model, tmp_path)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(tiny_bert), tmp_path).eval()(input_ids=ids).logits
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)
    back = reparam.import_peft(copy.deepcopy(tiny_bert), tmp_path)  # a plain rank-r LoRA at scale 1
    torch.testing.assert_close(back(input_ids=ids).logits, ours, atol=1e-5, rtol=0)


@pytest.mark.parametrize("fields, message", [
    (dict(num_basis_A=0), "num_basis_A"), (dict(r=1.5), "invalid r"), (dict(init="pure"), "init"),
    (dict(chunks=-1), "chunks"), (dict(dropout=1.0), "dropout"), (dict(cache_bases="yes"), "cache_bases"),
    (dict(basis=3), "unknown field"),
])
def test_config_errors(fields, message):
    with pytest.raises(reparam.ConfigError, match=message):
        reparam.make_config("nola", **fields)


def test_layer_errors_name_the_module_and_load_warns_on_other_generator(tmp_path):
    with pytest.raises(reparam.TargetError, match="emb"):
        reparam.adapt(MixedKinds(), reparam.make_config("nola"), targets=["emb"])
    base, model = adapted()
    reparam.save_adapter(model, tmp_path)
    (tmp_path / "reparam_adapter.json").unlink()
    tensors, meta = read_safetensors(tmp_path / "reparam_adapter.safetensors")
    from reparam.io.files import write_safetensors
    meta["reparam"] = meta["reparam"].replace('"device": "cpu"', '"device": "cuda"')
    write_safetensors(tmp_path / "reparam_adapter.safetensors", tensors, meta)
    with pytest.warns(UserWarning, match="fc1: bases were generated with"):
        reparam.load_adapter(copy.deepcopy(base), tmp_path)


def test_cli_finetune_end_to_end(tmp_path, minilm_path, glue_dir):
    from transformers import AutoModelForSequenceClassification

    from reparam.cli.main import main

    out = tmp_path / "nola"
    assert main(["finetune", "--model", str(minilm_path), "--data", str(glue_dir / "SST-2"), "--method", "nola",
                 "--targets", "query,value", "--r", "4", "--set", "num_basis_A=32", "--set", "num_basis_B=32",
                 "--limit", "16", "--eval-limit", "8", "--max-steps", "2", "--max-length", "24", "--batch-size", "8",
                 "--lr", "5e-3", "--quiet", "--output", str(out)]) == 0
    tensors, _ = read_safetensors(out / "reparam_adapter.safetensors")
    adapter_values = sum(t.numel() for k, t in tensors.items() if k.rsplit(".", 1)[1].startswith(("coef_", "seed_")))
    assert adapter_values == 12 * (32 + 32 + 3)
    model = reparam.load_adapter(AutoModelForSequenceClassification.from_pretrained(minilm_path, num_labels=2), out)
    coef = model.bert.encoder.layer[0].attention.self.query.adapters.default.coef_B
    assert coef.abs().max() > 0  # trained
