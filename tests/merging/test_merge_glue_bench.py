"""bench/merge_glue.py: argument errors, lambda grids, which inputs each method gets, and one merge end to end
on tiny BERT classifiers (heads kept out of the merge and put back per task)."""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import merge_glue as mg  # noqa: E402

from reparam.merging import METHODS  # noqa: E402
from reparam.training import TextClassificationData  # noqa: E402


def test_help_and_bad_arguments(capsys):
    with pytest.raises(SystemExit) as e:
        mg.main(["--help"])
    assert e.value.code == 0 and "--quick" in capsys.readouterr().out
    for argv, word in ((["--tasks", "SST-2,QQP"], "QQP"), (["--methods", "ties,nope"], "nope"),
                       (["--tasks", "SST-2"], "at least 2 tasks")):
        with pytest.raises(SystemExit) as e:
            mg.main(argv)
        assert e.value.code == 2 and word in capsys.readouterr().err


def test_lambda_grid_follows_sum_or_average():
    grid = lambda name, quick=False: mg.lambda_grid(METHODS[name], mg.SETTINGS.get(name, {}), quick)
    assert grid("linear") is None and grid("model_stock") is None  # no lambda parameter
    assert grid("task_arithmetic") == grid("dare_linear") == grid("della_linear") == mg.SUM_GRID
    assert grid("ties") == grid("della") == mg.MEAN_GRID  # normalize: true by default
    assert mg.lambda_grid(METHODS["ties"], {"normalize": False}, False) == mg.SUM_GRID
    assert grid("task_arithmetic", quick=True) == mg.QUICK_SUM_GRID
    assert grid("ties", quick=True) == (1.0,) and grid("dare_ties", quick=True) == (0.5,)
    if "pcb" in METHODS:
        assert grid("pcb") == mg.MEAN_GRID


def test_inputs_for_each_kind_of_method():
    base, a, b, c = (Path(x) for x in ("base", "a", "b", "c"))
    assert mg.inputs_for(METHODS["ties"], base, [a, b, c]) == (base, [a, b, c], None)
    assert mg.inputs_for(METHODS["slerp"], base, [a, b]) == (a, [b], None)  # the first model plays the base
    assert "exactly 2 models" in mg.inputs_for(METHODS["slerp"], base, [a, b, c])[2]
    if "fisher" in METHODS:
        assert mg.inputs_for(METHODS["fisher"], base, [a, b]) == (None, [a, b], None)


def test_normalised_leaves_out_nonpositive_references():
    scores = {"SST-2": {"accuracy": 0.45}, "CoLA": {"matthews": 0.1}}
    ref = {"SST-2": {"accuracy": 0.9}, "CoLA": {"matthews": 0.0}}
    assert mg.normalised(scores, ref) == {"SST-2": 0.5, "CoLA": None}
    assert mg.mean_of([0.5, None, 1.0]) == 0.75 and mg.mean_of([None]) is None


def _tiny_task(num_labels, n, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 60, (n, 7), generator=g).tolist()
    labels = torch.rand(n, generator=g).tolist() if num_labels == 1 else torch.randint(0, 2, (n,), generator=g).tolist()
    metrics = ["pearson", "spearman"] if num_labels == 1 else ["accuracy"]
    return TextClassificationData({"input_ids": ids}, labels, num_labels=num_labels, metric_names=metrics)


def test_merge_keeps_each_task_head(tmp_path):
    from transformers import BertConfig, BertForSequenceClassification

    cfg = dict(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
               max_position_embeddings=16)
    torch.manual_seed(0)
    base = BertForSequenceClassification(BertConfig(**cfg, num_labels=2))
    base.save_pretrained(tmp_path / "base")
    # Two "fine-tuned" models with the same body and different heads (a 2-class and a regression head): any
    # average of identical bodies is that body, so each task must score exactly as its individual model.
    body = {k: v + 0.05 * torch.randn_like(v) if v.is_floating_point() else v
            for k, v in base.state_dict().items() if not k.startswith("classifier.")}
    folders = {}
    for task, labels in (("SST-2", 2), ("STS-B", 1)):
        m = BertForSequenceClassification(BertConfig(**cfg, num_labels=labels))
        m.load_state_dict({**body, **{k: v for k, v in m.state_dict().items() if k.startswith("classifier.")}})
        folders[task] = tmp_path / task
        m.save_pretrained(folders[task])
    tasks = list(folders)
    data = {"SST-2": _tiny_task(2, 24, 1), "STS-B": _tiny_task(1, 24, 2)}
    scorer = mg.TaskScorer(folders)
    own = {t: mg.read_weights(folders[t]) for t in tasks}
    individual = {"held_out": {t: scorer.metrics(t, own[t], data[t]) for t in tasks},
                  "dev": {t: scorer.metrics(t, own[t], data[t]) for t in tasks}}
    assert individual["dev"]["SST-2"]["accuracy"] > 0 and individual["dev"]["STS-B"]["pearson"] != 0
    bench = mg.Bench(tasks, tmp_path / "base", folders, scorer, data, data, data, individual, 0, False, tmp_path)
    r = mg.run_method("linear", bench)
    assert r["parameters"] == {} and r["lambda_search"] == []
    for t in tasks:
        assert r["dev"][t] == pytest.approx(individual["dev"][t], abs=1e-5)
    # Task arithmetic adds lambda * (sum of the two equal task vectors): lambda = 0.5 gives the body back (held-out
    # normalised score 1); the search tries the whole grid and keeps the best held-out score.
    r = mg.run_method("task_arithmetic", bench)
    tried = {x["lambda"]: x["held_out_normalised"] for x in r["lambda_search"]}
    assert list(tried) == list(mg.SUM_GRID)
    assert tried[0.5] == pytest.approx(1.0, abs=1e-5)
    assert tried[r["parameters"]["lambda"]] == max(tried.values())
    assert r["dev"] == bench.scorer.scores(mg.merge("task_arithmetic", bench.base, list(folders.values()),
                                                    r["parameters"], [{}, {}], 0, tmp_path), data)
    assert not list(tmp_path.glob("*merged*")) and not list(tmp_path.glob(".*merged*"))  # read back, removed
