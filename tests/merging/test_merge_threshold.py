import math

import pytest
import torch

from reparam.merging.threshold import StreamingKth, keep_threshold, kth_smallest


def _streaming(chunks, k):
    s = StreamingKth(k)
    for c in chunks:
        s.count(c)
    s.locate()
    for c in chunks:
        s.collect(c)
    return s.value()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_streaming_kth_equals_kthvalue(seed):
    g = torch.Generator().manual_seed(seed)
    chunks = [torch.randn(n, generator=g).abs() * 10 ** float(e)
              for n, e in ((1000, -3), (37, 0), (500, -6), (1, 2))]
    chunks.append(torch.zeros(50))  # exact zeros
    chunks.append(torch.full((20,), 0.125))  # ties
    total = sum(c.numel() for c in chunks)
    for k in (1, 2, 50, 51, 60, 71, total // 2, total - 1, total):
        assert _streaming(chunks, k) == kth_smallest(chunks, k)


def test_keep_threshold_conventions():
    # |tau| = [3, 1, 0.5, 0], density 0.5: exact keeps {3, 1}; threshold keeps {3, 1, 0.5}
    a = torch.tensor([3.0, 1.0, 0.5, 0.0])
    k_exact = keep_threshold(4, 0.5, "exact")
    k_thr = keep_threshold(4, 0.5, "threshold")
    assert (a >= kth_smallest(a, k_exact)).sum() == 2
    assert (a >= kth_smallest(a, k_thr)).sum() == 3
    assert keep_threshold(4, 1.0) is None
    assert keep_threshold(4, 0.1, "exact") == 0  # nothing kept
    with pytest.raises(ValueError):
        keep_threshold(4, 0.5, "nope")


def test_streaming_rejects_bad_k():
    s = StreamingKth(10)
    s.count(torch.ones(3))
    with pytest.raises(ValueError):
        s.locate()
    assert not math.isnan(_streaming([torch.ones(3)], 3))


def test_streaming_kth_many_ties_and_subnormals():
    chunks = [torch.zeros(100_000), torch.tensor([1e-40, 3e-39, 2.0, 2.0, 7.5]), torch.full((10,), 1e-3)]
    total = sum(c.numel() for c in chunks)
    for k in (1, 100_000, 100_001, 100_002, 100_003, 100_010, 100_013, total):
        assert _streaming(chunks, k) == kth_smallest(chunks, k)
