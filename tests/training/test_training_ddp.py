"""DDP on CPU (gloo): two processes must train the same adapter weights as one process with the same global batch.

Why they can match: each step's global batch is the same rows in both setups; rank r takes a contiguous slice and
weights its mean loss by (slice size x world / global batch), so the all-reduced (averaged) gradient equals the
gradient of the mean loss over the global batch, even for uneven slices. Dropout is 0, and the first case pads
every batch to a fixed width (pad_to) so padding widths cannot differ between the shard and the whole batch; the
second case keeps dynamic padding (the masked mean-pool ignores padded positions up to rounding). The model is a
transformers-free encoder and the workers are forked, so they start fast.
"""
import json
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from reparam.training import TrainConfig, train
from tests.training.tiny import adapter_state, lora_encoder, synthetic_data

CASES = [
    dict(pad_to=24, batch_size=8, grad_accum=1),
    dict(pad_to=None, batch_size=7, grad_accum=2),  # uneven shards (4 + 3 rows), micro-batches on each rank
]


def _config(case, log_path=None):
    return TrainConfig(lr=1e-3, max_steps=4, batch_size=case["batch_size"], grad_accum=case["grad_accum"],
                       warmup_ratio=0.0, progress=False, log_every=1, seed=0, log_path=log_path)


def _run(case, log_path=None):
    model = lora_encoder()
    train(model, synthetic_data(40, pad_to=case["pad_to"]), _config(case, log_path))
    return adapter_state(model)


def _worker(rank, world, port, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        for i, case in enumerate(CASES):
            state = _run(case, log_path=f"{out_dir}/log{i}.jsonl")
            torch.save(state, f"{out_dir}/rank{rank}_case{i}.pt")
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not built")
def test_ddp_two_ranks_match_single_process(tmp_path):
    # single-process references first: they also import what training imports lazily (AdamW pulls in
    # torch._dynamo), so the forked workers inherit it instead of importing it twice on a busy machine
    singles = [_run(case) for case in CASES]
    # fork: the workers inherit the imported modules (spawn would re-import torch in each: ~10 s on a busy box)
    mp.start_processes(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True, start_method="fork")
    for i, single in enumerate(singles):
        r0 = torch.load(tmp_path / f"rank0_case{i}.pt")
        r1 = torch.load(tmp_path / f"rank1_case{i}.pt")
        assert single.keys() == r0.keys()
        for k in single:
            assert torch.equal(r0[k], r1[k]), k  # DDP keeps the replicas identical
            assert torch.allclose(r0[k], single[k], rtol=0, atol=1e-6), (i, k, (r0[k] - single[k]).abs().max())
        assert any(not torch.equal(v, lora_encoder().state_dict()[k]) for k, v in r0.items())  # it trained
        lines = [json.loads(x) for x in (tmp_path / f"log{i}.jsonl").read_text().splitlines()]
        assert [x["step"] for x in lines] == [1, 2, 3, 4]  # rank 0 logs alone
