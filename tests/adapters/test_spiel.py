"""SpIEL (specs/adapters/spiel.md): the unit-test properties of §11, save/load, the schedule callback and errors."""
import copy

import pytest
import torch

import reparam
from reparam.adapters import spiel
from reparam.adapters.spiel import SpielStep, reselection_rate
from reparam.core.errors import ConfigError
from reparam.io.files import read_safetensors
from reparam.training.callbacks import TrainState
from tests.helpers import (SPARSE_PATHS, TinyMLP, adapt_tiny_mlp, assert_merge_round_trip, randomize_adapters,
                           use_sparse_path)

DENSITY = 0.25


@pytest.fixture(params=SPARSE_PATHS)
def kernels(request, monkeypatch):
    return use_sparse_path(request.param, monkeypatch, spiel.SpielAdapter)


def adapted(dtype=torch.float32, **fields):
    return adapt_tiny_mlp("spiel", dtype=dtype, **{"density": DENSITY, **fields})


def spiel_adapters(model):
    return [(m, m.adapters["default"]) for m in (model.fc1, model.fc2)]


# --- §11.1 identity at init ---------------------------------------------------------------------------------

def test_identity_at_init_and_budget(kernels):
    base, model = adapted()
    x = torch.randn(5, 16)
    assert torch.equal(model(x), base(x))
    k = [len(a.index) for _, a in spiel_adapters(model)]
    assert k == [round(DENSITY * m.weight.numel()) for m, _ in spiel_adapters(model)]
    assert reparam.trainable_summary(model).trainable == sum(k)
    for m, a in spiel_adapters(model):  # distinct, sorted, in range
        assert torch.equal(a.index, a.index.unique()) and 0 <= int(a.index.min()) <= int(a.index.max()) < m.weight.numel()


# --- §11.2 gradient gather ----------------------------------------------------------------------------------

@pytest.mark.parametrize("accumulating", [False, True])
def test_gradient_is_the_dense_gradient_gathered(kernels, accumulating):
    base, model = adapted(torch.float64)
    randomize_adapters(model)
    for _, a in spiel_adapters(model):
        a.accumulating = accumulating
    x = torch.randn(6, 16, dtype=torch.float64, requires_grad=True)
    model(x).sin().sum().backward()
    # Dense reference: W = W0 + scatter(δ, η) as leaves.
    ref = copy.deepcopy(base)
    for name, a in zip(("fc1", "fc2"), (model.fc1.adapters["default"], model.fc2.adapters["default"])):
        w = getattr(ref, name).weight
        with torch.no_grad():
            w.view(-1)[a.index] += a.delta
    xr = x.detach().clone().requires_grad_(True)
    ref(xr).sin().sum().backward()
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-10, atol=1e-12)
    for name, (_, a) in zip(("fc1", "fc2"), spiel_adapters(model)):
        torch.testing.assert_close(a.delta.grad, getattr(ref, name).weight.grad.view(-1)[a.index], rtol=1e-10, atol=1e-12)
    if accumulating:  # the hook saw G_W: candidates are the top-k of |G_W|, Σg holds G_W there
        for name, (_, a) in zip(("fc1", "fc2"), spiel_adapters(model)):
            g = getattr(ref, name).weight.grad.view(-1)
            assert torch.equal(a.candidates.sort().values, g.abs().topk(len(a.index)).indices.sort().values)
            torch.testing.assert_close(a.sum_g, g[a.candidates])
            assert a.count == 1


# --- §11.3 invariants after reselect ------------------------------------------------------------------------

@pytest.mark.parametrize("rate", [1.0, 0.3])
def test_reselect_invariants(rate):
    _, model = adapted(torch.float64)
    randomize_adapters(model)
    layer, a = model.fc1, model.fc1.adapters["default"]
    a.accumulating = True
    for _ in range(2):  # two micro-batches
        model(torch.randn(7, 16, dtype=torch.float64)).square().sum().backward()
    before_index, before_delta = a.index.clone(), a.delta.detach().clone()
    k, n = len(before_index), int(len(before_index) * rate)
    slots = a.reselect(layer, rate)
    assert len(a.index) == k and len(a.index.unique()) == k
    assert int(a.index.min()) >= 0 and int(a.index.max()) < layer.weight.numel()
    assert torch.all(a.delta[slots] == 0) and len(slots) > 0
    unchanged = torch.ones(k, dtype=torch.bool)
    unchanged[slots] = False
    assert torch.equal(a.index[unchanged], before_index[unchanged])
    assert torch.equal(a.delta[unchanged], before_delta[unchanged])
    dropped = set(before_delta.abs().argsort()[:n].tolist())  # (random deltas: no ties)
    assert set(slots.tolist()) <= dropped
    assert not torch.isin(a.index[slots], before_index[unchanged]).any()  # grown: not active after the drop
    assert torch.isin(a.index[slots], a.candidates).all()
    # Grown positions are the top |Σg| among the free candidates
    free = ~torch.isin(a.candidates, before_index[unchanged])
    if rate == 1.0:
        best = a.candidates[free][a.sum_g[free].abs().topk(min(n, int(free.sum()))).indices]
        assert set(a.index[slots].tolist()) == set(best.tolist()) - set(before_index.tolist())
    # the sparse kernels follow the new indices
    x = torch.randn(3, 16, dtype=torch.float64)
    w = layer.weight.detach().clone().view(-1).index_add(0, a.index, a.delta.detach()).view(layer.weight.shape)
    torch.testing.assert_close(layer(x), x @ w.T + layer.bias, rtol=1e-12, atol=1e-12)


def test_reselect_seeds_adam_state_of_new_slots_only():
    _, model = adapted()
    layer, a = model.fc1, model.fc1.adapters["default"]
    opt = torch.optim.AdamW([a.delta], lr=1e-2, betas=(0.9, 0.99))
    a.accumulating = True
    for _ in range(3):
        model(torch.randn(7, 16)).square().sum().backward()
        opt.step()
    old = {k: v.clone() for k, v in opt.state[a.delta].items() if torch.is_tensor(v) and v.dim() == 1}
    slots = a.reselect(layer, 0.5, opt)
    st = opt.state[a.delta]
    keep = torch.ones(len(a.index), dtype=torch.bool)
    keep[slots] = False
    assert torch.equal(st["exp_avg"][keep], old["exp_avg"][keep])
    grown = torch.isin(a.candidates, a.index[slots]).nonzero().squeeze(1)
    order = torch.argsort(a.candidates[grown])
    pos_order = torch.argsort(a.index[slots])
    mean_g = (a.sum_g / a.count)[grown][order]
    torch.testing.assert_close(st["exp_avg"][slots][pos_order] / (1 - 0.9 ** 3), mean_g)


# --- §11.4 schedule -----------------------------------------------------------------------------------------

def test_schedule_linear_and_cosine():
    cfg = reparam.make_config("spiel", reselection_steps=20, selection_accumulation_steps=5)
    got = {t: reselection_rate(t, cfg, 100) for t in range(1, 130) if reselection_rate(t, cfg, 100) is not None}
    assert list(got) == [5, 25, 45, 65, 85]
    assert got[5] == 1.0 and all(abs(got[t] - 0.2 * (1 - t / 100)) < 1e-12 for t in (25, 45, 65, 85))
    cos = reparam.make_config("spiel", reselection_rate_policy="cosine")
    assert abs(reselection_rate(45, cos, 100) - 0.1 * (1 + torch.cos(torch.tensor(torch.pi * 0.45)).item())) < 1e-7


def test_callback_runs_the_schedule_in_training():
    _, model = adapted(reselection_steps=4, selection_accumulation_steps=2, weight_decay=0.1)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0)
    state = TrainState(model=model, optimizer=opt, total_steps=12)
    cb = SpielStep()
    phases = []
    for t in range(12):
        state.global_step = t
        cb.on_step_begin(state)
        phases.append(model.fc1.adapters["default"].accumulating)
        model(torch.randn(8, 16)).square().mean().backward()
        opt.step()
        cb.after_optimizer_step(state)
        opt.zero_grad()
    # §5 literally: accumulate from t = 0 until t = A = 2; begin again when (t+1) % R == 0 (t = 3, 7, 11), end and
    # reselect when t % R == A (t = 6, 10); t counts optimizer steps done, so step index i runs at t = i.
    T, F = True, False
    assert phases == [T, T, F, T, T, T, F, T, T, T, F, T]
    assert [e["step"] for e in state.history] == [1, 5, 9]  # logged at t = 2, 6, 10
    assert state.history[0]["spiel_rate"] == 1.0 and state.history[0]["spiel_reselected"] > 0
    for _, a in spiel_adapters(model):
        assert len(a.index.unique()) == len(a.index)
    assert reparam.trainable_summary(model).trainable == sum(len(a.index) for _, a in spiel_adapters(model))


# --- §11.5 merge round trip, save / load --------------------------------------------------------------------

def test_merge_round_trip(kernels):
    base, model = adapted(torch.float64)
    randomize_adapters(model)
    x = torch.randn(4, 16, dtype=torch.float64)
    w0 = model.fc1.weight.detach().clone()
    assert_merge_round_trip(model, x, atol=1e-10)
    torch.testing.assert_close(model.fc1.weight, w0, atol=1e-6, rtol=0)
    expected = model(x)
    torch.testing.assert_close(reparam.unload(copy.deepcopy(model))(x), expected)
    assert not torch.equal(expected, base(x))


def test_save_load_holds_indices_and_values(tmp_path):
    base, model = adapted()
    randomize_adapters(model)
    a = model.fc1.adapters["default"]
    a.accumulating = True
    model(torch.randn(7, 16)).square().sum().backward()
    a.reselect(model.fc1, 0.5)  # indices no longer the seeded initial ones
    a.accumulating = False
    reparam.save_adapter(model, tmp_path)
    tensors, _ = read_safetensors(tmp_path / "reparam_adapter.safetensors")
    assert {k.rsplit(".", 1)[-1] for k in tensors} == {"index", "delta"}
    assert all(t.dim() == 1 and t.numel() == len(a.index) for k, t in tensors.items() if k.startswith("fc1"))
    loaded = reparam.load_adapter(copy.deepcopy(base), tmp_path)
    assert torch.equal(loaded.fc1.adapters["default"].index, a.index)
    x = torch.randn(5, 16)
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


def test_errors():
    with pytest.raises(ConfigError, match="density"):
        reparam.make_config("spiel", density=0)
    with pytest.raises(ConfigError, match="selection_accumulation_steps"):
        reparam.make_config("spiel", reselection_steps=5, selection_accumulation_steps=5)
    with pytest.raises(ConfigError, match="reselection_rate_policy"):
        reparam.make_config("spiel", reselection_rate_policy="step")


def test_reparam_loop_runs_spiel_step_and_keeps_optimizer_state_compact():
    """reparam.training.train adds SpielStep by itself (method_callbacks); δ is the only adapter tensor trained."""
    from reparam.training import train
    from tests.helpers import bert_adapted, quiet, synthetic_data

    model = bert_adapted("spiel", density=0.05, reselection_steps=3, selection_accumulation_steps=1)
    before = {n: m.adapters["default"].index.clone() for n, m in model.named_modules() if hasattr(m, "adapters")}
    result = train(model, synthetic_data(48), quiet(max_steps=6))
    logged = [e for e in result.history if "spiel_reselected" in e]
    assert [e["spiel_rate"] for e in logged][:1] == [1.0] and logged[0]["spiel_reselected"] > 0
    after = {n: m.adapters["default"] for n, m in model.named_modules() if hasattr(m, "adapters")}
    assert any(not torch.equal(before[n], a.index) for n, a in after.items())
    assert all(a.delta.numel() == len(a.index) and len(a.index.unique()) == len(a.index) for a in after.values())


# --- SpIEL-MA: SftSM3 and growth by row x column statistics (§4, §5) -------------------------------------------

def test_sm3_step_closed_form():
    _, model = adapted(variant="ma")
    a = model.fc2.adapters["default"]
    d_in = model.fc2.weight.shape[1]
    with torch.no_grad():
        a.row_acc.uniform_(0, 1)
        a.col_acc.uniform_(0, 1)
    row, col, delta = a.row_acc.clone(), a.col_acc.clone(), a.delta.detach().clone()
    g = torch.randn_like(a.delta)
    a.delta.grad = g.clone()
    a.sm3_step(lr=0.1)
    i, j = a.positions // d_in, a.positions % d_in
    u = torch.minimum(row[i], col[j]) + g * g
    for slot in range(len(g)):  # by hand: max over the entries sharing a row / column
        row[i[slot]] = max(row[i[slot]], u[slot])
        col[j[slot]] = max(col[j[slot]], u[slot])
    torch.testing.assert_close(a.row_acc, row, atol=0, rtol=0)
    torch.testing.assert_close(a.col_acc, col, atol=0, rtol=0)
    torch.testing.assert_close(a.delta.detach(), delta - 0.1 * g / (u + 1e-8).sqrt(), atol=1e-7, rtol=0)
    assert a.delta.grad is None  # the loop's optimizer skips δ


@pytest.mark.parametrize("rate", [1.0, 0.3])
def test_ma_grows_the_largest_row_column_products_among_inactive(rate):
    _, model = adapted(variant="ma")
    layer, a = model.fc2, model.fc2.adapters["default"]
    with torch.no_grad():
        a.row_acc.uniform_(0, 1)
        a.col_acc.uniform_(0, 1)
        a.delta.normal_()
    k, n = len(a.index), int(len(a.index) * rate)
    order = a.delta.abs().argsort(stable=True)
    kept = set(a.positions[order[n:]].tolist())
    score = torch.outer(a.row_acc, a.col_acc).view(-1)
    ranked = [p for p in score.argsort(descending=True).tolist() if p not in kept]
    a.reselect(layer, rate)
    new = set(a.index.tolist()) - kept
    assert len(a.index.unique()) == k and kept <= set(a.index.tolist())
    # the n grown positions are the best inactive ones (a re-chosen dropped position simply stays)
    assert new == set(ranked[:n])


def test_ma_trains_without_dense_gradients_or_adam_state():
    from reparam.training import train
    from tests.helpers import bert_adapted, quiet, synthetic_data

    model = bert_adapted("spiel", density=0.05, reselection_steps=3, selection_accumulation_steps=1, variant="ma")
    observed = []
    for _, m in model.named_modules():
        if hasattr(m, "adapters"):
            a = m.adapters["default"]
            a.observe = lambda g: observed.append(g)  # an accumulation phase would hand it the dense ∂L/∂W
    before = {n: m.adapters["default"].index.clone() for n, m in model.named_modules() if hasattr(m, "adapters")}
    result = train(model, synthetic_data(48), quiet(max_steps=6))
    assert observed == []  # no accumulation phase, no dense gradient statistics
    after = {n: m.adapters["default"] for n, m in model.named_modules() if hasattr(m, "adapters")}
    assert any(not torch.equal(before[n], a.index) for n, a in after.items())
    assert all(a.row_acc.abs().sum() > 0 for a in after.values())
    assert [e["spiel_rate"] for e in result.history if "spiel_rate" in e][:1] == [1.0]


def test_ma_accumulators_survive_a_checkpoint():
    _, model = adapted(variant="ma")
    cb = SpielStep()
    cb.on_train_begin(TrainState(model=model))
    with torch.no_grad():
        model.fc1.adapters["default"].row_acc.fill_(3.0)
    saved = cb.state_dict()
    _, fresh = adapted(variant="ma")
    cb2 = SpielStep()
    cb2.load_state_dict(saved)
    cb2.on_train_begin(TrainState(model=fresh))
    assert (fresh.fc1.adapters["default"].row_acc == 3.0).all()
    with pytest.raises(reparam.ConfigError, match="invalid variant='xx'"):
        reparam.make_config("spiel", variant="xx")
