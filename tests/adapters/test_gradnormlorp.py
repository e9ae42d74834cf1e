"""GradNormLoRP (specs/adapters/gradnormlorp.md): the unit-test properties of §10, the exact / released gradient of
V, training through reparam's loop and its callback, save/load, merge/unload, resume, and errors."""
import copy

import pytest
import torch

import reparam
from reparam.adapters.gradnormlorp import (GradNormLoRPAdapter, GradNormLoRPStep, ProjectedAdam, normalized_weight,
                                           weight_norm_grads)
from reparam.core.errors import ConfigError, ReparamError
from reparam.training import TrainState, train
from tests.helpers import (MixedKinds, TinyMLP, adapt_tiny_mlp, adapter_params, assert_merge_round_trip,
                           bert_adapted, kill_and_resume, quiet, train_in_hf_trainer)
from tests.training.tiny import synthetic_data


def gnl_adapters(model):
    return [m for m in model.modules() if isinstance(m, GradNormLoRPAdapter)]


def config(**fields):
    return reparam.make_config("gradnormlorp", **fields)


# §10.1 exact reparameterisation at init
def test_exact_reparameterisation_at_init():
    base, model = adapt_tiny_mlp("gradnormlorp", r=4)
    for name in ("fc1", "fc2"):
        a = getattr(model, name).adapters["default"]
        torch.testing.assert_close(a.weight(), getattr(base, name).weight, atol=1e-6, rtol=0)
    x = torch.randn(5, 16)
    torch.testing.assert_close(model(x), base(x), atol=1e-6, rtol=0)


# §10.2 weight-norm gradients: closed forms == autograd, float64
def test_weight_norm_gradients_match_autograd():
    torch.manual_seed(0)
    g = torch.rand(7, dtype=torch.float64) + 0.5
    V = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    g.requires_grad_(True)
    x = torch.randn(9, 5, dtype=torch.float64)
    loss_of_W = lambda W: torch.tanh(x @ W.T).pow(2).sum()  # noqa: E731  a non-linear loss
    loss_of_W(normalized_weight(g, V)).backward()
    W = normalized_weight(g, V).detach().requires_grad_(True)
    loss_of_W(W).backward()
    grad_g, grad_V = weight_norm_grads(W.grad, g.detach(), V.detach())
    torch.testing.assert_close(grad_g, g.grad, atol=1e-12, rtol=0)
    torch.testing.assert_close(grad_V, V.grad, atol=1e-12, rtol=0)
    assert torch.autograd.gradcheck(lambda g_, V_: loss_of_W(normalized_weight(g_, V_)), (g, V))


def test_released_code_gradient_option():
    """exact_wn_grad=False gives the released code's ∂L/∂V ≈ (g/‖V‖)·G (§9.2)."""
    _, model = adapt_tiny_mlp("gradnormlorp", dtype=torch.float64, r=4, exact_wn_grad=False)
    layer = model.fc1
    a = layer.adapters["default"]
    with torch.no_grad():
        a.magnitude.mul_(1.5)
    x = torch.randn(6, 16, dtype=torch.float64)
    model(x).pow(2).sum().backward()
    W = a.weight().detach().requires_grad_(True)
    x1 = x.detach()
    h = torch.relu(torch.nn.functional.linear(x1, W, layer.bias))
    model.classifier(model.norm(torch.relu(model.fc2(h)))).pow(2).sum().backward()
    norm = torch.linalg.norm(a.direction.detach(), dim=1, keepdim=True)
    torch.testing.assert_close(a.transform_grad(), (a.magnitude.detach()[:, None] / norm) * W.grad, atol=1e-10, rtol=0)


# §10.3 projection round trip
@pytest.mark.parametrize("shape", [(12, 7), (6, 10)])
def test_projection_round_trip(shape):
    torch.manual_seed(1)
    G = torch.randn(*shape, dtype=torch.float64)
    full = ProjectedAdam(config(r=min(shape)))
    full.refresh(G)
    torch.testing.assert_close(full.back_project(full.project(G)), G, atol=1e-10, rtol=0)
    low = ProjectedAdam(config(r=3))
    low.refresh(G)
    U, S, Vh = torch.linalg.svd(G, full_matrices=False)
    best = (U[:, :3] * S[:3]) @ Vh[:3]
    torch.testing.assert_close(low.back_project(low.project(G)), best, atol=1e-10, rtol=0)
    assert low.P.shape == ((3, shape[1]) if shape[0] >= shape[1] else (shape[0], 3))


# §10.4 full-rank limit: the projected step is one AdamW step
def test_full_rank_limit_equals_adamw():
    """Gradients with orthogonal columns make P a signed permutation, where Adam's element-wise step commutes
    with the projection, so every step (moments, bias correction, decay) must equal AdamW's."""
    torch.manual_seed(2)
    m, n, lr, wd = 9, 5, 1e-2, 0.1
    V0 = torch.randn(m, n, dtype=torch.float64)
    ref = V0.clone().requires_grad_(True)
    adamw = torch.optim.AdamW([ref], lr=lr, betas=(0.9, 0.999), eps=1e-6, weight_decay=wd)
    V = V0.clone()
    proj = ProjectedAdam(config(r=n, update_proj_gap=200))
    for _ in range(4):
        Q, _ = torch.linalg.qr(torch.randn(m, n, dtype=torch.float64))
        G = Q * torch.tensor([5.0, 3.0, 2.0, 1.0, 0.5], dtype=torch.float64)  # columns orthogonal
        ref.grad = G.clone()
        adamw.step()
        proj.step(V, G, lr, wd)
        torch.testing.assert_close(V, ref.detach(), atol=1e-12, rtol=0)
        torch.testing.assert_close(proj.back_project(proj.M), adamw.state[ref]["exp_avg"], atol=1e-12, rtol=0)


def test_full_rank_first_moment_is_adams_for_any_gradient():
    torch.manual_seed(3)
    proj = ProjectedAdam(config(r=4, update_proj_gap=200))
    V, avg = torch.randn(6, 4, dtype=torch.float64), torch.zeros(6, 4, dtype=torch.float64)
    for _ in range(3):
        G = torch.randn(6, 4, dtype=torch.float64)
        avg = 0.9 * avg + 0.1 * G
        proj.step(V, G, 1e-3)
    torch.testing.assert_close(proj.back_project(proj.M), avg, atol=1e-12, rtol=0)


def test_projector_refreshed_every_T_steps_and_optional_moment_reset():
    torch.manual_seed(4)
    for reset in (False, True):  # the refresh schedule does not depend on the reset option
        proj = ProjectedAdam(config(r=2, update_proj_gap=3, reset_moments_on_refresh=reset))
        V, seen = torch.randn(8, 5), []
        for _ in range(7):
            proj.step(V, torch.randn(8, 5), 1e-3)
            seen.append(proj.P.clone())
        changed = [not torch.equal(a, b) for a, b in zip(seen, seen[1:])]
        assert changed == [False, False, True, False, False, True]  # refreshes at t = 0, 3, 6
    fresh = ProjectedAdam(config(r=2, reset_moments_on_refresh=True, update_proj_gap=1))
    G = torch.randn(8, 5)
    fresh.step(torch.randn(8, 5), torch.randn(8, 5), 1e-3)
    fresh.step(torch.randn(8, 5), G, 1e-3)
    torch.testing.assert_close(fresh.M, 0.1 * fresh.project(G))  # moments restarted at the refresh


def run_steps(model, steps=2, lr=1e-2):
    """reparam's loop order: backward, callback before optimizer.step, AdamW."""
    params = list(adapter_params(model).values())
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    cb, state = GradNormLoRPStep(), TrainState(model, optimizer)
    cb.on_train_begin(state)
    for i in range(steps):
        model(torch.randn(4, 16, generator=torch.Generator().manual_seed(i))).pow(2).sum().backward()
        cb.before_optimizer_step(state)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return optimizer


# §10.5 state size 2·m·r + r·n + 3·m
def test_state_size():
    _, model = adapt_tiny_mlp("gradnormlorp", targets=("fc2",), r=3)
    a = model.fc2.adapters["default"]
    optimizer = run_steps(model)
    m, n, r = 24, 24, 3
    assert a.direction not in optimizer.state  # no full-size moments for V
    g_state = sum(t.numel() for t in optimizer.state[a.magnitude].values() if t.ndim > 0)
    floats = sum(t.numel() for t in a.projected_adam.tensors()) + g_state + a.magnitude.numel()
    assert floats == 2 * m * r + r * n + 3 * m
    assert a.projected_adam.step_count == 2


def test_training_changes_weight_and_merge_unload_round_trip(tmp_path):
    base, model = adapt_tiny_mlp("gradnormlorp", r=4)
    run_steps(model, steps=3, lr=5e-2)
    x = torch.randn(5, 16)
    assert (model(x) - base(x)).abs().max() > 1e-3
    assert_merge_round_trip(model, x)
    reparam.save_adapter(model, tmp_path)
    loaded = reparam.load_adapter(copy.deepcopy(base), tmp_path)
    torch.testing.assert_close(loaded(x), model(x), atol=1e-6, rtol=0)
    expected = model(x)
    plain = reparam.unload(loaded)
    assert type(plain.fc1) is torch.nn.Linear
    torch.testing.assert_close(plain(x), expected, atol=1e-5, rtol=0)


def test_conv1d_layout_merge():
    torch.manual_seed(0)
    base = MixedKinds()
    model = reparam.adapt(copy.deepcopy(base), config(r=2), targets=["proj", "lin"])
    ids = torch.randint(1, 50, (3, 7))
    torch.testing.assert_close(model(ids), base(ids), atol=1e-6, rtol=0)
    with torch.no_grad():
        for a in gnl_adapters(model):
            a.direction.add_(0.1 * torch.randn_like(a.direction))
    assert_merge_round_trip(model, ids)


def test_reparam_train_loop_and_resume(tmp_path):
    data = synthetic_data(24)
    model = bert_adapted("gradnormlorp", r=2, update_proj_gap=2)
    before = {n: p.detach().clone() for n, p in adapter_params(model).items()}
    result = train(model, data, quiet(max_steps=3))
    after = adapter_params(model)
    assert all(not torch.equal(before[n], after[n]) for n in before if n.endswith("direction"))
    assert all(a.projected_adam.step_count == 3 for a in gnl_adapters(model))
    assert result is not None
    # resumed at step 2, between the refreshes at 0 and 3: the restored projector and moments are used
    kill_and_resume(lambda: bert_adapted("gradnormlorp", r=2, update_proj_gap=3), data, tmp_path / "ckpt",
                    crash_at=3, checkpoint_every=2, max_steps=5)


def test_hf_trainer_runs_the_projected_step(tmp_path):
    model = bert_adapted("gradnormlorp", r=2)
    before = {n: p.detach().clone() for n, p in adapter_params(model).items() if n.endswith("direction")}
    trainer, _ = train_in_hf_trainer(model, tmp_path, max_steps=2)
    adapters = gnl_adapters(model)
    assert all(a.projected_adam.step_count == 2 for a in adapters)
    assert all(a.direction not in trainer.optimizer.state for a in adapters)
    after = adapter_params(model)
    assert all(not torch.equal(before[n], after[n]) for n in before)


def test_errors():
    with pytest.raises(ConfigError, match="update_proj_gap"):
        config(update_proj_gap=0)
    with pytest.raises(ConfigError, match="unknown field"):
        config(rank=4)
    with pytest.raises(ReparamError, match="fc1.*r=20"):
        reparam.adapt(TinyMLP(), config(r=20), targets=["fc1"])
    with pytest.raises(ReparamError, match="emb.*adapts only linear"):
        reparam.adapt(MixedKinds(), config(r=2), targets=["emb"])
