"""The fast per-tensor paths of TIES / DARE-TIES give the very bits of the straightforward formulas:
histogram selection (threshold.kth_value) == kthvalue, largest_mask == smallest_mask(-a), sum_models ==
stack().sum(0), and gta_merge_tensor == the stacked reference of the spec (and never writes to its inputs)."""
from __future__ import annotations

import pytest
import torch

from reparam.merging.methods.gta import gta_merge_tensor, sum_models
from reparam.merging.sparsify import bernoulli, generator_for, largest_mask, magnitude, smallest_mask
from reparam.merging.threshold import kth_value


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32)


def _cases() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    n = 200_003
    signed = torch.randn(n, generator=g)
    zeros = torch.zeros(n)
    zeros[::3] = -0.0
    with_inf = torch.rand(n, generator=g)
    with_inf[7] = float("inf")
    with_nan = torch.randn(n, generator=g)
    with_nan[[5, 9]] = torch.tensor([float("nan"), -float("nan")])
    return {
        "magnitudes": torch.randn(n, generator=g).abs(),
        "signed": signed,
        "many_ties": (torch.randn(n, generator=g) * 3).round().abs(),
        "signed_zeros": zeros,
        "inf": with_inf,
        "nan": with_nan,
        "small": torch.randn(1000, generator=g),
        "float64": torch.randn(n, generator=g, dtype=torch.float64),
    }


@pytest.mark.parametrize("name", list(_cases()))
def test_kth_value_is_kthvalue(name):
    x = _cases()[name]
    d = x.numel()
    for k in (1, 2, d // 3, d // 2 + 1, d - 1, d):
        want, got = x.kthvalue(k).values, kth_value(x, k)
        assert got.dtype == want.dtype
        assert (got == want) or (got.isnan() and want.isnan()), (name, k, got, want)


def _reference_smallest(a: torch.Tensor, n: int) -> torch.Tensor:
    """The former rule: below the kthvalue, then ties at the boundary by a cumulative count."""
    flat = a.reshape(-1)
    t = flat.kthvalue(n).values
    mask = flat < t
    eq = flat == t
    return (mask | (eq & (eq.cumsum(0) <= n - int(mask.sum())))).reshape(a.shape)


@pytest.mark.parametrize("name", ["magnitudes", "many_ties", "signed_zeros", "small"])
def test_masks_keep_exact_counts_and_lower_index_ties(name):
    a = _cases()[name].reshape(-1, 1)
    d = a.numel()
    for n in (1, d // 10, d // 2, d - 1):
        small = smallest_mask(a, n)
        assert torch.equal(small, _reference_smallest(a, n))
        large = largest_mask(a, n)
        assert torch.equal(large, _reference_smallest(-a, n)) and int(large.sum()) == n
    assert not largest_mask(a, 0).any() and largest_mask(a, d).all()


@pytest.mark.parametrize("n", range(1, 8))
def test_sum_models_matches_stacked_sum_bitwise(n):
    g = torch.Generator().manual_seed(n)
    terms = [torch.randn(10_001, generator=g) * 10.0 ** (3 * i - 6) for i in range(n)]
    for t in terms:
        t[:100] = -0.0  # all-negative-zero columns: the reduction gives +0.0
    assert torch.equal(_bits(sum_models(terms)), _bits(torch.stack(terms).sum(0)))


def _reference_gta(base, tensors, weights, sparsify, consensus, normalize, lambda_):
    """The spec's formula on stacked float32 copies (the engine's former code path)."""
    b = base.float()
    stacked = torch.stack([sparsify(t.float() - b, i) for i, t in enumerate(tensors)])
    weighted = stacked * torch.tensor(weights, dtype=torch.float32).reshape(-1, *([1] * b.dim()))
    w = torch.tensor(weights, dtype=torch.float32).reshape(-1, *([1] * b.dim()))
    if consensus is not None:
        sign = weighted.sign()
        total = weighted.sum(0) if consensus == "sum" else sign.sum(0)
        mask = sign == torch.where(total >= 0, 1.0, -1.0)
        mixed, divisor = (weighted * mask).sum(0), (w * mask).sum(0)
        divisor[divisor == 0] = 1.0
    else:
        mixed, divisor = weighted.sum(0), w.sum(0)
        divisor[divisor.abs() < 1e-8] = 1.0
    if normalize:
        mixed = mixed / divisor
    return b + mixed * lambda_


@pytest.mark.parametrize("n_models", [1, 3, 5])
@pytest.mark.parametrize("consensus", ["sum", "count", None])
@pytest.mark.parametrize("weighted", [False, True])
def test_gta_matches_stacked_reference_and_leaves_inputs_alone(n_models, consensus, weighted):
    g = torch.Generator().manual_seed(n_models)
    base = torch.randn(300, 301, generator=g)
    tensors = [base + (torch.randn(300, 301, generator=g) * 2).round() / 8 for _ in range(n_models)]  # ties, 0s
    weights = [0.5, 1.0, -0.25, 2.0, 0.75][:n_models] if weighted else [1.0] * n_models
    copies = [t.clone() for t in [base, *tensors]]

    def trim(delta, i):
        return magnitude(delta, 0.4, inplace=True)

    def trim_ref(delta, i):
        return magnitude(delta, 0.4)

    got = gta_merge_tensor(base, tensors, weights, trim, consensus, True, 0.7)
    want = _reference_gta(base, tensors, weights, trim_ref, consensus, True, 0.7)
    assert torch.equal(_bits(got), _bits(want))
    assert all(torch.equal(_bits(a), _bits(b)) for a, b in zip(copies, [base, *tensors]))


def test_sparsifiers_in_place_only_when_allowed():
    g = torch.Generator().manual_seed(1)
    delta = torch.randn(400, 300, generator=g)
    keep = delta.clone()
    out = magnitude(delta, 0.3, rescale_mode="l1")
    assert torch.equal(delta, keep) and out.count_nonzero() == int(0.3 * delta.numel())
    out = magnitude(delta, 0.3, rescale_mode="l1", inplace=True)  # rescaling needs the original: not in place
    assert torch.equal(delta, keep)
    out = magnitude(delta, 0.3, inplace=True)
    assert out is delta and out.count_nonzero() == int(0.3 * keep.numel())
    assert torch.equal(out[out != 0], keep[out != 0])
    before = keep.clone()
    dropped = bernoulli(keep, 0.5, generator_for(0, 0, "k"))  # masks in its own storage
    assert torch.equal(keep, before) and torch.equal(dropped[dropped != 0], keep[dropped != 0] / 0.5)


@pytest.mark.parametrize("weights,normalize", [([1.0, 1.0, 1.0], True), ([0.2, 0.5, 0.3], True),
                                               ([2.0, -1.0, 0.5], False)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_blocks_equal_the_whole_tensor_sum_and_leave_inputs_alone(monkeypatch, weights, normalize, dtype):
    from reparam.merging.methods import linear
    from reparam.merging.methods.base import TensorContext
    from reparam.merging.methods.task_arithmetic import WeightParams

    monkeypatch.setattr(linear, "BLOCK", 7)  # several blocks and a ragged last one on 6 x 9 tensors
    g = torch.Generator().manual_seed(0)
    tensors = [torch.randn(6, 9, generator=g).to(dtype) for _ in weights]
    before = [t.clone() for t in tensors]
    ctx = TensorContext("w", out_dtype=torch.bfloat16)
    out = linear.merge_tensor(None, tensors, [WeightParams(weight=w) for w in weights],
                              linear.LinearParams(normalize=normalize), ctx)
    acc = torch.zeros(6, 9)
    for w, t in zip(weights, tensors):
        acc += w * t.float()
    if normalize:
        acc /= sum(weights)
    assert out.dtype == torch.bfloat16 and torch.equal(out, acc.to(torch.bfloat16))  # bit-identical
    assert all(torch.equal(t, b) for t, b in zip(tensors, before))
