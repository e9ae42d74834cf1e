"""IncreLoRA (Zhang et al. 2023; specs/adapters/increlora.md): AdaLoRA-style triplets whose rank GROWS.

    ΔW = s · P (Q ⊙ λ),  s = α' / (r_num + 1e-5),  y = x W0ᵀ + b + dropout(x) ΔWᵀ      (§2)

Q, λ, P are lists (nn.ParameterList lora_A / lora_E / lora_B) concatenated on the fly: entry 0 is the initial
block of init_r components, every later entry one rank-1 component, so each grown component is its own
parameter with its own optimizer state and parameter group (§7–8). The first 1 + r_num − init_r entries are
active; the rest are reserves ("advance learning": p, q train, λ frozen at 1e-5, §3). IncreLoraAllocator, which
the training loop runs by itself before optimizer.step, scores every module on its whole update (§6), activates
the reserves of the top_h modules and creates new ones until the budget is reached (§7), and sets the learning
rate of each group it added with its own restarted warm-up (§8). config.rank_pattern holds r_num per module and
config.reserve_pattern the number of reserves, so load_adapter rebuilds the shapes.
Scoring keeps a d_out × d_in gradient buffer per module until the budget is reached (the spec allows it; under
gradient accumulation it sums all micro-batches); while it runs, the layer computes x (W0 + ΔW)ᵀ so that G is
the dense ΔW's own gradient (one extra d_out·d_in·tokens matmul per step, as in any weight gradient).
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
from .lora import as_matrix, output_with_delta

ADD_R = {2: 1, 4: 2, 6: 3, 8: 4}  # §7: add_r by target_rank in the reference scripts
RESERVE_LAMBDA = 1e-5  # §3–4: frozen λ of a reserve under advance learning
FACTORS = ("lora_A", "lora_E", "lora_B")


@dataclass
class IncreLoraConfig(MethodConfig):
    init_r: int = 1
    target_rank: int = 2  # average final rank: target_total = target_rank · n ...
    target_total_rank: int | None = None  # ... or the total itself
    incre_rank_num: int | None = None  # add_r; None: ADD_R[target_rank]
    top_h: int = 10
    init_warmup: int = 4500  # t_warm (code default); the GLUE scripts use 100–1000
    incre_interval: int = 10
    alpha: float = 16.0  # α' = alpha if alpha > 0 else init_r
    dropout: float = 0.0
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.1  # γ
    orth_scope: str = "per_block"  # §5: "per_block" (the code) or "concatenated" (AdaLoRA's intent)
    advance_learn: bool = True
    multi_lr: bool = True  # §8 restart warm-up per added parameter group
    lr_warmup: int | None = None  # W of §8; None: the run's warm-up steps (0 in a hand-written loop)
    clamp_budget: bool = True  # §12 recommendation: never grow past target_total (ties and add_r > 1)
    rescale_on_growth: bool = False  # §12 option: multiply existing λ by r_new/r_old so the function is continuous
    total_step: int | None = None  # T; None: the number of optimizer steps of the training run
    rank_pattern: dict = field(default_factory=dict)  # set by the allocator: module -> r_num
    reserve_pattern: dict = field(default_factory=dict)  # module -> number of stored reserve components

    def __post_init__(self):
        for name, low in (("init_r", 1), ("target_rank", 1), ("top_h", 1), ("init_warmup", 0), ("incre_interval", 1)):
            value = getattr(self, name)
            self.check(isinstance(value, int) and not isinstance(value, bool) and value >= low, name,
                       f"must be an integer >= {low}")
        if self.incre_rank_num is None:
            self.check(self.target_rank in ADD_R, "target_rank",
                       f"needs incre_rank_num unless it is one of {sorted(ADD_R)}")
        else:
            self.check(isinstance(self.incre_rank_num, int) and self.incre_rank_num >= 1, "incre_rank_num",
                       "must be None or an integer >= 1")
        self.check(self.orth_scope in ("per_block", "concatenated"), "orth_scope",
                   "must be per_block or concatenated")
        self.check(0.0 <= self.dropout < 1.0, "dropout", "must be in [0, 1)")
        self.check(0.0 < self.beta1 < 1.0 and 0.0 < self.beta2 < 1.0, "beta1", "beta1 and beta2 must be in (0, 1)")
        self.check(self.orth_reg_weight >= 0, "orth_reg_weight", "must be >= 0")
        self.check(self.lr_warmup is None or isinstance(self.lr_warmup, int) and self.lr_warmup >= 0, "lr_warmup",
                   "must be None or an integer >= 0")
        self.check(all(isinstance(v, int) and v >= self.init_r for v in self.rank_pattern.values()),
                   "rank_pattern", f"must map module names to ranks >= init_r={self.init_r}")

    @property
    def add_r(self) -> int:
        return self.incre_rank_num or ADD_R[self.target_rank]


def restart_lr(k: int, warmup: int, horizon: int) -> float:
    """§8: the LR factor of a parameter group k steps after it was added, with horizon H = T − t_added."""
    if k < warmup:
        return k / warmup
    return max(0.0, (horizon - k) / max(1, horizon - warmup))


def importance_score(delta: torch.Tensor, grad: torch.Tensor) -> float:
    """§6: Σ|ΔW ⊙ G| / √(d_out·d_in) (the reference code's normaliser)."""
    return float((delta * grad).abs().sum() / math.sqrt(delta.numel()))


class IncreLoraAdapter(Adapter):
    supported_kinds = (LINEAR,)
    regularizer_reduction = "mean"

    def __init__(self, layer, config: IncreLoraConfig, init: bool = True):
        super().__init__(layer, config)
        self.d_in, self.d_out = linear_dims(layer)
        self._factory = dict(dtype=adapter_dtype(layer), device=layer.weight.device)
        self.lora_A, self.lora_E, self.lora_B = nn.ParameterList(), nn.ParameterList(), nn.ParameterList()  # Q λ P
        self.r_num = config.rank_pattern.get(layer.reparam_name, config.init_r)
        self.n_active = 1 + self.r_num - config.init_r  # active list entries
        self.add_components(config.init_r, init, lam=0.0)  # §4: λ = 0, p, q ~ N(0, 0.02²)
        for _ in range(self.r_num - config.init_r + config.reserve_pattern.get(layer.reparam_name, 0)):
            self.add_components(1, init, lam=0.0)
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else None
        self.score_grad = None  # G = ∂L/∂ΔW summed over the step's backward passes, while the allocator scores

    @property
    def factory(self) -> dict:
        return factory_like(self.lora_A, self._factory)

    @property
    def scale(self) -> float:
        alpha = self.config.alpha if self.config.alpha > 0 else self.config.init_r
        return alpha / (self.r_num + 1e-5)

    def add_components(self, k: int, init: bool = True, lam: float = 0.0) -> list[nn.Parameter]:
        """Append one entry of k components (random p, q when init, else values to be loaded); returns [q, λ, p]."""
        new = [nn.Parameter(torch.zeros(k, self.d_in, **self.factory)),
               nn.Parameter(torch.full((k, 1), lam, **self.factory)),
               nn.Parameter(torch.zeros(self.d_out, k, **self.factory))]
        if init:
            nn.init.normal_(new[0], std=0.02)
            nn.init.normal_(new[2], std=0.02)
        for name, p in zip(FACTORS, new):
            getattr(self, name).append(p)
        return new

    def entry(self, i: int) -> list[nn.Parameter]:
        return [getattr(self, name)[i] for name in FACTORS]

    def factors(self, active_only: bool = False):
        n = self.n_active if active_only else len(self.lora_A)
        return (torch.cat(list(self.lora_A)[:n]), torch.cat(list(self.lora_E)[:n]),
                torch.cat(list(self.lora_B)[:n], dim=1))

    @property
    def computes_layer_output(self) -> bool:
        """While scoring (without dropout) the layer runs as x (W0 + ΔW)ᵀ: the gradient autograd computes for the
        dense ΔW is G itself (§6, the spec's "retain grad on the materialised ΔW"), and P, Q, λ get theirs from it
        through one small r-rank product — the same big matmuls as LoRA's step plus one, not plus two."""
        return self.score_grad is not None and self.dropout is None

    def layer_output(self, layer, x):
        Q, lam, P = self.factors()
        delta = (P @ (Q * lam)) * self.scale
        if delta.requires_grad:
            delta.register_hook(self.add_score_grad)
        return output_with_delta(layer, x, delta)

    @torch.no_grad()
    def add_score_grad(self, grad) -> None:
        self.score_grad.add_(grad.to(self.score_grad.dtype))

    def forward(self, layer, x, out):
        Q, lam, P = self.factors()
        h = x.to(Q.dtype)
        if self.dropout is not None:
            h = self.dropout(h)
        delta = F.linear(F.linear(h, Q * lam) * self.scale, P)
        if self.score_grad is not None and delta.requires_grad:
            delta.register_hook(lambda g, h=h.detach(): self.accumulate_score_grad(g, h))
        return out.add_(delta.to(out.dtype))

    @torch.no_grad()
    def accumulate_score_grad(self, grad_out, h) -> None:
        """G += (∂L/∂y)ᵀ x over this backward's rows (§6); returns None so the gradient passes unchanged."""
        G = self.score_grad
        G.addmm_(grad_out.reshape(-1, self.d_out).T.to(G.dtype), h.reshape(-1, self.d_in).to(G.dtype))

    def update_matrix(self) -> torch.Tensor:
        """ΔW = s · P (Q ⊙ λ) in d_out × d_in layout, all stored components (§9: reserves with λ ≠ 0 count)."""
        Q, lam, P = (wide(t) for t in self.factors())
        return self.scale * (P @ (Q * lam))

    def delta_weight(self, layer):
        return as_matrix(layer, self.update_matrix())

    def regularizer(self, layer):
        """§5: γ · mean over tensors of ‖M Mᵀ − I‖_F (Mᵀ M for P), per stored tensor or on the concatenation."""
        if self.config.orth_scope == "concatenated":
            Q, _, P = self.factors(active_only=True)
            pairs = [(Q, P)]
        else:
            pairs = [(q, p) for q, p in zip(self.lora_A, self.lora_B)]
        terms = [torch.linalg.norm(m @ m.T - torch.eye(m.shape[0], dtype=m.dtype, device=m.device))
                 for q, p in pairs for m in (q, p.T)]
        return self.config.orth_reg_weight * torch.stack(terms).mean()

    def peft_lora_factors(self, layer):
        """ΔW as LoRA factors at scale 1: A = Q, B = s·P diag(λ), without reserves whose λ is 0 (§9 compact)."""
        Q, lam, P = (wide(t.detach()) for t in self.factors())
        keep = (lam.reshape(-1) != 0) | (torch.arange(len(lam), device=lam.device) < self.r_num)  # active rows first
        return Q[keep].contiguous(), (self.scale * P[:, keep] * lam[keep].T).contiguous()


class IncreLoraAllocator(RankAllocator):
    """§7–8, run after clipping and before optimizer.step (t = 0-based index of the optimizer step). Also adds
    γ·∇L_orth to the gradients after backward unless the loop adds reparam.regularizer to the loss."""

    runs_after_optimizer_step = False

    def __init__(self, model, adapter_name: str = "default", optimizer=None):
        super().__init__(model, adapter_name, optimizer)
        if not isinstance(self.config, IncreLoraConfig):
            raise ConfigError(f"adapter {adapter_name!r} is a {self.config.method} adapter, not increlora")
        self.ema = {m: (0.0, 0.0) for m in self.layers}  # (Ī, Ū) per module, §6
        self.groups: list[dict] = []  # the parameter groups added: {"t": step, "index": i, "params": [(m, name, j)]}
        self.started = self.done = False
        self.warmup = self.config.lr_warmup or 0
        self.scheduler = None  # the run's LambdaLR, given a schedule per added group (§8)
        self.frozen_values: dict = {}  # values of frozen components, restored on resume
        self.reserve_counts: dict = {}
        self.enable_scoring(True)

    def enable_scoring(self, on: bool) -> None:
        for a in self.adapters().values():
            a.score_grad = torch.zeros(a.d_out, a.d_in, dtype=torch.float64 if a.factory["dtype"] == torch.float64
                                       else torch.float32, device=a.factory["device"]) if on else None

    def target_total(self) -> int:
        cfg = self.config
        return cfg.target_rank * len(self.layers) if cfg.target_total_rank is None else cfg.target_total_rank

    def on_train_begin(self, state):
        super().on_train_begin(state)
        if getattr(state, "world_size", 1) > 1:  # new parameters cannot join DDP's buckets; G would be per rank
            raise ConfigError("increlora: growing ranks is not supported under DistributedDataParallel; train in one process")
        if self.config.lr_warmup is None:  # the run's warm-up: reparam's warmup_ratio or HF's warmup_steps
            args = state.config
            self.warmup = getattr(args, "warmup_steps", 0) or int(round(getattr(args, "warmup_ratio", 0) * self.total_steps))
        sched = getattr(state.scheduler, "scheduler", state.scheduler)  # accelerate may wrap HF's
        self.scheduler = sched if hasattr(sched, "lr_lambdas") else None
        self.sync_scheduler()  # on resume: the groups resize_to recreated

    def after_backward(self, state):
        if self.config.orth_reg_weight:
            self.add_regularizer_gradient(state)

    def allocate(self, t, optimizer=None):
        cfg = self.config
        if not self.started:  # t = 0: add_r reserves per module, their p, q in one new group (§4)
            new = [p for a in self.adapters().values() for p in self.add_reserves(a)]
            self.started = True
            if cfg.advance_learn:
                self.add_group(t, new, optimizer)
            self.record()
        if not self.done:
            self.update_importance()
            if t > cfg.init_warmup and t % cfg.incre_interval == 0:
                self.grow(t, optimizer)
        self.set_group_lrs(t, optimizer)

    def add_reserves(self, adapter) -> list[nn.Parameter]:
        """add_r new reserve entries; returns the parameters that train (p, q under advance learning)."""
        advance, out = self.config.advance_learn, []
        for _ in range(self.config.add_r):
            q, lam, p = adapter.add_components(1, lam=RESERVE_LAMBDA if advance else 0.0)
            lam.requires_grad_(False)
            for x in (q, p):
                x.requires_grad_(advance)
            out += [q, p] if advance else []
        return out

    @torch.no_grad()
    def update_importance(self):
        b1, b2 = self.config.beta1, self.config.beta2
        for m, a in self.adapters().items():
            score = importance_score(a.update_matrix(), a.score_grad)
            a.score_grad.zero_()
            i_bar = b1 * self.ema[m][0] + (1 - b1) * score
            self.ema[m] = (i_bar, b2 * self.ema[m][1] + (1 - b2) * abs(score - i_bar))

    def importance(self) -> dict[str, float]:
        return {m: i_bar * u_bar for m, (i_bar, u_bar) in self.ema.items()}

    @torch.no_grad()
    def grow(self, t, optimizer):
        cfg, target, adapters = self.config, self.target_total(), self.adapters()
        total = sum(a.r_num for a in adapters.values())
        if total >= target:
            return
        scores = self.importance()
        order = sorted(scores, key=lambda m: -scores[m])  # descending, stable: ties in module order
        tau = scores[order[min(cfg.top_h, target - total, len(order)) - 1]]
        new = []
        for m in (m for m in order if scores[m] >= tau):
            add = min(cfg.add_r, target - total) if cfg.clamp_budget else cfg.add_r
            if add <= 0:
                break
            a = adapters[m]
            if cfg.rescale_on_growth:  # keep s·λ of the existing components
                for lam in list(a.lora_E)[:a.n_active]:
                    lam.mul_((a.r_num + add) / a.r_num)
            for j in range(a.n_active, a.n_active + add):
                q, lam, p = a.entry(j)
                lam.requires_grad_(True)
                new += [lam] if cfg.advance_learn else [q, lam, p]
                q.requires_grad_(True), p.requires_grad_(True)
            a.n_active, a.r_num, total = a.n_active + add, a.r_num + add, total + add
            new += self.add_reserves(a)
        self.add_group(t, new, optimizer)
        if total >= target:  # once: stop scoring, unused reserves no longer count (§7)
            self.finish()
        self.record()

    @torch.no_grad()
    def finish(self):
        self.done = True
        self.enable_scoring(False)
        for a in self.adapters().values():
            for j in range(a.n_active, len(a.lora_A)):
                for x in a.entry(j):
                    x.requires_grad_(False)
                a.lora_E[j].zero_()

    def add_group(self, t, params, optimizer):
        if optimizer is None:
            raise ConfigError("increlora: the allocator needs the optimizer to add the new components to")
        where = {id(p): (m, name, j) for m, a in self.adapters().items() for name in FACTORS
                 for j, p in enumerate(getattr(a, name))}
        self.groups.append({"t": t, "index": len(optimizer.param_groups), "params": [where[id(p)] for p in params]})
        optimizer.add_param_group({"params": params, "weight_decay": optimizer.param_groups[0].get("weight_decay", 0.0),
                                   "lr": 0.0})
        self.sync_scheduler()

    def group_schedule(self, group):
        """The LR factor of an added group as a function of the global step (LambdaLR's lr_lambda)."""
        if not self.config.multi_lr:
            return self.scheduler.lr_lambdas[0]
        t0, warmup, horizon = group["t"], self.warmup, self.total_steps - group["t"]
        return lambda step: restart_lr(step - t0, warmup, horizon)

    def sync_scheduler(self):
        """The reference's LambdaLR subclass: one more lambda (and base LR) for every parameter group added."""
        if self.scheduler is None or not self.groups:
            return
        by_index = {g["index"]: g for g in self.groups}
        extend_scheduler_groups(self.scheduler, self.groups[-1]["index"] + 1,
                                lambda i: self.group_schedule(by_index[i]))

    def set_group_lrs(self, t, optimizer):
        """Without a LambdaLR (a hand-written loop): set the added groups' LRs directly."""
        if optimizer is None or not self.groups or self.scheduler is not None:
            return
        first = optimizer.param_groups[0]
        base = first.get("initial_lr", first["lr"])
        for g in self.groups:
            horizon = self.total_steps - g["t"]
            lr = base * restart_lr(t - g["t"], self.warmup, horizon) if self.config.multi_lr else first["lr"]
            optimizer.param_groups[g["index"]]["lr"] = lr

    def record(self):
        adapters = self.adapters()
        self.set_rank_pattern({m: a.r_num for m, a in adapters.items()},
                              reserve_pattern={m: len(a.lora_A) - a.n_active for m, a in adapters.items()})

    def ranks(self):
        return {m: a.r_num for m, a in self.adapters().items()}

    # --------------------------------------------------------------------------------------- exact resume
    def resize_to(self, rank_pattern, optimizer=None):
        """Rebuild the checkpoint's components (values come from the checkpoint), trainability and groups."""
        cfg, reserves = self.config, self.reserve_counts
        for m, a in self.adapters().items():
            a.r_num = rank_pattern.get(m, cfg.init_r)
            a.n_active = 1 + a.r_num - cfg.init_r
            while len(a.lora_A) < a.n_active + reserves.get(m, 0):
                a.add_components(1, init=False)
            for j in range(a.n_active, len(a.lora_A)):
                q, lam, p = a.entry(j)
                lam.requires_grad_(False)
                for x in (q, p):
                    x.requires_grad_(cfg.advance_learn and not self.done)
            with torch.no_grad():
                for key, value in self.frozen_values.get(m, {}).items():
                    name, j = key.split(".")
                    getattr(a, name)[int(j)].copy_(value)
        self.enable_scoring(not self.done)
        params = {(m, name, j): getattr(a, name)[j] for m, a in self.adapters().items() for name in FACTORS
                  for j in range(len(a.lora_A))}
        for g in self.groups:
            optimizer.add_param_group({"params": [params[tuple(k)] for k in g["params"]], "lr": 0.0,
                                       "weight_decay": optimizer.param_groups[0].get("weight_decay", 0.0)})
        self.record()

    def extra_state(self):
        frozen = {m: {k: v.detach().clone() for k, v in a.named_parameters() if not v.requires_grad}
                  for m, a in self.adapters().items()}
        return {"ema": dict(self.ema), "groups": self.groups, "started": self.started, "done": self.done,
                "warmup": self.warmup, "frozen": frozen, "reserves": dict(self.config.reserve_pattern)}

    def load_extra_state(self, state):
        self.ema, self.groups, self.warmup = dict(state["ema"]), list(state["groups"]), state["warmup"]
        self.started, self.done, self.frozen_values = state["started"], state["done"], state["frozen"]
        self.reserve_counts = state["reserves"]

    def load_state_dict(self, state):
        self.load_extra_state(state["extra"])  # resize_to needs the reserve counts, groups and frozen values
        super().load_state_dict(state)


IncreLoraAdapter.rank_allocator = IncreLoraAllocator
register("increlora", IncreLoraConfig, IncreLoraAdapter,
         "IncreLoRA: SVD-form triplets starting at rank 1, grown by importance up to a global budget")
