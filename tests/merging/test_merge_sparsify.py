import math

import pytest
import torch

from reparam.merging.methods.dare import dare
from reparam.merging.sparsify import (bernoulli, generator_for, largest_mask, magnitude, magnitude_outliers, magprune,
                                    smallest_mask, uniform)


def test_smallest_mask_exact_count_with_ties():
    a = torch.tensor([1.0, 2.0, 2.0, 2.0, 0.0, 5.0])
    m = smallest_mask(a, 3)
    assert m.tolist() == [True, True, False, False, True, False]  # ties: lower index first
    assert largest_mask(a, 2).tolist() == [False, True, False, False, False, True]
    assert smallest_mask(a, 0).sum() == 0 and smallest_mask(a, 10).all()


def test_magnitude_trim_counts():
    d = torch.tensor([3.0, -1.0, 0.5, 0.0])
    assert magnitude(d, 0.5, topk_mode="exact").tolist() == [3.0, -1.0, 0.0, 0.0]
    assert magnitude(d, 0.5, topk_mode="threshold").tolist() == [3.0, -1.0, 0.5, 0.0]
    x = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    for k in (0.1, 0.37, 0.9):
        e = magnitude(x, k, topk_mode="exact")
        t = magnitude(x, k, topk_mode="threshold")
        assert (e != 0).sum() == int(k * 1000)
        assert (t != 0).sum() == int(k * 1000) + 1
        assert e[e != 0].abs().min() >= x[e == 0].abs().max()
    assert torch.equal(magnitude(x, 1.0), x)


def test_breadcrumbs_mask():
    x = torch.randn(1000, generator=torch.Generator().manual_seed(1))
    out = magnitude_outliers(x, 0.8, gamma=0.05)
    kept = out != 0
    assert kept.sum() == 800
    top = x.abs().topk(50).indices
    assert not kept[top].any()
    dropped = x.abs()[~kept]
    lo, hi = x.abs()[kept].min(), x.abs()[kept].max()
    assert ((dropped < lo) | (dropped > hi)).all()
    # gamma = 0 is the plain magnitude top-k; density 1 keeps everything
    assert torch.equal(magnitude_outliers(x, 0.3, gamma=0.0), magnitude(x, 0.3))
    assert torch.equal(magnitude_outliers(x, 1.0, gamma=0.05), x)


def test_dare_kept_entries_and_rates():
    delta = torch.randn(200_000, generator=torch.Generator().manual_seed(2))
    p = 0.3
    out = dare(delta, 1 - p, generator_for(0, 0, "w"))
    kept = out != 0
    assert torch.allclose(out[kept], delta[kept] / (1 - p), rtol=0, atol=0)
    n = delta.numel()
    assert abs((~kept).sum().item() - p * n) < 5 * math.sqrt(n * p * (1 - p))
    assert torch.equal(dare(delta, 1 - p, generator_for(0, 0, "w"), rescale=False)[kept], delta[kept])
    assert torch.equal(dare(delta, 1.0, generator_for(0, 0, "w")), delta)
    assert not dare(delta, 0.0, generator_for(0, 0, "w")).any()


def test_dare_expectation():
    delta = torch.tensor([1.0, -2.0, 0.5, 3.0])
    m = 20_000
    for p in (0.1, 0.5, 0.9):
        g = generator_for(7, 0, "k")
        # many independent draws from one generator: rows of a (m, 4) tensor
        draws = bernoulli(delta.expand(m, 4).contiguous(), 1 - p, g)
        mean = draws.mean(0)
        tol = 5 * delta.abs() * math.sqrt(p / ((1 - p) * m))
        assert ((mean - delta).abs() <= tol).all(), (p, mean)


def test_generator_independence_and_chunking():
    draw = lambda *key, n=100: uniform(generator_for(*key), torch.empty(n))  # noqa: E731
    a = draw(1, 0, "k")
    assert torch.equal(a, draw(1, 0, "k")) and a.dtype == torch.float32 and 0 <= a.min() and a.max() < 1
    assert not torch.equal(a, draw(1, 1, "k"))
    assert not torch.equal(a, draw(1, 0, "k2"))
    assert not torch.equal(a, draw(2, 0, "k"))
    # row chunks drawn one after the other (odd sizes included) equal the whole tensor's draw
    g = generator_for(1, 0, "k")
    chunks = torch.cat([uniform(g, torch.empty(3, 7)).reshape(-1), uniform(g, torch.empty(5, 7)).reshape(-1),
                        uniform(g, torch.empty(44)).reshape(-1)])
    torch.testing.assert_close(chunks, a, atol=0, rtol=0)


def test_magprune_expectation_and_keep_rates():
    row = torch.tensor([0.1, -0.2, 0.3, -0.4, 0.5])
    m = 20_000
    x = row.expand(m, 5).contiguous()  # every row ranks the same way
    density, eps = 0.5, 0.2
    out = magprune(x, density, eps, generator_for(0, 0, "k"))
    kept = (out != 0).float().mean(0)
    assert abs(kept[0] - (density - eps)) < 0.02 and abs(kept[4] - (density + eps)) < 0.02
    assert torch.allclose(out.mean(0), row, atol=0.02)
    # eps = 0 is DARE with the same keep probability
    d = torch.randn(64, 32)
    a = magprune(d, 0.6, 0.0, generator_for(0, 0, "k"))
    b = bernoulli(d, 0.6, generator_for(0, 0, "k"))
    assert torch.allclose(a, b)
    with pytest.raises(ValueError):
        magprune(d, 0.9, 0.15, generator_for(0, 0, "k"))
    one = magprune(torch.randn(10, 1), 0.5, 0.1, generator_for(0, 0, "k"))  # length-1 rows: rank 1
    assert one.shape == (10, 1)
