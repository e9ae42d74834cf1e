"""One SVD utility for every method that decomposes a pretrained weight (PiSSA, SORSA, SVFit, SoMA, PELA).

Computed in float32 (float64 when asked, as the exactness tests do), never in the storage dtype: a bf16
SVD leaves a residual with large error. Results are cached per weight tensor and its version counter,
so two adapters on the same model do not decompose the same matrix twice.
"""
from __future__ import annotations

import weakref

import torch

# id(tensor) -> (weakref to it, key, result); a dead weakref or another key means a miss. The full U, Vh
# are kept: call clear_cache() after adapting a large model to free them.
_CACHE: dict[int, tuple] = {}


def clear_cache() -> None:
    _CACHE.clear()


def svd(matrix: torch.Tensor, compute_dtype=torch.float32, niter: int | None = None, rank: int | None = None):
    """Thin SVD (U, S, Vh) of a 2-D tensor, cached. niter selects torch.svd_lowrank with `rank` columns."""
    key = (matrix._version, compute_dtype, niter, rank if niter is not None else None)
    hit = _CACHE.get(id(matrix))
    if hit is not None and hit[0]() is matrix and hit[1] == key:
        return hit[2]
    w = matrix.detach().to(compute_dtype)
    if niter is None:
        result = torch.linalg.svd(w, full_matrices=False)
    else:
        U, S, V = torch.svd_lowrank(w, q=rank, niter=niter)
        result = (U, S, V.T)
    _CACHE[id(matrix)] = (weakref.ref(matrix), key, result)
    return result


def svd_split(matrix: torch.Tensor, r: int, part: str = "principal", compute_dtype=torch.float32,
              niter: int | None = None):
    """Split W = U_r diag(S_r) Vh_r + W_res; part="principal" takes the r largest singular triplets,
    "minor" the r smallest. Everything returned is in compute_dtype."""
    k = min(matrix.shape)
    if not 0 < r <= k:
        raise ValueError(f"rank r={r} must be between 1 and min(d_out, d_in)={k} for a {tuple(matrix.shape)} weight")
    if part not in ("principal", "minor"):
        raise ValueError(f"part must be 'principal' or 'minor', got {part!r}")
    if niter is not None and part == "minor":
        raise ValueError("a randomized SVD (niter) only finds principal components")
    U, S, Vh = svd(matrix, compute_dtype, niter, r)
    sel = slice(0, r) if part == "principal" else slice(k - r, k)
    U_r, S_r, Vh_r = U[:, sel], S[sel], Vh[sel, :]
    W_res = matrix.detach().to(compute_dtype) - (U_r * S_r) @ Vh_r
    return U_r, S_r, Vh_r, W_res
