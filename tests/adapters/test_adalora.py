"""AdaLoRA (specs/adapters/adalora.md): the unit-test properties of §12, PEFT parity (forward, regulariser,
allocation, export), the rank allocator in reparam's loop and in a HF Trainer (physical pruning, optimizer state,
exact resume, budget log), save/load of the rank pattern, the shared resize helper, errors and the CLI."""
import copy
import json

import pytest
import torch
from torch import nn

import reparam
from reparam.adapters.adalora import AdaLoraAllocator, budget
from reparam.core.errors import ConfigError
from reparam.core.model import adapted_layers, get_record
from reparam.core.resize import resize_rows
from reparam.training import Callback, train
from tests.helpers import (MixedKinds, adapt_tiny_mlp, adapter_params, assert_merge_round_trip, bert_adapted,
                           kill_and_resume, quiet, randomize_adapters, train_in_hf_trainer)
from tests.training.tiny import synthetic_data, tiny_bert

MODULES = ["fc1", "fc2"]


def adapted(dtype=torch.float32, **fields):
    return adapt_tiny_mlp("adalora", dtype, MODULES, **fields)


def ada(model, module):
    return dict(model.named_modules())[module].adapters["default"]


def set_scores(allocator, per_module):
    """EMA state whose triplet scores S are exactly `per_module[m]` (Ī = S on λ, Ū = 1, P and Q score 0)."""
    for m, values in per_module.items():
        a = allocator.adapters()[m]
        zeros = {k: torch.zeros_like(getattr(a, k), dtype=torch.float32) for k in ("lora_A", "lora_B")}
        lam = (torch.tensor(values, dtype=torch.float32)[:, None], torch.ones(len(values), 1))
        allocator.scores[m] = {"lora_E": lam, **{k: (z, z) for k, z in zeros.items()}}


def bert_adalora(seed=0, **fields):
    return bert_adapted("adalora", seed, **{"r": 4, "target_r": 2, "alpha": 8.0, **fields})


# --- §12.1 identity at init -----------------------------------------------------------------------------------

def test_identity_at_init_and_first_gradients():
    base, model = adapted(orth_reg_weight=0.0)
    x = torch.randn(5, 16)
    assert torch.equal(model(x), base(x))
    model(x).pow(2).sum().backward()  # task loss only (γ = 0)
    for m in MODULES:
        a = ada(model, m)
        assert torch.count_nonzero(a.lora_A.grad) == 0 and torch.count_nonzero(a.lora_B.grad) == 0
        assert torch.count_nonzero(a.lora_E.grad) > 0
        assert a.lora_A.shape == (12, a.lora_A.shape[1]) and a.lora_E.shape == (12, 1)
        assert 0.015 < a.lora_A.std() < 0.025 and torch.count_nonzero(a.lora_E) == 0  # N(0, 0.02²), λ = 0


# --- §12.2 schedule -------------------------------------------------------------------------------------------

def test_budget_schedule_worked_values():
    expected = {0: 12, 10: 12, 11: 11, 20: 9, 30: 6, 40: 5, 50: 4, 80: 4, 81: 4, 100: 4}
    assert {t: budget(t, 12, 4, 10, 20, 100) for t in expected} == expected
    values = [budget(t, 12, 4, 10, 20, 100) for t in range(101)]
    assert all(a >= b for a, b in zip(values, values[1:]))


# --- §12.3 / §12.4 masking ------------------------------------------------------------------------------------

def test_mask_to_budget_hits_budget_and_zeroes_lambda():
    _, model = adapted(r=4, target_r=1, total_step=20)
    randomize_adapters(model)
    alloc = AdaLoraAllocator(model)
    scores = {"fc1": [0.5, 0.1, 0.7, 0.3], "fc2": [0.2, 0.8, 0.05, 0.6]}  # distinct
    set_scores(alloc, scores)
    flat = sorted(v for vs in scores.values() for v in vs)
    for b in (7, 5, 2):
        alloc.mask_to_budget(b)
        tau = flat[len(flat) - b - 1]
        assert sum(alloc.ranks().values()) == b == sum(v > tau for v in flat)
        for m in MODULES:
            lam = ada(model, m).lora_E.detach().reshape(-1)
            assert torch.equal(lam[~alloc.active[m]], torch.zeros(int((~alloc.active[m]).sum())))
            assert torch.count_nonzero(lam[alloc.active[m]]) == int(alloc.active[m].sum())
            assert alloc.active[m].tolist() == [s > tau for s in scores[m]]


def test_allocation_is_global_not_per_matrix():
    _, model = adapted(r=3, target_r=0, total_step=20, prune="every")
    alloc = AdaLoraAllocator(model)
    set_scores(alloc, {"fc1": [3.0, 2.0, 4.0], "fc2": [0.3, 0.2, 0.1]})
    alloc.mask_to_budget(3)  # b = init_r: matrix 1 keeps everything, matrix 2 nothing
    assert alloc.ranks() == {"fc1": 3, "fc2": 0}
    assert ada(model, "fc2").lora_A.shape == (0, 24) and ada(model, "fc2").lora_B.shape == (24, 0)  # removed
    assert model(torch.randn(2, 16)).shape == (2, 8) and reparam.regularizer(model) >= 0  # a rank-0 module works


def test_ties_mask_more_unless_exact_budget():
    for exact, expected in ((False, 2), (True, 4)):
        _, model = adapted(r=3, target_r=1, total_step=20, exact_budget=exact)
        alloc = AdaLoraAllocator(model)
        set_scores(alloc, {"fc1": [0.0, 0.0, 1.0], "fc2": [0.0, 2.0, 0.0]})  # many zero scores (§11)
        alloc.mask_to_budget(4)
        assert sum(alloc.ranks().values()) == expected


def random_grads(model, g):
    for p in adapter_params(model).values():
        p.grad = torch.randn(p.shape, generator=g)


def test_budget_follows_schedule_then_final_pattern_is_fixed_and_removed():
    _, model = adapted(r=4, target_r=2, tinit=2, tfinal=3, deltaT=2, total_step=12)
    randomize_adapters(model)
    alloc = AdaLoraAllocator(model)
    g = torch.Generator().manual_seed(0)
    seen = []
    for t in range(12):
        random_grads(model, g)
        alloc.step(t)
        seen.append((sum(alloc.ranks().values()), dict(get_record(model, "default").config.rank_pattern)))
        if 2 < t < 9 and t % 2 == 0:  # a masking step: the budget b(t) exactly (distinct scores)
            assert seen[-1][0] == budget(t, 8, 4, 2, 3, 12)
    assert [s for s, _ in seen[:3]] == [8, 8, 8]  # warm-up: nothing masked
    assert all(s == 4 for s, _ in seen[9:]) and all(p == seen[9][1] for _, p in seen[9:])  # t >= T − t_f
    assert not seen[8][1] and sum(map(sum, seen[9][1].values())) == 4  # removed at t = T − t_f, not before
    assert sum(ada(model, m).lora_E.numel() for m in MODULES) == 4 and alloc.scores == {}


# --- §12.5 score formula --------------------------------------------------------------------------------------

def test_score_formula_one_ema_step_by_hand():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 3))  # d_in = 2, d_out = 3
    reparam.adapt(model, reparam.make_config("adalora", r=2, target_r=1, beta1=0.8, beta2=0.7), targets=["0"])
    a = model[0].adapters["default"]
    with torch.no_grad():
        a.lora_A.copy_(torch.tensor([[1.0, -2.0], [0.5, 3.0]]))  # Q
        a.lora_E.copy_(torch.tensor([[2.0], [-1.0]]))  # λ
        a.lora_B.copy_(torch.tensor([[1.0, 0.0], [-1.0, 2.0], [0.5, 1.0]]))  # P
    a.lora_A.grad = torch.tensor([[0.5, 1.0], [2.0, -1.0]])
    a.lora_E.grad = torch.tensor([[-1.5], [4.0]])
    a.lora_B.grad = torch.tensor([[2.0, 1.0], [1.0, -0.5], [-2.0, 0.0]])
    alloc = AdaLoraAllocator(model)
    alloc.update_scores()

    def s(w, g):  # (1−β1)(1−β2)β1 I², I = |w g|
        return 0.2 * 0.3 * 0.8 * (w * g) ** 2
    q = [[s(1.0, 0.5), s(-2.0, 1.0)], [s(0.5, 2.0), s(3.0, -1.0)]]
    p = [[s(1.0, 2.0), s(0.0, 1.0)], [s(-1.0, 1.0), s(2.0, -0.5)], [s(0.5, -2.0), s(1.0, 0.0)]]
    lam = [s(2.0, -1.5), s(-1.0, 4.0)]
    expected = [lam[i] + sum(row[i] for row in p) / 3 + sum(q[i]) / 2 for i in range(2)]
    torch.testing.assert_close(alloc.triplet_scores("0"), torch.tensor(expected), rtol=1e-6, atol=0)


# --- §12.6 orthogonality --------------------------------------------------------------------------------------

@pytest.mark.parametrize("form", ["mean_fro", "sum_fro_sq"])
def test_orthogonality_regularizer(form):
    _, model = adapted(torch.float64, r=4, orth_form=form, orth_reg_weight=0.3)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in MODULES:
            a = ada(model, m)
            a.lora_A.copy_(torch.linalg.qr(torch.randn(a.lora_A.shape[1], 4, generator=g, dtype=torch.float64))[0].T)
            a.lora_B.copy_(torch.linalg.qr(torch.randn(a.lora_B.shape[0], 4, generator=g, dtype=torch.float64))[0])
    assert abs(reparam.regularizer(model).item()) < 1e-12
    randomize_adapters(model, std=0.2)
    terms = []
    for m in MODULES:
        Q, P, eye = ada(model, m).lora_A, ada(model, m).lora_B, torch.eye(4, dtype=torch.float64)
        terms.append((torch.linalg.norm(Q @ Q.T - eye), torch.linalg.norm(P.T @ P - eye)))
    expected = (sum(a + b for a, b in terms) / 4 if form == "mean_fro"   # 1/(2n) Σ, n = 2
                else sum(a ** 2 + b ** 2 for a, b in terms))
    value = reparam.regularizer(model)
    assert value > 0
    torch.testing.assert_close(value, 0.3 * expected, rtol=1e-12, atol=0)
    params = [p for n, p in adapter_params(model).items() if "lora_E" not in n]
    value.backward()
    with torch.no_grad():
        for p in params:
            p -= 0.05 * p.grad
    assert reparam.regularizer(model) < value


# --- §12.7 merge and compaction -------------------------------------------------------------------------------

def test_merge_closed_form_and_round_trip():
    base, model = adapted(torch.float64, r=3, alpha=6.0)
    randomize_adapters(model)
    a = ada(model, "fc1")
    expected = base.fc1.weight + 6.0 / (3 + 1e-5) * a.lora_B @ (a.lora_E * a.lora_A)
    torch.testing.assert_close(a.delta_weight(model.fc1) + base.fc1.weight, expected, atol=1e-12, rtol=0)
    _, model = adapted(r=3)
    randomize_adapters(model)
    assert_merge_round_trip(model, torch.randn(6, 16))
    torch.manual_seed(0)
    mixed = MixedKinds()  # proj is a HF Conv1D: weight stored d_in x d_out
    reparam.adapt(mixed, reparam.make_config("adalora", r=3), targets=["proj", "lin"])
    randomize_adapters(mixed)
    a, ids = ada(mixed, "proj"), torch.randint(1, 50, (2, 5))
    assert a.lora_A.shape == (3, 12) and a.lora_B.shape == (10, 3)
    unmerged, w0 = mixed(ids), mixed.proj.weight.detach().clone()
    reparam.merge(mixed)
    torch.testing.assert_close(mixed.proj.weight, w0 + a.scale * (a.lora_B @ (a.lora_E * a.lora_A)).T, atol=1e-6, rtol=0)
    torch.testing.assert_close(mixed(ids), unmerged, atol=1e-5, rtol=0)


def test_removing_masked_triplets_keeps_outputs_and_scale():
    _, model = adapted(r=4, target_r=2, total_step=20, alpha=16.0)
    randomize_adapters(model)
    alloc = AdaLoraAllocator(model)
    set_scores(alloc, {"fc1": [0.5, 0.1, 0.7, 0.3], "fc2": [0.2, 0.8, 0.05, 0.6]})
    alloc.mask_to_budget(4)
    x = torch.randn(6, 16)
    masked = model(x)
    alloc.remove_masked()
    torch.testing.assert_close(model(x), masked, atol=1e-6, rtol=0)
    pattern = get_record(model, "default").config.rank_pattern
    assert pattern == {"fc1": [True, False, True, False], "fc2": [False, True, False, True]}
    assert ada(model, "fc1").scale == 16.0 / (4 + 1e-5) and ada(model, "fc1").lora_B.shape == (24, 2)


# --- the shared resize helper ---------------------------------------------------------------------------------

def test_resize_rows_moves_optimizer_state_and_keeps_the_parameter():
    p = nn.Parameter(torch.randn(4, 3))
    opt = torch.optim.AdamW([p], lr=0.1)
    p.grad = torch.randn(4, 3)
    opt.step()
    old = {k: v.clone() for k, v in opt.state[p].items()}
    y = (p * 2).sum()  # a graph built before the resize stays alive, as a loop's last loss does
    resize_rows(p, 0, [3, 1], optimizer=opt)
    assert p.shape == (2, 3) and opt.param_groups[0]["params"][0] is p and p.grad.shape == (2, 3)
    assert torch.equal(opt.state[p]["exp_avg"], old["exp_avg"][[3, 1]])
    assert torch.equal(opt.state[p]["step"], old["step"])
    resize_rows(p, 1, [0, 1, 2], new=torch.ones(2, 2), optimizer=opt)  # grow: two new columns
    assert p.shape == (2, 5) and torch.equal(p[:, 3:], torch.ones(2, 2))
    assert torch.equal(opt.state[p]["exp_avg_sq"][:, 3:], torch.zeros(2, 2))
    assert torch.equal(opt.state[p]["exp_avg_sq"][:, :3], old["exp_avg_sq"][[3, 1]])
    (p ** 2).sum().backward()  # the new shape trains
    opt.step()
    assert p.grad.shape == (2, 5) and y.requires_grad


# --- PEFT parity ----------------------------------------------------------------------------------------------

def peft_twin(model, **fields):
    """PEFT's AdaLoRA on a copy of the same tiny BERT, with our adapter's values copied in."""
    peft = pytest.importorskip("peft")
    cfg = get_record(model, "default").config
    pcfg = peft.AdaLoraConfig(init_r=cfg.r, target_r=cfg.target_r, lora_alpha=cfg.alpha,
                              target_modules=["query", "value"],
                              orth_reg_weight=cfg.orth_reg_weight, beta1=cfg.beta1, beta2=cfg.beta2, tinit=cfg.tinit,
                              tfinal=cfg.tfinal, deltaT=cfg.deltaT, total_step=cfg.total_step or 10, **fields)
    twin = peft.get_peft_model(tiny_bert(300), pcfg)
    theirs = dict(twin.named_parameters())
    with torch.no_grad():
        for name, p in adapter_params(model).items():
            module, _, param = name.partition(".adapters.default.")
            theirs[f"base_model.model.{module}.{param}.default"].copy_(p)
    return twin, {n: theirs[f"base_model.model.{n.replace('.adapters.default.', '.')}.default"]
                  for n in adapter_params(model)}


def test_forward_and_regularizer_equal_peft():
    model = bert_adalora(orth_reg_weight=0.3)
    randomize_adapters(model, std=0.3)
    twin, _ = peft_twin(model)
    ids, labels = torch.randint(1, 300, (3, 9), generator=torch.Generator().manual_seed(0)), torch.tensor([0, 1, 1])
    model.eval(), twin.eval()
    ours = model(input_ids=ids, labels=labels)
    theirs = twin.base_model(input_ids=ids, labels=labels)  # AdaLoraModel.forward adds the regulariser
    torch.testing.assert_close(theirs.logits, ours.logits, atol=1e-6, rtol=1e-5)
    # PEFT adds γ·(1/2n)Σ(‖QQᵀ−I‖+‖PᵀP−I‖) to the loss it returns
    torch.testing.assert_close(theirs.loss - ours.loss, reparam.regularizer(model), atol=1e-6, rtol=1e-5)


def test_allocation_equals_peft_rank_allocator():
    # same parameters, same loss (task + regulariser), same Adam steps: the same EMA scores, masks and final pattern
    # as peft's update_and_allocate, with prune="end" (masking only, as PEFT does).
    model = bert_adalora(tinit=1, tfinal=2, deltaT=1, total_step=8, prune="end")
    twin, theirs = peft_twin(model)
    ours = adapter_params(model)
    alloc = AdaLoraAllocator(model)
    opt_a = torch.optim.Adam(ours.values(), lr=0.02)
    opt_b = torch.optim.Adam(theirs.values(), lr=0.02)
    g = torch.Generator().manual_seed(0)
    for t in range(8):
        ids, labels = torch.randint(1, 300, (8, 10), generator=g), torch.randint(0, 2, (8,), generator=g)
        out = model(input_ids=ids, labels=labels)
        (out.loss + reparam.regularizer(model)).backward()
        twin.base_model(input_ids=ids, labels=labels).loss.backward()
        opt_a.step(), opt_b.step()
        alloc.step(t)
        twin.base_model.update_and_allocate(t)
        opt_a.zero_grad(), opt_b.zero_grad()
        for n, p in ours.items():
            torch.testing.assert_close(theirs[n], p, atol=1e-5, rtol=1e-4)
            if "lora_E" in n:
                assert torch.equal(theirs[n] == 0, p == 0), (t, n)
    pattern = twin.peft_config["default"].rank_pattern
    assert {k.replace("base_model.model.", "").replace(".lora_E.default", ""): v for k, v in pattern.items()} == \
        {m: a.tolist() for m, a in alloc.active.items()}
    assert sum(alloc.ranks().values()) == 2 * 4


# --- the allocator in training --------------------------------------------------------------------------------

def test_training_prunes_physically_and_logs_the_budget(tmp_path):
    model = bert_adalora(tinit=2, tfinal=3, deltaT=1)
    data = synthetic_data(40)
    n_before = reparam.trainable_summary(model).trainable
    states = []

    class Shapes(Callback):
        def on_step_end(self, state):
            states.append({n: (tuple(p.shape), tuple(state.optimizer.state[p]["exp_avg"].shape))
                           for n, p in adapter_params(state.model).items()})

    log = tmp_path / "log.jsonl"
    train(model, data, quiet(max_steps=12, log_path=str(log)), callbacks=[Shapes()])
    assert all(shape == opt for s in states for shape, opt in s.values())  # optimizer state follows the shapes
    ranks = {m: int(sum(v)) for m, v in get_record(model, "default").config.rank_pattern.items()}
    assert sum(ranks.values()) == 2 * 4 and len(set(ranks.values())) > 1  # bT = target_r · n, unevenly spread
    assert reparam.trainable_summary(model).trainable == n_before - 8 * (32 + 32 + 1)
    entries = [json.loads(line) for line in log.read_text().splitlines()]
    budgets = [(e["step"], e["rank_budget"]) for e in entries if "rank_budget" in e]
    assert budgets[0] == (1, 16) and budgets[-1][1] == 8 and all(a[1] > b[1] for a, b in zip(budgets, budgets[1:]))


def test_save_load_restores_ranks_and_export_matches_peft(tmp_path):
    model = bert_adalora(tinit=1, tfinal=2, target_total_rank=3)  # 4 modules, 3 ranks: some end at rank 0
    train(model, synthetic_data(24), quiet(max_steps=8))
    ids = torch.randint(1, 300, (2, 9), generator=torch.Generator().manual_seed(3))
    model.eval()
    ours = model(input_ids=ids).logits
    reparam.save_adapter(model, tmp_path / "ada")
    loaded = reparam.load_adapter(tiny_bert(300), tmp_path / "ada").eval()
    for n, p in adapter_params(model).items():
        assert torch.equal(dict(loaded.named_parameters())[n], p)
    assert torch.equal(loaded(input_ids=ids).logits, ours)
    assert 0 in {int(sum(v)) for v in get_record(loaded, "default").config.rank_pattern.values()}
    peft = pytest.importorskip("peft")
    reparam.export_peft(loaded, tmp_path / "peft")
    theirs = peft.PeftModel.from_pretrained(tiny_bert(300), tmp_path / "peft").eval()
    torch.testing.assert_close(theirs(input_ids=ids).logits, ours, atol=1e-6, rtol=0)


@pytest.mark.parametrize("crash_at", [5, 13])  # resumed in the budgeting phase; after the removal at t = T − t_f = 10
def test_kill_and_resume_is_bit_exact(tmp_path, crash_at):
    data = synthetic_data(40)
    kw = dict(max_steps=14, regularizer_weight=0.0, weight_decay=0.01)
    ck = tmp_path / "ck"
    ref, r_ref, resumed, r = kill_and_resume(lambda: bert_adalora(tinit=2, tfinal=4, deltaT=2), data, ck, crash_at, 4,
                                             **kw)  # asserts the resume step and bit-equal adapter parameters
    saved = torch.load(ck / f"checkpoint-{r.resumed_from_step:08d}" / "state.pt", weights_only=True)["callbacks"][1]
    assert bool(saved["rank_pattern"]) == (crash_at > 10)  # the later checkpoint holds the pruned shapes
    assert get_record(ref, "default").config.rank_pattern == get_record(resumed, "default").config.rank_pattern
    assert [h for h in r.history if "rank_budget" in h] == [h for h in r_ref.history if "rank_budget" in h]


def test_tfinal_zero_prunes_to_the_final_budget_when_training_ends():
    # with t_f = 0 the final allocation t = T falls after the last step index T − 1: it happens at train end
    model = bert_adalora(tinit=1, tfinal=0, deltaT=1)
    n_before = reparam.trainable_summary(model).trainable
    train(model, synthetic_data(40), quiet(max_steps=6))
    ranks = {m: int(sum(v)) for m, v in get_record(model, "default").config.rank_pattern.items()}
    assert sum(ranks.values()) == 2 * 4
    assert reparam.trainable_summary(model).trainable == n_before - 8 * (32 + 32 + 1)


def test_prune_modes_every_and_end():
    data = synthetic_data(24)
    every = bert_adalora(tinit=1, tfinal=2, prune="every")
    sizes = []

    class Size(Callback):
        def on_step_end(self, state):
            sizes.append(sum(p.numel() for n, p in adapter_params(state.model).items() if "lora_E" in n))
    train(every, data, quiet(max_steps=8), callbacks=[Size()])
    assert sizes[:2] == [16, 16] and 16 > sizes[2] > sizes[3] and sizes[-1] == 8  # smaller at every masking
    end = bert_adalora(tinit=1, tfinal=2, prune="end")
    train(end, data, quiet(max_steps=8), callbacks=[Size()])
    assert sizes[8:-1] == [16] * 7 and sizes[-1] == 16  # masked only while training ...
    assert sum(p.numel() for n, p in adapter_params(end).items() if "lora_E" in n) == 8  # ... removed at its end


def test_allocator_runs_inside_hf_trainer(tmp_path):
    model = bert_adalora(tinit=1, tfinal=2)
    trainer, bridge = train_in_hf_trainer(model, tmp_path)
    assert [type(c) for c in bridge.callbacks] == [AdaLoraAllocator]
    assert sum(p.numel() for n, p in adapter_params(model).items() if "lora_E" in n) == 8
    assert [h["rank_budget"] for h in bridge.history if "rank_budget" in h][-1] == 8
    opt = trainer.optimizer
    assert all(opt.state[p]["exp_avg"].shape == p.shape for p in adapter_params(model).values())


# --- errors and the command line ------------------------------------------------------------------------------

@pytest.mark.parametrize("fields,message", [
    (dict(r=4, target_r=6), "adalora: invalid target_r=6: must not exceed the initial rank r=4"),
    (dict(prune="sometimes"), "invalid prune='sometimes': must be one of final, every, end"),
    (dict(orth_form="l1"), "invalid orth_form='l1'"),
    (dict(beta1=1.0), r"invalid beta1=1.0: must be in \(0, 1\)"),
    (dict(tinit=5, tfinal=5, total_step=10), "invalid total_step=10: must be None or an integer > tinit"),
    (dict(init_r=4), "unknown field.*'init_r'"),
])
def test_config_errors(fields, message):
    with pytest.raises(reparam.ConfigError, match=message):
        reparam.make_config("adalora", **fields)


def test_schedule_without_budgeting_phase_is_an_error():
    model = bert_adalora(tinit=3, tfinal=3)
    with pytest.raises(reparam.ConfigError, match=r"tinit=3 and tfinal=3 leave no budgeting phase in 6 steps"):
        train(model, synthetic_data(16), quiet(max_steps=6))
    with pytest.raises(reparam.ConfigError, match="set total_step in the config or call set_total_step"):
        AdaLoraAllocator(bert_adalora()).step(0)


def test_cli_inspect_and_plot_ranks(tmp_path, capsys):
    from reparam.cli.main import main

    model = bert_adalora(tinit=1, tfinal=2)
    train(model, synthetic_data(24), quiet(max_steps=6))
    reparam.save_adapter(model, tmp_path / "ada")
    assert main(["inspect", str(tmp_path / "ada")]) == 0
    out = capsys.readouterr().out
    ranks = {m: int(sum(v)) for m, v in get_record(model, "default").config.rank_pattern.items()}
    for m, k in ranks.items():
        assert f"rank {k:<3} lora_A {k}x32" in next(line for line in out.splitlines() if m in line)
    assert "ranks: total 8 over 4 modules" in out and "rank_pattern" not in out
    assert main(["plot-ranks", str(tmp_path / "ada"), "-o", str(tmp_path / "ranks.png")]) == 0
    assert (tmp_path / "ranks.png").read_bytes()[:4] == b"\x89PNG"
    reparam.save_adapter(reparam.adapt(tiny_bert(300), reparam.LoraConfig(), targets=["query"]), tmp_path / "lora")
    assert main(["plot-ranks", str(tmp_path / "lora"), "-o", str(tmp_path / "x.png")]) == 2
    assert "has a fixed rank" in capsys.readouterr().err


# --- Conv2d (§2: PEFT's variant, Q over C_in·k_h·k_w, ΔW reshaped to the kernel) ------------------------------

def test_conv2d_forward_equals_conv_with_delta_merge_and_pruning(tmp_path):
    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Conv2d(3, 5, 3, stride=2, padding=1, dilation=1), torch.nn.ReLU(),
                               torch.nn.Conv2d(5, 4, (1, 3), padding=(0, 1))).double()
    model = reparam.adapt(copy.deepcopy(base), reparam.make_config("adalora", r=4, target_r=2), targets=["0", "2"])
    for _, layer in adapted_layers(model):
        torch.nn.init.normal_(layer.adapters["default"].lora_E)
    x = torch.randn(2, 3, 9, 9, dtype=torch.float64)
    conv = model[0]
    delta = conv.adapters["default"].delta_weight(conv)
    assert delta.shape == conv.weight.shape
    want = torch.nn.functional.conv2d(x, conv.weight + delta, conv.bias, conv.stride, conv.padding)
    torch.testing.assert_close(conv(x), want)
    assert_merge_round_trip(model, x, atol=1e-10)
    alloc = AdaLoraAllocator(model)
    alloc.active = {m: torch.tensor([True, False, True, False]) for m in alloc.layers}
    alloc.apply_mask()
    before = model(x)
    alloc.remove_masked()
    assert model[0].adapters["default"].lora_A.shape == (2, 3 * 3 * 3)
    torch.testing.assert_close(model(x), before)  # the masked triplets had λ = 0: removing them changes nothing
    reparam.save_adapter(model, tmp_path / "a")
    fresh = reparam.load_adapter(copy.deepcopy(base), tmp_path / "a")
    torch.testing.assert_close(fresh(x), before)


def test_grouped_conv_is_refused():
    with pytest.raises(ConfigError, match="grouped or non-zero-padded"):
        reparam.adapt(torch.nn.Sequential(torch.nn.Conv2d(4, 4, 3, groups=2)), reparam.make_config("adalora"),
                      targets=["0"])


def test_conv2d_exports_to_peft_lora(tmp_path):
    peft = pytest.importorskip("peft")

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 5, 3, padding=1)

        def forward(self, x):
            return self.conv(x)

    torch.manual_seed(0)
    base = Net()
    model = reparam.adapt(copy.deepcopy(base), reparam.make_config("adalora", r=3, target_r=2), targets=["conv"])
    torch.nn.init.normal_(model.conv.adapters["default"].lora_E)
    x = torch.randn(2, 3, 6, 6)
    reparam.export_peft(model, tmp_path / "p")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "p")
    torch.testing.assert_close(theirs(x), model(x), atol=1e-5, rtol=1e-5)
