"""GradNormLoRP (specs/adapters/gradnormlorp.md): weight normalisation + GaLore-style low-rank projected Adam.

    W = diag(g) · V / ‖V‖_row      (§2: each output row of the [out, in] weight normalised, §9.5)
    init: V = W0, g = ‖W0‖_row  ⇒  W = W0 exactly

g and V are the adapter's parameters; the layer computes its output with W (no extra matmul), and autograd gives
the exact weight-norm gradients of §3. GradNormLoRPStep (a training callback, run by reparam.training.train by
itself) takes V's gradient before optimizer.step and applies the rank-r projected Adam step of §4 to V, keeping
only the r-dim moments and the projector; the optimizer never sees a gradient of V, so it builds no full-size state
for it. g (size m) trains with the loop's AdamW. Merging writes W into the layer: a dense model, no overhead (§5).
Without the callback (a plain optimizer) this is ordinary weight-normalised full fine-tuning.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..core.errors import ReparamError
from ..core.layers import LINEAR, Adapter, adapter_dtype, wide
from ..core.registry import MethodConfig, register
from ..core.svd import svd
from ..training.callbacks import Callback
from .lora import as_matrix


@dataclass
class GradNormLoRPConfig(MethodConfig):
    r: int = 8                        # rank of the gradient projection
    update_proj_gap: int = 200        # T: projector refreshed by SVD every T steps (§4)
    scale: float = 1.0                # α ("galore_scale")
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-6
    correct_bias: bool = True
    exact_wn_grad: bool = True        # False reproduces the released code's ∂L/∂V ≈ (g/‖V‖)·G (§9.2)
    reset_moments_on_refresh: bool = False  # GaLore keeps moments across refreshes (§9.7); optional reset

    def __post_init__(self):
        self.check(isinstance(self.r, int) and self.r > 0, "r", "must be a positive integer")
        self.check(isinstance(self.update_proj_gap, int) and self.update_proj_gap > 0, "update_proj_gap",
                   "must be a positive integer")
        self.check(self.scale > 0, "scale", "must be positive")
        self.check(0.0 <= self.beta1 < 1.0, "beta1", "must be in [0, 1)")
        self.check(0.0 <= self.beta2 < 1.0, "beta2", "must be in [0, 1)")
        self.check(self.eps > 0, "eps", "must be positive")


def normalized_weight(g: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    """diag(g) · V / ‖V‖_row."""
    return (g / torch.linalg.norm(V, dim=1))[:, None] * V


def weight_norm_grads(G: torch.Tensor, g: torch.Tensor, V: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(∂L/∂g, ∂L/∂V) from G = ∂L/∂W by the closed forms of §3 (autograd computes the same in training)."""
    norm = torch.linalg.norm(V, dim=1, keepdim=True)
    V_hat = V / norm
    grad_g = (G * V_hat).sum(dim=1)
    return grad_g, (g[:, None] / norm) * (G - grad_g[:, None] * V_hat)


class ProjectedAdam:
    """GaLore projector + Adam moments of one m×n matrix (§4): P is r×n (right, m ≥ n) or m×r (left, m < n)."""

    def __init__(self, config: GradNormLoRPConfig):
        self.config = config
        self.step_count = 0
        self.P = self.M = self.S = None

    def refresh(self, grad: torch.Tensor) -> None:
        m, n = grad.shape
        U, _, Vh = svd(grad, torch.float32 if grad.dtype != torch.float64 else torch.float64, cache=False)  # §9.6
        self.right = m >= n  # GaLore "std": project on the smaller side
        self.P = (Vh[:self.config.r] if self.right else U[:, :self.config.r]).to(grad.dtype)

    def project(self, grad: torch.Tensor) -> torch.Tensor:
        return grad @ self.P.T if self.right else self.P.T @ grad

    def back_project(self, low: torch.Tensor) -> torch.Tensor:
        return low @ self.P if self.right else self.P @ low

    @torch.no_grad()
    def step(self, V: torch.Tensor, grad: torch.Tensor, lr: float, weight_decay: float = 0.0) -> None:
        c = self.config
        if self.step_count % c.update_proj_gap == 0:
            self.refresh(grad)
            if c.reset_moments_on_refresh:
                self.M = self.S = None
        self.step_count += 1
        R = self.project(grad)
        if self.M is None:
            self.M, self.S = torch.zeros_like(R), torch.zeros_like(R)
        self.M.mul_(c.beta1).add_(R, alpha=1 - c.beta1)
        self.S.mul_(c.beta2).addcmul_(R, R, value=1 - c.beta2)
        t = self.step_count
        m_hat, s_hat = (self.M / (1 - c.beta1 ** t), self.S / (1 - c.beta2 ** t)) if c.correct_bias else (self.M, self.S)
        if weight_decay:
            V.mul_(1 - lr * weight_decay)  # decoupled, as AdamW
        V.add_(self.back_project(m_hat / (s_hat.sqrt() + c.eps)), alpha=-lr * c.scale)

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.P, self.M, self.S) if t is not None]

    def state_dict(self) -> dict:
        return {"step": self.step_count, "right": getattr(self, "right", None), "P": self.P, "M": self.M, "S": self.S}

    def load_state_dict(self, state: dict) -> None:
        self.step_count, self.right = state["step"], state["right"]
        self.P, self.M, self.S = state["P"], state["M"], state["S"]


class GradNormLoRPAdapter(Adapter):
    supported_kinds = (LINEAR,)
    computes_layer_output = True  # the layer's output is x Wᵀ + b with W = diag(g) V̂: one matmul

    @classmethod
    def training_callbacks(cls) -> list:
        return [GradNormLoRPStep()]

    def __init__(self, layer, config: GradNormLoRPConfig, init: bool = True):
        super().__init__(layer, config)
        W0 = as_matrix(layer, layer.weight).detach().to(adapter_dtype(layer))
        if config.r > min(W0.shape):
            raise ReparamError(f"gradnormlorp on {layer.reparam_name}: r={config.r} exceeds min(d_out, d_in)="
                               f"{min(W0.shape)} of its {tuple(W0.shape)} weight")
        if init and not (torch.isfinite(W0).all() and (torch.linalg.norm(W0, dim=1) > 0).all()):
            raise ReparamError(f"gradnormlorp on {layer.reparam_name}: the weight has a zero or non-finite row, "
                               "which weight normalisation cannot represent")
        self.magnitude = nn.Parameter(torch.linalg.norm(W0, dim=1))  # g
        self.direction = nn.Parameter(W0.clone())                     # V
        self.projected_adam = ProjectedAdam(config)  # optimiser state of V (not saved with the adapter)

    def weight(self) -> torch.Tensor:
        return normalized_weight(self.magnitude, self.direction)

    def layer_output(self, layer, x):
        return F.linear(x, self.weight().to(x.dtype), None if layer.bias is None else layer.bias)

    def forward(self, layer, x, out):  # elsewhere in a stack: replace the base part x W0ᵀ by x Wᵀ
        return out + F.linear(x, self.delta_matrix(layer).to(x.dtype))

    def delta_matrix(self, layer) -> torch.Tensor:
        return self.weight() - wide(as_matrix(layer, layer.weight))

    def delta_weight(self, layer):
        return as_matrix(layer, self.delta_matrix(layer)).detach()

    def merge_into(self, layer, weight):
        self.merged_delta = as_matrix(layer, wide(self.weight().detach()) - as_matrix(layer, weight))  # exact unmerge
        return weight + self.merged_delta

    def unmerge_from(self, layer, weight):
        return weight - self.merged_delta

    def transform_grad(self) -> torch.Tensor:
        """V's gradient as the optimiser uses it: exact (§3), or the released code's approximation (§9.2)."""
        grad = self.direction.grad
        if not self.config.exact_wn_grad and self.magnitude.grad is not None:
            V = self.direction.detach()
            norm = torch.linalg.norm(V, dim=1, keepdim=True)
            grad = grad + (self.magnitude.detach()[:, None] / norm) * self.magnitude.grad[:, None] * (V / norm)
        return grad


def gradnormlorp_adapters(model):
    for name, module in model.named_modules():
        if isinstance(module, GradNormLoRPAdapter) and module.direction.requires_grad:
            yield name, module


class GradNormLoRPStep(Callback):
    """Before optimizer.step (gradients clipped): the projected Adam step of §4 on every trainable V, at the lr
    and weight decay of V's optimizer group (so the loop's schedule applies); V's gradient is then cleared so the
    optimizer skips V and keeps no full-size moments for it."""

    def before_optimizer_step(self, state):
        groups = {id(p): grp for grp in state.optimizer.param_groups for p in grp["params"]} if state.optimizer else {}
        for _, adapter in gradnormlorp_adapters(state.model):
            V = adapter.direction
            if V.grad is None:
                continue
            group = groups.get(id(V), {"lr": 0.0, "weight_decay": 0.0})
            adapter.projected_adam.step(V.data, adapter.transform_grad(), group["lr"], group.get("weight_decay", 0.0))
            V.grad = None

    # Checkpoints: the projector and moments of each V, by adapter module name. A checkpoint is loaded before
    # on_train_begin, when the model is first seen, so loaded state waits there.
    def on_train_begin(self, state):
        self.model = state.model
        adapters = dict(gradnormlorp_adapters(state.model))
        for name, saved in getattr(self, "pending", {}).items():
            adapters[name].projected_adam.load_state_dict(saved)
        self.pending = {}

    def state_dict(self):
        model = getattr(self, "model", None)
        return {n: a.projected_adam.state_dict() for n, a in gradnormlorp_adapters(model)} if model else {}

    def load_state_dict(self, state):
        self.pending = state


register("gradnormlorp", GradNormLoRPConfig, GradNormLoRPAdapter,
         "GradNormLoRP: W = diag(g)·V/‖V‖_row, V trained by rank-r GaLore-projected Adam, merges to a dense weight")
