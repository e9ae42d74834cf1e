"""Delta regularisation for DAREx (spec darex.md §3): AdamR and the L2 penalty toward theta_0."""
import math

import pytest
import torch

from reparam import ConfigError
from reparam.cli.main import main
from reparam.training import AdamR, Callback, TrainConfig, train
from reparam.training.delta_reg import DeltaL2
from tests.training.tiny import TinyEncoder, synthetic_data


def _toy(seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(3, 4, generator=g, dtype=dtype).requires_grad_()
    b = torch.randn(3, generator=g, dtype=dtype).requires_grad_()
    x = torch.randn(16, 4, generator=g, dtype=dtype)
    y = torch.randn(16, 3, generator=g, dtype=dtype)
    return w, b, x, y


def _run(opt, w, b, x, y, steps=10):
    for _ in range(steps):
        opt.zero_grad()
        ((x @ w.T + b - y) ** 2).mean().backward()
        opt.step()


def test_adamr_without_decay_is_adam():
    w1, b1, x, y = _toy(dtype=torch.float64)
    w2, b2 = w1.detach().clone().requires_grad_(), b1.detach().clone().requires_grad_()
    _run(AdamR([w1, b1], lr=0.05, betas=(0.8, 0.99), eps=1e-8, weight_decay=0.0), w1, b1, x, y)
    _run(torch.optim.Adam([w2, b2], lr=0.05, betas=(0.8, 0.99), eps=1e-8), w2, b2, x, y)
    assert not torch.equal(w1, _toy(dtype=torch.float64)[0])  # it moved
    torch.testing.assert_close(w1, w2, atol=1e-7, rtol=0)
    torch.testing.assert_close(b1, b2, atol=1e-7, rtol=0)


@pytest.mark.parametrize("l1", [False, True])
def test_adamr_two_steps_by_hand(l1):
    # two scalar parameters in two groups: v_bar is the mean over both (a per-group v_bar would give another step)
    lr, b1, b2, eps, wd = 0.1, 0.9, 0.999, 1e-8, 0.5
    a = torch.tensor([1.0], dtype=torch.float64, requires_grad=True)
    c = torch.tensor([-2.0], dtype=torch.float64, requires_grad=True)
    opt = AdamR([{"params": [a]}, {"params": [c]}], lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd, l1=l1)
    grads = [(0.3, -4.0), (-0.2, 1.0)]
    a.grad, c.grad = torch.tensor([grads[0][0]], dtype=torch.float64), torch.tensor([grads[0][1]], dtype=torch.float64)
    opt.step()
    # step 1: theta = theta_0, so no decay; the Adam step is lr * g / (|g| + eps)
    a1, c1 = 1.0 - lr * 0.3 / (0.3 + eps), -2.0 - lr * -4.0 / (4.0 + eps)
    assert a.item() == pytest.approx(a1, abs=1e-15) and c.item() == pytest.approx(c1, abs=1e-15)
    a.grad, c.grad = torch.tensor([grads[1][0]], dtype=torch.float64), torch.tensor([grads[1][1]], dtype=torch.float64)
    opt.step()
    ma, mc = b1 * (1 - b1) * 0.3 + (1 - b1) * -0.2, b1 * (1 - b1) * -4.0 + (1 - b1) * 1.0
    va = (b2 * (1 - b2) * 0.3 ** 2 + (1 - b2) * 0.2 ** 2) / (1 - b2 ** 2)
    vc = (b2 * (1 - b2) * 4.0 ** 2 + (1 - b2) * 1.0 ** 2) / (1 - b2 ** 2)
    s = math.sqrt((va + vc) / 2)
    pull_a = math.copysign(1.0, a1 - 1.0) if l1 else a1 - 1.0
    pull_c = math.copysign(1.0, c1 + 2.0) if l1 else c1 + 2.0
    a2 = a1 - wd * lr / s * pull_a - lr / (1 - b1 ** 2) * ma / (math.sqrt(va) + eps)
    c2 = c1 - wd * lr / s * pull_c - lr / (1 - b1 ** 2) * mc / (math.sqrt(vc) + eps)
    assert a.item() == pytest.approx(a2, abs=1e-12) and c.item() == pytest.approx(c2, abs=1e-12)


def test_adamr_zero_gradients_decay_geometrically_or_linearly():
    lr, wd, n = 0.1, 0.2, 7
    for l1 in (False, True):
        w = torch.zeros(5, dtype=torch.float64, requires_grad=True)
        opt = AdamR([w], lr=lr, weight_decay=wd, l1=l1)  # theta_0 = 0
        start = torch.tensor([1.0, -2.0, 0.5, 3.0, -0.25], dtype=torch.float64)
        with torch.no_grad():
            w.copy_(start)
        for _ in range(n):
            w.grad = torch.zeros_like(w)
            opt.step()
        # v_bar = 0 -> s = 1; Adam's own step is 0 / (0 + eps) = 0
        want = start - start.sign() * n * wd * lr if l1 else start * (1 - wd * lr) ** n
        torch.testing.assert_close(w.detach(), want, atol=1e-12, rtol=0)


def test_l2_gradient_is_the_closed_form():
    g = torch.Generator().manual_seed(0)
    params = {"w": torch.nn.Parameter(torch.randn(3, 2, generator=g)), "b": torch.nn.Parameter(torch.randn(2, generator=g))}
    reg = DeltaL2(params, strength=0.3)
    theta0 = {n: p.detach().clone() for n, p in params.items()}
    with torch.no_grad():
        for p in params.values():
            p.add_(torch.randn(p.shape, generator=g))
    task = {n: torch.randn(p.shape, generator=g) for n, p in params.items()}
    params["w"].grad = task["w"].clone()  # "b" has no gradient yet: the penalty alone
    reg.after_backward(None)
    penalty = 0.3 / 2 * sum(((p - theta0[n]) ** 2).sum() for n, p in params.items())
    closed = torch.autograd.grad(penalty, list(params.values()))
    torch.testing.assert_close(params["w"].grad, task["w"] + closed[0])
    torch.testing.assert_close(params["b"].grad, closed[1])
    torch.testing.assert_close(closed[0], 0.3 * (params["w"].detach() - theta0["w"]))


class Spy(Callback):
    def __init__(self):
        self.optimizers = []

    def on_step_end(self, state):
        self.optimizers.append(type(state.optimizer).__name__)


def _train(delta_reg="none", strength=0.0, steps=6, **kw):
    torch.manual_seed(0)
    model = TinyEncoder()
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    spy = Spy()
    cfg = TrainConfig(lr=0.05, batch_size=8, max_steps=steps, progress=False, seed=0, delta_reg=delta_reg,
                      delta_reg_strength=strength, **kw)
    train(model, synthetic_data(32), cfg, callbacks=[spy])
    end = {n: p.detach().clone() for n, p in model.named_parameters()}
    dist = math.sqrt(sum(float(((end[n] - start[n]) ** 2).sum()) for n in end))
    return end, dist, spy.optimizers


def test_default_path_unchanged_and_regularisers_shrink_the_delta():
    default, d_none, opts = _train()
    assert set(opts) == {"AdamW"}
    l2_zero, _, _ = _train("l2", 0.0)  # runs the penalty code with strength 0: bit-identical to the default
    assert default.keys() == l2_zero.keys()
    assert all(torch.equal(default[n], l2_zero[n]) for n in default)
    _, d_l2, _ = _train("l2", 1.0)
    _, d_adamr0, opts = _train("adamr", 0.0)
    assert set(opts) == {"AdamR"}
    _, d_adamr, _ = _train("adamr", 0.05)
    assert d_l2 < 0.5 * d_none and d_adamr < 0.5 * d_adamr0


class Crash(Callback):
    def on_step_begin(self, state):
        if state.global_step == 5:
            raise RuntimeError("killed")


@pytest.mark.parametrize("delta_reg,strength", [("l2", 1.0), ("adamr", 0.05)])
def test_resume_keeps_theta0(tmp_path, delta_reg, strength):
    # theta_0 lives in the checkpoint: a resumed run decays toward the start of training, not of the resume
    full, _, _ = _train(delta_reg, strength, steps=8)
    torch.manual_seed(0)
    model = TinyEncoder()
    cfg = dict(lr=0.05, batch_size=8, max_steps=8, progress=False, seed=0, delta_reg=delta_reg, delta_reg_strength=strength,
               checkpoint_dir=str(tmp_path), checkpoint_every=3)
    with pytest.raises(RuntimeError, match="killed"):
        train(model, synthetic_data(32), TrainConfig(**cfg), callbacks=[Crash()])
    torch.manual_seed(1)
    fresh = TinyEncoder()  # other initial weights: only the checkpoint can supply theta_0
    train(fresh, synthetic_data(32), TrainConfig(resume=True, **cfg), callbacks=[Callback()])
    for n, p in fresh.named_parameters():
        assert torch.equal(p.detach(), full[n]), n


def test_config_errors_and_cli_flags(capsys):
    with pytest.raises(ConfigError, match="delta_reg='adam'.*none, l2, adamr, adamr_l1"):
        TrainConfig(delta_reg="adam")
    with pytest.raises(ConfigError, match="delta_reg_strength=-1"):
        TrainConfig(delta_reg="l2", delta_reg_strength=-1)
    with pytest.raises(ConfigError, match="weight_decay=0.1.*use delta_reg_strength"):
        TrainConfig(delta_reg="adamr", weight_decay=0.1)
    code = main(["finetune", "--delta-reg", "adamr", "--weight-decay", "0.1", "-o", "unused"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("reparam: error: ") and "delta_reg_strength" in err


def test_delta_l2_theta0_follows_a_resized_parameter():
    """A rank allocator removing rows (core/resize.py) must cut DeltaL2's theta_0 the same way, and appended
    rows are pulled toward their own initial value."""
    from reparam.core.resize import resize_rows
    from reparam.training.delta_reg import DeltaL2

    p = torch.nn.Parameter(torch.arange(12.0).reshape(4, 3))
    reg = DeltaL2({"w": p}, strength=0.5)
    with torch.no_grad():
        p.add_(1.0)
    new_row = torch.full((1, 3), 7.0)
    resize_rows(p, 0, [3, 1], new=new_row)
    assert torch.equal(reg.theta0["w"], torch.cat([torch.arange(12.0).reshape(4, 3)[[3, 1]], new_row]))
    p.grad = None
    reg.after_backward(None)
    assert torch.equal(p.grad, torch.tensor([[0.5] * 3, [0.5] * 3, [0.0] * 3]))
