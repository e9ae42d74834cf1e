"""SpIEL (Ansell et al. 2024, arXiv 2401.16405; specs/adapters/spiel.md): sparse fine-tuning with drop and grow.

    W = W0 + scatter(δ, η),   η: k flat indices into W0 (buffer, saved),   δ: k deltas (trainable, 0 at init)

The layer computes x (W0 + scatter(δ, η))ᵀ in one matmul (sara.MergedSparseLinear: ∂L/∂δ is (∂L/∂W)[η], §2,
gathered inside backward; never a dense parameter gradient), so the optimizer keeps state for the k entries only.
During an accumulation phase backward hands the dense G_W to `observe`, which accumulates Σg, Σg² at the top-k
candidates of |G_W| (SpIEL-AG, §5). Behind another adapter it adds x scatter(δ, η)ᵀ (SaRA's CSR kernels on CPU).
SpielStep (a training callback) runs the schedule: every R steps, drop the n smallest |δ| and grow the n
candidates with the largest |Σg|.
variant="ma" (SpIEL-MA): no accumulation phase and no dense gradient ever; δ is trained by SftSM3 (§4: one
accumulator per row and per column of W, applied by SpielStep before optimizer.step, which then skips δ) and
grows where row_acc[i]·col_acc[j] is largest among the inactive positions.
The adapter file holds η and δ per module (index + value arrays, never dense tensors, §6).
"""
from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..core.layers import LINEAR, Adapter, adapter_dtype, linear_dims, wide
from ..core.model import active_adapters, adapted_layers, get_record
from ..core.registry import MethodConfig, register
from ..training.callbacks import Callback, learning_rates
from . import sara
from .lora import as_matrix


@dataclass
class SpielConfig(MethodConfig):
    density: float = 0.01  # k = round(density · numel) per targeted weight (§3)
    reselection_steps: int = 20  # R (§5)
    selection_accumulation_steps: int = 5  # A (§5)
    initial_reselection_rate: float = 0.2  # ρ0 (§5)
    reselection_rate_policy: str = "linear"  # or "cosine" (§5)
    weight_decay: float = 0.0  # decoupled pull of δ toward 0, i.e. of W toward W0 (§4, §10.6); applied by SpielStep
    seed: int = 0  # initial random η of each module: seed + crc32(module name)
    variant: str = "ag"  # "ag": grow by accumulated gradients (SftAdamW); "ma": by SM3 statistics (SftSM3)
    sm3_eps: float = 1e-8  # not given by the spec; SM3's usual ε (MA only)

    def __post_init__(self):
        self.check(isinstance(self.density, (int, float)) and 0 < self.density <= 1, "density", "must be in (0, 1]")
        self.check(isinstance(self.reselection_steps, int) and self.reselection_steps > 0, "reselection_steps",
                   "must be a positive step count")
        self.check(isinstance(self.selection_accumulation_steps, int)
                   and 0 < self.selection_accumulation_steps < self.reselection_steps,
                   "selection_accumulation_steps", "must be in [1, reselection_steps)")
        self.check(isinstance(self.initial_reselection_rate, (int, float)) and 0 <= self.initial_reselection_rate <= 1,
                   "initial_reselection_rate", "must be in [0, 1]")
        self.check(self.reselection_rate_policy in ("linear", "cosine"), "reselection_rate_policy",
                   "must be 'linear' or 'cosine'")
        self.check(isinstance(self.weight_decay, (int, float)) and self.weight_decay >= 0, "weight_decay",
                   "must be >= 0")
        self.check(self.variant in ("ag", "ma"), "variant", "must be 'ag' (SpIEL-AG) or 'ma' (SpIEL-MA)")
        self.check(isinstance(self.sm3_eps, (int, float)) and self.sm3_eps > 0, "sm3_eps", "must be > 0")


def reselection_rate(t: int, cfg: SpielConfig, total_steps: int) -> float | None:
    """p(t) of §5 after t optimizer steps, or None when no reselection happens at t."""
    if t % cfg.reselection_steps != cfg.selection_accumulation_steps or t > total_steps:
        return None
    if t == cfg.selection_accumulation_steps:
        return 1.0  # the first reselection replaces all the random initial indices
    if cfg.reselection_rate_policy == "linear":
        return cfg.initial_reselection_rate * (1 - t / total_steps)
    return cfg.initial_reselection_rate * (1 + math.cos(math.pi * t / total_steps)) / 2


class SpielAdapter(Adapter):
    supported_kinds = (LINEAR,)

    @classmethod
    def training_callbacks(cls) -> list:
        return [SpielStep()]

    def __init__(self, layer, config: SpielConfig, init: bool = True):
        super().__init__(layer, config)
        numel = layer.weight.numel()
        k = max(1, round(config.density * numel))
        # Uniformly random distinct positions (top-k of uniform scores), sorted. Stored (and saved) as int32 where
        # every position fits, int64 otherwise (§10.3); computations use the int64 copy `positions`.
        g = torch.Generator().manual_seed(config.seed + zlib.crc32(layer.reparam_name.encode()))
        index = torch.rand(numel, generator=g).topk(k).indices.sort().values
        self.register_buffer("index", index.to(layer.weight.device, torch.int32 if numel < 2**31 else torch.int64))
        self.delta = torch.nn.Parameter(torch.zeros(k, dtype=adapter_dtype(layer), device=layer.weight.device))
        self.accumulating = False
        self.clear_statistics()
        if config.variant == "ma":  # SM3 accumulators of the dense shape's rows and columns (§4); not in the file
            rows, cols = layer.weight.shape[0], layer.weight.numel() // layer.weight.shape[0]
            for name, n in (("row_acc", rows), ("col_acc", cols)):
                self.register_buffer(name, torch.zeros(n, dtype=torch.float32, device=layer.weight.device),
                                     persistent=False)
        self.restore(layer)

    def restore(self, layer):
        """(Re)build the CSR structures of scatter(δ, η): after init, a load or a reselection."""
        # a buffer (not saved), so it follows model.to(device) like the index it is derived from
        self.register_buffer("positions", self.index.long(), persistent=False)
        dense = len(self.index) > sara.SPARSE_KERNEL_MAX_DENSITY * layer.weight.numel()
        self.pattern = None if dense else sara.LinearPattern(layer, self.positions)

    def clear_statistics(self):
        self.candidates = self.sum_g = self.sum_g2 = None
        self.count = 0

    def scattered(self, layer) -> torch.Tensor:
        """scatter(δ, η) flat, in the weight's storage layout; differentiable in δ."""
        flat = torch.zeros(layer.weight.numel(), dtype=self.delta.dtype, device=self.delta.device)
        return flat.index_put((self.positions,), self.delta)

    def observe(self, grad_w: torch.Tensor) -> None:
        """Gradient hook on the dense G_W during accumulation (per micro-batch, §5): O(k) statistics at C."""
        g = grad_w.detach()
        if self.candidates is None:
            self.candidates = g.abs().topk(len(self.index)).indices
            self.sum_g, self.sum_g2 = torch.zeros_like(g[self.candidates]), torch.zeros_like(g[self.candidates])
        c = g[self.candidates]
        self.sum_g += c
        self.sum_g2 += c * c
        self.count += 1

    computes_layer_output = True  # first unmerged adapter: x (W0 + ΔW)ᵀ in one matmul (sara.MergedSparseLinear)

    def layer_output(self, layer, x):
        return sara.merged_sparse_linear(layer, x, self.delta, self.positions,
                                         observe=self.observe if self.accumulating else None)

    def forward(self, layer, x, out):  # behind another adapter: add x ΔWᵀ
        h = x.to(self.delta.dtype)
        if self.accumulating or not sara.csr_kernels(self.pattern, x):
            flat = self.scattered(layer)
            if self.accumulating and flat.requires_grad:
                flat.register_hook(self.observe)
            delta_w = as_matrix(layer, flat.view(layer.weight.shape))
            return out + F.linear(h, delta_w).to(out.dtype)
        y = sara.SparseLinearDelta.apply(h.reshape(-1, h.shape[-1]), self.delta, self.pattern)
        return out.add_(y.reshape(*x.shape[:-1], -1).to(out.dtype))

    def delta_weight(self, layer):
        return wide(self.scattered(layer).detach().view(layer.weight.shape))

    @torch.no_grad()
    def sm3_step(self, lr: float) -> None:
        """SftSM3 (§4) on δ's gradient: u = min(row[i], col[j]) + g², row/col ← max(·, u), δ −= lr·g/√(u + ε)."""
        g = self.delta.grad.float()
        rows, cols = self.positions // self.col_acc.numel(), self.positions % self.col_acc.numel()
        u = torch.minimum(self.row_acc[rows], self.col_acc[cols]) + g * g
        self.row_acc.scatter_reduce_(0, rows, u, "amax")
        self.col_acc.scatter_reduce_(0, cols, u, "amax")
        self.delta.sub_((lr * g / (u + self.config.sm3_eps).sqrt()).to(self.delta.dtype))
        self.delta.grad = None  # the loop's optimizer skips δ and keeps no state for it

    def grow_candidates(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(flat positions, scores) to grow from: AG the top-k of |G_W| with |Σg|; MA the top-k of row·col (§5).
        k of them always leave n free positions, since k − n stay active after the drop."""
        if self.config.variant == "ag":
            return None if self.candidates is None else (self.candidates, self.sum_g.abs())
        scores, candidates = torch.outer(self.row_acc, self.col_acc).view(-1).topk(len(self.index))
        return candidates, scores

    @torch.no_grad()
    def reselect(self, layer, rate: float, optimizer=None) -> torch.Tensor:
        """Drop the n = floor(k·rate) smallest |δ|, grow the candidates with the largest score that are not active
        after the drop (§5); returns the slots whose position changed (their δ and optimizer state restart)."""
        k = len(self.index)
        n = int(k * rate)
        found = self.grow_candidates()
        if n == 0 or found is None:
            return self.index.new_zeros(0)
        candidates, scores = found
        order = self.delta.abs().argsort(stable=True)
        drop_slots = order[:n]
        free = ~torch.isin(candidates, self.positions[order[n:]])  # not active after the drop (§10.2)
        free_at = free.nonzero().squeeze(1)
        top = free_at[scores[free].topk(min(n, len(free_at))).indices]
        grow = candidates[top]
        # A dropped position chosen again stays where it is (with its δ): cancel the pair (§10.2).
        kept = torch.isin(self.positions[drop_slots], grow)
        new = ~torch.isin(grow, self.positions[drop_slots])
        slots, top = drop_slots[~kept][: int(new.sum())], top[new]  # too few candidates: keep the larger |δ|
        self.index[slots] = candidates[top].to(self.index.dtype)
        self.delta[slots] = 0
        if self.config.variant == "ag":  # MA: the accumulators are dense-shaped, nothing to seed (§5)
            self.seed_optimizer_state(optimizer, slots, self.sum_g[top] / self.count, self.sum_g2[top] / self.count)
        self.restore(layer)
        return slots

    def seed_optimizer_state(self, optimizer, slots, mean_g, mean_g2):
        """New slots must not inherit the dropped entries' moments (§10.4). An Adam state is seeded from the
        accumulated statistics so that, with torch's step-count bias correction, the corrected moments of a new
        slot are (mean g, mean g²), as SftAdamW's per-element age correction gives right after seeding (§5).
        Not found: per-element age with a stock optimizer; recommended choice: this seeding."""
        state = optimizer.state.get(self.delta) if optimizer is not None else None
        if not state:
            return
        betas = next(g for g in optimizer.param_groups if any(p is self.delta for p in g["params"])).get("betas")
        step = float(state.get("step", 0))
        for key, value in state.items():
            if torch.is_tensor(value) and value.shape == self.delta.shape:
                value[slots] = 0
        if betas is not None and step > 0 and "exp_avg" in state and "exp_avg_sq" in state:
            state["exp_avg"][slots] = (mean_g * (1 - betas[0] ** step)).to(state["exp_avg"].dtype)
            state["exp_avg_sq"][slots] = (mean_g2 * (1 - betas[1] ** step)).to(state["exp_avg_sq"].dtype)


class SpielStep(Callback):
    """SpIEL's schedule (§5) for every active SpIEL adapter, in any loop that runs method_callbacks: accumulation
    phases (gradient hooks on) and drop-and-grow after optimizer.step, plus the decoupled weight decay of δ (§4)."""

    def spiel_adapters(self, model):
        for name in active_adapters(model):
            cfg = get_record(model, name).config
            if isinstance(cfg, SpielConfig):
                yield cfg, [(layer, layer.adapters[name]) for _, layer in adapted_layers(model) if name in layer.adapters]

    def on_step_begin(self, state):
        if state.global_step == 0:  # t = 0: the first accumulation phase begins at once
            for cfg, pairs in self.spiel_adapters(state.model):
                for _, adapter in pairs:
                    adapter.accumulating = cfg.variant == "ag"

    def before_optimizer_step(self, state):
        lr = learning_rates(state.optimizer)
        for cfg, pairs in self.spiel_adapters(state.model):
            for _, adapter in pairs:
                if cfg.variant == "ma" and adapter.delta.grad is not None:
                    adapter.sm3_step(lr.get(id(adapter.delta), 0.0))

    def after_optimizer_step(self, state):
        t = state.global_step + 1  # optimizer steps done
        lr = learning_rates(state.optimizer)
        for cfg, pairs in self.spiel_adapters(state.model):
            rate = reselection_rate(t, cfg, state.total_steps)
            changed = 0
            for layer, adapter in pairs:
                if cfg.weight_decay and id(adapter.delta) in lr:
                    with torch.no_grad():
                        adapter.delta.mul_(1 - lr[id(adapter.delta)] * cfg.weight_decay)
                if t % cfg.reselection_steps == cfg.selection_accumulation_steps:  # phase ends
                    if rate is not None:
                        changed += len(adapter.reselect(layer, rate, state.optimizer))
                    adapter.accumulating = False
                    adapter.clear_statistics()
                if (t + 1) % cfg.reselection_steps == 0 and t < state.total_steps and cfg.variant == "ag":
                    adapter.accumulating = True
            if rate is not None:
                state.log({"spiel_reselected": changed, "spiel_rate": rate})


    # Checkpoints: SpIEL-MA's SM3 accumulators by adapter module name (as GradNormLoRPStep keeps its moments); a
    # checkpoint is loaded before on_train_begin, when the model is first seen, so loaded state waits there.
    def on_train_begin(self, state):
        self.model = state.model
        accumulators = dict(self.accumulators(state.model))
        for name, saved in getattr(self, "pending", {}).items():
            for buffer, value in zip(accumulators[name], saved):
                buffer.copy_(value)
        self.pending = {}

    def accumulators(self, model):
        for name, module in model.named_modules():
            if isinstance(module, SpielAdapter) and module.config.variant == "ma":
                yield name, (module.row_acc, module.col_acc)

    def state_dict(self):
        model = getattr(self, "model", None)
        return {n: [t.clone() for t in acc] for n, acc in self.accumulators(model)} if model is not None else {}

    def load_state_dict(self, state):
        self.pending = state


register("spiel", SpielConfig, SpielAdapter, "SpIEL: sparse deltas at k indices per weight, drop and grow "
         "(variant ag: accumulated gradients; ma: SM3 statistics, no dense gradient)")
