"""AdaLoRA (Zhang et al., ICLR 2023; specs/adapters/adalora.md): an SVD-form update under a global rank budget.

    y = x W0ᵀ + b + s · (dropout(x) (Q ⊙ λ)ᵀ) Pᵀ,   ΔW = s · P diag(λ) Q,   s = α' / (r + 1e-5)   (§2)

Q (lora_A, k×d_in), λ (lora_E, k×1), P (lora_B, d_out×k) hold the k triplets still stored (k = r at the start);
λ = 0 and P, Q ~ N(0, 0.02²) at init (§4). r in the scale is the initial rank and never changes, so removing
triplets leaves the function unchanged (§8). AdaLoraAllocator, which the training loop runs by itself, scores
the triplets (§6), zeroes the λ of the least important to follow the cubic budget b(t) (§7) and, with
prune="final", removes them physically once the pattern is final at t = T − t_f (config.rank_pattern records
which of the r initial triplets each module still stores). PEFT export: the LoRA A = Q, B = s·P diag(λ) at scale 1.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..core.errors import ConfigError
from ..core.layers import CONV, LINEAR, Adapter, adapter_dtype, layer_kind, linear_dims, wide
from ..core.registry import MethodConfig, register
from ..core.resize import resize_rows
from ..training.allocators import RankAllocator
from .lora import as_matrix, check_conv, conv_update

PRUNE_MODES = ("final", "every", "end")
ORTH_FORMS = ("mean_fro", "sum_fro_sq")
TRIPLET_DIM = {"lora_A": 0, "lora_E": 0, "lora_B": 1}  # the axis that indexes triplets in Q, λ, P


@dataclass
class AdaLoraConfig(MethodConfig):
    r: int = 12  # init_r: triplets per matrix at the start
    target_r: int | None = None  # average final rank, bT = target_r · n; None: 2r/3 (b0 = 1.5·bT, §7; 8 for r = 12)
    target_total_rank: int | None = None  # ... or bT itself
    alpha: float = 8.0  # α' = alpha if alpha > 0 else r
    dropout: float = 0.0
    tinit: int = 0  # t_i: warm-up steps without masking
    tfinal: int = 0  # t_f: final steps with the pattern fixed
    deltaT: int = 1  # steps between maskings
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.1  # γ; spec §5 recommends 0.1 for NLU (PEFT's default is 0.5)
    orth_form: str = "mean_fro"  # the code's (1/2n)Σ(‖QQᵀ−I‖+‖PᵀP−I‖); "sum_fro_sq": the paper's Eq. 4 (§5)
    total_step: int | None = None  # T; None: the number of optimizer steps of the training run
    # "final": mask while budgeting (masked triplets can come back, §7), remove at t = T − t_f; "every": remove at
    # each masking (smaller sooner, no re-activation); "end": mask throughout as PEFT does, remove when training ends.
    prune: str = "final"
    exact_budget: bool = False  # spec §11 option: break ties at the threshold by index, so b(t) is met exactly
    rank_pattern: dict = field(default_factory=dict)  # set by the allocator: module -> r booleans, True = stored

    def __post_init__(self):
        def integer(name, low):
            value = getattr(self, name)
            self.check(isinstance(value, int) and not isinstance(value, bool) and value >= low, name,
                       f"must be an integer >= {low}")
        integer("r", 1), integer("tinit", 0), integer("tfinal", 0), integer("deltaT", 1)
        if self.target_r is not None:
            integer("target_r", 0)
            self.check(self.target_r <= self.r, "target_r", f"must not exceed the initial rank r={self.r}")
        total = self.target_total_rank
        self.check(total is None or isinstance(total, int) and total >= 0, "target_total_rank",
                   "must be None or an integer >= 0")
        self.check(0.0 <= self.dropout < 1.0, "dropout", "must be in [0, 1)")
        self.check(0.0 < self.beta1 < 1.0, "beta1", "must be in (0, 1)")
        self.check(0.0 < self.beta2 < 1.0, "beta2", "must be in (0, 1)")
        self.check(self.orth_reg_weight >= 0, "orth_reg_weight", "must be >= 0")
        self.check(self.orth_form in ORTH_FORMS, "orth_form", f"must be one of {', '.join(ORTH_FORMS)}")
        self.check(self.prune in PRUNE_MODES, "prune", f"must be one of {', '.join(PRUNE_MODES)}")
        phases = self.tinit + self.tfinal
        self.check(self.total_step is None or isinstance(self.total_step, int) and self.total_step > phases,
                   "total_step", f"must be None or an integer > tinit + tfinal = {phases} (§9)")
        self.check(all(isinstance(v, list) and len(v) == self.r for v in self.rank_pattern.values()),
                   "rank_pattern", f"must map module names to lists of r={self.r} booleans")


def budget(t: int, b0: int, bT: int, tinit: int, tfinal: int, total: int) -> int:
    """b(t) of §7: b0 until t_i, a cubic decay to bT at T − t_f, then bT."""
    if t <= tinit:
        return b0
    if t > total - tfinal:
        return bT
    remaining = 1 - (t - tinit) / (total - tfinal - tinit)
    return math.floor((b0 - bT) * remaining ** 3 + bT)


class AdaLoraAdapter(Adapter):
    supported_kinds = (LINEAR, CONV)

    def __init__(self, layer, config: AdaLoraConfig, init: bool = True):
        super().__init__(layer, config)
        self.conv = layer_kind(layer) == CONV
        if self.conv:  # §2, PEFT's Conv2d variant: Q is r x (C_in·k...), ΔW reshaped to the kernel
            check_conv(layer, "adalora")
            d_in, d_out = layer.in_channels * math.prod(layer.kernel_size), layer.out_channels
        else:
            d_in, d_out = linear_dims(layer)
        pattern = config.rank_pattern.get(layer.reparam_name)
        k = config.r if pattern is None else sum(map(bool, pattern))
        self.scale = (config.alpha if config.alpha > 0 else config.r) / (config.r + 1e-5)
        factory = dict(dtype=adapter_dtype(layer), device=layer.weight.device)
        self.lora_A = nn.Parameter(torch.zeros(k, d_in, **factory))  # Q
        self.lora_E = nn.Parameter(torch.zeros(k, 1, **factory))  # λ
        self.lora_B = nn.Parameter(torch.zeros(d_out, k, **factory))  # P
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else None
        self.regularizer_reduction = "mean" if config.orth_form == "mean_fro" else "sum"
        if init:
            nn.init.normal_(self.lora_A, std=0.02)
            nn.init.normal_(self.lora_B, std=0.02)

    def forward(self, layer, x, out):
        h = x.to(self.lora_A.dtype)
        if self.dropout is not None:
            h = self.dropout(h)
        if self.conv:
            A, B = self.conv_factors(layer, self.lora_A * self.lora_E, self.lora_B)
            return out.add_(conv_update(layer, h, A, B, self.scale).to(out.dtype))
        h = F.linear(h, self.lora_A * self.lora_E) * self.scale  # the scale on the k-wide intermediate
        return out.add_(F.linear(h, self.lora_B).to(out.dtype))  # in place, as LoRA (the base output is not saved)

    @staticmethod
    def conv_factors(layer, A, B):
        """Matrix factors (k x C_in·k..., C_out x k) as LoRA's conv kernels: A k-channel, B a 1x1 convolution."""
        k = len(layer.kernel_size)
        return A.reshape(-1, layer.in_channels, *layer.kernel_size), B.reshape(*B.shape, *(1,) * k)

    def delta_weight(self, layer):
        delta = self.scale * (wide(self.lora_B) @ (wide(self.lora_A) * wide(self.lora_E)))
        return delta.reshape(layer.weight.shape) if self.conv else as_matrix(layer, delta)

    def regularizer(self, layer):
        Q, P, gamma = self.lora_A, self.lora_B, self.config.orth_reg_weight
        eye = torch.eye(Q.shape[0], dtype=Q.dtype, device=Q.device)
        gram_Q, gram_P = Q @ Q.T - eye, P.T @ P - eye
        if self.config.orth_form == "mean_fro":  # averaged over the matrices by regularizer_reduction
            return gamma * (torch.linalg.norm(gram_Q) + torch.linalg.norm(gram_P)) / 2
        return gamma * (gram_Q.square().sum() + gram_P.square().sum())

    def keep_triplets(self, index, optimizer=None) -> None:
        """Keep only the stored triplets `index`, with their gradients and optimizer state."""
        for name, dim in TRIPLET_DIM.items():
            resize_rows(getattr(self, name), dim, index, optimizer=optimizer)

    def peft_lora_factors(self, layer):
        """ΔW as LoRA factors at scale 1: A = Q, B = s·P diag(λ), without the triplets whose λ is 0."""
        lam = wide(self.lora_E.detach()).reshape(-1)
        live = lam != 0
        A, B = wide(self.lora_A.detach())[live], self.scale * wide(self.lora_B.detach())[:, live] * lam[live]
        if A.shape[0] == 0:  # PEFT needs r >= 1: a zero rank-1 LoRA
            A, B = A.new_zeros(1, A.shape[1]), B.new_zeros(B.shape[0], 1)
        if self.conv:  # PEFT's conv LoRA has the same kernel shapes
            A, B = self.conv_factors(layer, A, B)
        return A.contiguous(), B.contiguous()


class AdaLoraAllocator(RankAllocator):
    """The budget allocation of §6–7, run after optimizer.step with the step's gradients in .grad (the loop's
    after_optimizer_step), t = the 0-based index of the step. Also adds γ·∇L_orth to the gradients of P and Q
    after backward, once per optimizer step (§11), unless the loop already adds reparam.regularizer to the loss
    (TrainConfig.regularizer_weight; a hand-written loop adds it to its loss and calls step(t, optimizer)). Under
    DistributedDataParallel triplets are only masked, and removed when training ends (DDP's buckets cannot resize)."""

    def __init__(self, model, adapter_name: str = "default", optimizer=None):
        super().__init__(model, adapter_name, optimizer)
        if not isinstance(self.config, AdaLoraConfig):
            raise ConfigError(f"adapter {adapter_name!r} is a {self.config.method} adapter, not adalora")
        self.prune = self.config.prune
        self.scores: dict[str, dict[str, tuple]] = {}  # module -> param -> (Ī, Ū), float32; none yet = zeros
        self.active = {m: torch.ones(a.lora_E.shape[0], dtype=torch.bool) for m, a in self.adapters().items()}
        self.final = False  # the pattern of t = T − t_f is fixed

    def budgets(self) -> tuple[int, int]:
        """(b0, bT): Σ init_r and the final budget."""
        cfg, n = self.config, len(self.layers)
        target_r = max(1, 2 * cfg.r // 3) if cfg.target_r is None else cfg.target_r
        b0, bT = cfg.r * n, target_r * n if cfg.target_total_rank is None else cfg.target_total_rank
        if bT > b0:
            raise ConfigError(f"adalora: target_total_rank={bT} exceeds the initial budget r·n = {b0}")
        return b0, bT

    def set_total_step(self, total_steps):
        super().set_total_step(total_steps)
        cfg = self.config
        if not cfg.tinit < total_steps - cfg.tfinal:
            raise ConfigError(f"adalora: tinit={cfg.tinit} and tfinal={cfg.tfinal} leave no budgeting phase in "
                              f"{total_steps} steps (need tinit < T − tfinal)")

    def on_train_begin(self, state):
        super().on_train_begin(state)
        if state.world_size > 1:
            self.prune = "end"

    def after_backward(self, state):
        if self.config.orth_reg_weight:
            self.add_regularizer_gradient(state)

    def allocate(self, t, optimizer=None):
        cfg = self.config
        b0, bT = self.budgets()
        if t < self.total_steps - cfg.tfinal:
            self.update_scores()
            if cfg.tinit < t and t % cfg.deltaT == 0:
                self.mask_to_budget(budget(t, b0, bT, cfg.tinit, cfg.tfinal, self.total_steps), optimizer)
        elif not self.final:  # t = T − t_f: the final allocation, forced
            self.mask_to_budget(bT, optimizer)
            self.final, self.scores = True, {}
            if self.prune == "final":
                self.remove_masked(optimizer)
        else:  # prune="end": the stored pattern, every step
            self.apply_mask()

    @torch.no_grad()
    def update_scores(self):
        b1, b2 = self.config.beta1, self.config.beta2
        for m, adapter in self.adapters().items():
            ema = self.scores.setdefault(m, {})
            for name in TRIPLET_DIM:
                p = getattr(adapter, name)
                sensitivity = (p.detach().float() * (p.grad.float() if p.grad is not None else 0.0)).abs()
                i_bar, u_bar = ema.get(name, (torch.zeros_like(sensitivity),) * 2)
                i_bar = b1 * i_bar + (1 - b1) * sensitivity
                ema[name] = (i_bar, b2 * u_bar + (1 - b2) * (sensitivity - i_bar).abs())

    def triplet_scores(self, m) -> torch.Tensor:
        """S_{k,i} = s(λ_i) + mean_j s(P_ji) + mean_j s(Q_ij), s = Ī·Ū (§6)."""
        adapter, ema = self.adapters()[m], self.scores.get(m, {})
        s = {name: ema[name][0] * ema[name][1] if name in ema
             else torch.zeros_like(getattr(adapter, name), dtype=torch.float32) for name in TRIPLET_DIM}
        return s["lora_E"].reshape(-1) + (s["lora_A"].mean(dim=1) + s["lora_B"].mean(dim=0))

    @torch.no_grad()
    def mask_to_budget(self, b, optimizer=None):
        modules = list(self.layers)
        scores = torch.cat([self.triplet_scores(m) for m in modules])
        k = len(scores) - b
        if k <= 0:  # within budget (kthvalue needs k >= 1, §11)
            return
        if self.config.exact_budget:
            masked = torch.zeros_like(scores, dtype=torch.bool)
            masked[torch.argsort(scores, stable=True)[:k]] = True
        else:  # ties with the threshold are masked too (§7, §11)
            masked = scores <= torch.kthvalue(scores, k).values
        for m, masked_m in zip(modules, masked.split([len(self.active[m]) for m in modules])):
            self.active[m] = ~masked_m.cpu()
        self.apply_mask()
        if self.prune == "every":
            self.remove_masked(optimizer)

    @torch.no_grad()
    def apply_mask(self):
        for m, adapter in self.adapters().items():
            if not self.active[m].all():
                adapter.lora_E[~self.active[m].to(adapter.lora_E.device)] = 0.0

    def stored(self, m) -> list[int]:
        """The indices, among the r initial triplets, of those module m still stores."""
        pattern = self.config.rank_pattern.get(m)
        return list(range(self.config.r)) if pattern is None else [i for i, keep in enumerate(pattern) if keep]

    def remove_masked(self, optimizer=None):
        pattern = dict(self.config.rank_pattern)
        for m, adapter in self.adapters().items():
            if self.active[m].all():
                continue
            keep, stored = self.active[m].nonzero().reshape(-1), self.stored(m)
            kept = {stored[i] for i in keep.tolist()}
            adapter.keep_triplets(keep, optimizer)
            pattern[m] = [i in kept for i in range(self.config.r)]
            if m in self.scores:
                self.scores[m] = {name: tuple(x.index_select(TRIPLET_DIM[name], keep.to(x.device)) for x in ema)
                                  for name, ema in self.scores[m].items()}
            self.active[m] = torch.ones(len(keep), dtype=torch.bool)
        self.set_rank_pattern(pattern)

    def on_train_end(self, state):
        if not self.final and state.global_step >= self.total_steps:
            # t_f = 0 puts t = T − t_f after the last step (indices run 0..T−1), so the final allocation happens
            # here; otherwise the adapter would end training still storing (masked) triplets beyond the budget.
            self.mask_to_budget(self.budgets()[1], state.optimizer)
            self.final, self.scores = True, {}
            if self.prune == "final":
                self.remove_masked(state.optimizer)
        if self.final and self.prune == "end":
            self.remove_masked(state.optimizer)

    def ranks(self):
        return {m: int(active.sum()) for m, active in self.active.items()}

    def resize_to(self, rank_pattern, optimizer=None):
        for m, adapter in self.adapters().items():
            current = self.stored(m)
            target = [i for i, keep in enumerate(rank_pattern.get(m, [True] * self.config.r)) if keep]
            if not set(target) <= set(current):
                raise ConfigError(f"adalora: module {m} no longer stores triplets {sorted(set(target) - set(current))} "
                                  f"of the saved rank pattern")
            adapter.keep_triplets([current.index(i) for i in target], optimizer)
            self.active[m] = torch.ones(len(target), dtype=torch.bool)
        self.set_rank_pattern(dict(rank_pattern))

    def extra_state(self):
        return {"scores": {m: {k: list(v) for k, v in ema.items()} for m, ema in self.scores.items()},
                "active": dict(self.active), "final": self.final}

    def load_extra_state(self, state):
        self.scores = {m: {k: tuple(v) for k, v in ema.items()} for m, ema in state["scores"].items()}
        self.active, self.final = dict(state["active"]), state["final"]


AdaLoraAdapter.rank_allocator = AdaLoraAllocator
register("adalora", AdaLoraConfig, AdaLoraAdapter,
         "AdaLoRA: ΔW = s·P diag(λ) Q, triplets pruned to a global budget by importance")
