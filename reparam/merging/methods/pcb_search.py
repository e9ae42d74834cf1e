"""PCB "ES" option: per-task coefficients lambda_i found by an evolutionary search (specs/merge/pcb.md).

The objective is a validation metric of theta_0 + sum_i lambda_i s_i tau_c_i / sum_i s_i, maximised over
lambda in a box. beta and s do not depend on lambda, so :func:`pcb_components` computes tau_c and s once (in
memory, N x D each) and :meth:`PcbComponents.merge` only redoes step 6; its result is bit-identical to
``pcb_merge(..., lambda_per_task=lambdas)``.

:func:`pcb_search` takes an ``evaluate(state_dict) -> float`` callback (higher is better) that must score the
**validation** split only (the released NLP script scored its ``test`` split, a pitfall the spec warns
about); report test metrics separately with the returned lambdas. Defaults are the released ViT-B/32 script's:
init 1.0, bounds [0.8, 1.3], 100 evaluations (the NLP script: init = user value, bounds [0.5, 3.0], 200).
Optimisers: ``cma`` (default, needs nothing) and ``ngopt`` (the released code's nevergrad ``NGOpt``; needs
the ``nevergrad`` package). The paper's CMA-ES settings were not found; recommended choice (spec): mean = init,
sigma0 = 0.25 * (upper - lower), population 4 + floor(3 ln N), candidates clipped into the box, same budget.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import torch

from ..errors import MergeConfigError
from .base import TensorContext
from .pcb import clipped_and_weights, combine


@dataclass
class PcbComponents:
    """Per merged tensor: base, clipped deltas tau_c and weights s; other tensors as they are copied."""

    merged: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.dtype]]
    copied: dict[str, torch.Tensor]
    n_models: int

    def merge(self, lambdas: Sequence[float] | None = None, lambda_: float = 1.0) -> dict[str, torch.Tensor]:
        """Step 6 with per-task `lambdas` (replacing `lambda_`) or one global `lambda_`."""
        if lambdas is not None and len(lambdas) != self.n_models:
            raise MergeConfigError(f"pcb: got {len(lambdas)} lambdas for {self.n_models} models")
        weights = [float(x) for x in lambdas] if lambdas is not None else [None] * self.n_models
        out = dict(self.copied)
        for key, (base, tc, s, out_dtype) in self.merged.items():
            out[key] = combine(base, tc, s, weights, lambda_).to(out_dtype)
        return {k: out[k] for k in sorted(out)}


def pcb_components(base: Mapping[str, torch.Tensor], models: Sequence[Mapping[str, torch.Tensor]],
                   params: Mapping | None = None, **options) -> PcbComponents:
    """Steps 1-5 of PCB over in-memory state dicts (config parameter names; `lambda` is ignored here)."""
    from ..engine import _load_key, _per_model_values, build_plan, thresholds_in_memory
    from ..io import DictSource
    from ..registry import get_method
    plan = build_plan(get_method("pcb"), DictSource(base, "base"),
                      [DictSource(m, f"model[{i}]") for i, m in enumerate(models)], dict(params or {}),
                      _per_model_values(None, len(models)), **options)
    stats = thresholds_in_memory(plan) if plan.needs_stats() else None
    merged, copied = {}, {}
    for kp in plan.keys:
        b, ts = _load_key(plan, kp)
        if kp.merge:
            ctx = TensorContext(kp.key, plan.seed, list(range(len(models))), stats)
            merged[kp.key] = (b, *clipped_and_weights(b, ts, kp.params, ctx), kp.out_dtype)
        else:
            copied[kp.key] = ts[0].to(kp.out_dtype)
    return PcbComponents(merged, copied, len(models))


def cma_es(objective: Callable[[list[float]], float], x0: Sequence[float], lower: float, upper: float,
           budget: int, seed: int = 0) -> list[tuple[list[float], float]]:
    """Maximise `objective` in the box [lower, upper]^n with a (mu/mu_w, lambda)-CMA-ES (Hansen's tutorial
    defaults), candidates clipped into the box, at most `budget` evaluations. Returns (x, f) per evaluation."""
    n = len(x0)
    pop = 4 + int(3 * math.log(n))
    mu = pop // 2
    w = torch.tensor([math.log(mu + 0.5) - math.log(i) for i in range(1, mu + 1)], dtype=torch.float64)
    w = w / w.sum()
    mueff = float(1 / (w ** 2).sum())
    cc, cs = (4 + mueff / n) / (n + 4 + 2 * mueff / n), (mueff + 2) / (n + mueff + 5)
    c1 = 2 / ((n + 1.3) ** 2 + mueff)
    cmu = min(1 - c1, 2 * (mueff - 2 + 1 / mueff) / ((n + 2) ** 2 + mueff))
    damps = 1 + 2 * max(0.0, math.sqrt((mueff - 1) / (n + 1)) - 1) + cs
    chi_n = math.sqrt(n) * (1 - 1 / (4 * n) + 1 / (21 * n * n))
    mean = torch.tensor([float(v) for v in x0], dtype=torch.float64).clamp(lower, upper)
    sigma = 0.25 * (upper - lower)
    C = torch.eye(n, dtype=torch.float64)
    pc, ps = torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)
    gen = torch.Generator().manual_seed(seed)
    history: list[tuple[list[float], float]] = []
    generation = 0
    while len(history) < budget:
        eigval, B = torch.linalg.eigh(C)
        D = eigval.clamp(min=1e-20).sqrt()
        z = torch.randn(min(pop, budget - len(history)), n, generator=gen, dtype=torch.float64)
        x = (mean + sigma * (z * D) @ B.T).clamp(lower, upper)
        scores = []
        for xi in x:
            scores.append(float(objective(xi.tolist())))
            history.append((xi.tolist(), scores[-1]))
        if len(scores) < mu:  # a last, partial generation: nothing to update
            break
        order = torch.tensor(scores, dtype=torch.float64).argsort(descending=True)[:mu]
        y = (x[order] - mean) / sigma  # steps of the clipped candidates
        yw = w @ y
        mean = mean + sigma * yw
        ps = (1 - cs) * ps + math.sqrt(cs * (2 - cs) * mueff) * (B @ ((B.T @ yw) / D))
        generation += 1
        hsig = float(ps.norm()) / math.sqrt(1 - (1 - cs) ** (2 * generation)) / chi_n < 1.4 + 2 / (n + 1)
        pc = (1 - cc) * pc + hsig * math.sqrt(cc * (2 - cc) * mueff) * yw
        C = ((1 - c1 - cmu) * C + c1 * (torch.outer(pc, pc) + (not hsig) * cc * (2 - cc) * C)
             + cmu * (y.T * w) @ y)
        sigma *= math.exp((cs / damps) * (float(ps.norm()) / chi_n - 1))
    return history


def _ngopt(objective, x0, lower, upper, budget, seed):
    try:
        import nevergrad as ng
        import numpy as np
    except ImportError:
        raise MergeConfigError("pcb search: optimizer 'ngopt' needs the nevergrad package "
                               "(pip install nevergrad); optimizer 'cma' needs nothing") from None
    param = ng.p.Array(init=np.asarray(x0, dtype=float)).set_bounds(lower, upper)
    param.random_state = np.random.RandomState(seed)
    opt = ng.optimizers.NGOpt(parametrization=param, budget=budget)
    history = []
    for _ in range(budget):
        cand = opt.ask()
        x = [float(v) for v in cand.value]
        score = float(objective(x))
        opt.tell(cand, -score)  # nevergrad minimises
        history.append((x, score))
    return history


@dataclass
class SearchResult:
    lambdas: list[float]
    score: float  # best validation score
    history: list[tuple[list[float], float]] = field(default_factory=list)


def pcb_search(base: Mapping[str, torch.Tensor], models: Sequence[Mapping[str, torch.Tensor]],
               evaluate: Callable[[dict[str, torch.Tensor]], float], *, init: float | Sequence[float] = 1.0,
               bounds: tuple[float, float] = (0.8, 1.3), budget: int = 100, optimizer: str = "cma", seed: int = 0,
               params: Mapping | None = None, **options) -> SearchResult:
    """Search per-task lambda_i maximising `evaluate` (a validation metric) of the PCB merge."""
    lower, upper = (float(b) for b in bounds)
    if not lower < upper:
        raise MergeConfigError(f"pcb search: bounds must satisfy lower < upper, got {bounds!r}")
    if optimizer not in ("cma", "ngopt"):
        raise MergeConfigError(f"pcb search: optimizer must be 'cma' or 'ngopt', got {optimizer!r}")
    if not isinstance(budget, int) or budget < 1:
        raise MergeConfigError(f"pcb search: budget must be a positive integer, got {budget!r}")
    x0 = [float(init)] * len(models) if isinstance(init, (int, float)) else [float(v) for v in init]
    if len(x0) != len(models):
        raise MergeConfigError(f"pcb search: init has {len(x0)} values for {len(models)} models")
    parts = pcb_components(base, models, params, **options)
    run = cma_es if optimizer == "cma" else _ngopt
    history = run(lambda lam: evaluate(parts.merge(lam)), x0, lower, upper, budget, seed)
    best = max(history, key=lambda h: h[1])
    return SearchResult(best[0], best[1], history)
