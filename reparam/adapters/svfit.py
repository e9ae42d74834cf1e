"""SVFit (Sun et al., 2024, arXiv 2409.05926; specs/adapters/svfit.md): train only the top-r singular values.

    W0 = U diag(σ) Vᵀ,   W_e = W0 − U_r diag(σ_r) V_rᵀ   (frozen; it becomes the layer's weight)
    y  = x W_eᵀ + b + ((x V_r) ⊙ σ̂) U_rᵀ,   ΔW on W0 = U_r diag(σ̂ − σ_r) V_rᵀ,   σ̂ = σ_r at init

U_r, V_rᵀ and σ_r are buffers saved with the adapter (as PiSSA keeps its initial factors): it loads onto the
original checkpoint without a new SVD. They cost r(d_in + d_out) values per matrix, more than W0 itself at full
rank; save_basis=False saves σ̂ alone and redoes the (deterministic up to round-off) SVD of W0 at load. Export to
PEFT: the rank-r LoRA B = U_r, A = diag(σ̂ − σ_r) V_rᵀ at scale 1 on W0. σ̂ is 1-D, so reparam's training loop
never weight-decays it (spec §8, §10).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..core.errors import ConfigError, ReparamError
from ..core.layers import LINEAR, ResidualAdapter, adapter_dtype, wide
from ..core.registry import MethodConfig, register
from ..core.svd import svd, svd_split
from .lora import as_matrix, output_with_delta

RANK_MODES = ("fixed", "energy")
PARAMETERIZATIONS = ("additive", "multiplicative")


@dataclass
class SvfitConfig(MethodConfig):
    # top singular values trained per matrix; None = all, min(d_in, d_out). With rank_mode="energy": a cap.
    r: int | None = None
    # Not found in the paper; recommended choice (spec §5): "energy" = smallest r keeping `energy` of Σσ².
    rank_mode: str = "fixed"
    energy: float = 0.99
    # Not from the paper; spec §4 option: "multiplicative" trains δ with σ̂ = σ_r ⊙ (1 + δ), a scale-free lr.
    parameterization: str = "additive"
    # False: the file holds σ̂ only (r values per matrix) and load_adapter recomputes U_r, V_r from W0.
    save_basis: bool = True
    # r chosen per module by rank_mode="energy": filled in by adapt (the per-matrix log of §5) and saved,
    # so that load_adapter rebuilds the same shapes without an SVD. Not an input.
    ranks: dict = field(default_factory=dict)

    def __post_init__(self):
        self.check(self.r is None or isinstance(self.r, int) and not isinstance(self.r, bool) and self.r > 0,
                   "r", "must be a positive integer or None (all singular values)")
        self.check(self.rank_mode in RANK_MODES, "rank_mode", f"must be one of {', '.join(RANK_MODES)}")
        self.check(isinstance(self.energy, (int, float)) and 0.0 < self.energy <= 1.0, "energy", "must be in (0, 1]")
        self.check(self.parameterization in PARAMETERIZATIONS, "parameterization",
                   f"must be one of {', '.join(PARAMETERIZATIONS)}")
        self.check(isinstance(self.save_basis, bool), "save_basis", "must be true or false")
        self.check(isinstance(self.ranks, dict) and all(isinstance(v, int) and v > 0 for v in self.ranks.values()),
                   "ranks", "must map module names to positive integers")
        self.check(self.rank_mode == "energy" or not self.ranks, "ranks",
                   "is filled in by rank_mode='energy'; with rank_mode='fixed' set r instead")


def energy_rank(sigma: torch.Tensor, energy: float) -> int:
    """Smallest r with Σ_{i≤r} σ_i² / Σ_i σ_i² ≥ energy (σ sorted descending; ratios in float64)."""
    cumulative = sigma.double().square().cumsum(0)
    ratios = cumulative / cumulative[-1]
    return min(int(torch.searchsorted(ratios, torch.tensor([energy], dtype=ratios.dtype))[0]) + 1, len(sigma))


class SvfitAdapter(ResidualAdapter):
    supported_kinds = (LINEAR,)

    def __init__(self, layer, config: SvfitConfig, init: bool = True):
        super().__init__(layer, config)
        W = as_matrix(layer, layer.weight)  # one tensor object, so rank choice and split share one cached SVD
        dtype = adapter_dtype(layer)
        r = self.choose_rank(layer.reparam_name, W, dtype, init)
        factory, saved = dict(dtype=dtype, device=layer.weight.device), config.save_basis
        self.register_buffer("left_vectors", torch.zeros(W.shape[0], r, **factory), persistent=saved)  # U_r
        self.register_buffer("right_vectors", torch.zeros(r, W.shape[1], **factory), persistent=saved)  # V_rᵀ
        self.register_buffer("sigma0", torch.zeros(r, **factory), persistent=saved)  # σ_r, pretrained values
        self.multiplicative = config.parameterization == "multiplicative"
        if self.multiplicative:
            self.sigma_gain = nn.Parameter(torch.zeros(r, **factory))  # δ
        else:
            self.sigma = nn.Parameter(torch.zeros(r, **factory))  # σ̂
        # Per token the factored path costs ~3·r·(d_in + d_out) extra multiply-adds (forward and backward), the dense
        # one (W_e + U_r diag(σ̂) V_rᵀ formed once per step, one matmul) ~d_in·d_out for the weight gradient σ̂
        # needs: at SVFit's usual full rank the dense path does half the work. Same values either way (tested).
        self.computes_layer_output = 3 * r * sum(W.shape) > W.numel()
        if init:
            self.split(layer, W)
            if not self.multiplicative:
                with torch.no_grad():
                    self.sigma.copy_(self.sigma0)  # σ̂ = σ_r: training starts from the pretrained model (§4)

    def choose_rank(self, name: str, W: torch.Tensor, dtype, init: bool) -> int:
        cfg, full = self.config, min(W.shape)
        if cfg.rank_mode == "fixed":
            if cfg.r is not None and cfg.r > full:
                raise ConfigError(f"svfit on {name}: r={cfg.r} exceeds min(d_in, d_out)={full}")
            return cfg.r or full
        if not init:
            if name not in cfg.ranks:
                raise ConfigError(f"svfit on {name}: rank_mode='energy' but ranks has no entry for this module "
                                  f"(ranks are filled in when the adapter is first created)")
            return cfg.ranks[name]
        sigma = svd(W, dtype)[1]
        if not sigma[0] > 0:
            raise ReparamError(f"svfit on {name}: the weight is zero, it has no singular values to fit")
        cfg.ranks[name] = min(energy_rank(sigma, cfg.energy), cfg.r or full)
        return cfg.ranks[name]

    @torch.no_grad()
    def split(self, layer, W):
        """U_r, σ_r, V_rᵀ of W0 into the buffers; the residual W_e becomes the layer's weight."""
        U_r, S_r, Vh_r, W_e = svd_split(W, len(self.sigma0), "principal", self.sigma0.dtype)
        self.left_vectors.copy_(U_r)
        self.right_vectors.copy_(Vh_r)
        self.sigma0.copy_(S_r)
        layer.weight.copy_(as_matrix(layer, W_e).to(layer.weight.dtype))

    def sigma_hat(self) -> torch.Tensor:
        return self.sigma0 * (1 + self.sigma_gain) if self.multiplicative else self.sigma

    def forward(self, layer, x, out):
        # r multiplies per token on the r-wide intermediate; in place into the base output, as LoRA does.
        h = F.linear(x.to(self.sigma0.dtype), self.right_vectors) * self.sigma_hat()
        return out.add_(F.linear(h, self.left_vectors).to(out.dtype))

    def layer_output(self, layer, x):
        return output_with_delta(layer, x, self.singular_part(self.sigma_hat()))

    def singular_part(self, sigma: torch.Tensor) -> torch.Tensor:
        """U_r diag(sigma) V_rᵀ in float32 (or float64), d_out x d_in."""
        return (wide(self.left_vectors) * wide(sigma)) @ wide(self.right_vectors)

    def delta_weight(self, layer):
        """U_r diag(σ̂) V_rᵀ: what merging adds to the layer's weight W_e (§7)."""
        return as_matrix(layer, self.singular_part(self.sigma_hat()))

    def initial_part(self, layer):
        """U_r diag(σ_r) V_rᵀ: what the SVD moved out of W0."""
        return as_matrix(layer, self.singular_part(self.sigma0))

    @torch.no_grad()
    def peft_lora_factors(self, layer):
        """ΔW on the original W0 as LoRA factors at scale 1: B = U_r, A = diag(σ̂ − σ_r) V_rᵀ."""
        A = (wide(self.sigma_hat()) - wide(self.sigma0))[:, None] * wide(self.right_vectors)
        return A.contiguous(), wide(self.left_vectors).contiguous()

    def restore(self, layer):
        """Loaded onto the original W0: rebuild W_e from the saved U_r, σ_r, V_rᵀ, or from a new SVD of W0
        (joint sign flips of u_i, v_i leave U_r diag(σ̂) V_rᵀ unchanged)."""
        if self.config.save_basis:
            super().restore(layer)
        else:
            self.split(layer, as_matrix(layer, layer.weight))


register("svfit", SvfitConfig, SvfitAdapter, "SVFit: only the top-r singular values of W0 train; U, V, residual frozen")
