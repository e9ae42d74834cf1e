import json
import math

import pytest
import torch

import reparam
from reparam import ConfigError, ReparamError
from reparam.training import Callback, TrainConfig, evaluate, load_task, load_text_blocks, train
from reparam.training import loop as loop_mod
from tests.training.tiny import adapter_state, lora_bert, synthetic_data, tokenizer

VOCAB = 300  # synthetic data uses ids < 200 plus 101/102


def quiet(**kw):
    base = dict(lr=5e-3, batch_size=8, progress=False, log_every=1, seed=0)
    base.update(kw)
    return TrainConfig(**base)


class Boom(RuntimeError):
    pass


class Counter(Callback):
    """Stateful callback: its count must survive a checkpoint/resume."""

    def __init__(self, crash_at=None):
        self.count = 0
        self.crash_at = crash_at

    def on_step_begin(self, state):
        if self.crash_at is not None and state.global_step == self.crash_at:
            raise Boom(f"killed at step {state.global_step}")

    def on_step_end(self, state):
        self.count += 1

    def state_dict(self):
        return {"count": self.count}

    def load_state_dict(self, s):
        self.count = s["count"]


def test_resume_is_bit_exact(tmp_path):
    # dropout on (model and LoRA) so the torch RNG state matters; 40 rows / batch 8 = 5 steps per epoch, so the
    # run crosses epochs; grad_accum 2 exercises micro-batching; the crash comes 2 steps after a checkpoint.
    data = synthetic_data(40, min_len=4, max_len=24)
    kw = dict(max_steps=12, grad_accum=2, weight_decay=0.01, warmup_ratio=0.2, schedule="cosine")
    ref = lora_bert(VOCAB, dropout=0.1)
    ref_cb = Counter()
    r_ref = train(ref, data, quiet(**kw), callbacks=[ref_cb])
    assert r_ref.steps == 12 and ref_cb.count == 12

    ck = tmp_path / "ck"
    first = lora_bert(VOCAB, dropout=0.1)
    log = tmp_path / "log.jsonl"
    with pytest.raises(Boom):
        train(first, data, quiet(checkpoint_dir=str(ck), checkpoint_every=4, log_path=str(log), **kw),
              callbacks=[Counter(crash_at=6)])
    assert [json.loads(x)["step"] for x in log.read_text().splitlines()] == [1, 2, 3, 4, 5, 6]
    assert json.loads((ck / "latest.json").read_text())["step"] == 4

    resumed = lora_bert(VOCAB, dropout=0.1)
    cb = Counter()
    r = train(resumed, data, quiet(checkpoint_dir=str(ck), checkpoint_every=4, resume=True, log_path=str(log), **kw),
              callbacks=[cb])
    assert r.resumed_from_step == 4 and r.steps == 12
    assert cb.count == 12  # 4 restored from the checkpoint + 8 run here
    a, b = adapter_state(ref), adapter_state(resumed)
    assert a.keys() == b.keys() and len(a) > 4
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert [h["loss"] for h in r.history if "loss" in h] == [h["loss"] for h in r_ref.history if "loss" in h]
    # the log keeps steps 1-4 of the killed run (5 and 6 died with it) and continues from 5
    lines = [json.loads(x) for x in log.read_text().splitlines()]
    assert [x["step"] for x in lines] == list(range(1, 13))
    assert [x["loss"] for x in lines] == [h["loss"] for h in r_ref.history]
    # keep_checkpoints=2: only the last two remain, and the final one is the end of training
    assert sorted(p.name for p in ck.glob("checkpoint-*")) == ["checkpoint-00000008", "checkpoint-00000012"]
    # resuming a finished run does nothing more
    again = lora_bert(VOCAB, dropout=0.1)
    r2 = train(again, data, quiet(checkpoint_dir=str(ck), resume=True, **kw), callbacks=[Counter()])
    assert r2.steps == 12 and all(torch.equal(v, adapter_state(again)[k]) for k, v in b.items())


def test_resume_checks_data_order_settings(tmp_path):
    data = synthetic_data(16)
    ck = tmp_path / "ck"
    train(lora_bert(VOCAB), data, quiet(max_steps=2, checkpoint_dir=str(ck)))
    with pytest.raises(ReparamError, match="batch_size=8, this run has batch_size=4"):
        train(lora_bert(VOCAB), data, quiet(max_steps=4, batch_size=4, checkpoint_dir=str(ck), resume=True))
    with pytest.raises(ReparamError, match="no checkpoint here"):
        train(lora_bert(VOCAB), data, quiet(max_steps=4, resume_from=str(tmp_path)))


def test_grad_accum_matches_one_big_batch():
    # the gradient handed to the optimizer is that of the mean loss over the whole step batch, however it is split
    data = synthetic_data(30)
    grads = {}

    class Grab(Callback):
        def __init__(self, key):
            self.key = key

        def after_backward(self, state):
            grads.setdefault(self.key, []).append(
                {n: p.grad.clone() for n, p in state.model.named_parameters() if p.requires_grad})

    a, b = lora_bert(VOCAB), lora_bert(VOCAB)
    train(a, data, quiet(max_steps=5, batch_size=10, grad_accum=1), callbacks=[Grab(1)])
    train(b, data, quiet(max_steps=5, batch_size=10, grad_accum=3), callbacks=[Grab(3)])  # micro-batches 4, 3, 3
    for k, v in grads[1][0].items():
        assert torch.allclose(v, grads[3][0][k], rtol=1e-4, atol=1e-7), k
    # Adam amplifies float-rounding differences of near-zero gradients to ~1e-6 of weights of size ~1e-2
    for k, v in adapter_state(a).items():
        assert torch.allclose(v, adapter_state(b)[k], rtol=0, atol=1e-5), k


@pytest.mark.parametrize("schedule", ["linear", "cosine", "constant"])
def test_lr_schedules(schedule):
    seen = []

    class LR(Callback):
        def on_step_begin(self, state):
            seen.append(state.optimizer.param_groups[0]["lr"])

    train(lora_bert(VOCAB), synthetic_data(16), quiet(lr=1.0e-3, max_steps=10, warmup_ratio=0.2,
                                                     schedule=schedule), callbacks=[LR()])
    warm = [(s + 1) / 3 * 1e-3 for s in range(2)]
    progress = [(s - 2) / 8 for s in range(2, 10)]
    rest = {"linear": [1e-3 * (1 - p) for p in progress],
            "cosine": [1e-3 * 0.5 * (1 + math.cos(math.pi * p)) for p in progress],
            "constant": [1e-3] * 8}[schedule]
    assert seen == pytest.approx(warm + rest, rel=1e-9)


def test_callback_order_and_gradients(tmp_path):
    events = []
    lora_grads = []

    class Rec(Callback):
        def on_train_begin(self, state):
            events.append(("begin", state.global_step, state.total_steps))

        def on_step_begin(self, state):
            events.append(("step_begin", state.global_step))

        def after_backward(self, state):
            grads = [p.grad for n, p in state.model.named_parameters() if p.requires_grad]
            lora_grads.append(all(g is not None for g in grads))
            events.append(("after_backward", state.global_step))

        def on_step_end(self, state):
            assert all(p.grad is not None for p in state.model.parameters() if p.requires_grad)
            events.append(("step_end", state.global_step, round(state.loss, 3) >= 0))

        def on_evaluate(self, state, metrics):
            events.append(("evaluate", state.global_step, sorted(metrics)))

        def on_train_end(self, state):
            events.append(("end", state.global_step))

    log = tmp_path / "log.jsonl"
    r = train(lora_bert(VOCAB), synthetic_data(16), quiet(max_steps=2, eval_every=1, log_path=str(log)),
              eval_data=synthetic_data(8, seed=5), callbacks=[Rec()])
    assert events == [("begin", 0, 2), ("step_begin", 0), ("after_backward", 0), ("step_end", 1, True),
                      ("evaluate", 1, ["accuracy", "loss"]), ("step_begin", 1), ("after_backward", 1),
                      ("step_end", 2, True), ("evaluate", 2, ["accuracy", "loss"]), ("end", 2)]
    assert lora_grads == [True, True]
    lines = [json.loads(x) for x in log.read_text().splitlines()]
    assert lines == r.history
    assert [x["step"] for x in lines] == [1, 1, 2, 2]
    assert set(lines[0]) == {"step", "epoch", "loss", "lr", "examples_per_s"}
    assert set(lines[1]) == {"step", "eval_loss", "eval_accuracy"}
    assert r.eval_metrics["accuracy"] == lines[-1]["eval_accuracy"]
    assert r.examples_per_s > 0 and r.wall_time > 0


def test_regularizer_weight(monkeypatch):
    data = synthetic_data(16)
    base = lora_bert(VOCAB)
    r0 = train(base, data, quiet(max_steps=3))
    # a constant regularizer adds exactly weight * value to the loss and nothing to the gradients
    monkeypatch.setattr(loop_mod, "regularizer", lambda m: torch.tensor(5.0))
    const = lora_bert(VOCAB)
    r1 = train(const, data, quiet(max_steps=3, regularizer_weight=0.1))
    for k, v in adapter_state(base).items():
        assert torch.equal(v, adapter_state(const)[k])
    l0 = [h["loss"] for h in r0.history if "loss" in h]
    l1 = [h["loss"] for h in r1.history if "loss" in h]
    assert l1 == pytest.approx([x + 0.5 for x in l0], abs=1e-6)
    # a real penalty changes the trained weights (gradient flows through it)
    monkeypatch.setattr(loop_mod, "regularizer", lambda m: sum(
        (p ** 2).sum() for n, p in m.named_parameters() if "lora_B" in n or "adapters" in n))
    pen = lora_bert(VOCAB)
    train(pen, data, quiet(max_steps=3, regularizer_weight=10.0))
    assert any(not torch.equal(v, adapter_state(pen)[k]) for k, v in adapter_state(base).items())


def test_evaluate_loss_matches_hf_loss():
    model = lora_bert(VOCAB)
    data = synthetic_data(12)
    out = evaluate(model, data, batch_size=12)
    batch = data.collate(range(12))
    model.eval()
    with torch.no_grad():
        hf = model(**batch)
    assert out["loss"] == pytest.approx(float(hf.loss), rel=1e-5)
    assert out["accuracy"] == float((hf.logits.argmax(-1) == batch["labels"]).float().mean())
    reg = synthetic_data(12, num_labels=1)
    rmodel = lora_bert(VOCAB, num_labels=1)
    r = evaluate(rmodel, reg, batch_size=5)
    with torch.no_grad():
        pred = rmodel(**{k: v for k, v in reg.collate(range(12)).items() if k != "labels"}).logits.reshape(-1)
    assert r["loss"] == pytest.approx(float(((pred - torch.tensor(reg.labels)) ** 2).mean()), rel=1e-5)
    assert set(r) == {"loss", "pearson", "spearman"}


def test_causal_lm(minilm_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = tokenizer(minilm_path)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=tok.vocab_size, n_embd=32, n_layer=2, n_head=2, n_positions=64,
                                       resid_pdrop=0, embd_pdrop=0, attn_pdrop=0))
    reparam.adapt(model, reparam.LoraConfig(r=4, alpha=8), targets=["c_attn"])
    train_d = load_text_blocks("/work/shared/data/text/tinyshakespeare.txt", tok, block_size=32, limit=32)
    before = evaluate(model, train_d, batch_size=16)
    ids = train_d.blocks[:16]
    with torch.no_grad():
        hf = model(input_ids=ids, labels=ids).loss
    assert evaluate(model, train_d.__class__(ids), 16)["loss"] == pytest.approx(float(hf), rel=1e-5)
    assert before["perplexity"] == pytest.approx(math.exp(before["loss"]))
    r = train(model, train_d, quiet(lr=2e-2, max_steps=8, warmup_ratio=0.0), eval_data=train_d)
    assert r.eval_metrics["loss"] < before["loss"]


def test_glue_smoke(minilm_path, glue_dir):
    from tests.training.tiny import tiny_bert

    tok = tokenizer(minilm_path)
    tr = load_task(glue_dir / "MRPC", tok, "train", limit=64, max_length=64)
    dev = load_task(glue_dir / "MRPC", tok, "dev", limit=32, max_length=64)
    model = tiny_bert(tok.vocab_size)
    reparam.adapt(model, reparam.LoraConfig(r=2), targets=["query", "value"], modules_to_save=["classifier"])
    r = train(model, tr, quiet(max_steps=4, batch_size=16), eval_data=dev)
    assert set(r.eval_metrics) == {"loss", "f1", "accuracy"} and 0 <= r.eval_metrics["f1"] <= 1


def test_bad_config_and_model():
    with pytest.raises(ConfigError, match=r"TrainConfig.schedule='step'"):
        TrainConfig(schedule="step")
    with pytest.raises(ConfigError, match="checkpoint_every.*needs checkpoint_dir"):
        TrainConfig(checkpoint_every=5)
    frozen = lora_bert(VOCAB)
    for p in frozen.parameters():
        p.requires_grad_(False)
    with pytest.raises(ReparamError, match="no trainable parameters"):
        train(frozen, synthetic_data(8), quiet(max_steps=1))


def test_callback_log_values_are_json(tmp_path):
    class LogTensor(Callback):
        def on_step_end(self, state):
            state.log({"norm": torch.tensor(1.5), "vec": torch.tensor([1.0, 2.0])})

    log = tmp_path / "log.jsonl"
    train(lora_bert(VOCAB), synthetic_data(8), quiet(max_steps=1, log_path=str(log)), callbacks=[LogTensor()])
    lines = [json.loads(x) for x in log.read_text().splitlines()]
    assert lines[0] == {"step": 1, "norm": 1.5, "vec": [1.0, 2.0]}
