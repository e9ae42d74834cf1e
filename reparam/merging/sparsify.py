"""Per-tensor sparsifiers used by TIES, DARE, Breadcrumbs and DELLA, plus seeded generators.

All functions take and return float32 tensors (the engine casts before and after). Selection by rank never
sorts the whole tensor except DELLA's per-row ranks: :func:`smallest_mask` finds the n smallest entries
with :func:`~reparam.merging.threshold.kth_value` (histogram, then ``kthvalue`` in one bucket) and breaks ties
at the boundary by index (lower index first), so counts are exact.
"""
from __future__ import annotations

import hashlib

import torch

from .fused import Stream, uniform
from .threshold import kth_value

RESCALE_MODES = ("inverse_keep", "l1", "l2", "linf", "none")


def generator_for(seed: int | None, model_index: int, key: str) -> Stream:
    """The random stream of (seed, model index, tensor name), keyed by a stable hash of the three. Counter based
    (:mod:`reparam.merging.fused`): ~1 ns an entry in parallel, where torch.bernoulli costs ~20 and numpy's
    SFC64 ~2.4 on one core, and DARE draws one per parameter."""
    digest = hashlib.sha256(f"{0 if seed is None else int(seed)}|{model_index}|{key}".encode()).digest()
    return Stream(int.from_bytes(digest[:8], "little"))


def _with_ties(flat: torch.Tensor, beyond: torch.Tensor, t: torch.Tensor, n: int) -> torch.Tensor:
    """`beyond` (entries strictly past the boundary value t) plus the first entries equal to t, up to n."""
    need = n - int(beyond.count_nonzero())  # (sum() of a bool tensor is ~20x slower)
    if need > 0:  # ties at the boundary: lower flat index first
        beyond[(flat == t).nonzero().squeeze(1)[:need]] = True
    return beyond


def smallest_mask(a: torch.Tensor, n: int) -> torch.Tensor:
    """Boolean mask of exactly n entries of `a` with the smallest values (ties: lower flat index first)."""
    flat = a.reshape(-1)
    if n <= 0:
        return torch.zeros_like(a, dtype=torch.bool)
    if n >= flat.numel():
        return torch.ones_like(a, dtype=torch.bool)
    t = kth_value(flat, n)
    return _with_ties(flat, flat < t, t, n).reshape(a.shape)


def largest_mask(a: torch.Tensor, n: int) -> torch.Tensor:
    """Boolean mask of exactly n entries with the largest values (ties: lower flat index first); the same
    mask as ``smallest_mask(-a, n)`` without negating a copy of `a`."""
    flat = a.reshape(-1)
    if n <= 0:
        return torch.zeros_like(a, dtype=torch.bool)
    if n >= flat.numel():
        return torch.ones_like(a, dtype=torch.bool)
    t = kth_value(flat, flat.numel() - n + 1)
    return _with_ties(flat, flat > t, t, n).reshape(a.shape)


def rescale(delta: torch.Tensor, kept: torch.Tensor, mode: str, keep_prob: torch.Tensor | float | None,
            eps: float = 1e-7) -> torch.Tensor:
    """Rescale the masked tensor `kept` (= mask * delta, a fresh tensor: it is rescaled in place).

    inverse_keep: divide by the keep probability (DARE/DELLA papers; E[out] = delta);
    l1/l2/linf: match the norm of `delta` (current mergekit), skipped when either norm < eps; none: as is.
    """
    if mode == "none":
        return kept
    if mode == "inverse_keep":
        if keep_prob is None:
            return kept
        return kept.div_(keep_prob)
    if mode == "l1":
        before, after = delta.abs().sum(), kept.abs().sum()
    elif mode == "l2":
        before, after = delta.norm(), kept.norm()
    elif mode == "linf":
        before, after = delta.abs().max(), kept.abs().max()
    else:
        raise ValueError(f"unknown rescale mode {mode!r}; valid: {', '.join(RESCALE_MODES)}")
    if before < eps or after < eps:
        return kept
    return kept.mul_(before / after)


def magnitude(delta: torch.Tensor, density: float, *, threshold: float | None = None, topk_mode: str = "exact",
              rescale_mode: str = "none", inplace: bool = False) -> torch.Tensor:
    """Keep the largest-|delta| fraction `density` (TIES trim).

    With `threshold` (global scope, precomputed per model) keep |delta| >= threshold. Otherwise per tensor:
    "exact" keeps floor(density*d) entries, "threshold" keeps every entry >= the (d-n)-th smallest |delta|.
    `inplace`: `delta` may be overwritten (without rescaling, the result is `delta` itself, masked).
    """
    if density >= 1 and threshold is None:
        return delta
    a = delta.abs()
    if threshold is not None:
        mask = a >= threshold
    else:
        d = delta.numel()
        n = int(density * d)
        if topk_mode == "exact":
            mask = largest_mask(a, n)
        elif topk_mode == "threshold":
            k = d - n
            mask = torch.ones_like(a, dtype=torch.bool) if k < 1 else a >= kth_value(a, k)
        else:
            raise ValueError(f"topk_mode must be 'exact' or 'threshold', got {topk_mode!r}")
    mask = a.copy_(mask)  # |delta| is no longer needed: the mask as 0/1 floats (float*bool is far slower)
    if inplace and rescale_mode == "none":
        return delta.mul_(mask)
    kept = delta * mask
    return rescale(delta, kept, rescale_mode, min(1.0, max(density, 1e-12)))


def bernoulli(delta: torch.Tensor, density: float, gen: Stream, rescale_mode: str = "inverse_keep"
              ) -> torch.Tensor:
    """DARE: keep each entry independently with probability `density` (uniform < density), then rescale."""
    if density >= 1:
        return delta
    if density <= 0:
        return torch.zeros_like(delta)
    mask = uniform(gen, delta).lt_(density)  # 0/1 floats in the uniforms' storage (float*bool is far slower)
    return rescale(delta, mask.mul_(delta), rescale_mode, density)  # mask * delta, in the mask's storage


def magnitude_outliers(delta: torch.Tensor, density: float, gamma: float = 0.01, rescale_mode: str = "none"
                       ) -> torch.Tensor:
    """Breadcrumbs: drop the `gamma` fraction of largest |delta| and the smallest, keeping `density` in all."""
    if density >= 1:
        return delta
    n = delta.numel()
    keep = int(density * n)
    n_top = int(gamma * n)
    n_bot = n - keep - n_top
    if n_bot < 0:
        n_top += n_bot
        n_bot = 0
    a = delta.abs()
    top = largest_mask(a, n_top)
    bot = smallest_mask(a.masked_fill(top, float("inf")), n_bot)
    kept = delta * ~(top | bot)
    return rescale(delta, kept, rescale_mode, max(density, 1e-12))


def magprune(delta: torch.Tensor, density: float, epsilon: float, gen: Stream,
             rescale_mode: str = "inverse_keep") -> torch.Tensor:
    """DELLA MAGPRUNE: per row, keep probability rises linearly with magnitude rank from density-eps to
    density+eps (rows = last dimension; a 1-D tensor is one row; a row of length 1 gets rank 1)."""
    if density >= 1:
        return delta
    if density <= 0:
        return torch.zeros_like(delta)
    if not (density - epsilon > 0 and density + epsilon < 1):
        raise ValueError(f"DELLA needs 0 < density - epsilon and density + epsilon < 1 "
                         f"(density={density}, epsilon={epsilon})")
    x = delta.reshape(-1, delta.shape[-1]) if delta.dim() > 0 else delta.reshape(1, 1)
    cols = x.shape[1]
    if cols > 1:
        order = x.abs().argsort(dim=1, stable=True)
        steps = torch.arange(cols, dtype=torch.float32).div_(cols - 1).expand_as(x)
        ranks = torch.empty_like(x).scatter_(1, order, steps)  # normalised rank of every entry
    else:
        ranks = torch.ones_like(x)
    p = (density - epsilon) + 2 * epsilon * ranks
    kept = x * uniform(gen, p).lt_(p)
    out = rescale(x, kept, rescale_mode, p)
    return out.reshape(delta.shape)
