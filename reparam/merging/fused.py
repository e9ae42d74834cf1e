"""Fused per-tensor kernels (numba) for the generalized-task-arithmetic merges: TIES, DARE, task arithmetic.

Why: the torch form of a TIES merge (:func:`~reparam.merging.methods.gta.gta_merge_tensor`) makes ~20 passes
over every delta (cast, subtract, |.|, histogram, mask, multiply, election, counts, divide, add), each one a
trip through main memory; on a 2-core machine that is ~8x the time it takes to read the models. Here every
step runs inside one loop over cache-sized chunks, in parallel over the tensor:

* :func:`magnitude_threshold` finds a model's exact trim threshold of |theta_i - theta_0| (the very float
  ``kthvalue`` returns) in one sweep: a sample gives the few values around the wanted rank, the sweep counts
  the entries below and up to each of them (bf16 deltas tie, so one of them usually holds the rank), or, when
  the sample shows many distinct values there, counts those outside a bracket and gathers those inside; when
  the sample misleads, radix selection (top 16 bits of the float32 pattern, then the low 16) decides in two
  sweeps. When more entries tie at the threshold than may be kept, it also gives the flat index up to which
  ties are kept (lower index first, as :func:`~reparam.merging.sparsify.largest_mask`).
* :func:`merge` computes the deltas again (cheaper than storing them), applies each model's keep rule
  (magnitude threshold or a DARE draw), weights, elects signs, takes the disjoint (weighted) mean and adds
  the base, writing float32 or bfloat16 directly.

The results equal the torch path bit for bit (tests/merging/test_fused.py); the torch path stays for what
the kernels do not cover (other dtypes, more than 4 models, norm rescaling, non-finite values).

Random draws (DARE, DELLA) come from :func:`uniform`: a counter-based generator (the splitmix64 finaliser
of key + (index // 2) * golden gamma; its top 24 bits make the even draw, the next 24 the odd one, as a
float32 in [0, 1)), so entry j of a tensor gets the same number whichever chunk or thread draws it; the key
is a hash of (seed, model index, tensor name).
"""
from __future__ import annotations

import itertools
import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass

import numpy as np
import torch
from numba import njit, types
from llvmlite import ir
from numba.extending import intrinsic, overload

_CHUNK = 4096  # elements per inner block: a few float32 buffers of this size stay in L1/L2
_INF_TOP = 0x7F80  # top 16 bits of +inf: this bucket and above hold inf and NaN

KEEP_ALL, KEEP_MAGNITUDE, KEEP_RANDOM = 0, 1, 2
CONSENSUS = {None: 0, "sum": 1, "count": 2}

_GAMMA = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


@intrinsic
def _float_of(typingctx, bits):
    """The float32 whose bit pattern is the uint32 `bits` (a register bitcast)."""
    return types.float32(types.uint32), lambda context, builder, sig, args: builder.bitcast(args[0], ir.FloatType())


def _value(src, j):
    """src[j] as float32; src holds float32 values or bfloat16 bit patterns (uint16)."""


@overload(_value)
def _value_impl(src, j):
    if src.dtype == types.uint16:
        return lambda src, j: _float_of(np.uint32(src[j]) << np.uint32(16))
    return lambda src, j: src[j]


@njit(inline="always")
def _load(src, lo, n, dst):
    """dst[:n] = float32(src[lo:lo+n]); src holds float32 values or bfloat16 bit patterns (uint16).

    The kernels slice before their inner loops: indexed as src[lo + j], numba's check for a negative index
    kept LLVM from vectorising the loop (2-5x slower)."""
    part = src[lo:lo + n]
    for j in range(n):
        dst[j] = _value(part, j)


@njit(inline="always")
def _add32(count, flag):
    """count + flag in 32 bits: numba widens int32 + int32 to int64, and 64-bit sums of booleans vectorise
    4 lanes wide on AVX2 instead of 8 (the bracket sweep ran at half the speed)."""
    return np.int32(count + np.int32(flag))


@njit(inline="always")
def _abs_delta(x, base, lo, m, xb, bb):
    """xb[:m] = |x - base| over entries lo .. lo+m-1 (bb is scratch for the base's chunk)."""
    _load(base, lo, m, bb)
    part = x[lo:lo + m]
    for j in range(m):
        xb[j] = abs(_value(part, j) - bb[j])


def _store(dst, lo, n, src):
    """dst[lo:lo+n] = src[:n] as float32, or rounded to bfloat16 bits (uint16) as torch rounds."""


@overload(_store)
def _store_impl(dst, lo, n, src):
    if dst.dtype == types.uint16:
        def store_bf16(dst, lo, n, src):
            part, bits = dst[lo:lo + n], src.view(np.uint32)
            for j in range(n):
                b = bits[j]
                if src[j] != src[j]:  # NaN -> the canonical quiet NaN, as c10::BFloat16
                    part[j] = np.uint16(0x7FC0)
                else:  # round to nearest, ties to even
                    part[j] = np.uint16((b + np.uint32(0x7FFF) + ((b >> np.uint32(16)) & np.uint32(1)))
                                        >> np.uint32(16))
        return store_bf16

    def store_f32(dst, lo, n, src):
        part = dst[lo:lo + n]
        for j in range(n):
            part[j] = src[j]
    return store_f32


@njit(inline="always")
def _mix(z):
    z = (z ^ (z >> np.uint64(30))) * _M1
    z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


_U24 = np.float32(1.0 / (1 << 24))


@njit(inline="always")
def _uniform_at(key, index):
    """Draw `index` of stream `key`: one 64-bit hash serves draws 2k (its top 24 bits) and 2k+1 (the next 24)."""
    h = _mix(key + np.uint64(index >> 1) * _GAMMA)
    return np.float32((h >> np.uint64(40)) if index & 1 == 0 else ((h >> np.uint64(16)) & np.uint64(0xFFFFFF))) * _U24


@njit(inline="always")
def _draws(key, start, m, u):
    """u[:m] = draws start .. start+m-1 of stream `key`: from an even start one hash per pair of entries (its
    two halves are _uniform_at's even and odd draws), otherwise one draw at a time."""
    paired = (m // 2) * 2 if start % 2 == 0 else 0
    for q in range(paired // 2):
        h = _mix(key + np.uint64((start >> 1) + q) * _GAMMA)
        u[2 * q] = np.float32(h >> np.uint64(40)) * _U24
        u[2 * q + 1] = np.float32((h >> np.uint64(16)) & np.uint64(0xFFFFFF)) * _U24
    for j in range(paired, m):
        u[j] = _uniform_at(key, start + j)


@njit(cache=True, nogil=True)
def _uniform_fill(key, offset, out, c_lo, c_hi):
    """Chunks c_lo .. c_hi-1 of out: the stream's draws offset + their entries."""
    n = out.size
    for c in range(c_lo, c_hi):
        lo = c * _CHUNK
        _draws(key, offset + lo, min(_CHUNK, n - lo), out[lo:])


class Stream:
    """A reproducible stream of uniforms: draw number i is a pure function of (key, i), so a kernel may draw
    any slice of it in any order; `offset` is where the next :func:`uniform` call starts."""

    def __init__(self, key: int):
        self.key = key & 0xFFFF_FFFF_FFFF_FFFF
        self.offset = 0

    def take(self, n: int) -> int:
        start, self.offset = self.offset, self.offset + n
        return start


def uniform(stream: Stream, like: torch.Tensor) -> torch.Tensor:
    """The stream's next like.numel() float32 uniforms in [0, 1), shaped and placed like `like` (row-major),
    so row chunks drawn one after the other equal the whole tensor's draw."""
    out = np.empty(like.numel(), dtype=np.float32)
    _spread(_uniform_fill, _chunks(out.size), np.uint64(stream.key), np.int64(stream.take(out.size)), out)
    u = torch.from_numpy(out).view(like.shape)
    return u if like.device.type == "cpu" else u.to(like.device)


def _skip_blas_probe() -> None:
    """Load numba's numpy support without its BLAS probe, which imports scipy.linalg when scipy is installed.

    numba imports numba.np.arraymath before its first compile or cache load, and that module tries
    numba.np.linalg.ensure_blas() once, to choose how np.correlate / np.convolve take inner products. With scipy
    installed the try imports scipy.linalg: 0.25-0.4 s of a `reparam merge` process (a twentieth of a 1B TIES
    merge on 2 cores) for kernels that call no BLAS. Here the probe fails fast instead, so np.correlate and
    np.convolve in numba code use their plain loop; every other BLAS / LAPACK user (np.dot, np.linalg.*) calls
    ensure_blas itself when compiled and still gets scipy's. Skipped when scipy.linalg is already loaded (then
    the probe is free) or numba's numpy support already is."""
    if "numba.np.arraymath" in sys.modules or "scipy.linalg" in sys.modules:
        return
    from numba.np import linalg

    probe = linalg.ensure_blas

    def unavailable():
        raise ImportError("BLAS probe skipped by reparam.merging.fused")

    linalg.ensure_blas = unavailable
    try:
        from numba.np import arraymath
    finally:
        linalg.ensure_blas = probe
    arraymath.ensure_blas = probe  # the name it imported: the real one again for anything that calls it later


_SET_UP = False
_LOCK = threading.Lock()
_POOL: ThreadPoolExecutor | None = None
_POOL_SIZE = 0
_POOL_PID = 0  # a forked child has the pool object but not its threads: it starts its own


def _threads() -> int:
    """Threads the kernels use: as many as torch does (OMP_NUM_THREADS / torch.set_num_threads)."""
    global _SET_UP
    if not _SET_UP:
        with _LOCK:
            if not _SET_UP:
                _skip_blas_probe()  # before the first kernel loads
                _SET_UP = True
    return max(1, torch.get_num_threads())


def _pool(size: int) -> ThreadPoolExecutor:
    global _POOL, _POOL_SIZE, _POOL_PID
    with _LOCK:
        if _POOL is None or _POOL_SIZE < size or _POOL_PID != os.getpid():
            if _POOL is not None and _POOL_PID == os.getpid():
                _POOL.shutdown(wait=False)  # what it has queued still runs
            _POOL = ThreadPoolExecutor(size, thread_name_prefix="reparam-merge-kernel")
            _POOL_SIZE, _POOL_PID = size, os.getpid()
        return _POOL


_PIECES = 8  # per thread: threads take the next piece when done, so one slowed by other work takes fewer


def _spread(kernel, count: int, *args) -> None:
    """kernel(*args, lo, hi) over [0, count) in contiguous pieces, on as many threads as torch uses: the calling
    thread and pool threads each take the next piece until none is left (the kernels run without the GIL).

    Why not numba's own parallel loops: its workqueue layer wakes one worker per span and sleeps the caller,
    and woken workers often landed on one core (a bracket sweep took 6-12 ms instead of 6); its OpenMP layer
    runs on the libgomp that torch loads, whose workers spin ~ms after every loop (OpenMP's default wait
    policy), which took the CPU from the reader and writer threads: 10.0 against 7.1 CPU-s on a 1B TIES
    merge. Here the caller works too and the pool's threads sleep in a queue; merges from several threads
    share the pool. Pieces rather than one span per thread: with even spans the caller waited 0.7 s of a 1B
    TIES merge for the pool thread, which shares its core with the writer (a call costs ~2 us)."""
    spans = min(_threads(), count)
    if spans <= 1:
        if count > 0:
            kernel(*args, 0, count)
        return
    pieces = min(count, spans * _PIECES)
    bounds = [count * i // pieces for i in range(pieces + 1)]
    claims = itertools.count()  # next() on it is atomic under the GIL

    def work():
        while (i := next(claims)) < pieces:
            kernel(*args, bounds[i], bounds[i + 1])

    pool = _pool(spans - 1)
    pending = [pool.submit(work) for _ in range(spans - 1)]
    try:
        work()
    finally:
        wait(pending)  # every piece ends before the outputs are read or an error leaves
    for f in pending:
        f.result()  # a piece's error


def _chunks(n: int) -> int:
    return (n + _CHUNK - 1) // _CHUNK


def _parts(n):
    # 16 per thread: a tie scan (_index_of_equal) runs through one part on one thread
    return max(1, min(16 * _threads(), _chunks(n)))


@njit(cache=True, nogil=True)
def _abs_delta_histogram(x, base, step, shift, prefix, hist, p_lo, p_hi):
    """hist[p] for parts p_lo .. p_hi-1 (entries p*step .. (p+1)*step-1): a histogram of 16 bits of
    |x - base|'s float32 pattern, the top 16 bits (shift 16), or the low 16 bits of the entries whose top 16
    bits equal `prefix` (shift 0)."""
    n = base.size
    xb = np.empty(_CHUNK, np.float32)
    bb = np.empty(_CHUNK, np.float32)
    for p in range(p_lo, p_hi):
        h = hist[p]
        for c in range(p * step, min(n, (p + 1) * step), _CHUNK):
            m = min(_CHUNK, n - c, (p + 1) * step - c)
            _abs_delta(x, base, c, m, xb, bb)
            bits = xb.view(np.uint32)
            if shift == 16:
                for j in range(m):
                    h[bits[j] >> np.uint32(16)] += 1
            else:
                for j in range(m):
                    if (bits[j] >> np.uint32(16)) == prefix:
                        h[bits[j] & np.uint32(0xFFFF)] += 1


@njit(cache=True, nogil=True)
def _index_of_equal(x, base, t, lo, hi, rank):
    """Flat index of the rank-th (1-based) entry in [lo, hi) with |x - base| == t."""
    xb = np.empty(_CHUNK, np.float32)
    bb = np.empty(_CHUNK, np.float32)
    for c in range(lo, hi, _CHUNK):
        m = min(_CHUNK, hi - c)
        _abs_delta(x, base, c, m, xb, bb)
        for j in range(m):
            if xb[j] == t:
                rank -= 1
                if rank == 0:
                    return c + j
    return hi


def _locate(counts: np.ndarray, rank: int) -> tuple[int, int, int]:
    """(bucket holding the rank-th smallest, entries in lower buckets, entries in higher buckets)."""
    cum = np.cumsum(counts)
    bucket = int(np.searchsorted(cum, rank, side="left"))
    below = int(cum[bucket - 1]) if bucket > 0 else 0
    return bucket, below, int(cum[-1] - cum[bucket])


@njit(cache=True, nogil=True)
def _sample(x, base, blocks):
    """|x - base| over `blocks` runs of _CHUNK entries spread evenly over the tensor (runs, not single entries:
    memory is read in streams, not one cache line per entry)."""
    n = base.size
    m = min(_CHUNK, n)
    out = np.empty(blocks * m, np.float32)
    bb = np.empty(_CHUNK, np.float32)
    for b in range(blocks):
        _abs_delta(x, base, (n - m) * b // max(1, blocks - 1), m, out[b * m:], bb)
    return out


@njit(cache=True, nogil=True)
def _window_buckets(values, first, last):
    """The values in the top-14-bit buckets that hold the first-th .. last-th smallest, and how many are below."""
    bits = values.view(np.uint32)
    hist = np.zeros(1 << 14, np.int32)
    for j in range(values.size):
        hist[bits[j] >> np.uint32(18)] += 1
    below, b_lo = 0, 0
    while below + hist[b_lo] <= first:
        below += hist[b_lo]
        b_lo += 1
    b_hi, upto = b_lo, below + hist[b_lo]
    while upto <= last:
        b_hi += 1
        upto += hist[b_hi]
    size = upto - below
    picked = np.empty(size + 1, np.float32)
    lo, hi = np.uint32(b_lo) << np.uint32(18), np.uint32(b_hi + 1) << np.uint32(18)
    k = 0
    for j in range(values.size):  # branch-free: a branch mispredicted on every hit took 4x longer
        picked[min(k, size)] = values[j]
        k += (bits[j] >= lo) & (bits[j] < hi)
    return picked[:size], below


def _order_window(values, first, last):
    """The first-th .. last-th smallest (0-based) of non-negative float32 values, sorted: bucketed by the top 14
    bits of their patterns (a table that stays in cache), only the buckets that hold that range are sorted
    (np.partition of the whole 128k sample took ~10x longer)."""
    picked, below = _window_buckets(values, first, last)
    return np.sort(picked)[first - below:last - below + 1]


_GATHER_NONE, _GATHER_FEW, _GATHER_ALL = 0, 1, 2  # how _bracket collects the entries between two edges


@njit(inline="always")
def _tally(a, edge, inf, nbad, lt, le):
    """The counters after one more |delta| a: not finite, < edge, <= edge."""
    return _add32(nbad, not (a < inf)), _add32(lt, a < edge), _add32(le, a <= edge)


@njit(cache=True, nogil=True)
def _bracket(models, base, edges, nedges, gather, step, less, at_most, bad, fill, inside, p_lo, p_hi):
    """One sweep of parts p_lo .. p_hi-1 (entries p*step .. (p+1)*step-1) of every |x_i - base| against its
    sorted edges[i, :nedges[i]] (the base read once for all): per model, part and edge e, how many entries are
    < edges[i, e] (less) and how many <= it (at_most), and how many are not finite (bad); unless gather[i] is
    _GATHER_NONE, also the values in [edges[i, 0], edges[i, 1]] (inside, in index order, up to its size; fill
    counts them all). The counts add to the zeros they start from."""
    n = base.size
    nm = len(models)
    inf = np.float32(np.inf)
    xb = np.empty(_CHUNK, np.float32)
    bb = np.empty(_CHUNK, np.float32)
    for p in range(p_lo, p_hi):
        for c in range(p * step, min(n, (p + 1) * step), _CHUNK):
            m = min(_CHUNK, n - c, (p + 1) * step - c)
            _load(base, c, m, bb)
            for i in range(nm):
                # the delta, the non-finite count and the first edge's counts in one loop (most brackets have
                # one edge); 32-bit counters per chunk (_add32). The deltas are kept in xb only when another
                # edge or the gather reads them: storing them took 2/5 of the sweep.
                x, edge = models[i][c:c + m], edges[i, 0]
                nbad, lt, le = np.int32(0), np.int32(0), np.int32(0)
                if nedges[i] == 1 and gather[i] == _GATHER_NONE:
                    for j in range(m):
                        a = abs(_value(x, j) - bb[j])
                        nbad, lt, le = _tally(a, edge, inf, nbad, lt, le)
                else:
                    for j in range(m):
                        a = abs(_value(x, j) - bb[j])
                        xb[j] = a
                        nbad, lt, le = _tally(a, edge, inf, nbad, lt, le)
                bad[i, p] += nbad
                less[i, p, 0] += lt
                at_most[i, p, 0] += le
                for e in range(1, nedges[i]):
                    edge = edges[i, e]
                    lt, le = np.int32(0), np.int32(0)
                    for j in range(m):
                        lt = _add32(lt, xb[j] < edge)
                        le = _add32(le, xb[j] <= edge)
                    less[i, p, e] += lt
                    at_most[i, p, e] += le
                if gather[i] == _GATHER_NONE:
                    continue
                low, high = edges[i, 0], edges[i, 1]
                if gather[i] == _GATHER_ALL:
                    fill[i, p] = _compact(xb, 0, m, low, high, inside[i, p], fill[i, p])
                else:  # few inside: compact only the 32-entry groups that hold any (counted vectorised)
                    k = fill[i, p]
                    for g in range(0, m, 32):
                        g_end = min(m, g + 32)
                        hits = np.int32(0)
                        for j in range(g, g_end):
                            hits = _add32(hits, (low <= xb[j]) & (xb[j] <= high))
                        if hits:
                            k = _compact(xb, g, g_end, low, high, inside[i, p], k)
                    fill[i, p] = k


@njit(inline="always")
def _compact(values, start, end, low, high, row, k):
    """Append values[start:end] that lie in [low, high] to row from position k (clamped to its last slot: the
    caller sees the overflow in the returned count); branch-free: every value is written, k advances past
    those inside."""
    last = row.size - 1
    for j in range(start, end):
        v = values[j]
        row[min(k, last)] = v
        k += (low <= v) & (v <= high)
    return k


@njit(cache=True, nogil=True)
def _select_inside(inside, fill, left):
    """Among the gathered values (inside[p, :fill[p]] for each part p; non-negative, so their bit patterns
    order as they do): the left-th smallest (1-based) as its bit pattern, how many are greater, and per part
    how many equal it. Radix selection again (top 16 bits, then low 16), on a few % of the tensor."""
    nparts = fill.size
    top = np.zeros(65536, np.int64)
    for p in range(nparts):
        bits = inside[p].view(np.uint32)
        for j in range(fill[p]):
            top[bits[j] >> np.uint32(16)] += 1
    bucket = 0
    while left > top[bucket]:
        left -= top[bucket]
        bucket += 1
    low = np.zeros(65536, np.int64)
    for p in range(nparts):
        bits = inside[p].view(np.uint32)
        for j in range(fill[p]):
            if (bits[j] >> np.uint32(16)) == bucket:
                low[bits[j] & np.uint32(0xFFFF)] += 1
    digit = 0
    while left > low[digit]:
        left -= low[digit]
        digit += 1
    key = np.uint32((bucket << 16) | digit)
    greater = 0
    equal = np.zeros(nparts, np.int64)
    for p in range(nparts):
        bits = inside[p].view(np.uint32)
        k = 0
        for j in range(fill[p]):
            greater += bits[j] > key
            k += bits[j] == key
        equal[p] = k
    return key, greater, equal


_SAMPLE = 1 << 17  # entries sampled to place the bracket (in runs of _CHUNK)


def _bits_float(bits: int) -> np.float32:
    """The float32 whose bit pattern is `bits`."""
    return np.array([bits], dtype=np.uint32).view(np.float32)[0]


def magnitude_threshold(x: np.ndarray, base: np.ndarray, keep: int, mode: str = "exact"
                        ) -> tuple[float, int] | None:
    """(t, cut) such that entry j of |x - base| is kept iff it is > t, or == t with j < cut.

    ``exact``: exactly `keep` entries (0 < keep < size; ties at t: lower index first); ``threshold``: every
    entry >= the (size-keep)-th smallest. None when the values hold inf or NaN (the caller takes the torch
    path). See :func:`magnitude_thresholds`."""
    found = magnitude_thresholds((x,), base, [keep], mode)
    return None if found is None else found[0]


_CANDIDATES = 4  # at most this many distinct sampled values near the rank are counted one by one
_FEW_SHARE = 0.02  # below this share of entries inside a bracket, _GATHER_FEW beats _GATHER_ALL


def magnitude_thresholds(models: tuple, base: np.ndarray, keeps: list[int], mode: str = "exact"
                         ) -> list[tuple[float, int]] | None:
    """:func:`magnitude_threshold` of several models against one base, in one sweep over all of them.

    A sample (32 runs of 4096 entries) gives a window of values around each wanted rank (its order statistics
    +-4 sigma of the rank error away). bf16 deltas tie a lot (one value can hold 2-7 % of a tensor), so the
    window usually holds a few distinct values: one sweep then counts, for each, the entries below it and up
    to it, and the threshold is the value whose count range holds the rank (its ties per part come with it).
    When the window holds many values (float32 models), the sweep counts the entries below and above the
    window and gathers those inside (~1 %), and the exact value comes from those (:func:`_select_inside`).
    Should a sample mislead (the rank falls outside the window or between two counted values, or too many
    entries fall inside), the two-sweep radix selection of :func:`_radix_threshold` decides for that model;
    all give the very float ``kthvalue`` gives. None when any model's deltas hold inf or NaN."""
    n = base.size
    parts = _parts(n)
    step = (n + parts - 1) // parts
    ranks = [n - keep + 1 if mode == "exact" else n - keep for keep in keeps]  # ascending, 1-based
    edges = np.zeros((len(models), _CANDIDATES), np.float32)
    nedges = np.empty(len(models), np.int64)
    gather = np.empty(len(models), np.int8)
    for i, (x, rank) in enumerate(zip(models, ranks)):
        sample = _sample(x, base, max(1, min(n, _SAMPLE) // _CHUNK))
        if not np.isfinite(sample).all():
            return None
        taken, q = sample.size, rank / n
        margin = 4.0 * (taken * q * (1 - q)) ** 0.5 + 16
        ends = [max(0, int(q * taken - margin)), min(taken - 1, int(q * taken + margin))]
        window = np.unique(_order_window(sample, ends[0], ends[1]))
        if window.size <= _CANDIDATES:
            edges[i, :window.size], nedges[i], gather[i] = window, window.size, _GATHER_NONE
        else:
            edges[i, :2], nedges[i] = (window[0], window[-1]), 2
            share = ((sample >= window[0]) & (sample <= window[-1])).mean()
            gather[i] = _GATHER_FEW if share < _FEW_SHARE else _GATHER_ALL
    cap = step // 8 + 64 if (gather != _GATHER_NONE).any() else 1
    nm, width = len(models), edges.shape[1]
    less, at_most = np.zeros((nm, parts, width), np.int64), np.zeros((nm, parts, width), np.int64)
    bad, fill = np.zeros((nm, parts), np.int64), np.zeros((nm, parts), np.int64)
    inside = np.empty((nm, parts, cap), np.float32)
    _spread(_bracket, parts, models, base, edges, nedges, gather, step, less, at_most, bad, fill, inside)
    if bad.any():
        return None
    found = []
    for i, (x, keep, rank) in enumerate(zip(models, keeps, ranks)):
        lt, le = less[i].sum(axis=0), at_most[i].sum(axis=0)
        e = int(np.searchsorted(le[:nedges[i]], rank))  # the first edge with rank <= entries up to it
        if e < nedges[i] and lt[e] < rank:  # the rank falls on edge e's value itself
            t, greater, ties = edges[i, e], n - int(le[e]), at_most[i, :, e] - less[i, :, e]
        elif gather[i] != _GATHER_NONE and lt[0] < rank <= le[1] and not (fill[i] > cap).any():
            key, above, ties = _select_inside(inside[i], fill[i], rank - int(lt[0]))
            t, greater = _bits_float(int(key)), n - int(le[1]) + int(above)
        else:
            found.append(_radix_threshold(x, base, keep, rank, mode, parts))
            continue
        if mode != "exact":
            found.append((float(t), n))
            continue
        found.append((float(t), _tie_cut(x, base, t, keep - greater, ties, step)))
    return found


def _tie_cut(x, base, t, need: int, ties_per_part: np.ndarray, step: int) -> int:
    """The cut keeping the first `need` entries equal to t (all of them: the tensor's size)."""
    if need >= int(ties_per_part.sum()):
        return base.size
    p, before, _ = _locate(ties_per_part, need)  # the part holding the need-th tie
    return _index_of_equal(x, base, np.float32(t), p * step, min(base.size, (p + 1) * step), need - before) + 1


def _radix_threshold(x, base, keep: int, rank: int, mode: str, parts: int) -> tuple[float, int] | None:
    """magnitude_threshold by exact radix selection: the top 16 bits' histogram, then the low 16 bits'."""
    n = base.size
    step = (n + parts - 1) // parts

    def histogram(shift, prefix):
        hist = np.zeros((parts, 65536), np.int64)
        _spread(_abs_delta_histogram, parts, x, base, step, shift, prefix, hist)
        return hist

    top = histogram(16, 0).sum(axis=0)
    if top[_INF_TOP:].any():
        return None
    hi_bucket, below_hi, above_hi = _locate(top, rank)
    low_per_part = histogram(0, hi_bucket)
    low = low_per_part.sum(axis=0)
    digit, _, above_lo = _locate(low, rank - below_hi)
    t = _bits_float((hi_bucket << 16) | digit)
    if mode != "exact":
        return float(t), n
    need = keep - above_hi - above_lo  # ties at t that may be kept (>= 1)
    return float(t), _tie_cut(x, base, t, need, low_per_part[:, digit], step)


@njit(inline="always")
def _sign(d):
    """1, -1 or 0 as a float32 (a model's vote when the consensus counts signs)."""
    one, zero = np.float32(1.0), np.float32(0.0)
    return one if d > 0 else (-one if d < 0 else zero)


@njit(inline="always")
def _add_rows(d0, d1, d2, d3, nm):
    """0 + d0 + ... + d_{nm-1} in that order (the torch path's sum over models)."""
    total = np.float32(0.0) + d0
    if nm > 1:
        total += d1
    if nm > 2:
        total += d2
    if nm > 3:
        total += d3
    return total


@njit(inline="always")
def _disjoint_mean(d0, d1, d2, d3, nm, total, weights, normalize):
    """The (weighted) mean of the values whose sign agrees with total's (the elected sign; 0 counts as +)."""
    one, zero = np.float32(1.0), np.float32(0.0)
    sign = one if total >= 0 else -one
    agree = one if d0 * sign > 0 else zero
    mix, divisor = zero + d0 * agree, zero + weights[0] * agree
    if nm > 1:
        agree = one if d1 * sign > 0 else zero
        mix, divisor = mix + d1 * agree, divisor + weights[1] * agree
    if nm > 2:
        agree = one if d2 * sign > 0 else zero
        mix, divisor = mix + d2 * agree, divisor + weights[2] * agree
    if nm > 3:
        agree = one if d3 * sign > 0 else zero
        mix, divisor = mix + d3 * agree, divisor + weights[3] * agree
    return mix / (divisor if divisor != 0 else one) if normalize else mix


@njit(cache=True, nogil=True)
def _merge(base, models, modes, thresholds, cuts, probs, keys, offsets, scales, weights, weighted, consensus,
           normalize, fixed_divisor, lam, out, c_lo, c_hi):
    """Chunks c_lo .. c_hi-1 of the merged tensor into out."""
    # Every inner loop is over j (the chunk's entries) and free of branches on the data, so LLVM vectorises
    # it; a kept entry is d * 1.0, a dropped one d * 0.0, the products torch's masked multiply forms.
    n = base.size
    nm = len(models)
    one, zero = np.float32(1.0), np.float32(0.0)
    bb = np.empty(_CHUNK, np.float32)
    vals = np.empty((nm, _CHUNK), np.float32)
    mixed = np.empty(_CHUNK, np.float32)
    u = np.empty(_CHUNK, np.float32)
    for c in range(c_lo, c_hi):
        lo = c * _CHUNK
        m = min(_CHUNK, n - lo)
        _load(base, lo, m, bb)
        for i in range(nm):
            x, v = models[i][lo:lo + m], vals[i]
            mode, w = modes[i], weights[i] if weighted else one
            # the load, the keep rule and the weight in one loop per model
            if mode == KEEP_MAGNITUDE:
                t, cut = thresholds[i], cuts[i] - lo
                for j in range(m):
                    d = _value(x, j) - bb[j]
                    a = abs(d)
                    d *= one if (a > t) | ((a == t) & (j < cut)) else zero
                    d = d * w if weighted else d
                    v[j] = d
            elif mode == KEEP_RANDOM:
                _draws(keys[i], offsets[i] + lo, m, u)
                p, scale = probs[i], scales[i]
                for j in range(m):
                    d = (one if u[j] < p else zero) * (_value(x, j) - bb[j]) / scale
                    d = d * w if weighted else d
                    v[j] = d
            else:
                for j in range(m):
                    d = _value(x, j) - bb[j]
                    d = d * w if weighted else d
                    v[j] = d
        # The consensus with every model's kept value of an entry in a register (nm is part of the kernel's
        # type, so the `nm > k` tests fold away), one loop per consensus kind (testing it inside the loop cost
        # a third of the kernel's time): 1.15-1.2x the speed of a loop per model over arrays of sums. Sums run in
        # model order, as the torch path adds them.
        r0, r1, r2, r3 = vals[0], vals[min(1, nm - 1)], vals[min(2, nm - 1)], vals[min(3, nm - 1)]
        if consensus == 0:
            for j in range(m):
                total = _add_rows(r0[j], r1[j], r2[j], r3[j], nm)
                mixed[j] = total / fixed_divisor if normalize else total
        elif consensus == 1:
            for j in range(m):
                total = _add_rows(r0[j], r1[j], r2[j], r3[j], nm)
                mixed[j] = _disjoint_mean(r0[j], r1[j], r2[j], r3[j], nm, total, weights, normalize)
        else:
            for j in range(m):
                total = _add_rows(_sign(r0[j]), _sign(r1[j]), _sign(r2[j]), _sign(r3[j]), nm)
                mixed[j] = _disjoint_mean(r0[j], r1[j], r2[j], r3[j], nm, total, weights, normalize)
        if lam != 1:
            for j in range(m):
                mixed[j] *= lam
        for j in range(m):
            mixed[j] += bb[j]
        _store(out, lo, m, mixed)

MAX_MODELS = 4  # gta's sum_models adds up to 4 terms in order; beyond that torch's own reduction order rules


def as_array(t: torch.Tensor) -> np.ndarray | None:
    """The flat numpy view the kernels read (bfloat16 as its uint16 bit patterns), or None if unsupported."""
    if t.device.type != "cpu" or not t.is_contiguous() or t.dtype not in (torch.float32, torch.bfloat16):
        return None
    flat = t.reshape(-1)
    return flat.view(torch.int16).numpy().view(np.uint16) if t.dtype == torch.bfloat16 else flat.numpy()


_READ = (torch.float32, torch.bfloat16)  # what the kernels read directly


def inputs(base: torch.Tensor, tensors) -> tuple[np.ndarray, tuple] | None:
    """(base array, tuple of model arrays) when the fused kernels can take these tensors, else None.

    Models stored in another float dtype (float16, float64), or in mixed dtypes, are cast to float32 first (one
    copy each; the torch path computes in float32 too), since the kernel takes one dtype for all of them."""
    if (not 1 <= len(tensors) <= MAX_MODELS or any(t.shape != base.shape for t in tensors)
            or any(not t.is_floating_point() or t.device.type != "cpu" for t in (base, *tensors))):
        return None
    if len({t.dtype for t in tensors}) > 1 or tensors[0].dtype not in _READ:
        tensors = [t.float() for t in tensors]
    b = as_array(base if base.dtype in _READ else base.float())
    ms = [as_array(t.contiguous()) for t in tensors]
    if b is None or any(m is None for m in ms):
        return None
    return b, tuple(ms)


@dataclass
class KeepRule:
    """How one model's delta is sparsified before the merge: everything, a magnitude threshold (keep
    |delta| > t, and == t below flat index cut), or a DARE draw (keep where the stream's next uniform < prob,
    then divide by scale)."""

    mode: int = KEEP_ALL
    threshold: float = 0.0
    cut: int = 0
    prob: float = 1.0
    stream: Stream | None = None
    scale: float = 1.0


def merge(base: np.ndarray, models: tuple, shape, rules, weights, consensus: str | None, normalize: bool,
          lambda_: float, out_dtype: torch.dtype | None) -> torch.Tensor:
    """The gta merge of :func:`~reparam.merging.methods.gta.gta_merge_tensor` in one fused pass."""
    w = torch.tensor([float(x) for x in weights], dtype=torch.float32)
    divisor = w.sum()
    divisor = np.float32(1.0 if abs(float(divisor)) < 1e-8 else float(divisor))
    # numpy's allocation, not torch.empty: numpy asks for huge pages, and faulting in a fresh output
    # tensor was a third of the time of a TIES merge in torch's 4 KB pages
    out = np.empty(base.size, np.uint16 if out_dtype == torch.bfloat16 else np.float32)
    out_t = torch.from_numpy(out)
    out_t = (out_t.view(torch.bfloat16) if out_dtype == torch.bfloat16 else out_t).view(shape)
    f32 = np.float32
    random = [r.stream is not None for r in rules]
    _spread(_merge, _chunks(base.size), base, models, np.array([r.mode for r in rules], np.int8),
            np.array([r.threshold for r in rules], f32), np.array([r.cut for r in rules], np.int64),
            np.array([r.prob for r in rules], f32),
            np.array([r.stream.key if x else 0 for r, x in zip(rules, random)], np.uint64),
            np.array([r.stream.take(base.size) if x else 0 for r, x in zip(rules, random)], np.int64),
            np.array([r.scale for r in rules], f32), w.numpy(), not bool((w == 1).all()), CONSENSUS[consensus],
            bool(normalize), divisor, f32(lambda_), out)
    return out_t
