"""SaRA (specs/adapters/sara.md): the unit-test properties of §11, plus merge, the training callback and errors."""
import copy

import pytest
import torch

import reparam
from reparam.adapters import sara
from reparam.adapters.sara import SaraStep
from reparam.core.errors import ConfigError
from reparam.io.files import read_safetensors
from reparam.training.callbacks import TrainState
from tests.helpers import SPARSE_PATHS, MixedKinds, TinyMLP, use_sparse_path

TAU = 0.05  # TinyMLP weights are U(±1/√16) and U(±1/√24): about 20-25% of the entries are below τ
ALL_KINDS = ["emb", "proj", "conv1", "conv2", "lin"]


@pytest.fixture(params=SPARSE_PATHS)
def kernels(request, monkeypatch):
    return use_sparse_path(request.param, monkeypatch, sara.SaraAdapter)


def adapted(dtype=torch.float32, targets=("fc1", "fc2"), model_cls=TinyMLP, **fields):
    torch.manual_seed(0)
    base = model_cls() if model_cls is not TinyMLP else TinyMLP(dtype=dtype)
    fields.setdefault("threshold", TAU)
    model = reparam.adapt(copy.deepcopy(base), reparam.make_config("sara", **fields), targets=list(targets))
    return base, model


def sara_values(model):
    return [p for n, p in model.named_parameters() if ".adapters." in n]


def train(model, steps, lr=5e-2, total_steps=None, seed=1, start=0):
    """AdamW on p, run the way reparam's loop runs it (SaraStep around optimizer.step); returns the callback state."""
    optimizer = torch.optim.AdamW(sara_values(model), lr=lr, weight_decay=0.0)
    state = TrainState(model=model, optimizer=optimizer, total_steps=total_steps or steps)
    callback = SaraStep()
    g = torch.Generator().manual_seed(seed)
    for t in range(start, start + steps):
        state.global_step = t
        x = torch.randn(8, 16, generator=g, dtype=next(model.parameters()).dtype)
        model(x).square().mean().backward()
        callback.before_optimizer_step(state)
        optimizer.step()
        callback.after_optimizer_step(state)
        optimizer.zero_grad()
    return state


def effective_weights(model, names=("fc1", "fc2")):
    """W of each adapted layer, via a merge into a copy."""
    merged = reparam.unload(copy.deepcopy(model))
    return {n: (getattr(merged, n).weight.detach().clone(), getattr(merged, n).bias.detach().clone()) for n in names}


# --- §11.1 identity at init ---------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_identity_at_init_is_exact(dtype, kernels):
    base, model = adapted(dtype)
    x = torch.randn(5, 16, dtype=dtype)
    assert torch.equal(model(x), base(x))
    n_masked = sum(int((getattr(base, n).weight.abs() < TAU).sum() + (getattr(base, n).bias.abs() < TAU).sum())
                   for n in ("fc1", "fc2"))
    assert reparam.trainable_summary(model).trainable == n_masked > 0


def test_identity_on_every_layer_kind(kernels):
    base, model = adapted(targets=ALL_KINDS, model_cls=MixedKinds)
    ids = torch.randint(0, 50, (2, 7))
    assert torch.equal(model(ids), base(ids))


# --- §11.2 sparsity of updates ------------------------------------------------------------------------------

def test_updates_only_touch_small_entries_and_frozen_entries_are_bit_identical(kernels):
    base, model = adapted(progressive_iter=-1)
    train(model, 5)
    for name, (W, b) in effective_weights(model).items():
        for new, old in ((W, getattr(base, name).weight), (b, getattr(base, name).bias)):
            small = old.abs() < TAU
            assert torch.equal(new[~small], old[~small])  # frozen entries: bit-identical
            assert (new[small] != old[small]).any()  # the small ones did train


def test_forward_matches_the_merged_model_on_every_layer_kind(kernels):
    _, model = adapted(targets=ALL_KINDS, model_cls=MixedKinds, threshold=0.2)
    with torch.no_grad():
        for p in sara_values(model):
            p.add_(torch.randn(p.shape) * 0.1)
    ids = torch.randint(0, 50, (2, 7))
    out = model(ids)
    reparam.merge(model)
    torch.testing.assert_close(model(ids), out, rtol=1e-5, atol=1e-6)
    reparam.unmerge(model)
    torch.testing.assert_close(model(ids), out, rtol=1e-5, atol=1e-6)


def test_merge_unmerge_unload_in_float64(kernels):
    base, model = adapted(torch.float64)
    with torch.no_grad():
        for p in sara_values(model):
            p.add_(torch.randn(p.shape, dtype=p.dtype))
    x = torch.randn(4, 16, dtype=torch.float64)
    out = model(x)
    reparam.merge(model)
    W = model.fc1.weight.detach().clone()
    small = base.fc1.weight.abs() < TAU
    # W_final = W0 ⊙ (1 − M) + scatter(p, M) (§7)
    expected = base.fc1.weight.detach().clone()
    expected[small] = model.fc1.adapters["default"].weight_entries.values.detach()
    torch.testing.assert_close(W, expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(model(x), out, rtol=0, atol=1e-12)
    reparam.unmerge(model)
    torch.testing.assert_close(model.fc1.weight, base.fc1.weight, rtol=0, atol=1e-12)
    with reparam.disabled(model):
        torch.testing.assert_close(model(x), base(x), rtol=0, atol=1e-12)
    plain = reparam.unload(model)
    assert type(plain.fc1) is torch.nn.Linear
    torch.testing.assert_close(plain(x), out, rtol=0, atol=1e-12)


# --- §11.3 gradient gather ----------------------------------------------------------------------------------

def test_gradient_is_the_dense_gradient_gathered_at_the_mask(kernels):
    base, model = adapted(torch.float64)
    x = torch.randn(6, 16, dtype=torch.float64)
    model(x).sin().sum().backward()
    reference = copy.deepcopy(base)
    reference(x).sin().sum().backward()
    for name in ("fc1", "fc2"):
        entries = getattr(model, name).adapters["default"]
        for sparse, dense in ((entries.weight_entries, getattr(reference, name).weight),
                              (entries.bias_entries, getattr(reference, name).bias)):
            mask = dense.detach().abs() < TAU
            torch.testing.assert_close(sparse.values.grad, dense.grad[mask], rtol=0, atol=1e-12)
    assert all(p.grad is None for n, p in model.named_parameters() if ".adapters." not in n)


def test_gradient_gather_on_conv1d_layout(kernels):
    """HF Conv1D stores W as d_in × d_out: the mask and gradient follow the stored layout."""
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    base = torch.nn.Sequential(Conv1D(10, 12)).double()
    model = reparam.adapt(copy.deepcopy(base), reparam.make_config("sara", threshold=0.01), targets=["0"])
    x = torch.randn(3, 5, 12, dtype=torch.float64)
    model(x).sin().sum().backward()
    base(x).sin().sum().backward()
    mask = base[0].weight.detach().abs() < 0.01
    grad = model[0].adapters["default"].weight_entries.values.grad
    torch.testing.assert_close(grad, base[0].weight.grad[mask], rtol=0, atol=1e-12)


def test_rank_term_gradient_is_u_vt_at_the_mask():
    """‖W ⊙ M‖_* has gradient U Vᵀ (thin SVD of W ⊙ M), flowing into the masked entries only (§4)."""
    torch.manual_seed(0)
    base = torch.nn.Linear(80, 70, dtype=torch.float64)
    model = reparam.adapt(copy.deepcopy(torch.nn.Sequential(base)), reparam.make_config("sara", threshold=0.05),
                          targets=["0"])
    layer = model[0]
    adapter = layer.adapters["default"]
    term = reparam.regularizer(model)
    (grad,) = torch.autograd.grad(term, adapter.weight_entries.values)
    small = base.weight.abs() < 0.05
    masked = torch.where(small, base.weight.detach(), torch.zeros_like(base.weight))
    U, S, Vh = torch.linalg.svd(masked, full_matrices=False)
    torch.testing.assert_close(term, 5e-4 * S.sum(), rtol=1e-12, atol=0)
    torch.testing.assert_close(grad, 5e-4 * (U @ Vh)[small], rtol=1e-9, atol=1e-12)


def test_callback_adds_the_rank_term_of_one_eligible_matrix():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(80, 70), torch.nn.Linear(70, 66), torch.nn.Linear(66, 8))
    model = reparam.adapt(net, reparam.make_config("sara", threshold=0.05, rank_weight=1.0, include_bias=False),
                          targets=["0", "1", "2"])
    state = TrainState(model=model, optimizer=None)
    SaraStep().before_optimizer_step(state)  # no task gradient: only the rank term
    touched = [i for i in range(3) if model[i].adapters["default"].weight_entries.values.grad is not None]
    assert len(touched) == 1 and touched[0] in (0, 1)  # layer 2 (min dim 8 <= 64) is not eligible
    i = touched[0]
    expected = torch.autograd.grad(model[i].adapters["default"].regularizer(model[i]),
                                   model[i].adapters["default"].weight_entries.values)[0]
    torch.testing.assert_close(model[i].adapters["default"].weight_entries.values.grad, expected)


# --- §11.4 progressive reselection --------------------------------------------------------------------------

@pytest.mark.parametrize("reset", [True, False])
def test_progressive_reselection_freezes_entries_that_grew_past_tau(reset):
    _, model = adapted(progressive_iter=3, reset_optimizer_on_reselect=reset, weight_decay=0.0)
    adapters = [model.fc1.adapters["default"], model.fc2.adapters["default"]]
    entries = [e for a in adapters for e in a.entries()]
    train(model, 3, lr=0.05)
    at_reselect = [e.values.detach().clone() for e in entries]
    grown = [v.abs() >= TAU for v in at_reselect]
    assert any(e.frozen.any() for e in entries)  # re-selected after step 3
    assert sum(int(g.sum()) for g in grown) > 0
    for e, g in zip(entries, grown):
        # new mask = M_0 ∧ (|W| < τ), in M_0 order
        assert torch.equal(e.trainable(), ~g)
    train(model, 4, lr=0.05, seed=2, start=3)
    for e, v, g in zip(entries, at_reselect, grown):
        assert torch.equal(e.values.detach()[g], v[g])  # grown entries constant afterwards
    still_small = torch.cat([e.values.detach()[~g] != v[~g] for e, v, g in zip(entries, at_reselect, grown)])
    assert still_small.float().mean() > 0.5  # they keep training (some sit behind dead ReLUs: zero gradient)


def test_reselection_resets_optimizer_state_only_when_asked():
    for reset in (True, False):
        _, model = adapted(progressive_iter=2, reset_optimizer_on_reselect=reset)
        state = train(model, 2, lr=0.2)
        assert all((p in state.optimizer.state) != reset for p in sara_values(model))
        trainable = sum(int(e.trainable().sum()) for layer in (model.fc1, model.fc2)
                        for e in layer.adapters["default"].entries())
        assert state.history == [{"step": 1, "sara_trainable": trainable}]


def test_default_reselection_is_at_half_the_run_and_weight_decay_pulls_toward_zero():
    _, model = adapted(weight_decay=0.5, rank_weight=0.0)
    entries = model.fc1.adapters["default"].weight_entries
    before = entries.values.detach().clone()
    optimizer = torch.optim.SGD(sara_values(model), lr=0.1)  # no gradient: only the decay moves p
    state = TrainState(model=model, optimizer=optimizer, total_steps=10)
    callback = SaraStep()
    for t in range(5):
        state.global_step = t
        callback.after_optimizer_step(state)
    torch.testing.assert_close(entries.values.detach(), before * 0.95 ** 5)  # p ← p − lr·wd·p, each step
    assert [h["step"] for h in state.history if "sara_trainable" in h] == [4]  # after T/2 = 5 steps


# --- §11.5 checkpoint round trip ----------------------------------------------------------------------------

def test_save_load_round_trip_stores_only_the_masked_values(tmp_path, kernels):
    base, model = adapted(targets=ALL_KINDS, model_cls=MixedKinds, threshold=0.1)
    with torch.no_grad():
        for p in sara_values(model):
            p.add_(torch.randn(p.shape) * 0.1)
    reparam.save_adapter(model, tmp_path)
    tensors, _ = read_safetensors(tmp_path / "reparam_adapter.safetensors")
    expected = sum(int((t.abs() < 0.1).sum()) for n, t in base.named_parameters())
    assert sum(t.numel() for t in tensors.values()) == expected
    assert all(t.dim() == 1 and k.endswith(".values") for k, t in tensors.items())
    fresh = reparam.load_adapter(copy.deepcopy(base), tmp_path)
    ids = torch.randint(0, 50, (3, 6))
    assert torch.equal(fresh(ids), model(ids))


def test_load_onto_different_weights_is_a_clear_error(tmp_path):
    base, model = adapted()
    reparam.save_adapter(model, tmp_path)
    other = copy.deepcopy(base)
    with torch.no_grad():
        other.fc1.weight.mul_(3)  # fewer entries below τ: the recomputed mask does not fit the file
    with pytest.raises(reparam.core.errors.BaseModelMismatch, match="fc1"):
        reparam.load_adapter(other, tmp_path)
    with pytest.raises(reparam.core.errors.AdapterFileError, match="fc1.adapters|fc1"):
        reparam.load_adapter(other, tmp_path, check_base=False)


# --- configuration ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("field, value", [("threshold", 0), ("rank_weight", -1), ("progressive_iter", 0),
                                          ("weight_decay", -0.1), ("include_bias", "yes")])
def test_bad_config_names_the_field(field, value):
    with pytest.raises(ConfigError, match=f"sara: invalid {field}"):
        reparam.make_config("sara", **{field: value})


def test_kernel_choice_follows_density():
    _, model = adapted(threshold=1e-3)  # few entries: sparse kernels
    assert model.fc1.adapters["default"].pattern is not None
    _, model = adapted(threshold=1.0)  # every entry: dense
    assert model.fc1.adapters["default"].pattern is None


def test_include_bias_false_trains_weights_only():
    _, model = adapted(include_bias=False)
    assert all(k.endswith("weight_entries.values") for k, _ in model.named_parameters() if ".adapters." in k)
