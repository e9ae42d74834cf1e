"""The fused numba kernels against the torch path of the same methods, bit for bit."""
import os
import select
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from reparam.merging import fused
from reparam.merging.methods import dare, task_arithmetic, ties
from reparam.merging.methods.base import TensorContext
from reparam.merging.sparsify import generator_for, largest_mask, uniform


@pytest.fixture(autouse=True)
def three_threads():
    """Every test here runs the kernels on 3 threads (CI runs with one per worker): the caller and two pool
    threads share each tensor's pieces, so the split work is what the comparisons check."""
    before = torch.get_num_threads()
    torch.set_num_threads(3)
    yield
    torch.set_num_threads(before)


def torch_path(monkeypatch, fn, *args):
    """fn(*args) with the fused kernels switched off."""
    with monkeypatch.context() as m:
        m.setattr(fused, "inputs", lambda *a: None)
        return fn(*args)


def models(shape, n=3, dtype=torch.bfloat16, std=0.002, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = (torch.randn(shape, generator=g) * 0.02).to(dtype)
    # bf16 deltas take few distinct values: many ties at the trim threshold
    return base, [(base.float() + torch.randn(shape, generator=g) * std).to(dtype) for _ in range(n)]


def used_fused(monkeypatch, fn, *args):
    calls = []
    real = fused.merge

    def spy(*a, **k):
        calls.append(1)
        return real(*a, **k)
    with monkeypatch.context() as m:
        m.setattr(fused, "merge", spy)
        out = fn(*args)
    return out, bool(calls)


# (shape, dtype, density, topk_mode, weights, consensus, normalize, lambda, out dtype)
TIES_CASES = [
    ((300, 257), torch.bfloat16, 0.5, "exact", [1, 1, 1], "sum", True, 1.0, torch.bfloat16),
    ((300, 257), torch.bfloat16, 0.2, "threshold", [1, 1, 1], "sum", True, 1.0, torch.float32),
    ((5000,), torch.float32, 0.3, "exact", [0.5, 1.25, 2.0], "sum", True, 0.7, torch.float32),
    ((64, 64), torch.bfloat16, 0.9, "exact", [0.3, 0.7, 1.0], "count", False, 1.0, torch.bfloat16),
    ((7,), torch.float32, 0.5, "exact", [1, 1, 1], "sum", True, 1.0, None),  # smaller than a chunk
    ((100, 100), torch.bfloat16, 0.001, "exact", [1, 2], "sum", True, 1.0, torch.bfloat16),  # keeps 10 of 10k
    ((10, 10), torch.float32, 0.001, "exact", [1, 1], "sum", True, 1.0, torch.float32),  # keeps none
    ((50, 90), torch.bfloat16, 0.4, "exact", [1.5], "sum", True, 1.0, torch.bfloat16),  # one model
    ((128, 33), torch.float32, 0.6, "exact", [1, 0.5, 2, 1], "count", True, 0.8, torch.float32),  # four
]


@pytest.mark.parametrize("shape,dtype,density,mode,weights,consensus,normalize,lam,out_dtype", TIES_CASES)
def test_ties_equals_torch_path(monkeypatch, shape, dtype, density, mode, weights, consensus, normalize, lam,
                                out_dtype):
    base, tensors = models(shape, len(weights), dtype)
    params = ties.TiesParams(normalize=normalize, lambda_=lam, topk_mode=mode, consensus_method=consensus)
    per_model = [ties.DensityParams(w, density) for w in weights]
    ctx = TensorContext("k", out_dtype=out_dtype)
    out, was_fused = used_fused(monkeypatch, ties.merge_tensor, base, tensors, per_model, params, ctx)
    ref = torch_path(monkeypatch, ties.merge_tensor, base, tensors, per_model, params, ctx)
    assert was_fused
    assert out.dtype == (out_dtype or torch.float32)
    assert torch.equal(out, ref.to(out.dtype))


def test_ties_per_model_densities_in_one_sweep(monkeypatch):
    base, tensors = models((257, 300), 4, torch.bfloat16, seed=5)
    tensors[3] = tensors[3].float().mul(3).sub(base.float() * 2).bfloat16()  # a model with larger deltas
    params = ties.TiesParams()
    per_model = [ties.DensityParams(1.0, d) for d in (0.2, 0.5, 1.0, 0.9)]  # model 2 is not trimmed
    ctx = TensorContext("k", out_dtype=torch.bfloat16)
    out, was_fused = used_fused(monkeypatch, ties.merge_tensor, base, tensors, per_model, params, ctx)
    assert was_fused
    assert torch.equal(out, torch_path(monkeypatch, ties.merge_tensor, base, tensors, per_model, params,
                                       ctx).bfloat16())


def test_ties_ties_across_parts_keep_the_lowest_indices(monkeypatch):
    """Every delta has one of three magnitudes, so the threshold value is shared by ~1/3 of the entries over
    every part of the parallel split: exactly floor(density*d) are kept, the lowest flat indices first."""
    n = 300_001
    base = torch.zeros(n)
    delta = torch.tensor([1.0, -2.0, 3.0]).repeat(n // 3 + 1)[:n]
    x = base + delta
    keep = int(0.5 * n)
    t, cut = fused.magnitude_threshold(fused.as_array(x), fused.as_array(base), keep)
    a = delta.abs()
    mask = (a > t) | ((a == t) & (torch.arange(n) < cut))
    assert t == 2.0 and int(mask.sum()) == keep
    assert torch.equal(mask, largest_mask(a, keep))


def test_threshold_equals_kthvalue_for_wide_ranges():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(200_000, generator=g) * torch.logspace(-6, 3, 200_000)
    base = torch.randn(200_000, generator=g)
    a = (x - base).abs()
    for keep in (1, 17, 100_000, 199_999):
        t, cut = fused.magnitude_threshold(fused.as_array(x), fused.as_array(base), keep)
        assert t == float(a.kthvalue(a.numel() - keep + 1).values)
        mask = (a > t) | ((a == t) & (torch.arange(a.numel()) < cut))
        assert int(mask.sum()) == keep


def test_non_finite_deltas_take_the_torch_path(monkeypatch):
    base, tensors = models((50, 50), 2, torch.float32)
    tensors[1][3, 4] = float("inf")
    assert fused.magnitude_threshold(fused.as_array(tensors[1]), fused.as_array(base), 10) is None
    params, per_model = ties.TiesParams(), [ties.DensityParams(1.0, 0.5)] * 2
    ctx = TensorContext("k")
    out, was_fused = used_fused(monkeypatch, ties.merge_tensor, base, tensors, per_model, params, ctx)
    assert not was_fused
    assert torch.equal(out, torch_path(monkeypatch, ties.merge_tensor, base, tensors, per_model, params, ctx))


def test_global_scope_threshold(monkeypatch):
    base, tensors = models((40, 33), 3, torch.bfloat16)
    params = ties.TiesParams(scope="global")
    per_model = [ties.DensityParams(1.0, 0.4)] * 3
    ctx = TensorContext("k", thresholds=[0.001, None, 0.0025], out_dtype=torch.bfloat16)
    out, was_fused = used_fused(monkeypatch, ties.merge_tensor, base, tensors, per_model, params, ctx)
    assert was_fused
    assert torch.equal(out, torch_path(monkeypatch, ties.merge_tensor, base, tensors, per_model, params,
                                       ctx).bfloat16())


@pytest.mark.parametrize("consensus", [True, False])
@pytest.mark.parametrize("rescale,density", [(True, 0.3), (False, 0.5), (True, 0.0), (True, 1.0)])
def test_dare_equals_torch_path(monkeypatch, consensus, rescale, density):
    base, tensors = models((123, 77), 3, torch.bfloat16)
    kernel = dare.SPEC_TIES.kernel if consensus else dare.SPEC_LINEAR.kernel
    params = dare.DareParams(rescale=rescale, normalize=consensus, lambda_=0.9)
    per_model = [dare.DensityParams(w, density) for w in (1.0, 0.5, 0.25)]
    ctx = TensorContext("layer.weight", seed=4, model_indices=[0, 1, 2], out_dtype=torch.float32)
    out, was_fused = used_fused(monkeypatch, kernel, base, tensors, per_model, params, ctx)
    assert was_fused
    assert torch.equal(out, torch_path(monkeypatch, kernel, base, tensors, per_model, params, ctx))


@pytest.mark.parametrize("normalize", [True, False])
def test_task_arithmetic_equals_torch_path(monkeypatch, normalize):
    base, tensors = models((77, 51), 3, torch.float32)
    params = task_arithmetic.TaskArithmeticParams(normalize=normalize, lambda_=1.3)
    per_model = [task_arithmetic.WeightParams(w) for w in (1.0, -0.5, 0.25)]
    ctx = TensorContext("k", out_dtype=torch.bfloat16)
    out, was_fused = used_fused(monkeypatch, task_arithmetic.merge_tensor, base, tensors, per_model, params, ctx)
    assert was_fused
    ref = torch_path(monkeypatch, task_arithmetic.merge_tensor, base, tensors, per_model, params, ctx)
    assert torch.equal(out, ref.bfloat16())


def test_dare_norm_rescale_takes_torch_path(monkeypatch):
    base, tensors = models((20, 20), 2, torch.float32)
    params = dare.DareParams(rescale_mode="l1")
    per_model = [dare.DensityParams(1.0, 0.5)] * 2
    _, was_fused = used_fused(monkeypatch, dare.SPEC_TIES.kernel, base, tensors, per_model, params,
                              TensorContext("k", seed=0, model_indices=[0, 1]))
    assert not was_fused


def test_more_than_four_models_or_other_shapes_are_not_fused():
    base, tensors = models((10,), 5, torch.float32)
    assert fused.inputs(base, tensors) is None
    assert fused.inputs(base, tensors[:4]) is not None
    assert fused.inputs(base, [tensors[0][:5]]) is None
    assert fused.inputs(base.int(), [t.int() for t in tensors[:2]]) is None


@pytest.mark.parametrize("dtypes", [(torch.float16,) * 3, (torch.float32, torch.bfloat16, torch.float16),
                                    (torch.float64, torch.float64, torch.bfloat16)])
def test_other_and_mixed_float_dtypes_are_cast_and_fused(monkeypatch, dtypes):
    base, tensors = models((60, 70), 3, torch.float32)
    base = base.to(dtypes[-1])
    tensors = [t.to(d) for t, d in zip(tensors, dtypes)]
    params, per_model = ties.TiesParams(), [ties.DensityParams(1.0, 0.4)] * 3
    ctx = TensorContext("k", out_dtype=torch.float16)
    out, was_fused = used_fused(monkeypatch, ties.merge_tensor, base, tensors, per_model, params, ctx)
    assert was_fused
    ref = torch_path(monkeypatch, ties.merge_tensor, base, tensors, per_model, params, ctx)
    assert torch.equal(out.half(), ref.half())


def test_uniform_stream_is_a_function_of_the_index():
    g = generator_for(1, 0, "k")
    whole = uniform(g, torch.empty(10_000))
    assert g.offset == 10_000
    h = generator_for(1, 0, "k")
    parts = torch.cat([uniform(h, torch.empty(n)) for n in (1, 4095, 4097, 1807)])
    assert torch.equal(parts, whole)
    assert 0 <= float(whole.min()) and float(whole.max()) < 1
    # uniform enough: mean and the 10 decile counts of 10k draws
    assert abs(float(whole.mean()) - 0.5) < 0.01
    counts = np.histogram(whole.numpy(), bins=10, range=(0, 1))[0]
    assert counts.min() > 900 and counts.max() < 1100
    # neighbouring streams are uncorrelated
    other = uniform(generator_for(1, 1, "k"), torch.empty(10_000))
    assert abs(float(torch.corrcoef(torch.stack([whole, other]))[0, 1])) < 0.05


def test_misleading_sample_falls_back_to_radix_selection(monkeypatch):
    """The sample reads runs spread over the tensor; a tensor whose large deltas all sit between those runs
    puts the wanted rank outside the bracket, and the exact radix selection answers instead."""
    n = 1 << 20
    base = torch.zeros(n)
    delta = torch.full((n,), 1e-3)
    sampled = torch.zeros(n, dtype=torch.bool)
    blocks = fused._SAMPLE // fused._CHUNK
    for b in range(blocks):
        lo = (n - fused._CHUNK) * b // (blocks - 1)
        sampled[lo:lo + fused._CHUNK] = True
    delta[~sampled] = torch.linspace(1.0, 2.0, int((~sampled).sum()))
    calls = []
    real = fused._radix_threshold
    monkeypatch.setattr(fused, "_radix_threshold", lambda *a: calls.append(1) or real(*a))
    keep = n // 2
    t, cut = fused.magnitude_threshold(fused.as_array(base + delta), fused.as_array(base), keep)
    assert calls, "the sample should have misled the bracket"
    a = delta.abs()
    assert t == float(a.kthvalue(n - keep + 1).values)
    assert int(((a > t) | ((a == t) & (torch.arange(n) < cut))).sum()) == keep


@pytest.mark.parametrize("skip", [0, 1, 4097])
def test_random_rule_draws_the_stream_from_its_offset(skip):
    """DARE's kernel draws pairs of uniforms per hash when the stream sits at an even offset and one at a time
    otherwise; either way entry j gets draw offset + j, as uniform() gives it."""
    base, (x,) = models((9001,), 1, torch.float32)
    stream, replay = generator_for(3, 0, "k"), generator_for(3, 0, "k")
    for s in (stream, replay):
        uniform(s, torch.empty(skip))
    rule = fused.KeepRule(fused.KEEP_RANDOM, prob=0.3, stream=stream, scale=0.3)
    out = fused.merge(*fused.inputs(base, [x]), base.shape, [rule], [1.0], None, False, 1.0, torch.float32)
    expect = (uniform(replay, base) < 0.3).float().mul_(x - base).div_(0.3).add_(base)
    assert torch.equal(out, expect)
    assert stream.offset == skip + base.numel()


@pytest.mark.parametrize("dtype,few_share,expect", [
    (torch.bfloat16, 0.02, fused._GATHER_NONE),  # bf16 deltas: a few distinct values near the rank, counted
    (torch.float32, 0.02, fused._GATHER_FEW),  # all distinct: ~1 % gathered, group by group
    (torch.float32, 0.0, fused._GATHER_ALL),  # the same, gathered entry by entry
])
def test_each_selection_path_gives_kthvalue(monkeypatch, dtype, few_share, expect):
    """The three ways the one-sweep selection resolves a rank, each exact (threshold = kthvalue, exactly `keep`
    entries kept, ties by lower index), for several ranks, without the radix fallback."""
    base, tensors = models((700, 1100), 3, dtype, seed=2)
    modes = []  # per piece of the sweep
    real = fused._bracket
    monkeypatch.setattr(fused, "_FEW_SHARE", few_share)
    monkeypatch.setattr(fused, "_bracket", lambda *a: modes.append(a[4].tolist()) or real(*a))
    monkeypatch.setattr(fused, "_radix_threshold", lambda *a: pytest.fail("took the radix fallback"))
    n = base.numel()
    keeps = [n // 3, n // 2, n - n // 3]
    found = fused.magnitude_thresholds(fused.inputs(base, tensors)[1], fused.as_array(base), keeps)
    assert modes and all(m == [expect] * 3 for m in modes)
    for x, keep, (t, cut) in zip(tensors, keeps, found):
        a = (x.float() - base.float()).abs().flatten()
        assert t == float(a.kthvalue(n - keep + 1).values)
        kept = (a > t) | ((a == t) & (torch.arange(n) < cut))
        assert int(kept.sum()) == keep
        assert torch.equal(kept, largest_mask(a, keep))


def test_rank_between_counted_values_falls_back_to_radix(monkeypatch):
    """When the wanted rank falls between two counted sample values (on a value the sample missed), the
    counts cannot name it and the exact radix selection answers."""
    n = 1 << 18
    delta = torch.full((n,), 1.0)
    delta[n // 2:] = 3.0
    missed = torch.zeros(n, dtype=torch.bool)  # a value between 1 and 3 outside every sampled run
    blocks = fused._SAMPLE // fused._CHUNK
    for b in range(blocks - 1):
        lo = (n - fused._CHUNK) * b // (blocks - 1) + fused._CHUNK
        missed[lo:lo + 100] = True
    delta[missed & (torch.arange(n) < n // 2)] = 2.0
    base = torch.zeros(n)
    calls = []
    real = fused._radix_threshold
    monkeypatch.setattr(fused, "_radix_threshold", lambda *a: calls.append(1) or real(*a))
    keep = n // 2 + int((missed & (torch.arange(n) < n // 2)).sum()) // 2  # ranks into the 2.0 entries
    t, cut = fused.magnitude_threshold(fused.as_array(delta), fused.as_array(base), keep)
    assert calls
    assert t == 2.0 == float(delta.kthvalue(n - keep + 1).values)
    assert torch.equal((delta > t) | ((delta == t) & (torch.arange(n) < cut)), largest_mask(delta, keep))


@pytest.mark.parametrize("first,last", [(0, 0), (0, 10), (60_000, 61_000), (131_000, 131_071), (5, 5)])
def test_order_window_equals_sorted_slice(first, last):
    rng = np.random.default_rng(0)
    spread = np.abs(rng.standard_normal(131_072)).astype(np.float32)
    tied = (np.round(spread * 50) / 50).astype(np.float32)  # a few hundred distinct values
    for values in (spread, tied, np.zeros_like(spread)):
        assert np.array_equal(fused._order_window(values, first, last), np.sort(values)[first:last + 1])


def test_spread_covers_the_range_once_on_torch_threads_and_reraises():
    """_spread runs kernel(*args, lo, hi) over contiguous pieces that cover [0, count) once, on the calling
    thread and pool threads (as many as torch uses, each taking the next piece); a piece's error is raised
    after every piece has finished."""
    caller, seen = threading.current_thread(), []
    first_three = threading.Barrier(3, timeout=30)

    def kernel(tag, lo, hi):
        if lo < 3:  # each thread waits inside its first piece, so the first three pieces are on three threads
            first_three.wait()
        seen.append((tag, lo, hi, threading.current_thread()))
    fused._spread(kernel, 10, "k")
    assert sorted(x[:3] for x in seen) == [("k", i, i + 1) for i in range(10)]
    threads = {x[3] for x in seen}
    assert caller in threads and len(threads) == 3
    seen.clear()
    fused._spread(lambda lo, hi: seen.append((lo, hi)), 1000)  # 8 pieces a thread
    assert sorted(seen) == [(1000 * i // 24, 1000 * (i + 1) // 24) for i in range(24)]
    torch.set_num_threads(1)
    seen.clear()
    fused._spread(lambda lo, hi: seen.append((lo, hi, threading.current_thread())), 5)
    assert seen == [(0, 5, caller)]
    torch.set_num_threads(3)
    done = []

    def kernel(lo, hi):
        if lo == 0:
            raise ValueError("piece 0 failed")
        time.sleep(0.05)
        done.append(lo)
    with pytest.raises(ValueError, match="piece 0 failed"):
        fused._spread(kernel, 3)
    assert sorted(done) == [1, 2]


def test_kernels_never_start_numbas_thread_pool():
    """The kernels split their work in Python threads (see _spread), so numba's threading layer (the workqueue
    one parks woken workers on one core; the OpenMP one spins torch's libgomp workers) is never started."""
    code = ("import numpy as np, numba, torch; torch.set_num_threads(2); from reparam.merging import fused; "
            "b = np.zeros(90000, np.uint16); fused.magnitude_thresholds((b + 1,), b, [10]); "
            "fused.merge(b, (b + 1,), (90000,), [fused.KeepRule()], [1.0], None, False, 1.0, None)\n"
            "try:\n    print(numba.threading_layer())\nexcept ValueError:\n    print('none')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split()[-1] == "none"


def test_kernels_load_without_importing_scipy_and_blas_still_works():
    """numba's BLAS probe (an import of scipy.linalg, 0.25-0.4 s) is skipped when the kernels load; numba code that
    needs BLAS (np.dot) still compiles and gets it, and np.correlate still computes (with its plain loop)."""
    pytest.importorskip("scipy")
    code = ("import sys, numpy as np, numba; from reparam.merging import fused; b = np.zeros(9000, np.uint16); "
            "fused.magnitude_thresholds((b + 1,), b, [10]); print('scipy.linalg' in sys.modules); "
            "a = np.arange(6.0).reshape(2, 3); print(numba.njit(lambda x: np.dot(x, x.T))(a).tolist()); "
            "print(numba.njit(lambda x, y: np.correlate(x, y))(np.arange(4.0), np.ones(2)).tolist())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.splitlines()
    assert out[-3] == "False"
    assert out[-2] == str((np.arange(6.0).reshape(2, 3) @ np.arange(6.0).reshape(2, 3).T).tolist())
    assert out[-1] == str(np.correlate(np.arange(4.0), np.ones(2)).tolist())


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_spread_in_a_forked_child_starts_its_own_pool():
    """A child forked after the kernels ran has the pool object but none of its threads: its work starts a pool
    of its own instead of waiting forever. (Only _spread here: torch's own OpenMP pool can hang a child forked
    after it ran.)"""
    all_three = threading.Barrier(3, timeout=30)
    fused._spread(lambda lo, hi: all_three.wait(), 3)  # both pool threads ran a piece, and now idle:
    time.sleep(0.2)  # each has said so (the executor would hand the child's work to those dead threads)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: spread some work, report its sum, leave at once
        try:
            total = []
            fused._spread(lambda lo, hi: total.append(sum(range(lo, hi))), 100)
            os.write(write, str(sum(total)).encode())
        finally:
            os._exit(0)
    os.close(write)
    ready, _, _ = select.select([read], [], [], 60)
    got = os.read(read, 16) if ready else b""
    os.close(read)
    if not ready:
        os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    assert got == str(sum(range(100))).encode(), "the child's work hung" if not ready else got


def test_merges_from_several_threads_at_once():
    """Merges started from several threads at once (their pieces share one pool) all finish, each equal to the
    same merge run alone."""
    base, tensors = models((512, 300), 3, torch.bfloat16, seed=11)
    params = ties.TiesParams()
    per_model = [ties.DensityParams(1.0, d) for d in (0.3, 0.5, 0.7)]
    ctx = TensorContext("k", out_dtype=torch.bfloat16)
    alone = ties.merge_tensor(base, tensors, per_model, params, ctx)
    with ThreadPoolExecutor(4) as pool:
        outs = list(pool.map(lambda _: ties.merge_tensor(base, tensors, per_model, params, ctx), range(8)))
    assert all(torch.equal(o, alone) for o in outs)
