"""Rank allocators: training callbacks that change the ranks of one adapter while it trains (AdaLoRA prunes,
IncreLoRA and TriAdaptLoRA grow).

An adapter class names its allocator in `rank_allocator` (a RankAllocator subclass). reparam.training.train then
runs it with no call from the user (method_callbacks builds one per adapter); a Hugging Face Trainer runs it
through HFTrainerCallback(method_callbacks(model)); a hand-written loop calls `allocator.step(t, optimizer)`
where the method's spec says (after or before optimizer.step) with t the 0-based index of the optimizer step.

Ranks change physically: components are removed or added with reparam.core.resize.resize_rows (or new
parameters added to the optimizer), so parameter count, optimizer state and compute follow the budget. The
current allocation is the config field `rank_pattern` (module name -> per-module allocation, the method's own
format, e.g. AdaLoRA's booleans over the initial triplets). It is saved with the adapter, so load_adapter builds
the adapter at its allocated shapes, and with the allocator's state in training checkpoints, where
load_state_dict reshapes the adapter before the checkpoint's tensors are loaded into it.
"""
from __future__ import annotations

import dataclasses

import torch

from ..core.errors import ConfigError
from ..core.model import get_record, regularizer
from .callbacks import Callback


def extend_scheduler_groups(scheduler, n_groups: int, lr_lambda_of=None) -> None:
    """Give a learning-rate scheduler's per-group lists (LambdaLR's lr_lambdas, base_lrs) an entry for each of
    the first n_groups optimizer parameter groups, after a growing allocator added groups to the optimizer
    (torch's schedulers read one entry per group and do not grow with the optimizer). A new base LR is the
    first group's; a new lr_lambda is lr_lambda_of(group index), or the first group's without it. Lists already
    long enough (e.g. a scheduler built after the groups, on resume) are left as they are."""
    for name in ("lr_lambdas", "base_lrs"):
        values = getattr(scheduler, name, None)
        while values is not None and len(values) < n_groups:
            own = lr_lambda_of is not None and name == "lr_lambdas"
            values.append(lr_lambda_of(len(values)) if own else values[0])


class RankAllocator(Callback):
    """Owns the rank budget of adapter `adapter_name` of `model`.

    Subclasses set `runs_after_optimizer_step` (True: after optimizer.step, gradients of the step still present,
    AdaLoRA; False: after clipping, before optimizer.step, IncreLoRA / TriAdaptLoRA) and implement
    allocate(t, optimizer), ranks() -> {module: active rank}, resize_to(rank_pattern, optimizer) (give the adapter
    the shapes of a saved pattern, on resume), and extra_state() / load_extra_state(d) for their own state.
    The allocation is recorded with set_rank_pattern. `optimizer` is the one the hooks see (state.optimizer);
    reparam's loop passes it at construction too, so that resize_to can recreate the parameter groups a growing
    method added before the checkpoint's optimizer state is loaded (the loop loads callback states first).
    The total rank is logged as `rank_budget` in the training log at every step where it changed.
    """

    runs_after_optimizer_step = True

    def __init__(self, model, adapter_name: str = "default", optimizer=None):
        self.model = model
        self.adapter_name = adapter_name
        self.optimizer = optimizer
        modules = dict(model.named_modules())
        self.layers = {m: modules[m] for m in get_record(model, adapter_name).modules}
        self.total_steps: int | None = None
        self.logged_budget: int | None = None

    # ------------------------------------------------------------------------------------------- subclass API
    def allocate(self, t: int, optimizer=None) -> None:
        raise NotImplementedError

    def ranks(self) -> dict[str, int]:
        raise NotImplementedError

    def resize_to(self, rank_pattern: dict, optimizer=None) -> None:
        raise NotImplementedError

    def extra_state(self) -> dict:
        return {}

    def load_extra_state(self, state: dict) -> None:
        pass

    # ---------------------------------------------------------------------------------------------- helpers
    @property
    def config(self):
        return get_record(self.model, self.adapter_name).config

    def adapters(self) -> dict:
        return {m: layer.adapters[self.adapter_name] for m, layer in self.layers.items()}

    def set_rank_pattern(self, rank_pattern: dict, **fields) -> None:
        """Record a new allocation in a new config object (the one the user passed to adapt is never changed);
        `fields`: other config fields that describe it (IncreLoRA's reserve_pattern)."""
        config = dataclasses.replace(self.config, rank_pattern=rank_pattern, **fields)
        get_record(self.model, self.adapter_name).config = config
        for adapter in self.adapters().values():
            adapter.config = config

    def add_regularizer_gradient(self, state) -> None:
        """Add the gradient of the adapter's extra loss (reparam.regularizer, e.g. an orthogonality term) to the
        .grad of its trainable parameters, once per optimizer step, unless the loop already adds the regulariser
        to the loss (TrainConfig.regularizer_weight). A subclass calls it from after_backward."""
        if getattr(state.config, "regularizer_weight", 0):
            return
        params = [p for a in self.adapters().values() for p in a.parameters() if p.requires_grad]
        with torch.enable_grad():
            grads = torch.autograd.grad(regularizer(self.model, self.adapter_name), params, allow_unused=True)
        for p, g in zip(params, grads):
            if g is not None:
                p.grad = g if p.grad is None else p.grad.add_(g)

    def set_total_step(self, total_steps: int) -> None:
        if not isinstance(total_steps, int) or total_steps < 1:
            raise ConfigError(f"{self.config.method}: total_step must be a positive integer, got {total_steps!r}")
        self.total_steps = total_steps

    def step(self, t: int, optimizer=None) -> None:
        """The allocation of optimizer step t (0-based), for hand-written training loops."""
        if self.total_steps is None:
            total = getattr(self.config, "total_step", None)
            if total is None:
                raise ConfigError(f"{self.config.method}: the rank schedule needs the number of optimizer steps: "
                                  f"set total_step in the config or call set_total_step(T) first")
            self.set_total_step(total)
        self.allocate(t, optimizer)

    # ------------------------------------------------------------------------------------------ callback hooks
    def on_train_begin(self, state) -> None:
        self.optimizer = state.optimizer
        if self.total_steps is None:
            self.set_total_step(getattr(self.config, "total_step", None) or state.total_steps)

    def before_optimizer_step(self, state) -> None:
        if not self.runs_after_optimizer_step:
            self.step(state.global_step, state.optimizer)

    def after_optimizer_step(self, state) -> None:
        if self.runs_after_optimizer_step:
            self.step(state.global_step, state.optimizer)

    def on_step_end(self, state) -> None:
        total = sum(self.ranks().values())
        if total != self.logged_budget and state.is_main:
            state.log({"rank_budget": total})
        self.logged_budget = total

    def state_dict(self) -> dict:
        return {"rank_pattern": self.config.rank_pattern, "total_steps": self.total_steps,
                "logged_budget": self.logged_budget, "extra": self.extra_state()}

    def load_state_dict(self, state: dict) -> None:
        self.resize_to(state["rank_pattern"], self.optimizer)
        self.total_steps = state["total_steps"]
        self.logged_budget = state["logged_budget"]
        self.load_extra_state(state["extra"])
