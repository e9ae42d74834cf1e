"""One SVD utility for every method that decomposes a pretrained weight (PiSSA, SORSA, SVFit, SoMA, PELA).

Computed in float32 (float64 when asked, as the exactness tests do), never in the storage dtype: a bf16
SVD leaves a residual with large error. Results are cached per weight tensor and its version counter,
so two adapters on the same model do not decompose the same matrix twice.

A progress bar covers the decompositions of one adapt call (`progress`, used by reparam.adapt): automatic mode
shows it only for large models; set_progress(True/False) or REPARAM_SVD_PROGRESS=1/0 forces it on or off.
"""
from __future__ import annotations

import contextlib
import math
import os
import weakref

import torch

# id(tensor) -> (weakref to it, key, result); a dead weakref or another key means a miss. The full U, Vh
# are kept: call clear_cache() after adapting a large model to free them.
_CACHE: dict[int, tuple] = {}


def clear_cache() -> None:
    _CACHE.clear()


# Automatic mode shows the bar when the weights of one adapt call take more than this many multiply-adds to
# decompose (Σ d_out·d_in·min(d_out, d_in): all-linear on the bundled 6-layer MiniLM is ~4e9, 1-3 s on one core;
# a 7B Llama ~3e13), and only after AUTO_DELAY_S, so tiny models and tests stay silent.
AUTO_MIN_WORK = 2e10
AUTO_DELAY_S = 1.0
_show_progress: bool | None = None  # set_progress(); None = automatic
_active_progress: "_Progress | None" = None


def set_progress(show: bool | None) -> bool | None:
    """Force the SVD progress bar on (True) or off (False), or back to automatic (None); returns the old setting."""
    global _show_progress
    old, _show_progress = _show_progress, show
    return old


class _Progress:
    """One tqdm bar over the decompositions made inside a `progress` block, created at the first one."""

    def __init__(self, shapes: list, desc: str):
        self.total, self.desc = len(shapes), desc
        work = sum(s[0] * math.prod(s[1:]) * min(s[0], math.prod(s[1:])) for s in shapes if len(s) >= 2)
        show = _show_progress
        if show is None and os.environ.get("REPARAM_SVD_PROGRESS") in ("0", "1"):
            show = os.environ["REPARAM_SVD_PROGRESS"] == "1"
        self.show = work >= AUTO_MIN_WORK if show is None else show
        self.delay = AUTO_DELAY_S if show is None else 0.0
        self.bar = None

    def advance(self, matrix: torch.Tensor) -> None:
        if not self.show:
            return
        if self.bar is None:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=self.total, desc=self.desc, unit="matrix", delay=self.delay, dynamic_ncols=True)
        self.bar.set_postfix_str("x".join(map(str, matrix.shape)), refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


@contextlib.contextmanager
def progress(weights, desc: str = "SVD"):
    """Show one progress bar for the decompositions made inside the block; `weights` are the tensors about to be
    decomposed (one adapt call's layers). Nothing is shown for methods that decompose nothing or when every
    matrix is cached; a nested block joins the outer bar."""
    global _active_progress
    if _active_progress is not None:
        yield
        return
    _active_progress = _Progress([tuple(w.shape) for w in weights], desc)
    try:
        yield
    finally:
        _active_progress.close()
        _active_progress = None


def svd(matrix: torch.Tensor, compute_dtype=torch.float32, niter: int | None = None, rank: int | None = None,
        cache: bool = True):
    """Thin SVD (U, S, Vh) of a 2-D tensor, cached unless cache=False (a matrix decomposed once, such as a
    merged delta). niter selects torch.svd_lowrank with `rank` columns."""
    key = (matrix._version, compute_dtype, niter, rank if niter is not None else None)
    hit = _CACHE.get(id(matrix)) if cache else None
    if hit is not None and hit[0]() is matrix and hit[1] == key:
        return hit[2]
    w = matrix.detach().to(compute_dtype)
    if niter is None:
        result = torch.linalg.svd(w, full_matrices=False)
    else:
        U, S, V = torch.svd_lowrank(w, q=rank, niter=niter)
        result = (U, S, V.T)
    if _active_progress is not None:
        _active_progress.advance(matrix)
    if cache:
        _CACHE[id(matrix)] = (weakref.ref(matrix), key, result)
    return result


def svd_split(matrix: torch.Tensor, r: int, part: str = "principal", compute_dtype=torch.float32,
              niter: int | None = None, cache: bool = True):
    """Split W = U_r diag(S_r) Vh_r + W_res; part="principal" takes the r largest singular triplets,
    "minor" the r smallest. Everything returned is in compute_dtype."""
    k = min(matrix.shape)
    if not 0 < r <= k:
        raise ValueError(f"rank r={r} must be between 1 and min(d_out, d_in)={k} for a {tuple(matrix.shape)} weight")
    if part not in ("principal", "minor"):
        raise ValueError(f"part must be 'principal' or 'minor', got {part!r}")
    if niter is not None and part == "minor":
        raise ValueError("a randomized SVD (niter) only finds principal components")
    U, S, Vh = svd(matrix, compute_dtype, niter, r, cache)
    sel = slice(0, r) if part == "principal" else slice(k - r, k)
    U_r, S_r, Vh_r = U[:, sel], S[sel], Vh[sel, :]
    W_res = matrix.detach().to(compute_dtype) - (U_r * S_r) @ Vh_r
    return U_r, S_r, Vh_r, W_res
