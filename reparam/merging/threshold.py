"""Exact order statistics (thresholds, quantiles) of huge, streamed sets of floats without a full sort.

Two ways to get the k-th smallest value of the values of a whole model:

* :func:`kth_smallest` — in memory, ``torch.kthvalue`` on the concatenation.
* :func:`kth_value` — one tensor in memory (per-tensor TIES trim): one histogram sweep locates the bucket,
  ``kthvalue`` runs inside it only (3-5x faster than ``kthvalue`` on millions of values, same float).
* :class:`StreamingOrderStats` — exact radix selection over streaming sweeps, constant memory. Each float is
  mapped to an integer whose signed order is the float order (:func:`_ordered_keys`: the IEEE bit pattern,
  with the magnitude bits of negative values flipped). Sweep 1 histograms the top 16 bits of the keys (for a
  non-negative float32: exponent and 7 mantissa bits, i.e. a histogram of log2|x| with 128 sub-bins per
  octave) and locates the bucket holding the k-th smallest; each further sweep histograms the next 16 bits
  of the keys inside the located prefix. float32 needs 2 sweeps, float64 4. Nothing but the histograms is
  kept, even when millions of values tie (e.g. zero deltas of frozen layers). Both paths return the very
  same float (tested). :class:`StreamingKth` is the one-rank float32 form used by TIES.

:func:`keep_threshold` turns a density into the rank to ask for, for both top-k conventions of the specs:
``"exact"`` keeps the n = floor(density*D) largest (absent ties), ``"threshold"`` (TIES reference code) keeps
every value >= the (D-n)-th smallest, i.e. n+1 values absent ties.
"""
from __future__ import annotations

import math
import sys
from typing import Iterable, Sequence

import torch

_DIGIT = 16  # bits of the order key resolved per streaming sweep
_BUCKETS = 1 << _DIGIT


def _ordered_keys(x: torch.Tensor) -> torch.Tensor:
    """Integers whose signed order is the float order: float32 -> int32, float64 -> int64.

    Negative floats get their magnitude bits flipped. -0.0 is first made +0.0 (by adding 0.0) so that both
    zeros share one key, as ``kthvalue`` treats them as equal.
    """
    x = x.reshape(-1)
    if x.dtype != torch.float64:
        x = x.float()
    x = (x + 0.0).contiguous()
    nbits = 8 * x.element_size()
    bits = x.view(torch.int64 if nbits == 64 else torch.int32)
    return bits ^ ((bits >> (nbits - 1)) & ((1 << (nbits - 1)) - 1))


def _key_to_float(key: int, dtype: torch.dtype) -> float:
    nbits = 64 if dtype == torch.float64 else 32
    bits = torch.tensor([key], dtype=torch.int64 if nbits == 64 else torch.int32)
    bits = bits ^ ((bits >> (nbits - 1)) & ((1 << (nbits - 1)) - 1))  # the key map is its own inverse
    return float(bits.view(torch.float64 if nbits == 64 else torch.float32))


def kth_smallest(values: torch.Tensor | Iterable[torch.Tensor], k: int) -> float:
    """k-th smallest (1-indexed) of the concatenated values (float32, or float64 if given), in memory."""
    if not isinstance(values, torch.Tensor):
        values = torch.cat([v.reshape(-1) for v in values])
    values = values.reshape(-1)
    if values.dtype != torch.float64:
        values = values.float()
    return float(values.kthvalue(k).values) + 0.0  # -0.0 -> 0.0, as the streaming path returns


_INF_BUCKET = (0x7F80_0000 >> _DIGIT) + _BUCKETS // 2  # top-16-bit bucket of +inf's key (and of small NaNs)
_NEG_INF_BUCKET = _BUCKETS - 1 - _INF_BUCKET  # -inf's bucket; negative NaNs sit at or below it
_LITTLE_ENDIAN = sys.byteorder == "little"
_HISTOGRAM_MIN = 1 << 16  # below this many values kthvalue alone is as fast


def kth_value(x: torch.Tensor, k: int) -> torch.Tensor:
    """``x.reshape(-1).kthvalue(k).values`` (k 1-indexed), found without partitioning the whole tensor.

    The in-memory, single-tensor form of the radix selection above: one histogram of the top 16 bits of the
    order keys locates the bucket holding the k-th smallest, then ``kthvalue`` runs on that bucket's values
    only. Same float as ``kthvalue``. Tensors that are small or not float32 go straight to ``kthvalue``, and
    so do those with a value in the +-inf buckets (where NaNs, which kthvalue orders last, could hide).
    """
    flat = x.reshape(-1)
    if flat.dtype != torch.float32 or flat.numel() < _HISTOGRAM_MIN:
        return flat.kthvalue(k).values
    # Fast path for magnitudes: with the sign bit clear the key is the bit pattern itself, and its top 16 bits
    # are the high half-word, read in place (little-endian). Otherwise the full key map (a few more sweeps).
    top = flat.contiguous().view(torch.int16)[1::2].contiguous() if _LITTLE_ENDIAN else None
    if top is not None and int(top.min()) >= 0:
        counts = torch.bincount(top, minlength=_BUCKETS // 2)
        offset = _BUCKETS // 2  # bucket index b here is b + offset in the signed-key histogram
    else:
        top = (_ordered_keys(flat) >> (32 - _DIGIT)).add_(_BUCKETS // 2)
        counts = torch.bincount(top, minlength=_BUCKETS)
        offset = 0
    if counts[_INF_BUCKET - offset:].any() or (offset == 0 and counts[:_NEG_INF_BUCKET + 1].any()):
        return flat.kthvalue(k).values
    cum = counts.cumsum_(0)
    bucket = int(torch.searchsorted(cum, torch.tensor(k), right=False))
    rank_left = k - (int(cum[bucket - 1]) if bucket > 0 else 0)
    return flat[top == bucket].kthvalue(rank_left).values


class StreamingOrderStats:
    """Exact order statistics of float32 or float64 values fed in chunks, by radix selection over sweeps.

    ``ranks`` are 1-indexed ascending positions (rank = number of values gives the maximum). Usage: for each
    of ``self.passes`` sweeps, ``feed`` every chunk, then call ``next_pass()``; then ``values()`` gives one
    float per rank. Memory: one 65536-bucket histogram per rank.
    """

    def __init__(self, ranks: Sequence[int], dtype: torch.dtype = torch.float32):
        if any(k < 1 for k in ranks):
            raise ValueError(f"ranks must be >= 1, got {list(ranks)}")
        self.dtype = torch.float64 if dtype == torch.float64 else torch.float32
        self.nbits = 64 if self.dtype == torch.float64 else 32
        self.passes = self.nbits // _DIGIT
        self.ranks = list(ranks)
        self.rank_left = list(ranks)  # rank among the values sharing the prefix resolved so far
        self.prefix: list[int] = [0] * len(ranks)  # top (sweep * 16) bits of each wanted key, signed
        self.hists = [torch.zeros(_BUCKETS, dtype=torch.int64) for _ in ranks]
        self.sweep = 0
        self.total = 0

    def feed(self, chunk: torch.Tensor) -> None:
        if (chunk.dtype == torch.float64) != (self.dtype == torch.float64):
            raise ValueError(f"expected {self.dtype} values, got {chunk.dtype}")
        keys = _ordered_keys(chunk)
        shift = self.nbits - _DIGIT * (self.sweep + 1)
        if self.sweep == 0:
            self.total += keys.numel()
            counts = torch.bincount(((keys >> shift) + _BUCKETS // 2).long(), minlength=_BUCKETS)
            for h in self.hists:
                h += counts
            return
        for h, pre in zip(self.hists, self.prefix):
            sel = keys[(keys >> (shift + _DIGIT)) == pre]
            if sel.numel():
                h += torch.bincount(((sel >> shift) & (_BUCKETS - 1)).long(), minlength=_BUCKETS)

    def next_pass(self) -> None:
        if self.sweep == 0 and self.ranks and max(self.ranks) > self.total:
            raise ValueError(f"k={max(self.ranks)} exceeds the number of values ({self.total})")
        for j, h in enumerate(self.hists):
            cum = h.cumsum(0)
            digit = int(torch.searchsorted(cum, torch.tensor(self.rank_left[j]), right=False))
            self.rank_left[j] -= int(cum[digit - 1]) if digit > 0 else 0
            self.prefix[j] = digit - _BUCKETS // 2 if self.sweep == 0 else (self.prefix[j] << _DIGIT) | digit
            h.zero_()
        self.sweep += 1

    def values(self) -> list[float]:
        if self.sweep != self.passes:
            raise RuntimeError(f"{self.sweep} of {self.passes} sweeps done")
        return [_key_to_float(p, self.dtype) for p in self.prefix]


class StreamingKth(StreamingOrderStats):
    """Exact k-th smallest of float32 values over two sweeps (TIES magnitudes).

    Usage: ``s = StreamingKth(k)``; feed every chunk to ``s.count(chunk)``; call ``s.locate()``; feed the same
    chunks again to ``s.collect(chunk)``; read ``s.value()``.
    """

    def __init__(self, k: int):
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        super().__init__([k])
        self.k = k

    count = collect = StreamingOrderStats.feed
    locate = StreamingOrderStats.next_pass

    def value(self) -> float:
        if self.sweep == 1:
            self.next_pass()  # the collect sweep ends here
        return self.values()[0]


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
