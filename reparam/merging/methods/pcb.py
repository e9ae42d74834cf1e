"""PCB-merging, Parameter Competition Balancing (Du et al., NeurIPS 2024); spec: specs/merge/pcb.md.

The spec makes the released reference implementation normative. With T the N x D matrix of task vectors
tau_i = theta_i - theta_0 (one row per model) and every statistic taken per row:

  1. clip: A_i = clamp(|tau_i|, lo_i, hi_i), lo_i / hi_i = |tau_i| at ascending 0-based positions
     int(D*eps_clip) and int(D*(1-eps_clip)) - 1; clipped deltas tau_c_i = sign(tau_i) * A_i;
  2. intra-balancing: exp(N * minmax(A_i)^2), minmax(A_i) = (A_i - lo_i) / (hi_i - lo_i);
  3. inter-balancing: tanh(tau_i * sum_j tau_j) (``inter: raw``, standalone and NLP scripts; unclipped tau),
     or tanh(tau_i * sum_j sign(tau_j) minmax(A_j)) (``inter: normalized``, the ViT script);
  4. beta = intra * inter;
  5. drop: q_i = beta_i at position int(D*(1-pcb_ratio)); s_i = minmax(max(beta_i, q_i))
     = (max(beta_i, q_i) - q_i) / (max beta_i - q_i): 0 for dropped entries (beta <= q_i), at most 1;
  6. theta = theta_0 + lambda * sum_i w_i s_i tau_c_i / max(sum_i s_i, 1e-12).

Config (``merge_method: pcb``): global ``pcb_ratio`` (r, fraction kept per model, 0.1), ``eps_clip`` (1e-4,
the standalone script; the NLP/ViT scripts use 0.01), ``lambda`` (1.0), ``inter`` (raw | normalized),
``scope`` (global | tensor); per model ``weight``: the per-task lambda_i of the spec (ES mode). As in the
reference, per-task lambda_i replace the global lambda (which is then 1); setting both is an error, since the
spec says not to mix them. Per-task lambda_i from an evolutionary search: :mod:`.pcb_search`.

Scope: the default is ``global`` (row = the whole model, D = all merged scalars): it is what the normative
reference computes and what its numbers were produced with; mergekit has no PCB to follow. It costs extra
streaming sweeps before the merge (exact, :class:`~reparam.merging.engine.StatsRun`): 2 for the clip
quantiles lo_i, hi_i of |tau_i| (after clipping, min and max of A_i are exactly lo_i and hi_i, so they give
minmax(A_i) without another sweep), then 2 for q_i and max beta_i. ``tensor`` applies the same algorithm to
each tensor alone (row = one tensor, one pass; a 1-element tensor then keeps theta_0, its row being constant).

Numerics: float32, or float64 when N > 60 (spec: exp(N) overflows float32 near N = 88) or when the inputs
are float64. Constant rows (hi_i <= lo_i, e.g. a model equal to the base, or max beta_i = q_i) get weight 0
and a warning (spec pitfall; a constant row also adds nothing to the ``normalized`` inter score). Unlike
the reference, which raises IndexError there, a ratio so small that int(D*(1-r)) = D keeps nothing.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch

from ..errors import MergeConfigError
from ..params import check_choice
from .base import MethodSpec, TensorContext

_DENOM_FLOOR = 1e-12  # reference: s.sum(0).clamp(min=1e-12)
_FLOAT64_ABOVE = 60  # models; exp(N * 1) overflows float32 near N = 88
_UNIFORM = ("pcb_ratio", "eps_clip", "inter", "scope")  # one value for the whole model in global scope


def _number(name: str, value) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise ValueError(f"{name} must be a number, got {value!r}")


@dataclass
class PcbParams:
    pcb_ratio: float = 0.1
    eps_clip: float = 1e-4
    lambda_: float = 1.0
    inter: str = "raw"
    scope: str = "global"

    def __post_init__(self):
        _number("pcb_ratio", self.pcb_ratio)
        if not 0 < self.pcb_ratio <= 1:
            raise ValueError(f"pcb_ratio (fraction kept per model) must be in (0, 1], got {self.pcb_ratio!r}")
        _number("eps_clip", self.eps_clip)
        if not 0 <= self.eps_clip < 0.5:
            raise ValueError(f"eps_clip (fraction clipped per side) must be in [0, 0.5), got {self.eps_clip!r}")
        _number("lambda", self.lambda_)
        check_choice("inter", self.inter, ("raw", "normalized"))
        check_choice("scope", self.scope, ("global", "tensor"))


@dataclass
class PcbModelParams:
    weight: float | None = None  # lambda_i of the spec; None: 1 (and the global lambda applies)

    def __post_init__(self):
        if self.weight is not None:
            _number("weight", self.weight)


@dataclass(frozen=True)
class RowStats:
    """Global-scope statistics of one model's row: clip bounds, drop quantile, max beta, compute dtype."""

    lo: float
    hi: float
    q: float
    top: float
    dtype: torch.dtype


def clip_positions(d: int, eps_clip: float) -> tuple[int, int]:
    """0-based ascending positions of lo and hi among d magnitudes (the reference's int() truncation; a
    hi position of -1, when d * (1 - eps_clip) < 1, indexes from the end as Python indexing does there)."""
    return int(d * eps_clip), (int(d * (1 - eps_clip)) - 1) % d


def drop_position(d: int, pcb_ratio: float) -> int:
    return min(int(d * (1 - pcb_ratio)), d - 1)  # d - 1 only when 1 - r rounds to 1: nothing kept


def work_dtype(n_models: int, dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if n_models > _FLOAT64_ABOVE or dtype == torch.float64 else torch.float32


def task_matrix(base: torch.Tensor, tensors: Sequence[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    b = base.to(dtype)
    return torch.stack([t.to(dtype) - b for t in tensors]).reshape(len(tensors), -1)


def balance(T: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, inter: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Steps 1-4 for the rows of T (N x d) with clip bounds lo, hi (N x 1): (clipped deltas, beta)."""
    # in-place where possible: these N x d temporaries dominate time and memory; same operations as written
    A = T.abs().clamp_(lo, hi)
    span = hi - lo
    unit = (A - lo).div_(torch.where(span > 0, span, 1.0)).mul_(span > 0)  # minmax(A); constant rows: 0
    intra = unit.square().mul_(T.shape[0]).exp_()  # exp(N * minmax(A)^2)
    sign = T.sign()
    other = T if inter == "raw" else sign.mul(unit)
    inter_score = other.sum(0, keepdim=True).mul(T).tanh_()  # tanh(tau_i * sum_j other_j)
    return A.mul_(sign), intra.mul_(inter_score)


def drop_weights(beta: torch.Tensor, q: torch.Tensor, top: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Step 5: s = minmax(max(beta, q)) per row (its min is q, its max is max beta); invalid rows: 0."""
    span = top - q
    return torch.where(valid & (span > 0), (torch.maximum(beta, q) - q) / span, 0.0)


def combine(base: torch.Tensor, Tc: torch.Tensor, s: torch.Tensor, weights: Sequence[float | None],
            lambda_: float) -> torch.Tensor:
    """Step 6: theta_0 + lambda * sum_i w_i s_i tau_c_i / max(sum_i s_i, 1e-12); per-task w_i replace lambda."""
    per_task = any(w is not None for w in weights)
    ws = s
    if per_task:
        ws = torch.tensor([1.0 if w is None else float(w) for w in weights], dtype=Tc.dtype)[:, None] * s
    tau_m = (ws * Tc).sum(0) / s.sum(0).clamp(min=_DENOM_FLOOR)
    if not per_task and lambda_ != 1:
        tau_m = lambda_ * tau_m
    return base.to(Tc.dtype) + tau_m.reshape(base.shape)


def _column(values: Sequence[float], dtype: torch.dtype) -> torch.Tensor:
    return torch.tensor(list(values), dtype=dtype)[:, None]


def _warn_constant(what: str, rows: Sequence[int]) -> None:
    warnings.warn(f"pcb: {what}: no entry kept for model(s) {list(rows)} (constant clipped magnitudes, e.g. "
                  f"equal to the base, or pcb_ratio * size < 1): their delta gets weight 0", stacklevel=3)


def clipped_and_weights(base: torch.Tensor, tensors: Sequence[torch.Tensor], params: PcbParams,
                        ctx: TensorContext) -> tuple[torch.Tensor, torch.Tensor]:
    """Steps 1-5 for one tensor: clipped deltas tau_c and weights s (N x numel), global or per-tensor stats."""
    if params.scope == "global":
        if ctx.thresholds is None:
            raise MergeConfigError(f"pcb: tensor {ctx.key!r} has scope 'global' but the first merged tensor "
                                   f"has scope 'tensor'; scope must be the same for every tensor")
        stats: list[RowStats] = ctx.thresholds
        T = task_matrix(base, tensors, stats[0].dtype)
        lo, hi, q, top = (_column([getattr(r, f) for r in stats], T.dtype) for f in ("lo", "hi", "q", "top"))
        Tc, beta = balance(T, lo, hi, params.inter)
        return Tc, drop_weights(beta, q, top, hi > lo)
    T = task_matrix(base, tensors, work_dtype(len(tensors), base.dtype))
    d = T.shape[1]
    if d == 0:
        return T, T
    i_lo, i_hi = clip_positions(d, params.eps_clip)
    A = T.abs()
    lo = A.kthvalue(i_lo + 1, dim=1, keepdim=True).values
    hi = A.kthvalue(i_hi + 1, dim=1, keepdim=True).values
    Tc, beta = balance(T, lo, hi, params.inter)
    q = beta.kthvalue(drop_position(d, params.pcb_ratio) + 1, dim=1, keepdim=True).values
    s = drop_weights(beta, q, beta.amax(1, keepdim=True), hi > lo)
    dead = [i for i in range(len(tensors)) if not bool(s[i].any()) and bool(T[i].any())]
    if dead:  # an all-zero delta (a tensor this model did not train) is expected and not worth a warning
        _warn_constant(f"tensor {ctx.key!r}", dead)
    return Tc, s


def merge_tensor(base: torch.Tensor, tensors: Sequence[torch.Tensor], per_model: Sequence[PcbModelParams],
                 params: PcbParams, ctx: TensorContext) -> torch.Tensor:
    Tc, s = clipped_and_weights(base, tensors, params, ctx)
    return combine(base, Tc, s, [m.weight for m in per_model], params.lambda_)


def global_stats(run) -> list[RowStats]:
    """Global scope: lo_i, hi_i (2 sweeps), then q_i and max beta_i (2 more sweeps; float64: 4 + 4)."""
    first = run.merged[0].params
    for kp in run.merged:
        for name in _UNIFORM:
            if getattr(kp.params, name) != getattr(first, name):
                raise MergeConfigError(f"pcb scope 'global' needs one {name} for the whole model: tensor "
                                       f"{kp.key!r} has {getattr(kp.params, name)!r}, {run.merged[0].key!r} has "
                                       f"{getattr(first, name)!r}")
    n, d = run.n_models, run.total
    dtype = work_dtype(n, torch.float64 if any(run.load_dtype(kp) == torch.float64 for kp in run.merged)
                       else torch.float32)
    i_lo, i_hi = clip_positions(d, first.eps_clip)
    clip = run.order_stats(lambda base, ts, kp: list(task_matrix(base, ts, dtype).abs()),
                           [[i_lo + 1, i_hi + 1]] * n, dtype, desc="pcb clip quantiles")
    lo, hi = _column([c[0] for c in clip], dtype), _column([c[1] for c in clip], dtype)
    drop = run.order_stats(lambda base, ts, kp: list(balance(task_matrix(base, ts, dtype), lo, hi, first.inter)[1]),
                           [[drop_position(d, first.pcb_ratio) + 1, d]] * n, dtype, desc="pcb drop quantiles")
    stats = [RowStats(clip[i][0], clip[i][1], drop[i][0], drop[i][1], dtype) for i in range(n)]
    dead = [i for i, r in enumerate(stats) if not (r.hi > r.lo and r.top > r.q)]
    if dead:
        _warn_constant("whole model", dead)
    return stats


def _check(params: PcbParams, per_model: Sequence[PcbModelParams], key: str) -> None:
    if params.lambda_ != 1 and any(m.weight is not None for m in per_model):
        raise ValueError(f"tensor {key!r}: give either the global 'lambda' or per-model 'weight' (the per-task "
                         f"lambda_i, which replace it), not both")


SPEC = MethodSpec("pcb", PcbParams, PcbModelParams, merge_tensor, global_stats=lambda p: p.scope == "global",
                  stats=global_stats, check=_check,
                  description="intra/inter balancing scores, drop, weighted average of clipped deltas")


def pcb_merge(base: Mapping[str, torch.Tensor], models: Sequence[Mapping[str, torch.Tensor]], *,
              pcb_ratio: float = 0.1, eps_clip: float = 1e-4, lambda_: float = 1.0,
              lambda_per_task: Sequence[float] | None = None, inter: str = "raw", scope: str = "global",
              **options) -> dict[str, torch.Tensor]:
    """PCB over in-memory state dicts; `lambda_per_task` (lambda_i, replacing `lambda_`) is one float per model."""
    from ..engine import merge_state_dicts
    params = {"pcb_ratio": pcb_ratio, "eps_clip": eps_clip, "lambda": lambda_, "inter": inter, "scope": scope}
    return merge_state_dicts("pcb", base, models, params, {"weight": lambda_per_task}, **options)
