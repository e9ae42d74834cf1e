"""DAREx-q (Deng et al., ICLR 2025, spec darex.md §1): DARE's random drop, but the survivors are rescaled by 1/q
with a tuned q in [1 - p, 1] instead of DARE's 1/(1 - p), which is far too large at extreme drop rates.

reparam name ``darex`` (not in mergekit): drop-and-rescale each model's delta, then a weighted sum as
``dare_linear`` (one model with weight 1 is plain DAREx-q delta compression). Global ``normalize`` (false) and
``lambda`` (1.0); per model ``weight`` (1.0), ``density`` (1 - p, 1.0 = no drop) and

* ``q``: one rescale for every tensor (global q);
* ``q_per_key``: ``{tensor name: q}`` (per-layer q, e.g. from the analytical q_e). A bias without an entry uses
  the q of its weight matrix; other tensors without an entry use ``q``, else the mean of the ``q_per_key``
  values (spec §1). A name that is not a merged tensor is an error.

Without either, q = density: DARE's rescale. q must lie in [density, 1] (q < 1 - p would rescale beyond DARE,
spec "Known pitfalls"); q = 1 is DropOnly. Masks come from the same generator as DARE's (seed, model index,
tensor name), so for q = density the result equals ``dare_linear`` bit for bit. The drop is element-wise and
independent, so there is no tensor-vs-global scope: whole-model q is ``q``, per-tensor q is ``q_per_key``.
Reference key scope (keep the heads): encoders ``exclude: ['classifier']``; decoders prune only ``mlp`` and
``self_attn`` keys. Choosing q (validation or unsupervised output change) is a separate step:
:mod:`reparam.merging.darex_q`.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch

from ..params import check_range
from ..sparsify import bernoulli
from .base import MethodSpec, TensorContext
from .gta import random_sparsified_kernel


@dataclass
class DarexParams:
    normalize: bool = False
    lambda_: float = 1.0


def _check_q(name: str, q) -> None:
    if not isinstance(q, (int, float)) or isinstance(q, bool) or not 0 < q <= 1:
        raise ValueError(f"{name} must be a number in (0, 1], got {q!r}")


@dataclass
class DarexModelParams:
    weight: float = 1.0
    density: float = 1.0
    q: float | None = None
    q_per_key: dict | None = None

    def __post_init__(self):
        check_range("density", self.density, 0.0, 1.0)
        if self.q is not None:
            _check_q("q", self.q)
        if self.q_per_key is not None:
            if not isinstance(self.q_per_key, dict) or not self.q_per_key:
                raise ValueError(f"q_per_key must be a non-empty mapping of tensor name to q, got {self.q_per_key!r}")
            for key, q in self.q_per_key.items():
                _check_q(f"q_per_key[{key!r}]", q)

    def q_for(self, key: str) -> float:
        """The rescale q of tensor `key` (see the module docstring for the fallbacks)."""
        per_key = self.q_per_key or {}
        if key in per_key:
            return float(per_key[key])
        if key.endswith(".bias") and key[:-len("bias")] + "weight" in per_key:
            return float(per_key[key[:-len("bias")] + "weight"])
        if self.q is not None:
            return float(self.q)
        if per_key:
            return sum(map(float, per_key.values())) / len(per_key)
        return float(self.density)


def darex(delta: torch.Tensor, density: float, q: float, gen) -> torch.Tensor:
    """DAREx-q on one float32 delta: DARE's mask (keep probability `density`), survivors divided by q."""
    return bernoulli(delta, density, gen, rescale_mode="none") / q


_drop_and_sum = random_sparsified_kernel(lambda delta, m, p, gen: darex(delta, m.density, m.q, gen), consensus=False)


def merge_tensor(base: torch.Tensor, tensors: Sequence[torch.Tensor], per_model: Sequence[DarexModelParams],
                 params: DarexParams, ctx: TensorContext) -> torch.Tensor:
    # the shared kernel's sparsifier does not see the tensor name, so resolve each model's q for it here
    resolved = [dataclasses.replace(m, q=m.q_for(ctx.key), q_per_key=None) for m in per_model]
    return _drop_and_sum(base, tensors, resolved, params, ctx)


def check(params: DarexParams, per_model: Sequence[DarexModelParams], key: str) -> None:
    for i, m in enumerate(per_model):
        q = m.q_for(key)
        if q < m.density:
            raise ValueError(f"model {i}, tensor {key!r}: q={q:g} is below density={m.density:g} (= 1 - p), which "
                             f"rescales more than DARE; use q in [density, 1]")


def check_keys(merged: Sequence[str], per_model: Sequence[DarexModelParams]) -> None:
    """q_per_key must name merged tensors: a typo would otherwise silently fall back to the mean q."""
    known = set(merged)
    for i, m in enumerate(per_model):
        unknown = sorted(set(m.q_per_key or {}) - known)
        if unknown:
            raise ValueError(f"model {i}: q_per_key names tensor(s) that are not merged: "
                             f"{', '.join(map(repr, unknown[:5]))}" + (" ..." if len(unknown) > 5 else ""))


SPEC = MethodSpec("darex", DarexParams, DarexModelParams, merge_tensor, randomized=True, check=check,
                  check_keys=check_keys, description="DARE's random drop, survivors rescaled by 1/q, weighted sum")


def darex_merge(base: Mapping[str, torch.Tensor], models: Sequence[Mapping[str, torch.Tensor]], *,
                density: float | Sequence[float], q: float | Sequence[float] | None = None,
                q_per_key: Mapping[str, float] | None = None, weights: Sequence[float] | None = None,
                lambda_: float = 1.0, normalize: bool = False, seed: int = 0, **options) -> dict[str, torch.Tensor]:
    """DAREx-q over in-memory state dicts; `density`, `q` and `weights` may be per model."""
    from ..engine import merge_state_dicts
    return merge_state_dicts("darex", base, models, {"lambda": lambda_, "normalize": normalize},
                             {"weight": weights, "density": density, "q": q,
                              "q_per_key": dict(q_per_key) if q_per_key is not None else None},
                             seed=seed, **options)
