"""TriAdaptLoRA (Liang et al. 2025; specs/adapters/triadaptlora.md): a B C A update whose rank GROWS.

    ΔW = s · B C A,   C = L + U,   s = α' / (r + 1e-5), r the CURRENT rank,   y = x W0ᵀ + b + dropout(x) ΔWᵀ  (§2)

A, B and the core strips are nn.ParameterLists with one entry per growth block j (sizes a_1 = init_rank, then
a = incre_rank_num): A_j (a_j × d_in), B_j (d_out × a_j), the row strip Row_j (a_j × c_j) and the column strip
Col_j (c_j × a_j), c_j the cumulative rank. L stacks the zero-padded row strips (block-lower-triangular), U the
column strips (block-upper-triangular), so growing appends strips and never touches existing entries. Each
growth creates new parameters in a new optimizer group, with fresh state (§3). TriAdaptAllocator, which the
training loop runs by itself before optimizer.step, scores modules by the increase of ‖C‖_F / m (§6) and grows
the top k, k from a linear / non-linear / fixed threshold (§7). config.rank_pattern holds each module's rank
(the block sizes follow from it), so load_adapter rebuilds the shapes. PEFT export: A = cat A_j, B = s·B C.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..core.errors import ConfigError
from ..core.layers import LINEAR, Adapter, adapter_dtype, factory_like, linear_dims, wide
from ..core.registry import MethodConfig, register
from ..training.allocators import RankAllocator, extend_scheduler_groups
from .lora import as_matrix

GROWTH_MODES = ("linear", "non-linear", "fixed")
INIT_MODES = ("recommended", "reference_zero")
NORMS = ("blocks", "rank", "sqrt_numel")
BLOCK_LISTS = ("lora_A", "lora_B", "lora_row", "lora_col")


@dataclass
class TriAdaptLoraConfig(MethodConfig):
    init_rank: int = 1
    reference_rank: int = 8  # average target rank: target_total = reference_rank · n ...
    target_total_rank: int | None = None  # ... or the total itself
    incre_rank_num: int | None = None  # a, ranks per growth; None: reference_rank / 2
    alpha: float = 16.0  # α' = alpha if alpha > 0 else init_rank; §9 recommends 16–32 (reference default not found)
    dropout: float = 0.0
    init_warmup: int = 0  # t_warm
    incre_interval: int = 1
    rank_growth_model: str = "linear"  # "linear" | "non-linear" | "fixed" (k = top_k, §7)
    top_k: int = 1
    orth_reg_weight: float = 0.5  # γ
    weight_decay: float = 0.0  # of the parameter groups added by growth
    total_step: int | None = None  # T; None: the number of optimizer steps of the training run
    init_mode: str = "recommended"  # §4: A, B ~ N(0, 0.02²), strips 0; "reference_zero" reproduces the dead zone
    norm_by: str = "blocks"  # §6 normaliser of ‖C‖_F: block count m (default), rank r, or √numel(C) (= r, C square)
    rescale_on_growth: bool = False  # §11 option: multiply existing strips by r_new/r_old so ΔW is unchanged
    clamp_budget: bool = True  # §11 recommendation: grow in descending score order, stop at the budget
    rank_pattern: dict = field(default_factory=dict)  # set by the allocator: module -> rank r

    def __post_init__(self):
        for name, low in (("init_rank", 1), ("reference_rank", 1), ("init_warmup", 0), ("incre_interval", 1),
                          ("top_k", 1)):
            value = getattr(self, name)
            self.check(isinstance(value, int) and not isinstance(value, bool) and value >= low, name,
                       f"must be an integer >= {low}")
        if self.incre_rank_num is None:
            self.check(self.reference_rank % 2 == 0, "reference_rank", "must be even unless incre_rank_num is set")
        else:
            self.check(isinstance(self.incre_rank_num, int) and self.incre_rank_num >= 1, "incre_rank_num",
                       "must be None or an integer >= 1")
        total = self.target_total_rank
        self.check(total is None or isinstance(total, int) and total >= 0, "target_total_rank",
                   "must be None or an integer >= 0")
        self.check(0.0 <= self.dropout < 1.0, "dropout", "must be in [0, 1)")
        self.check(self.orth_reg_weight >= 0, "orth_reg_weight", "must be >= 0")
        self.check(self.rank_growth_model in GROWTH_MODES, "rank_growth_model",
                   f"must be one of {', '.join(GROWTH_MODES)}")
        self.check(self.init_mode in INIT_MODES, "init_mode", f"must be one of {', '.join(INIT_MODES)}")
        self.check(self.norm_by in NORMS, "norm_by", f"must be one of {', '.join(NORMS)}")
        self.check(self.total_step is None or isinstance(self.total_step, int) and self.total_step > self.init_warmup,
                   "total_step", f"must be None or an integer > init_warmup = {self.init_warmup}")
        self.check(all(self.block_sizes(v) is not None for v in self.rank_pattern.values()), "rank_pattern",
                   f"must map module names to ranks init_rank + j·{self.growth}, j >= 0")

    @property
    def growth(self) -> int:
        return self.incre_rank_num or self.reference_rank // 2

    def block_sizes(self, rank) -> list[int] | None:
        """(a_1, ..., a_m) of a module of rank `rank`: init_rank, then blocks of `growth`; None if none fits."""
        extra = rank - self.init_rank if isinstance(rank, int) and not isinstance(rank, bool) else -1
        if extra < 0 or extra % self.growth:
            return None
        return [self.init_rank] + [self.growth] * (extra // self.growth)


def threshold_count(mode: str, remaining: int, rho: float, top_k: int, n: int) -> int:
    """k of §7: how many modules grow, clamped to [1, n]; the 1e-9 keeps exp(ln 60) = 59.999… at 60 (§11)."""
    if mode == "linear":
        k = math.floor(remaining * rho + 1e-9)
    elif mode == "non-linear":
        k = math.floor(math.exp(rho * math.log(remaining)) + 1e-9)
    else:
        k = top_k
    return min(max(k, 1), n)


class TriAdaptLoraAdapter(Adapter):
    supported_kinds = (LINEAR,)
    regularizer_reduction = "mean"  # L_orth = (1/2n) Σ_modules (...) (§5)

    def __init__(self, layer, config: TriAdaptLoraConfig, init: bool = True):
        super().__init__(layer, config)
        self.d_in, self.d_out = linear_dims(layer)
        self._factory = dict(dtype=adapter_dtype(layer), device=layer.weight.device)
        for name in BLOCK_LISTS:
            setattr(self, name, nn.ParameterList())
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else None
        sizes = config.block_sizes(config.rank_pattern.get(layer.reparam_name, config.init_rank))
        for j, a in enumerate(sizes):
            # reference init (§4): only the first A is random, everything else zero
            self.add_block(a, random_A=init and (config.init_mode == "recommended" or j == 0),
                           random_B=init and config.init_mode == "recommended")

    @property
    def factory(self) -> dict:
        return factory_like(self.lora_A, self._factory)

    @property
    def rank(self) -> int:
        return sum(A.shape[0] for A in self.lora_A)

    @property
    def scale(self) -> float:
        alpha = self.config.alpha if self.config.alpha > 0 else self.config.init_rank
        return alpha / (self.rank + 1e-5)

    def add_block(self, a: int, random_A: bool = True, random_B: bool = True) -> list[nn.Parameter]:
        """Append growth block (A_new, B_new, Row_new, Col_new), strips zero; returns the new parameters."""
        c = self.rank + a
        new = [nn.Parameter(torch.zeros(a, self.d_in, **self.factory)),
               nn.Parameter(torch.zeros(self.d_out, a, **self.factory)),
               nn.Parameter(torch.zeros(a, c, **self.factory)),
               nn.Parameter(torch.zeros(c, a, **self.factory))]
        with torch.no_grad():
            if random_A:
                nn.init.normal_(new[0], std=0.02)
            if random_B:
                nn.init.normal_(new[1], std=0.02)
        for name, p in zip(BLOCK_LISTS, new):
            getattr(self, name).append(p)
        return new

    def triangles(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(L, U): the zero-padded row strips stacked, the zero-padded column strips side by side (§2)."""
        r = self.rank
        L = torch.cat([F.pad(row, (0, r - row.shape[1])) for row in self.lora_row], 0)
        U = torch.cat([F.pad(col, (0, 0, 0, r - col.shape[0])) for col in self.lora_col], 1)
        return L, U

    def core(self) -> torch.Tensor:
        L, U = self.triangles()
        return L + U

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.cat(list(self.lora_A), 0), torch.cat(list(self.lora_B), 1)

    def forward(self, layer, x, out):
        A, B = self.factors()
        h = x.to(A.dtype)
        if self.dropout is not None:
            h = self.dropout(h)
        h = F.linear(F.linear(h, A), self.core()) * self.scale  # the scale on the r-wide intermediate
        return out.add_(F.linear(h, B).to(out.dtype))

    def delta_weight(self, layer):
        A, B = (wide(t) for t in self.factors())
        return as_matrix(layer, self.scale * (B @ wide(self.core()) @ A))

    def regularizer(self, layer):
        """γ (‖A Aᵀ − I_r‖_F + ‖Bᵀ B − I_r‖_F) / 2 on the concatenated factors, averaged over modules (§5)."""
        A, B = self.factors()
        eye = torch.eye(A.shape[0], dtype=A.dtype, device=A.device)
        return self.config.orth_reg_weight * (torch.linalg.norm(A @ A.T - eye) + torch.linalg.norm(B.T @ B - eye)) / 2

    @torch.no_grad()
    def normalised_norm(self) -> float:
        """‖C‖_F divided by the block count m (default), the rank, or √numel (§6)."""
        by = self.config.norm_by
        divisor = len(self.lora_A) if by == "blocks" else self.rank if by == "rank" else math.sqrt(self.rank ** 2)
        return float(torch.linalg.norm(wide(self.core()))) / divisor

    def peft_lora_factors(self, layer):
        """ΔW on W0 as LoRA factors at scale 1: A = cat A_j, B = s · B C."""
        A, B = (wide(t.detach()) for t in self.factors())
        return A.contiguous(), (self.scale * B @ wide(self.core().detach())).contiguous()


class TriAdaptAllocator(RankAllocator):
    """§6–7, run after clipping and before optimizer.step (t = 0-based optimizer step). Also adds γ·∇L_orth to
    the gradients after backward unless the loop adds reparam.regularizer to the loss. The groups growth added
    follow the learning rate of the optimizer's first group (no restarted warm-up: §11 leaves it unspecified)."""

    runs_after_optimizer_step = False

    def __init__(self, model, adapter_name: str = "default", optimizer=None):
        super().__init__(model, adapter_name, optimizer)
        if not isinstance(self.config, TriAdaptLoraConfig):
            raise ConfigError(f"adapter {adapter_name!r} is a {self.config.method} adapter, not triadaptlora")
        self.norm_prev = {m: a.normalised_norm() for m, a in self.adapters().items()}  # nF_prev (§6)
        self.groups: list[list[str]] = []  # the modules grown at each allocation = the parameter groups added
        self.scheduler = None  # the run's learning-rate scheduler, extended to the groups growth adds

    def target_total(self) -> int:
        cfg = self.config
        return cfg.reference_rank * len(self.layers) if cfg.target_total_rank is None else cfg.target_total_rank

    def after_backward(self, state):
        if self.config.orth_reg_weight:
            self.add_regularizer_gradient(state)

    def scores(self) -> dict[str, float]:
        """score = nF_now − nF_prev; updates nF_prev of every module (§6)."""
        out = {}
        for m, a in self.adapters().items():
            now = a.normalised_norm()
            out[m], self.norm_prev[m] = now - self.norm_prev[m], now
        return out

    def allocate(self, t, optimizer=None):
        optimizer = optimizer if optimizer is not None else self.optimizer
        cfg, total, target = self.config, sum(self.ranks().values()), self.target_total()
        if total < target and t > cfg.init_warmup and t % cfg.incre_interval == 0:
            scores = self.scores()
            rho = (t - cfg.init_warmup) / (self.total_steps - cfg.init_warmup)
            k = threshold_count(cfg.rank_growth_model, target - total, rho, cfg.top_k, len(scores))
            order = sorted(scores, key=lambda m: -scores[m])  # descending, stable: ties in module order
            tau = scores[order[k - 1]]
            chosen = [m for m in order if scores[m] >= tau]
            if cfg.clamp_budget:  # one block of a each until the budget is reached (§11)
                chosen = chosen[:math.ceil((target - total) / cfg.growth)]
            self.grow(chosen, optimizer)

    @torch.no_grad()
    def grow(self, modules: list[str], optimizer, init: bool = True) -> None:
        cfg, adapters, new = self.config, self.adapters(), []
        for m in modules:
            a = adapters[m]
            if init and cfg.rescale_on_growth:  # keep s · C: s falls by r_old/r_new
                for strip in (*a.lora_row, *a.lora_col):
                    strip.mul_((a.rank + cfg.growth) / a.rank)
            recommended = init and cfg.init_mode == "recommended"
            new += a.add_block(cfg.growth, random_A=recommended, random_B=recommended)
        self.groups.append(list(modules))
        if optimizer is not None:
            lr = optimizer.param_groups[0]["lr"]
            initial = optimizer.param_groups[0].get("initial_lr", lr)
            optimizer.add_param_group({"params": new, "lr": lr, "initial_lr": initial,
                                       "weight_decay": cfg.weight_decay})
            self.optimizer = optimizer
            self.sync_scheduler()
        self.set_rank_pattern(self.ranks())

    def on_train_begin(self, state):
        super().on_train_begin(state)
        self.scheduler = getattr(state.scheduler, "scheduler", state.scheduler)  # accelerate wraps HF's
        self.sync_scheduler()  # on resume: the groups resize_to recreated

    def sync_scheduler(self) -> None:
        """Give the groups growth added the learning-rate schedule of the first group (the scheduler must cover
        every group; a restarted warm-up per group, as IncreLoRA's, is left unspecified by §11)."""
        if self.scheduler is not None and self.optimizer is not None:
            extend_scheduler_groups(self.scheduler, len(self.optimizer.param_groups))

    def ranks(self):
        return {m: a.rank for m, a in self.adapters().items()}

    def resize_to(self, rank_pattern, optimizer=None):
        """Replay the checkpoint's growth events (values come from the checkpoint) so that the parameter groups
        are those the saved optimizer state describes."""
        groups, self.groups = self.groups, []
        for modules in groups:
            self.grow(modules, optimizer, init=False)
        if self.ranks() != {m: rank_pattern.get(m, self.config.init_rank) for m in self.layers}:
            raise ConfigError("triadaptlora: the checkpoint's growth events do not give its rank pattern "
                              "(was the adapter already grown before resuming?)")

    def extra_state(self):
        return {"norm_prev": dict(self.norm_prev), "groups": [list(g) for g in self.groups]}

    def load_extra_state(self, state):
        self.norm_prev = dict(state["norm_prev"])

    def load_state_dict(self, state):
        self.groups = [list(g) for g in state["extra"]["groups"]]  # resize_to replays them
        super().load_state_dict(state)


TriAdaptLoraAdapter.rank_allocator = TriAdaptAllocator
register("triadaptlora", TriAdaptLoraConfig, TriAdaptLoraAdapter,
         "TriAdaptLoRA: ΔW = s·B C A with a triangular-strip core, ranks grown by the rise of ‖C‖_F/blocks")
