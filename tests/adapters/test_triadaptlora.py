"""TriAdaptLoRA (specs/adapters/triadaptlora.md): the unit-test properties of §12, the growth allocator in reparam's
loop and in a HF Trainer (ranks grow physically, new parameter groups, exact resume, budget log), save/load of the
rank pattern, PEFT export, errors and the CLI."""
import json
import math

import pytest
import torch

import reparam
from reparam.adapters.triadaptlora import TriAdaptAllocator, threshold_count
from reparam.core.model import get_record
from reparam.training import Callback, train
from tests.helpers import (TinyMLP, adapt_tiny_mlp, adapter_params, assert_merge_round_trip, bert_adapted,
                           kill_and_resume, quiet, train_in_hf_trainer)
from tests.training.tiny import synthetic_data, tiny_bert

MODULES = ["fc1", "fc2"]


def adapted(dtype=torch.float32, **fields):
    return adapt_tiny_mlp("triadaptlora", dtype, MODULES, **fields)


def tri(model, module):
    return dict(model.named_modules())[module].adapters["default"]


def fill_strips(adapter, seed=0, std=0.3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in (*adapter.lora_row, *adapter.lora_col):
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std)


def bert_tri(seed=0, **fields):
    return bert_adapted("triadaptlora", seed, **{"init_rank": 1, "reference_rank": 4, "incre_rank_num": 2, "alpha": 8.0,
                                                  **fields})


# --- §12.1 identity at init / at growth ---------------------------------------------------------------------

def test_identity_at_init_and_first_gradients():
    base, model = adapted(orth_reg_weight=0.0)
    x = torch.randn(5, 16)
    assert torch.equal(model(x), base(x))
    model(x).pow(2).sum().backward()
    a = tri(model, "fc1")
    assert torch.count_nonzero(a.lora_A[0].grad) == 0 and torch.count_nonzero(a.lora_B[0].grad) == 0
    assert torch.count_nonzero(a.lora_row[0].grad) > 0  # only the core gets task gradient at first (§4)
    assert 0.01 < a.lora_B[0].std() < 0.03 and torch.count_nonzero(a.lora_A[0]) == a.lora_A[0].numel()


@pytest.mark.parametrize("rescale", [False, True])
def test_growth_keeps_or_scales_the_update(rescale):
    _, model = adapted(torch.float64, init_rank=2, incre_rank_num=3, reference_rank=8, rescale_on_growth=rescale,
                       total_step=10)
    for m in MODULES:
        fill_strips(tri(model, m))
    alloc = TriAdaptAllocator(model)
    x = torch.randn(4, 16, dtype=torch.float64)
    delta_before = tri(model, "fc1").delta_weight(model.fc1).clone()
    out_before = model(x)
    alloc.grow(["fc1"], None)
    a = tri(model, "fc1")
    assert a.rank == 5 and [p.shape for p in a.lora_row] == [(2, 2), (3, 5)]
    if rescale:
        torch.testing.assert_close(model(x), out_before, atol=1e-6, rtol=0)
    else:
        expected = delta_before * (2 + 1e-5) / (5 + 1e-5)  # s = α/(r + 1e-5): the update scales by r_old/r_new
        torch.testing.assert_close(a.delta_weight(model.fc1), expected, atol=1e-12, rtol=0)
        assert not torch.allclose(model(x), out_before, atol=1e-6)


# --- §12.2 core structure -----------------------------------------------------------------------------------

def test_core_structure_and_parameter_count():
    _, model = adapted(init_rank=1, incre_rank_num=2, reference_rank=8, total_step=10)
    alloc = TriAdaptAllocator(model)
    alloc.grow(["fc1"], None), alloc.grow(["fc1"], None)  # blocks (1, 2, 2)
    a = tri(model, "fc1")
    fill_strips(a)
    L, U = a.triangles()
    C = a.core()
    assert C.shape == (5, 5)
    block = torch.tensor([0, 1, 1, 2, 2])
    above, below = block[:, None] < block[None, :], block[:, None] > block[None, :]
    assert torch.count_nonzero(L[above]) == 0 and torch.count_nonzero(U[below]) == 0
    assert torch.count_nonzero(L[below]) == below.sum() and torch.count_nonzero(U[above]) == above.sum()
    d_in, d_out = 16, 24
    assert sum(p.numel() for p in a.parameters()) == 5 * (d_in + d_out) + 2 * (1 * 1 + 2 * 3 + 2 * 5)
    assert sum(p.numel() for p in a.parameters()) == 5 * (d_in + d_out) + 25 + (1 + 4 + 4)  # r² + Σ a_j²
    A, B = a.factors()
    torch.testing.assert_close(a.delta_weight(model.fc1), a.scale * B @ (L + U) @ A)


# --- §12.3 threshold counts ---------------------------------------------------------------------------------

def test_threshold_counts():
    rho = {t: t / 1000 for t in (100, 250, 500, 900)}
    assert [threshold_count("linear", 60, rho[t], 1, 100) for t in rho] == [6, 15, 30, 54]
    assert [threshold_count("non-linear", 60, rho[t], 1, 100) for t in rho] == [1, 2, 7, 39]
    assert math.floor(math.exp(math.log(60))) == 59  # the float floor the epsilon fixes
    assert threshold_count("linear", 60, 1.0, 1, 100) == 60 == threshold_count("non-linear", 60, 1.0, 1, 100)
    assert threshold_count("linear", 60, 0.001, 1, 100) == 1 == threshold_count("non-linear", 60, 0.0, 1, 100)
    assert threshold_count("linear", 60, 0.9, 1, 7) == 7 and threshold_count("fixed", 60, 0.1, 3, 7) == 3


# --- §12.4 score --------------------------------------------------------------------------------------------

def test_score_is_rise_of_normalised_norm():
    _, model = adapted(init_rank=1, incre_rank_num=2, total_step=10)
    alloc = TriAdaptAllocator(model)
    alloc.grow(["fc1"], None)  # m = 2
    a = tri(model, "fc1")
    fill_strips(a)
    alloc.scores()
    prev = alloc.norm_prev["fc1"]
    assert prev == pytest.approx(float(torch.linalg.norm(a.core().detach())) / 2, rel=1e-6)
    with torch.no_grad():
        for p in (*a.lora_row, *a.lora_col):
            p.mul_(2)
    assert alloc.scores()["fc1"] == pytest.approx(prev, rel=1e-6)
    norm = float(torch.linalg.norm(a.core().detach()))
    alloc.grow(["fc1"], None)  # zero strips: same ‖C‖, one more block
    score = alloc.scores()["fc1"]
    assert score == pytest.approx(norm / 3 - norm / 2, rel=1e-6) and score < 0


@pytest.mark.parametrize("norm_by", ["rank", "sqrt_numel"])
def test_score_normalisers(norm_by):
    _, model = adapted(init_rank=1, incre_rank_num=2, norm_by=norm_by)
    a = tri(model, "fc1")
    TriAdaptAllocator(model).grow(["fc1"], None)
    fill_strips(a)
    assert a.normalised_norm() == pytest.approx(float(torch.linalg.norm(a.core())) / 3, rel=1e-6)


def test_allocation_grows_top_k_and_stops_at_budget():
    _, model = adapted(init_rank=1, incre_rank_num=2, target_total_rank=5, rank_growth_model="fixed", top_k=2,
                       total_step=10)
    alloc = TriAdaptAllocator(model)
    fill_strips(tri(model, "fc2"))  # fc2's norm rises, fc1's stays 0
    alloc.step(1)  # k = 2 (fc1's score 0 ties nothing): remaining 3 needs two blocks of 2, total 6
    assert alloc.ranks() == {"fc1": 3, "fc2": 3} and alloc.groups == [["fc2", "fc1"]]
    alloc.step(2)
    assert sum(alloc.ranks().values()) == 6  # budget reached: no more growth


def test_clamp_budget_stops_in_score_order():
    _, model = adapted(init_rank=1, incre_rank_num=2, target_total_rank=4, rank_growth_model="fixed", top_k=2,
                       total_step=10)
    alloc = TriAdaptAllocator(model)
    fill_strips(tri(model, "fc2"))
    alloc.step(1)  # remaining 2 = one block: only the best module grows
    assert alloc.ranks() == {"fc1": 1, "fc2": 3}
    assert get_record(model, "default").config.rank_pattern == {"fc1": 1, "fc2": 3}


# --- §12.5 reference-init defect ------------------------------------------------------------------------------

def test_reference_zero_init_never_leaves_zero():
    _, model = adapted(init_mode="reference_zero")
    a = tri(model, "fc1")
    assert torch.count_nonzero(a.lora_A[0]) > 0
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for _ in range(3):
        x = torch.randn(8, 16)
        (model(x).pow(2).mean() + reparam.regularizer(model)).backward()
        opt.step(), opt.zero_grad()
    for m in MODULES:
        a = tri(model, m)
        assert torch.count_nonzero(a.lora_B[0]) == 0 and torch.count_nonzero(a.core()) == 0


# --- §12.6 merge, §5 regulariser ------------------------------------------------------------------------------

def test_merge_round_trip_and_closed_form():
    base, model = adapted(torch.float64, init_rank=2, incre_rank_num=2)
    alloc = TriAdaptAllocator(model)
    alloc.grow(MODULES, None)
    for i, m in enumerate(MODULES):
        fill_strips(tri(model, m), seed=i)
    a = tri(model, "fc1")
    A, B = torch.cat(list(a.lora_A)), torch.cat(list(a.lora_B), 1)
    expected = base.fc1.weight + 16.0 / (4 + 1e-5) * B @ a.core() @ A
    torch.testing.assert_close(base.fc1.weight + a.delta_weight(model.fc1), expected, atol=1e-12, rtol=0)
    assert_merge_round_trip(model.float(), torch.randn(6, 16))


def test_orthogonality_regularizer_closed_form():
    _, model = adapted(torch.float64, init_rank=2, orth_reg_weight=0.3)
    TriAdaptAllocator(model).grow(["fc1"], None)
    terms = []
    for m in MODULES:
        A, B = tri(model, m).factors()
        eye = torch.eye(A.shape[0], dtype=torch.float64)
        terms.append(torch.linalg.norm(A @ A.T - eye) + torch.linalg.norm(B.T @ B - eye))
    torch.testing.assert_close(reparam.regularizer(model), 0.3 * sum(terms) / 4, atol=1e-12, rtol=0)  # 1/(2n)


# --- the allocator in training --------------------------------------------------------------------------------

def test_training_grows_physically_and_logs_the_budget(tmp_path):
    model = bert_tri()  # 4 modules, init 1 each, target 4·4 = 16, blocks of 2
    n_before = reparam.trainable_summary(model).trainable
    shapes, groups = [], []

    class Watch(Callback):
        def on_step_end(self, state):
            shapes.append({n: (tuple(p.shape), tuple(state.optimizer.state[p]["exp_avg"].shape))
                           for n, p in adapter_params(state.model).items() if p in state.optimizer.state})
            groups.append(len(state.optimizer.param_groups))

    log = tmp_path / "log.jsonl"
    train(model, synthetic_data(40), quiet(max_steps=10, log_path=str(log)), callbacks=[Watch()])
    ranks = get_record(model, "default").config.rank_pattern
    assert sum(ranks.values()) == 16 and len(adapter_params(model)) > 4 * 4 + 2
    assert all(shape == opt for s in shapes for shape, opt in s.values())
    params = sum(r * (32 + 32) + 2 * sum(a * c for a, c in zip(*_blocks(r))) for r in ranks.values())
    params0 = 4 * (1 * 64 + 2)
    assert reparam.trainable_summary(model).trainable == n_before - params0 + params
    entries = [json.loads(line) for line in log.read_text().splitlines()]
    budgets = [e["rank_budget"] for e in entries if "rank_budget" in e]
    assert budgets[0] == 4 and budgets[-1] == 16 and all(a < b for a, b in zip(budgets, budgets[1:]))
    assert groups[0] == 2 and groups[-1] == 2 + len(budgets) - 1 and groups == sorted(groups)  # a group per growth


def _blocks(r, init=1, a=2):
    sizes = [init] + [a] * ((r - init) // a)
    return sizes, [sum(sizes[:j + 1]) for j in range(len(sizes))]


def test_new_groups_get_fresh_state_and_existing_state_is_kept():
    model = bert_tri(rank_growth_model="fixed", top_k=1, incre_interval=3, weight_decay=0.03)

    class Watch(Callback):
        added_at, t, lrs = [], 0, []  # the 0-based step at which each parameter group was added

        def on_step_end(self, state):
            groups = state.optimizer.param_groups
            self.added_at += [self.t] * (len(groups) - len(self.added_at))
            self.lrs.append([g["lr"] for g in groups])
            self.t, self.optimizer = self.t + 1, state.optimizer
    watch = Watch()
    train(model, synthetic_data(40), quiet(max_steps=8, weight_decay=0.1, warmup_ratio=0.25), callbacks=[watch])
    opt, T = watch.optimizer, 8
    assert watch.added_at == [0, 0, 3, 6]  # t > t_warm = 0 and t % 3 == 0, one module each (top_k = 1)
    first = tri(model, "bert.encoder.layer.0.attention.self.query").lora_A[0]
    assert opt.state[first]["step"].item() == T  # kept through the growths
    for i, t in enumerate(watch.added_at[2:], start=2):
        group = opt.param_groups[i]
        assert len(group["params"]) == 4 and group["weight_decay"] == 0.03
        # fresh Adam state: created at step t before optimizer.step without a gradient, first updated at t + 1
        assert all(opt.state[p]["step"].item() == T - t - 1 for p in group["params"])
    for lrs in watch.lrs:  # the added groups follow the scheduled learning rate (warm-up, then decay)
        assert all(lr == lrs[0] for lr in lrs)
    assert len({lrs[0] for lrs in watch.lrs}) > 4


def test_save_load_restores_ranks_and_export_matches_peft(tmp_path):
    model = bert_tri(rank_growth_model="non-linear")
    train(model, synthetic_data(24), quiet(max_steps=6))
    ranks = get_record(model, "default").config.rank_pattern
    assert len(set(ranks.values())) > 1
    ids = torch.randint(1, 300, (2, 9), generator=torch.Generator().manual_seed(3))
    model.eval()
    ours = model(input_ids=ids).logits
    reparam.save_adapter(model, tmp_path / "tri")
    loaded = reparam.load_adapter(tiny_bert(300), tmp_path / "tri").eval()
    assert adapter_params(loaded).keys() == adapter_params(model).keys()
    for n, p in adapter_params(model).items():
        assert torch.equal(dict(loaded.named_parameters())[n], p)
    assert torch.equal(loaded(input_ids=ids).logits, ours)
    peft = pytest.importorskip("peft")
    reparam.export_peft(loaded, tmp_path / "peft")
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert cfg["rank_pattern"] and set(cfg["rank_pattern"].values()) | {cfg["r"]} == set(ranks.values())
    theirs = peft.PeftModel.from_pretrained(tiny_bert(300), tmp_path / "peft").eval()
    torch.testing.assert_close(theirs(input_ids=ids).logits, ours, atol=1e-6, rtol=0)


@pytest.mark.parametrize("crash_at", [3, 7])
def test_kill_and_resume_is_bit_exact(tmp_path, crash_at):
    data = synthetic_data(40)
    kw = dict(max_steps=10, weight_decay=0.01, max_grad_norm=1.0)
    fields = dict(rank_growth_model="fixed", top_k=1, incre_interval=2, weight_decay=0.02)
    ref, r_ref, resumed, r = kill_and_resume(lambda: bert_tri(**fields), data, tmp_path / "ck", crash_at, 3, **kw)
    assert r.resumed_from_step > 0  # kill_and_resume checked it is the last checkpoint and the bit-equal parameters
    assert get_record(ref, "default").config.rank_pattern == get_record(resumed, "default").config.rank_pattern
    assert [h for h in r.history if "rank_budget" in h] == [h for h in r_ref.history if "rank_budget" in h]


def test_allocator_runs_inside_hf_trainer(tmp_path):
    model = bert_tri()
    trainer, bridge = train_in_hf_trainer(model, tmp_path)
    assert [type(c) for c in bridge.callbacks] == [TriAdaptAllocator]
    assert [h["rank_budget"] for h in bridge.history if "rank_budget" in h][-1] == 16
    opt = trainer.optimizer
    grown = tri(model, "bert.encoder.layer.1.attention.self.value")
    assert all(opt.state[p]["exp_avg"].shape == p.shape for p in adapter_params(model).values() if p in opt.state)
    assert sum(len(g["params"]) for g in opt.param_groups) >= len(adapter_params(model)) and grown.rank >= 1


# --- errors and the command line ------------------------------------------------------------------------------

@pytest.mark.parametrize("fields,message", [
    (dict(reference_rank=5), "invalid reference_rank=5: must be even unless incre_rank_num is set"),
    (dict(rank_growth_model="cubic"), "invalid rank_growth_model='cubic': must be one of linear, non-linear, fixed"),
    (dict(init_mode="zeros"), "invalid init_mode='zeros'"),
    (dict(norm_by="max"), "invalid norm_by='max'"),
    (dict(init_rank=0), "invalid init_rank=0: must be an integer >= 1"),
    (dict(rank_pattern={"fc1": 4}), r"invalid rank_pattern=.*ranks init_rank \+ j·4"),
    (dict(r=4), "unknown field.*'r'"),
])
def test_config_errors(fields, message):
    with pytest.raises(reparam.ConfigError, match=message):
        reparam.make_config("triadaptlora", **fields)


def test_allocator_needs_total_step_and_the_right_method():
    _, model = adapted()
    with pytest.raises(reparam.ConfigError, match="set total_step in the config or call set_total_step"):
        TriAdaptAllocator(model).step(1)
    lora = reparam.adapt(TinyMLP(), reparam.LoraConfig(), targets=MODULES)
    with pytest.raises(reparam.ConfigError, match="is a lora adapter, not triadaptlora"):
        TriAdaptAllocator(lora)


def test_cli_inspect(tmp_path, capsys):
    from reparam.cli.main import main

    model = bert_tri()
    train(model, synthetic_data(24), quiet(max_steps=5))
    reparam.save_adapter(model, tmp_path / "tri")
    assert main(["inspect", str(tmp_path / "tri")]) == 0
    out = capsys.readouterr().out
    total = sum(get_record(model, "default").config.rank_pattern.values())
    assert f"ranks: total {total} over 4 modules" in out
