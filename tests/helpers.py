"""Tiny models shared by the tests, and the training runs the rank-allocator tests share."""
import copy

import pytest
import torch
from torch import nn

import reparam
from reparam.training import Callback, HFTrainerCallback, TrainConfig, method_callbacks, train
from tests.training.tiny import synthetic_data, tiny_bert


class TinyMLP(nn.Module):
    def __init__(self, d_in=16, hidden=24, d_out=8, dtype=torch.float32):
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden, dtype=dtype)
        self.fc2 = nn.Linear(hidden, hidden, dtype=dtype)
        self.classifier = nn.Linear(hidden, d_out, dtype=dtype)
        self.norm = nn.LayerNorm(hidden, dtype=dtype)

    def forward(self, x):
        return self.classifier(self.norm(torch.relu(self.fc2(torch.relu(self.fc1(x))))))


class MixedKinds(nn.Module):
    """One layer of every kind LoRA supports, including Hugging Face's Conv1D (fan-in/fan-out layout)."""

    def __init__(self):
        super().__init__()
        from transformers.pytorch_utils import Conv1D

        self.emb = nn.Embedding(50, 12, padding_idx=0)
        self.proj = Conv1D(10, 12)  # d_out=10, d_in=12, weight stored 12 x 10
        self.conv1 = nn.Conv1d(10, 6, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(6, 5, kernel_size=(3, 2), stride=1, padding=1)
        self.lin = nn.Linear(5, 4)

    def forward(self, ids):
        h = self.proj(self.emb(ids))  # (b, t, 10)
        h = self.conv1(h.transpose(1, 2))  # (b, 6, t)
        h = self.conv2(h.unsqueeze(-1))  # (b, 5, t', w)
        return self.lin(h.mean(dim=(2, 3)))


def randomize_adapters(model, std=0.1, seed=0):
    """Give every adapter parameter a random non-zero value (B = 0 at init hides bugs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".adapters." in name:
                p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std)


def assert_merge_round_trip(model, x, atol=1e-5):
    """merge and then unmerge both keep the adapted model's outputs on x."""
    unmerged = model(x)
    reparam.merge(model)
    torch.testing.assert_close(model(x), unmerged, atol=atol, rtol=0)
    reparam.unmerge(model)
    torch.testing.assert_close(model(x), unmerged, atol=atol, rtol=0)


def adapt_tiny_mlp(method, dtype=torch.float32, targets=("fc1", "fc2"), **fields):
    """(base, adapted copy) of a seeded TinyMLP with a `method` adapter on `targets`."""
    torch.manual_seed(0)
    base = TinyMLP(dtype=dtype)
    model = reparam.adapt(copy.deepcopy(base), reparam.make_config(method, **fields), targets=list(targets))
    return base, model


def adapter_params(model):
    return {n: p for n, p in model.named_parameters() if ".adapters." in n}


# --- training runs (tiny BERT, reparam's loop, a HF Trainer) -----------------------------------------------------

def bert_adapted(method, seed=0, **fields):
    """A seeded tiny BERT (vocabulary 300) with a `method` adapter on query/value and a trained classifier."""
    model = tiny_bert(300, seed=seed)
    torch.manual_seed(seed + 1)
    return reparam.adapt(model, reparam.make_config(method, **fields), targets=["query", "value"],
                         modules_to_save=["classifier"])


def quiet(**kw):
    return TrainConfig(**{"lr": 5e-3, "batch_size": 8, "progress": False, "log_every": 1, "seed": 0, **kw})


class Crash(Callback):
    """Kills the run (KeyboardInterrupt) when step `at` begins; Crash(None) never does."""

    def __init__(self, at):
        self.at = at

    def on_step_begin(self, state):
        if state.global_step == self.at:
            raise KeyboardInterrupt(f"killed at step {state.global_step}")


def kill_and_resume(make_model, data, checkpoint_dir, crash_at, checkpoint_every, **kw):
    """A reference run; a run of a fresh make_model() killed at step crash_at, checkpointing every
    checkpoint_every steps into checkpoint_dir; and a third model resumed from its last checkpoint. Asserts the
    resumed run starts at that checkpoint and ends with the reference's adapter parameters, bit for bit.
    Returns (reference model, its TrainResult, resumed model, its TrainResult)."""
    ref = make_model()
    r_ref = train(ref, data, quiet(**kw), callbacks=[Crash(None)])
    with pytest.raises(KeyboardInterrupt):
        train(make_model(), data, quiet(checkpoint_dir=str(checkpoint_dir), checkpoint_every=checkpoint_every, **kw),
              callbacks=[Crash(crash_at)])
    resumed = make_model()
    r = train(resumed, data, quiet(checkpoint_dir=str(checkpoint_dir), resume=True, **kw), callbacks=[Crash(None)])
    assert r.resumed_from_step == checkpoint_every * (crash_at // checkpoint_every)
    a, b = adapter_params(ref), adapter_params(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    return ref, r_ref, resumed, r


def train_in_hf_trainer(model, output_dir, max_steps=6, **args):
    """Train `model` with a Hugging Face Trainer (batches of 8 from synthetic_data(48), lr 5e-3, CPU) that runs
    its method callbacks (rank allocators) through HFTrainerCallback; returns (trainer, bridge)."""
    from transformers import Trainer, TrainingArguments

    data = synthetic_data(48)
    rows = [{"row": i} for i in range(len(data))]
    args = TrainingArguments(output_dir=str(output_dir), max_steps=max_steps, per_device_train_batch_size=8,
                             learning_rate=5e-3, use_cpu=True, report_to=[], save_strategy="no", logging_strategy="no",
                             disable_tqdm=True, dataloader_num_workers=0, remove_unused_columns=False, **args)
    bridge = HFTrainerCallback(method_callbacks(model))
    trainer = Trainer(model=model, args=args, train_dataset=rows, callbacks=[bridge],
                      data_collator=lambda feats: data.collate([f["row"] for f in feats]))
    trainer.train()
    return trainer, bridge


# --- SaRA / SpIEL: the three paths a Linear's sparse delta can take -------------------------------------------------

SPARSE_PATHS = ["merged", "sparse", "dense"]


def use_sparse_path(path, monkeypatch, adapter_cls):
    """Run a test on one Linear path: the first adapter's merged matmul (sara.MergedSparseLinear), or, as if behind
    another adapter (computes_layer_output off), the CSR kernels (SparseLinearDelta) or the dense ΔW."""
    from reparam.adapters import sara

    if path != "merged":
        monkeypatch.setattr(adapter_cls, "computes_layer_output", False)
    monkeypatch.setattr(sara, "SPARSE_KERNEL_MAX_DENSITY", 1.0 if path == "sparse" else 0.0)
    return path
