"""Delta regularisation during fine-tuning (spec darex.md §3): keep theta - theta_0 small and well behaved so
that DARE / DAREx can drop most of it afterwards. theta_0 is each trainable parameter's value when training
starts (for full fine-tuning: the pre-trained weights); it is saved in checkpoints, so a resumed run decays
toward the same theta_0. Memory: one extra copy of the trainable parameters.

* ``l2`` (:class:`DeltaL2`): the penalty strength/2 * ||theta - theta_0||^2 added to the loss, implemented as
  its closed-form gradient strength * (theta - theta_0) added to the gradients once per optimizer step
  (before clipping); the optimizer stays AdamW.
* ``adamr`` / ``adamr_l1`` (:class:`AdamR`): Adam with decoupled decay toward theta_0 scaled by lr / sqrt(v_bar),
  v_bar the mean bias-corrected second moment over *all* parameters of all groups (DAREx "AdamR").
"""
from __future__ import annotations

import math

import torch

from ..core.resize import cut_rows
from .callbacks import Callback

DELTA_REGS = ("none", "l2", "adamr", "adamr_l1")


class AdamR(torch.optim.Optimizer):
    """AdamR (DAREx reference): per step, for every parameter with a gradient,
    m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2;  v_hat = v / (1 - b2^t)
    v_bar = sum of v_hat over all their elements / their total numel;  s = sqrt(v_bar), or 1 when it is 0
    theta -= weight_decay * lr / s * (theta - theta_0)          (L1: * sign(theta - theta_0))
    theta -= lr / (1 - b1^t) * m / (sqrt(v_hat) + eps)
    With weight_decay = 0 this is Adam. theta_0 is stored per parameter in the optimizer state (``theta0``).
    Amsgrad (optional in the reference) is not implemented.
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-4, l1: bool = False):
        if not (lr >= 0 and eps >= 0 and weight_decay >= 0 and 0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise ValueError(f"AdamR needs lr, eps, weight_decay >= 0 and betas in [0, 1); got lr={lr}, eps={eps}, "
                             f"weight_decay={weight_decay}, betas={betas}")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, l1=l1))
        for group in self.param_groups:
            for p in group["params"]:
                self.state[p]["theta0"] = p.detach().clone()

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        live = [(g, p) for g in self.param_groups for p in g["params"] if p.grad is not None]
        v_hat_sum, numel = 0.0, 0
        v_hats = []
        for group, p in live:
            if p.grad.is_sparse:
                raise RuntimeError("AdamR does not support sparse gradients")
            beta1, beta2 = group["betas"]
            state = self.state[p]
            if "step" not in state:
                state["step"] = 0
                state["exp_avg"] = torch.zeros_like(p)
                state["exp_avg_sq"] = torch.zeros_like(p)
            state["step"] += 1
            state["exp_avg"].mul_(beta1).add_(p.grad, alpha=1 - beta1)
            state["exp_avg_sq"].mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
            v_hat = state["exp_avg_sq"] / (1 - beta2 ** state["step"])
            v_hats.append(v_hat)
            v_hat_sum += float(v_hat.sum(dtype=torch.float64))
            numel += p.numel()
        # one scale for the whole model: a per-group v_bar would be a different method (spec pitfall)
        s = math.sqrt(v_hat_sum / numel) if numel else 1.0
        s = s if s > 0 else 1.0
        for (group, p), v_hat in zip(live, v_hats):
            state = self.state[p]
            if group["weight_decay"]:
                diff = p - state["theta0"]
                p.sub_(diff.sign_() if group["l1"] else diff, alpha=group["weight_decay"] * group["lr"] / s)
            beta1 = group["betas"][0]
            p.addcdiv_(state["exp_avg"], v_hat.sqrt_().add_(group["eps"]),
                       value=-group["lr"] / (1 - beta1 ** state["step"]))
        return loss


class DeltaL2(Callback):
    """Adds strength * (theta - theta_0) to each parameter's gradient after the backward passes of a step:
    the gradient of strength/2 * ||theta - theta_0||^2. Its state (theta_0) is saved in checkpoints."""

    def __init__(self, params: dict[str, torch.nn.Parameter], strength: float):
        self.params = params
        self.strength = strength
        self.theta0 = {n: p.detach().clone() for n, p in params.items()}
        for name, p in params.items():  # a rank allocator resizing p (core/resize.py) cuts theta_0 the same way
            p.reparam_on_resize = [*getattr(p, "reparam_on_resize", ()), self._resize_hook(name)]

    def _resize_hook(self, name: str):
        def on_resize(dim, keep, new):  # new rows are regularised toward their initial value
            self.theta0[name] = cut_rows(self.theta0[name], dim, keep, new)
        return on_resize

    @torch.no_grad()
    def after_backward(self, state) -> None:
        for name, p in self.params.items():
            diff = (p - self.theta0[name]).mul_(self.strength)
            if p.grad is None:
                p.grad = diff
            else:
                p.grad.add_(diff)

    def state_dict(self) -> dict:
        return {"theta0": self.theta0}

    def load_state_dict(self, state: dict) -> None:
        self.theta0 = {n: t.to(self.params[n].device, self.params[n].dtype) for n, t in state["theta0"].items()}
