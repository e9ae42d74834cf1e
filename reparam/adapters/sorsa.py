"""SORSA (Cao, 2024, arXiv 2409.00055; specs/adapters/sorsa.md): train the top-r SVD part of W0 as three
tensors, freeze the residual, and keep the singular vectors orthonormal with a regulariser of its own step size.

    W0 = U diag(σ) Vᵀ,   W_r = W0 − s·U_p diag(S_p) V_pᵀ   (frozen; it becomes the layer's weight)
    y  = x W_rᵀ + b + s·((dropout(x) V_p) ⊙ S_p) U_pᵀ,      s = 1, or alpha / r when alpha is set
    L_orth = 1/(2n) Σ_k (‖V_pᵀ V_p − I‖_F + ‖U_pᵀ U_p − I‖_F)   (not squared; mean over the 2n tensors)

Tensors keep the reference code's names: sorsa_A = V_pᵀ (r × d_in), sorsa_S = S_p (r), sorsa_B = U_p (d_out × r).
Their initial values are kept too (buffers, saved), as PiSSA keeps its initial factors: the adapter loads onto
the original checkpoint, and exports to PEFT as a rank-2r LoRA on W0 (peft_lora_factors).
L_orth is reparam.regularizer(model), never part of forward or of the task loss: OrthonormalStep, which
reparam.training.train adds by itself, puts γ/η_base·∇L_orth into the gradients after clipping (§5).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..core.errors import ConfigError
from ..core.layers import LINEAR, ResidualAdapter, adapter_dtype, linear_dims, wide
from ..core.model import active_adapters, adapted_layers, get_record, regularizer
from ..core.registry import MethodConfig, register
from ..core.svd import svd_split
from ..training.callbacks import Callback
from .lora import as_matrix


@dataclass
class SorsaConfig(MethodConfig):
    r: int = 8
    alpha: float | None = None  # None: s = 1, as in every reference run; otherwise s = alpha / r
    dropout: float = 0.0
    gamma: float = 4e-4  # the regulariser's step size γ of the reference runs; 0 turns it off
    # §10: a backward wrapper that averages over micro-batches would make the multiplier γ/(η_base·grad_accum).
    divide_reg_by_accumulation: bool = False

    def __post_init__(self):
        def number(v):
            return isinstance(v, (int, float)) and not isinstance(v, bool)

        self.check(isinstance(self.r, int) and not isinstance(self.r, bool) and self.r > 0, "r",
                   "must be a positive integer")
        self.check(self.alpha is None or number(self.alpha) and self.alpha > 0, "alpha",
                   "must be > 0 or None (s = 1)")
        self.check(number(self.dropout) and 0.0 <= self.dropout < 1.0, "dropout", "must be in [0, 1)")
        self.check(number(self.gamma) and self.gamma >= 0, "gamma", "must be >= 0 (0 = no regulariser)")
        self.check(isinstance(self.divide_reg_by_accumulation, bool), "divide_reg_by_accumulation",
                   "must be true or false")

    @property
    def scale(self) -> float:
        return 1.0 if self.alpha is None else self.alpha / self.r


class SorsaAdapter(ResidualAdapter):
    supported_kinds = (LINEAR,)
    regularizer_reduction = "mean"  # L_orth is a mean over the adapted matrices

    @classmethod
    def training_callbacks(cls) -> list:
        return [OrthonormalStep()]

    def __init__(self, layer, config: SorsaConfig, init: bool = True):
        super().__init__(layer, config)
        d_in, d_out = linear_dims(layer)
        r = config.r
        if r > min(d_in, d_out):
            raise ConfigError(f"sorsa on {layer.reparam_name}: r={r} exceeds min(d_in, d_out)={min(d_in, d_out)}")
        self.scale = config.scale
        factory = dict(dtype=adapter_dtype(layer), device=layer.weight.device)
        self.sorsa_A = nn.Parameter(torch.zeros(r, d_in, **factory))  # V_pᵀ
        self.sorsa_S = nn.Parameter(torch.zeros(r, **factory))  # S_p
        self.sorsa_B = nn.Parameter(torch.zeros(d_out, r, **factory))  # U_p
        for name in ("sorsa_A", "sorsa_S", "sorsa_B"):  # the values at init: what was moved out of W0
            self.register_buffer(name + "0", torch.zeros_like(getattr(self, name)))
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else None
        if init:
            self.initialise(layer)

    @torch.no_grad()
    def initialise(self, layer):
        W0 = as_matrix(layer, layer.weight)
        U_r, S_r, Vh_r, W_res = svd_split(W0, self.config.r, "principal", self.sorsa_S.dtype)
        # Spec §4 recommended choice: S_p = σ_r / s, so that W_r is the true SVD residual also when s ≠ 1.
        for name, value in (("sorsa_A", Vh_r), ("sorsa_S", S_r / self.scale), ("sorsa_B", U_r)):
            getattr(self, name).copy_(value)
            getattr(self, name + "0").copy_(value)
        layer.weight.copy_(as_matrix(layer, W_res).to(layer.weight.dtype))

    def forward(self, layer, x, out):
        h = x.to(self.sorsa_A.dtype)
        if self.dropout is not None:
            h = self.dropout(h)
        # s·S_p goes on the r-wide intermediate (r multiplies per token, as LoRA's scale); in place, as LoRA adds.
        h = F.linear(h, self.sorsa_A) * (self.sorsa_S * self.scale)
        return out.add_(F.linear(h, self.sorsa_B).to(out.dtype))

    def principal(self, U, S, Vh) -> torch.Tensor:
        """s·U diag(S) Vh in float32 (float64 on a float64 model), d_out × d_in."""
        return self.scale * (wide(U) * wide(S)) @ wide(Vh)

    def delta_weight(self, layer):
        """s·U_p diag(S_p) V_pᵀ: what merging adds to W_r (§7)."""
        return as_matrix(layer, self.principal(self.sorsa_B, self.sorsa_S, self.sorsa_A))

    def initial_part(self, layer):
        return as_matrix(layer, self.principal(self.sorsa_B0, self.sorsa_S0, self.sorsa_A0))

    def regularizer(self, layer):
        """(‖V_pᵀ V_p − I‖_F + ‖U_pᵀ U_p − I‖_F) / 2, averaged over the matrices (§5)."""
        A, B = self.sorsa_A, self.sorsa_B
        eye = torch.eye(A.shape[0], dtype=A.dtype, device=A.device)
        return (torch.linalg.matrix_norm(A @ A.T - eye) + torch.linalg.matrix_norm(B.T @ B - eye)) / 2

    @torch.no_grad()
    def peft_lora_factors(self, layer):
        """The update on the original W0, scale 1, rank 2r: W_r + s·U S Vᵀ − W0 = s·(U S Vᵀ − U_0 S_0 V_0ᵀ)
        = [s·U ⊙ S, s·U_0 ⊙ S_0] [Vᵀ; −V_0ᵀ]."""
        B = self.scale * torch.cat([wide(self.sorsa_B) * wide(self.sorsa_S),
                                    wide(self.sorsa_B0) * wide(self.sorsa_S0)], 1)
        A = torch.cat([wide(self.sorsa_A), -wide(self.sorsa_A0)], 0)
        return A.contiguous(), B.contiguous()


def accumulation_steps(train_config) -> int:
    """Micro-batches per optimizer step of reparam's TrainConfig (grad_accum) or HF's TrainingArguments."""
    for field in ("grad_accum", "gradient_accumulation_steps"):
        if getattr(train_config, field, None):
            return int(getattr(train_config, field))
    return 1


class OrthonormalStep(Callback):
    """SORSA §5, once per optimizer step, after clipping and before optimizer.step: for U_p and V_pᵀ of every
    active SORSA adapter with γ > 0, grad += γ/η_base · ∇L_orth. η_base is the peak lr of the parameter's group
    (peak_lr if given, else the scheduler's max_lr / initial_lr, else lr), read every step; with plain SGD the
    regulariser then steps by γ·η_t/η_base whatever the task gradient and its clipping do."""

    def __init__(self, peak_lr: float | None = None):
        self.peak_lr = peak_lr

    def on_train_begin(self, state):
        from ..training.delta_reg import AdamR  # decays toward the start values, not toward 0

        if isinstance(state.optimizer, AdamR):
            return
        decayed = {id(p) for g in state.optimizer.param_groups if g.get("weight_decay") for p in g["params"]}
        for pname, p in state.model.named_parameters():
            if ".sorsa_" in pname and id(p) in decayed:
                warnings.warn(f"sorsa: the optimizer weight-decays {pname}; the adapter holds the principal part "
                              f"of the pretrained weight, and decay erases it (spec §10: use weight_decay=0)")
                return

    def before_optimizer_step(self, state):
        model, accumulation = state.model, accumulation_steps(state.config)
        peak = {id(p): self.peak_lr or g.get("max_lr") or g.get("initial_lr") or g["lr"]
                for g in state.optimizer.param_groups for p in g["params"]}
        for name in active_adapters(model):
            cfg = get_record(model, name).config
            if not isinstance(cfg, SorsaConfig) or cfg.gamma == 0:
                continue
            params = [p for _, layer in adapted_layers(model) if name in layer.adapters
                      for p in (layer.adapters[name].sorsa_A, layer.adapters[name].sorsa_B)
                      if p.requires_grad and id(p) in peak]
            if not params:
                continue
            grads = torch.autograd.grad(regularizer(model, name), params)
            for p, g in zip(params, grads):
                if not peak[id(p)] > 0:
                    raise ConfigError(f"sorsa: gamma/η_base needs a learning rate > 0, the optimizer has "
                                      f"{peak[id(p)]}")
                factor = cfg.gamma / peak[id(p)] / (accumulation if cfg.divide_reg_by_accumulation else 1)
                if p.grad is None:
                    p.grad = g * factor
                else:
                    p.grad.add_(g, alpha=factor)


register("sorsa", SorsaConfig, SorsaAdapter,
         "SORSA: trainable top-r SVD part U_p diag(S_p) V_pᵀ of W0, residual frozen, orthonormality regulariser")
