"""IncreLoRA (specs/adapters/increlora.md): the unit-test properties of §13, the regulariser (§5), and the growing
allocator in reparam's loop (physical growth, optimizer state, budget log, save/load, PEFT export, exact resume)."""
import copy
import json
import math

import pytest
import torch
from torch import nn

import reparam
from reparam.adapters.increlora import IncreLoraAllocator, restart_lr
from reparam.core.model import get_record
from reparam.training import Callback, method_callbacks, train
from tests.helpers import TinyMLP, bert_adapted, kill_and_resume, quiet, randomize_adapters, train_in_hf_trainer
from tests.training.tiny import synthetic_data, tiny_bert

QV = ["query", "value"]


def bert_increlora(seed=0, **fields):
    return bert_adapted("increlora", seed, **{"init_warmup": 1, "incre_interval": 2, "top_h": 2, "target_rank": 2,
                                               **fields})


def allocator_for(model, lr=1e-2):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    alloc = IncreLoraAllocator(model, optimizer=opt)
    alloc.set_total_step(100)
    return alloc, opt


def total_rank(alloc):
    return sum(alloc.ranks().values())


# --- §13.1 identity at init -----------------------------------------------------------------------------------

@pytest.mark.parametrize("advance", [False, True])
def test_identity_at_init(advance):
    torch.manual_seed(0)
    base = TinyMLP(dtype=torch.float64)
    model = reparam.adapt(copy.deepcopy(base), reparam.make_config("increlora", advance_learn=advance),
                          targets=["fc1", "fc2"])
    alloc, opt = allocator_for(model)
    alloc.step(0, opt)  # t = 0: the reserves are created
    a = alloc.adapters()["fc1"]
    assert len(a.lora_A) == 2 and a.r_num == 1 and float(a.lora_E[1]) == (1e-5 if advance else 0.0)
    x = torch.randn(5, 16, dtype=torch.float64)
    if not advance:
        assert torch.equal(model(x), base(x))
        return
    h = x
    for name in ("fc1", "fc2"):  # per layer, the bound of §13.1 on that layer's input
        layer, ref = dict(model.named_modules())[name], getattr(base, name)
        a = layer.adapters["default"]
        bound = a.scale * 1e-5 * a.lora_B[1].norm() * a.lora_A[1].norm() * h.norm(dim=1).max()
        err = (layer(h) - ref(h)).abs().max()
        assert 0 < err <= bound
        h = torch.relu(ref(h))


# --- §13.2 growth bookkeeping, §13.3 budget end ---------------------------------------------------------------

def test_growth_bookkeeping_and_budget_end():
    model = bert_increlora(target_rank=4, top_h=2, incre_rank_num=2)  # add_r = 2; target_total = 16, start 4
    alloc, opt = allocator_for(model)
    alloc.step(0, opt)
    modules = list(alloc.layers)
    n_groups = len(opt.param_groups)
    alloc.ema = {m: (float(i + 1), 1.0) for i, m in enumerate(modules)}  # importance = 1, 2, 3, 4
    before = alloc.ranks()
    alloc.grow(2, opt)
    grown = {m for m in modules if alloc.ranks()[m] != before[m]}
    assert grown == set(modules[2:])  # the top_h = 2 most important
    assert all(alloc.ranks()[m] == before[m] + 2 for m in grown)
    assert total_rank(alloc) == sum(a.r_num for a in alloc.adapters().values()) == 8
    for m, a in alloc.adapters().items():
        assert len(a.lora_A) - a.n_active == 2  # add_r reserves again
        assert all(lam.requires_grad for lam in list(a.lora_E)[:a.n_active])
        assert not any(lam.requires_grad for lam in list(a.lora_E)[a.n_active:])
    assert len(opt.param_groups) == n_groups + 1
    assert get_record(model, "default").config.rank_pattern == alloc.ranks()
    # ties: all four modules tie, 8 ranks left, add_r = 2 each -> exactly the budget; then 16 is final
    alloc.ema = {m: (1.0, 1.0) for m in modules}
    alloc.grow(4, opt)
    assert total_rank(alloc) == 16 and alloc.done
    for a in alloc.adapters().values():  # §13.3: reserves zeroed, score hooks removed
        assert all(float(lam.abs().sum()) == 0 for lam in list(a.lora_E)[a.n_active:])
        assert a.score_grad is None
    groups = len(opt.param_groups)
    for t in range(5, 12):
        alloc.step(t, opt)
    assert total_rank(alloc) == 16 and len(opt.param_groups) == groups


def test_clamping_never_exceeds_the_budget():
    model = bert_increlora(target_total_rank=7, top_h=4, incre_rank_num=2)  # 4 → 7: ties would give 12
    alloc, opt = allocator_for(model)
    alloc.step(0, opt)
    alloc.ema = {m: (1.0, 1.0) for m in alloc.layers}
    alloc.grow(2, opt)
    assert total_rank(alloc) == 7 and alloc.done
    assert sorted(alloc.ranks().values()) == [1, 1, 2, 3]  # 2 + 1 of the 3 missing ranks, in module order
    unclamped = bert_increlora(target_total_rank=7, top_h=4, incre_rank_num=2, clamp_budget=False)
    alloc, opt = allocator_for(unclamped)
    alloc.step(0, opt)
    alloc.ema = {m: (1.0, 1.0) for m in alloc.layers}
    alloc.grow(2, opt)
    assert total_rank(alloc) == 12  # the reference's overshoot (§12)


def test_rescale_on_growth_keeps_the_function():
    ids = torch.randint(1, 300, (2, 7), generator=torch.Generator().manual_seed(1))
    for rescale in (True, False):
        model = bert_increlora(rescale_on_growth=rescale, advance_learn=False).eval()
        alloc, opt = allocator_for(model)
        alloc.step(0, opt)
        with torch.no_grad():
            for a in alloc.adapters().values():
                a.lora_E[0].fill_(0.5)
        before = model(input_ids=ids).logits
        alloc.ema = {m: (1.0, 1.0) for m in alloc.layers}
        alloc.grow(2, opt)  # rank 1 → 2 with λ of the new component 0
        after = model(input_ids=ids).logits
        assert torch.allclose(before, after, atol=1e-6) == rescale


# --- §13.4 restart warm-up ------------------------------------------------------------------------------------

def test_restart_warmup_schedule_of_an_added_group():
    assert restart_lr(10, 100, 500) == pytest.approx(0.1)
    model = bert_increlora()
    alloc, opt = allocator_for(model, lr=2e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    alloc.total_steps, alloc.warmup, alloc.scheduler = 1000, 100, sched
    for _ in range(500):
        opt.step()
        sched.step()
    alloc.add_group(500, alloc.add_reserves(alloc.adapters()[QV_MODULE]), opt)
    lrs = {}
    for step in range(501, 1001):
        opt.step()
        sched.step()
        lrs[step] = opt.param_groups[-1]["lr"]
    assert lrs[510] == pytest.approx(2e-3 * 10 / 100) and lrs[600] == pytest.approx(2e-3) and lrs[1000] == 0
    assert opt.param_groups[0]["lr"] == 2e-3  # the original groups keep the global schedule


QV_MODULE = "bert.encoder.layer.0.attention.self.query"


# --- §13.5 score formula --------------------------------------------------------------------------------------

def test_score_formula_on_a_hand_set_4x3_module():
    torch.manual_seed(0)
    model = reparam.adapt(nn.Sequential(nn.Linear(3, 4, dtype=torch.float64)),
                          reparam.make_config("increlora", alpha=1.0), targets=["0"])
    alloc, _ = allocator_for(model)
    a = alloc.adapters()["0"]
    p, q = torch.tensor([[1.0], [-2.0], [0.5], [3.0]], dtype=torch.float64), torch.tensor([[2.0, -1.0, 0.25]],
                                                                                          dtype=torch.float64)
    with torch.no_grad():
        a.lora_B[0].copy_(p), a.lora_A[0].copy_(q), a.lora_E[0].fill_(1.5)
    delta = a.scale * 1.5 * p @ q  # hand-set ΔW, s included
    x, c = torch.tensor([[0.3, -1.2, 2.0]], dtype=torch.float64), torch.tensor([[1.0, -0.5, 2.0, 0.1]],
                                                                              dtype=torch.float64)
    (model(x) * c).sum().backward()  # ∂L/∂y = c, so G = cᵀ x
    G = c.T @ x
    alloc.update_importance()
    expected = (delta * G).abs().sum() / math.sqrt(12)
    assert alloc.ema["0"][0] == pytest.approx((1 - 0.85) * float(expected), rel=1e-12)
    assert float(a.score_grad.abs().sum()) == 0  # cleared for the next step


def test_score_sums_micro_batches():
    model = bert_increlora()
    alloc, _ = allocator_for(model)
    ids = torch.randint(1, 300, (4, 6), generator=torch.Generator().manual_seed(2))
    model(input_ids=ids).logits.sum().backward()
    full = alloc.adapters()[QV_MODULE].score_grad.clone()
    alloc.adapters()[QV_MODULE].score_grad.zero_()
    for half in (ids[:2], ids[2:]):
        model(input_ids=half).logits.sum().backward()
    torch.testing.assert_close(alloc.adapters()[QV_MODULE].score_grad, full, rtol=1e-5, atol=1e-7)


def test_merged_scoring_path_equals_the_hooked_one(monkeypatch):
    """While scoring, the first adapter computes x (W0 + ΔW)ᵀ and G is ΔW's gradient; behind another adapter a hook
    on the r-rank output adds gᵀx. Same G, same factor and input gradients."""
    from reparam.adapters.increlora import IncreLoraAdapter

    results = []
    for merged in (True, False):
        if not merged:
            monkeypatch.setattr(IncreLoraAdapter, "computes_layer_output", False)
        model = bert_increlora()
        randomize_adapters(model)
        alloc, _ = allocator_for(model)
        ids = torch.randint(1, 300, (4, 6), generator=torch.Generator().manual_seed(2))
        model(input_ids=ids).logits.sin().sum().backward()
        a = alloc.adapters()[QV_MODULE]
        results.append((a.score_grad.clone(), [p.grad.clone() for p in a.parameters() if p.grad is not None]))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-5, atol=1e-7)
    assert len(results[0][1]) == len(results[1][1]) > 0
    for g_merged, g_hooked in zip(*(r[1] for r in results)):
        torch.testing.assert_close(g_merged, g_hooked, rtol=1e-4, atol=1e-7)


# --- §5 orthogonality regulariser -----------------------------------------------------------------------------

@pytest.mark.parametrize("scope", ["per_block", "concatenated"])
def test_orthogonality_regularizer(scope):
    model = bert_increlora(orth_scope=scope, orth_reg_weight=0.3)
    alloc, opt = allocator_for(model)
    alloc.step(0, opt)
    alloc.ema = {m: (1.0, 1.0) for m in alloc.layers}
    alloc.grow(2, opt)
    a = alloc.adapters()[QV_MODULE]  # r_num 2: the init block, one grown component, one reserve
    eye = lambda k: torch.eye(k)  # noqa: E731
    if scope == "per_block":
        mats = [q for q in a.lora_A] + [p.T for p in a.lora_B]
    else:
        mats = [torch.cat(list(a.lora_A)[:2]), torch.cat(list(a.lora_B)[:2], 1).T]
    expected = 0.3 * sum(torch.linalg.norm(m @ m.T - eye(m.shape[0])) for m in mats) / len(mats)
    layer = dict(model.named_modules())[QV_MODULE]
    torch.testing.assert_close(a.regularizer(layer), expected)


# --- training end to end, §13.6 merge ---------------------------------------------------------------------

def test_training_grows_physically_saves_loads_merges_and_exports(tmp_path):
    model = bert_increlora()
    n_before = reparam.trainable_summary(model).trainable
    shapes = []

    class Shapes(Callback):
        def on_step_end(self, state):
            shapes.append(all(state.optimizer.state[p]["exp_avg"].shape == p.shape
                              for g in state.optimizer.param_groups for p in g["params"] if p in state.optimizer.state))

    log = tmp_path / "log.jsonl"
    train(model, synthetic_data(40), quiet(max_steps=12, log_path=str(log)), callbacks=[Shapes()])
    assert all(shapes)
    cfg = get_record(model, "default").config
    assert sum(cfg.rank_pattern.values()) == 8 and max(cfg.rank_pattern.values()) > 1  # grown from 4 to 2·n
    # each grown rank adds a 1x32 q, a 1x1 λ and a 32x1 p; unused reserves are frozen at the end
    assert reparam.trainable_summary(model).trainable == n_before + 4 * 65
    budgets = [e["rank_budget"] for e in map(json.loads, log.read_text().splitlines()) if "rank_budget" in e]
    assert budgets == [4, 6, 8]
    ids = torch.randint(1, 300, (2, 9), generator=torch.Generator().manual_seed(3))
    model.eval()
    ours = model(input_ids=ids).logits
    reparam.save_adapter(model, tmp_path / "incre")
    loaded = reparam.load_adapter(tiny_bert(300), tmp_path / "incre").eval()
    assert get_record(loaded, "default").config.rank_pattern == cfg.rank_pattern
    assert torch.equal(loaded(input_ids=ids).logits, ours)
    peft = pytest.importorskip("peft")
    reparam.export_peft(loaded, tmp_path / "peft")
    exported = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert exported["rank_pattern"]  # modules grew unevenly
    theirs = peft.PeftModel.from_pretrained(tiny_bert(300), tmp_path / "peft").eval()
    torch.testing.assert_close(theirs(input_ids=ids).logits, ours, atol=1e-6, rtol=0)
    reparam.merge(model)  # §13.6, after two growth events
    torch.testing.assert_close(model(input_ids=ids).logits, ours, atol=1e-5, rtol=0)
    reparam.unmerge(model)
    torch.testing.assert_close(model(input_ids=ids).logits, ours, atol=1e-5, rtol=0)


@pytest.mark.parametrize("crash_at,advance", [(5, True), (9, False)])  # mid-growth; after the budget is reached
def test_kill_and_resume_is_bit_exact(tmp_path, crash_at, advance):
    data = synthetic_data(40)
    kw = dict(max_steps=12, weight_decay=0.01, warmup_ratio=0.2)
    ref, r_ref, resumed, r = kill_and_resume(lambda: bert_increlora(advance_learn=advance), data, tmp_path / "ck",
                                             crash_at, 4, **kw)  # asserts the resume step, bit-equal parameters
    assert get_record(ref, "default").config == get_record(resumed, "default").config
    losses = [[(h["step"], h["loss"], h["lr"]) for h in run.history if "loss" in h] for run in (r, r_ref)]
    assert losses[0] == losses[1]


def test_allocator_is_a_method_callback_and_errors():
    model = bert_increlora()
    assert [type(c) for c in method_callbacks(model)] == [IncreLoraAllocator]
    with pytest.raises(reparam.ConfigError, match="set total_step in the config or call set_total_step"):
        IncreLoraAllocator(model).step(0)
    with pytest.raises(reparam.ConfigError, match="needs the optimizer"):
        alloc = IncreLoraAllocator(model)
        alloc.set_total_step(10)
        alloc.step(0)


@pytest.mark.parametrize("fields,message", [
    (dict(target_rank=3), "invalid target_rank=3: needs incre_rank_num unless it is one of"),
    (dict(orth_scope="global"), "invalid orth_scope='global'"),
    (dict(init_r=0), "invalid init_r=0: must be an integer >= 1"),
    (dict(rank_pattern={"fc1": 0}), "invalid rank_pattern"),
    (dict(r=4), "unknown field.*'r'"),
])
def test_config_errors(fields, message):
    with pytest.raises(reparam.ConfigError, match=message):
        reparam.make_config("increlora", **fields)


def test_allocator_grows_inside_hf_trainer(tmp_path):
    model = bert_increlora()
    trainer, bridge = train_in_hf_trainer(model, tmp_path, warmup_steps=2)
    assert [h["rank_budget"] for h in bridge.history if "rank_budget" in h] == [4, 6, 8]
    opt = trainer.optimizer
    lambdas = trainer.lr_scheduler.lr_lambdas  # one per group; the last one added at t = 4, W = 2, H = 2
    assert len(lambdas) == len(opt.param_groups) == 5 and lambdas[-1](5) == restart_lr(1, 2, 2) == 0.5
    assert all(opt.state[p]["exp_avg"].shape == p.shape for g in opt.param_groups for p in g["params"] if p in opt.state)
