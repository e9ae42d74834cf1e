"""Magnitude thresholds for top-k trimming without a full sort.

Two ways to get the k-th smallest value of a (possibly huge, streamed) set of non-negative float32 values:

* :func:`kth_smallest` — in memory, ``torch.kthvalue`` on the concatenation.
* :class:`StreamingKth` — exact, two streaming passes, constant memory. For non-negative float32, the
  int32 bit pattern is monotonic in the value, so its high 16 bits (sign, exponent, 7 mantissa bits: a
  histogram of log2|x| with 128 sub-bins per octave) index a 32768-bin histogram. Pass 1 counts values per
  bin and locates the bin holding the k-th smallest value; pass 2 histograms the low 16 bits of the values
  in that bin (65536 bins), which pins down the exact bit pattern of the k-th smallest value. Nothing but
  the two histograms is kept, even when millions of values tie (e.g. zero deltas of frozen layers). Both
  paths return the very same float (tested).

:func:`keep_threshold` turns a density into the rank to ask for, for both top-k conventions of the specs:
``"exact"`` keeps the n = floor(density*D) largest (absent ties), ``"threshold"`` (TIES reference code) keeps
every value >= the (D-n)-th smallest, i.e. n+1 values absent ties.
"""
from __future__ import annotations

import math
from typing import Iterable

import torch

_BINS = 1 << 15  # high 16 bits of a non-negative float32 (sign bit is 0)


def _bins_of(x: torch.Tensor) -> torch.Tensor:
    return (x.contiguous().view(torch.int32) >> 16).long()


def kth_smallest(values: torch.Tensor | Iterable[torch.Tensor], k: int) -> float:
    """k-th smallest (1-indexed) of the concatenated float32 values, in memory."""
    if not isinstance(values, torch.Tensor):
        values = torch.cat([v.reshape(-1).float() for v in values])
    return float(values.reshape(-1).float().kthvalue(k).values)


class StreamingKth:
    """Exact k-th smallest of non-negative float32 values fed in chunks, over two passes.

    Usage: ``s = StreamingKth(k)``; feed every chunk to ``s.count(chunk)``; call ``s.locate()``; feed the same
    chunks again to ``s.collect(chunk)``; read ``s.value()``.
    """

    def __init__(self, k: int):
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        self.k = k
        self.hist = torch.zeros(_BINS, dtype=torch.int64)
        self.low = torch.zeros(1 << 16, dtype=torch.int64)
        self.total = 0
        self.bin: int | None = None
        self.rank_in_bin = 0

    def count(self, chunk: torch.Tensor) -> None:
        x = chunk.reshape(-1).float()
        if x.numel() and bool((x < 0).any()):
            raise ValueError("StreamingKth takes non-negative values (magnitudes)")
        self.hist += torch.bincount(_bins_of(x), minlength=_BINS)
        self.total += x.numel()

    def locate(self) -> None:
        if self.k > self.total:
            raise ValueError(f"k={self.k} exceeds the number of values ({self.total})")
        cum = self.hist.cumsum(0)
        self.bin = int(torch.searchsorted(cum, torch.tensor(self.k), right=False))
        below = int(cum[self.bin - 1]) if self.bin > 0 else 0
        self.rank_in_bin = self.k - below

    def collect(self, chunk: torch.Tensor) -> None:
        bits = chunk.reshape(-1).float().contiguous().view(torch.int32)
        sel = bits[(bits >> 16) == self.bin]
        if sel.numel():
            self.low += torch.bincount((sel & 0xFFFF).long(), minlength=1 << 16)

    def value(self) -> float:
        low = int(torch.searchsorted(self.low.cumsum(0), torch.tensor(self.rank_in_bin), right=False))
        return float(torch.tensor([(self.bin << 16) | low], dtype=torch.int32).view(torch.float32))


def keep_threshold(total: int, density: float, mode: str = "exact") -> int | None:
    """Rank k (1-indexed, ascending) whose value t gives the keep rule ``|x| >= t``.

    Returns None when everything is kept (density >= 1) and 0 when nothing is kept ("exact" mode, n = 0).
    """
    if mode not in ("exact", "threshold"):
        raise ValueError(f"topk_mode must be 'exact' or 'threshold', got {mode!r}")
    if density >= 1 or total == 0:
        return None
    n = math.floor(density * total)
    if mode == "exact":
        return 0 if n == 0 else total - n + 1
    k = total - n
    return None if k < 1 else k
