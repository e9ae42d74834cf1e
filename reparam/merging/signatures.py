"""Robust Weight Signatures (Cai, Zhang, Wang, ICML 2023; spec weight_signatures.md): the per-tensor
projection that turns a robust model's delta into a signature, and the linear quantiser that stores it.

Files (extraction from safetensors, patching, removal, composition) are handled by delta.py: a signature is
a delta extracted with ``clean=`` (theta_std), whose tensors went through :func:`signature` and optionally
:func:`quantize_linear`. Patching is ``apply_delta(target, sig, out, scale=alpha)``; un-patching is
``remove_delta``; several signatures compose (``apply_delta(target, [s1, s2], out, scale=[a1, a2])``, the
reference default being alpha_c = alpha / |C|).

Not implemented, by design or for lack of data (spec sections in brackets):
* BatchNorm statistics re-estimation after patching ["BatchNorm statistics"]: it needs corrupted training
  images and forward passes; signatures exclude running stats, so patching keeps the target's statistics;
* the log and tanh quantisers ["Compression"]; codes are stored one per byte (uint8, so L <= 256 levels)
  rather than packed into ceil(log2 L) bits;
* the reference code's quirks (alpha applied twice; bn/downsample keys averaged) ["Patching"]: reparam
  applies alpha once and patches every selected tensor with its signature.
"""
from __future__ import annotations

import torch


def signature(delta: torch.Tensor, clean_delta: torch.Tensor) -> torch.Tensor:
    """v = d - (<d, a> / <a, a>) a over the flattened tensor (d: robust delta, a: clean delta); v = d if a = 0.

    Computed in float64 (dot products and the subtraction), so the result is orthogonal to `a` up to the
    final rounding to float32 (or stays float64 when `delta` is float64).
    """
    out_dtype = torch.float64 if delta.dtype == torch.float64 else torch.float32
    d, a = delta.double(), clean_delta.double()
    aa = torch.dot(a.reshape(-1), a.reshape(-1))
    if aa == 0:
        return d.to(out_dtype)
    coef = torch.dot(d.reshape(-1), a.reshape(-1)) / aa
    return (d - coef * a).to(out_dtype)


def quantize_linear(v: torch.Tensor, levels: int, name: str = "tensor") -> tuple[torch.Tensor, torch.Tensor]:
    """L uniformly spaced levels on [min v, max v]: uint8 codes and the float32 range [min, max].

    A constant tensor (min = max) keeps its value with all codes 0 (spec pitfall: no division by zero).
    """
    if not 2 <= levels <= 256:
        raise ValueError(f"quantization levels must be in [2, 256], got {levels}")
    x = v.double()
    if x.numel() == 0:
        return torch.zeros(v.shape, dtype=torch.uint8), torch.zeros(2, dtype=torch.float32)
    if not torch.isfinite(x).all():
        raise ValueError(f"{name}: cannot quantise a delta with inf or nan values")
    lo, hi = x.min(), x.max()
    if hi == lo:
        codes = torch.zeros(v.shape, dtype=torch.uint8)
    else:
        codes = torch.round((x - lo) / (hi - lo) * (levels - 1)).clamp_(0, levels - 1).to(torch.uint8)
    return codes, torch.stack([lo, hi]).float()


def dequantize_linear(codes: torch.Tensor, value_range: torch.Tensor, levels: int) -> torch.Tensor:
    """v_q = min + code * (max - min) / (L - 1), in float32 (computed in float64, rounded once)."""
    lo, hi = value_range.double()
    if hi == lo:
        return torch.full(codes.shape, float(lo), dtype=torch.float32)
    return (lo + codes.double() * ((hi - lo) / (levels - 1))).float()
