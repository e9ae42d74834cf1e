"""Diagonal Fisher estimation (reparam.training.fisher) against closed forms and brute-force per-example gradients,
and the `reparam fisher` command on a tiny BERT built from a config."""
import csv

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open

from reparam.cli.main import main
from reparam.core.errors import ConfigError
from reparam.training.data import LMBlocks, TextClassificationData
from reparam.training.fisher import compute_fisher, save_fisher

from tiny import synthetic_data, tiny_bert


class SoftmaxRegression(torch.nn.Module):
    """z = W x + b with x a fixed feature vector per token (a buffer): the spec's softmax-regression test model."""

    def __init__(self, vocab=20, k=5, classes=3, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("features", torch.randn(vocab, k, generator=g))
        self.linear = torch.nn.Linear(k, classes)
        with torch.no_grad():
            self.linear.weight.copy_(torch.randn(classes, k, generator=g))
            self.linear.bias.copy_(torch.randn(classes, generator=g))

    def forward(self, input_ids, attention_mask):
        return self.linear(self.features[input_ids[:, 1]])


def token_data(tokens, labels, num_labels=3):
    rows = [[1, t, 2] for t in tokens]
    metrics = ["accuracy"] if num_labels > 1 else ["pearson"]
    return TextClassificationData({"input_ids": rows}, labels, num_labels=num_labels, metric_names=metrics)


@pytest.fixture
def softmax_case():
    model = SoftmaxRegression()
    data = token_data([3, 7, 11, 15], [0, 2, 1, 2])
    x = model.features[torch.tensor([3, 7, 11, 15])].double()
    p = torch.softmax(model.linear(x.float()).double(), -1).detach()
    return model, data, x, p


def test_exact_fisher_of_softmax_regression_is_p_one_minus_p_x_squared(softmax_case):
    model, data, x, p = softmax_case
    fisher = compute_fisher(model, data)
    want_w = (p * (1 - p))[:, :, None] * (x ** 2)[:, None, :]  # [examples, classes, features]
    assert torch.allclose(fisher["linear.weight"].double(), want_w.mean(0), rtol=1e-6, atol=0)
    assert torch.allclose(fisher["linear.bias"].double(), (p * (1 - p)).mean(0), rtol=1e-6, atol=0)
    assert fisher["linear.weight"].dtype == torch.float32 and set(fisher) == {"linear.weight", "linear.bias"}


def test_empirical_and_batch_approx_closed_forms(softmax_case):
    model, data, x, p = softmax_case
    gold = F.one_hot(torch.tensor(data.labels), 3).double()
    emp = compute_fisher(model, data, mode="empirical")
    assert torch.allclose(emp["linear.weight"].double(),
                          (((gold - p) ** 2)[:, :, None] * (x ** 2)[:, None, :]).mean(0), rtol=1e-6, atol=0)
    # batch_approx at batch size 1: (sqrt(p_c) - p_c * sum_y sqrt(p_y))^2 x_k^2 -- not the Fisher
    approx = compute_fisher(model, data, mode="batch_approx", batch_size=1)
    coef = (p.sqrt() - p * p.sqrt().sum(-1, keepdim=True)) ** 2
    want = (coef[:, :, None] * (x ** 2)[:, None, :]).mean(0)
    assert torch.allclose(approx["linear.weight"].double(), want, rtol=1e-5, atol=0)
    exact = compute_fisher(model, data)
    assert not torch.allclose(approx["linear.weight"], exact["linear.weight"], rtol=1e-2)
    # at batch size 2 the squared batch gradient adds cross terms between the two examples
    pairs = compute_fisher(model, data, mode="batch_approx", batch_size=2)
    assert not torch.allclose(pairs["linear.weight"], approx["linear.weight"], rtol=1e-2)


def test_sampled_fisher_is_seeded_and_unbiased(softmax_case):
    model, data, _, _ = softmax_case
    a = compute_fisher(model, data, mode="sampled", samples=20000, seed=1)
    b = compute_fisher(model, data, mode="sampled", samples=20000, seed=1)
    assert all(torch.equal(a[k], b[k]) for k in a)
    exact = compute_fisher(model, data)
    assert torch.allclose(a["linear.bias"], exact["linear.bias"], rtol=0.03)
    assert torch.allclose(a["linear.weight"], exact["linear.weight"], rtol=0.05)
    assert not torch.equal(compute_fisher(model, data, mode="sampled", seed=2)["linear.bias"],
                           compute_fisher(model, data, mode="sampled", seed=3)["linear.bias"])


def test_regression_head_uses_the_unit_gaussian_likelihood():
    model = SoftmaxRegression(classes=1)
    data = token_data([3, 7, 11], [0.5, -1.0, 2.0], num_labels=1)
    x = model.features[torch.tensor([3, 7, 11])].double()
    f = model.linear(x.float()).double().reshape(-1).detach()
    exact = compute_fisher(model, data)  # auto -> exact: (df/dtheta)^2 = x^2
    assert torch.allclose(exact["linear.weight"].double(), (x ** 2).mean(0, keepdim=True), rtol=1e-6)
    assert exact["linear.bias"].item() == pytest.approx(1.0, rel=1e-6)
    emp = compute_fisher(model, data, mode="empirical")
    y = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
    assert emp["linear.bias"].item() == pytest.approx(float(((y - f) ** 2).mean()), rel=1e-5)


def brute_force(model, data, rows, mode):
    """The per-example squared-gradient mean, one example and one class at a time, straight from autograd."""
    model.eval()
    params = dict(model.named_parameters())
    total = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in params.items()}
    for i in rows:
        batch = data.collate([i])
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        lp = torch.log_softmax(logits[0].float(), -1)
        classes = range(lp.numel()) if mode == "exact" else [data.labels[i]]
        for c in classes:
            weight = lp[c].exp().item() if mode == "exact" else 1.0
            grads = torch.autograd.grad(lp[c], list(params.values()), retain_graph=True, allow_unused=True)
            for k, g in zip(params, grads):
                if g is not None:
                    total[k] += weight * g.double() ** 2
    return {k: v / len(rows) for k, v in total.items()}


@pytest.mark.parametrize("mode", ["exact", "empirical"])
def test_tiny_bert_matches_per_example_brute_force(mode):
    model = tiny_bert(200, dropout=0.2)  # dropout must be off during the pass
    model.train()
    data = synthetic_data(n=5, seed=4)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    model.bert.embeddings.word_embeddings.weight.requires_grad_(False)  # frozen parameters get a Fisher too
    fisher = compute_fisher(model, data, mode=mode)
    assert model.training and not model.bert.embeddings.word_embeddings.weight.requires_grad  # restored
    model.bert.embeddings.word_embeddings.weight.requires_grad_(True)
    want = brute_force(model, data, range(5), mode)
    assert set(fisher) == set(dict(model.named_parameters())) == set(flags)
    for k, v in want.items():
        assert torch.allclose(fisher[k].double(), v, rtol=1e-4, atol=1e-12), k
    assert fisher["bert.encoder.layer.0.attention.self.query.weight"].abs().sum() > 0


def test_causal_lm_empirical_and_sampled():
    class Bigram(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.table = torch.nn.Embedding(12, 12)

        def forward(self, input_ids, attention_mask):
            return self.table(input_ids)

    model = Bigram()
    blocks = LMBlocks(torch.randint(0, 12, (3, 6), generator=torch.Generator().manual_seed(0)))
    fisher = compute_fisher(model, blocks, mode="empirical")
    want = torch.zeros(12, 12, dtype=torch.float64)
    for row in blocks.blocks:
        lp = torch.log_softmax(model.table(row[:-1]), -1)
        (g,) = torch.autograd.grad(lp.gather(1, row[1:, None]).sum(), [model.table.weight])
        want += g.double() ** 2
    assert torch.allclose(fisher["table.weight"].double(), want / 3, rtol=1e-5, atol=1e-12)
    auto = compute_fisher(model, blocks, samples=2)  # auto -> sampled for a causal LM
    assert auto["table.weight"].sum() > 0
    with pytest.raises(ConfigError, match="causal LM"):
        compute_fisher(model, blocks, mode="exact")


def test_argument_errors(softmax_case):
    model, data, _, _ = softmax_case
    with pytest.raises(ConfigError, match=r"n_examples must be an integer in \[1, 4\]"):
        compute_fisher(model, data, 5)
    with pytest.raises(ConfigError, match="fisher mode must be one of"):
        compute_fisher(model, data, mode="diagonal")
    subset = compute_fisher(model, data, 2, seed=0)
    assert not torch.equal(subset["linear.bias"], compute_fisher(model, data)["linear.bias"])


def test_save_fisher_writes_float32_with_metadata(tmp_path, softmax_case):
    model, data, _, _ = softmax_case
    fisher = compute_fisher(model, data, mode="empirical")
    path = save_fisher(tmp_path / "f.safetensors", fisher, mode="empirical", n_examples=4, data="x")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        assert meta == {"format": "reparam-fisher", "mode": "empirical", "n_examples": "4", "data": "x"}
        assert all(torch.equal(f.get_tensor(k), v) for k, v in fisher.items())
    assert [p.name for p in tmp_path.iterdir()] == ["f.safetensors"]


# --- the command -------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory, minilm_path):
    from transformers import AutoTokenizer

    out = tmp_path_factory.mktemp("fisher_cli")
    tok = AutoTokenizer.from_pretrained(minilm_path)
    model = tiny_bert(tok.vocab_size, num_labels=2, seed=1)
    model.save_pretrained(out / "model")
    tok.save_pretrained(out / "model")
    with open(out / "train.tsv", "w", newline="") as f:
        w = csv.writer(f, delimiter="\t")
        w.writerow(["sentence", "label"])
        for i, s in enumerate(["a good film", "a bad plot", "great acting", "awful", "fine", "sad story"]):
            w.writerow([s, i % 2])
    return out


def test_cli_writes_a_loadable_sidecar_that_merges(tmp_path, tiny_model_dir, capsys):
    from reparam.merging import merge_models
    from reparam.merging.io import SafetensorsSource

    out = tmp_path / "fisher.safetensors"
    code = main(["fisher", "--model", str(tiny_model_dir / "model"), "--data", str(tiny_model_dir / "train.tsv"),
                 "--examples", "4", "--quiet", "-o", str(out)])
    stdout, _ = capsys.readouterr()
    assert code == 0 and "fisher (exact)" in stdout and "on 4 of 6" in stdout
    weights = SafetensorsSource(tiny_model_dir / "model")
    with safe_open(str(out), framework="pt") as f:
        assert f.metadata()["mode"] == "exact" and f.metadata()["n_examples"] == "4"
        assert set(f.keys()) == {k for k in weights.keys() if weights.dtype(k).is_floating_point}
        assert all(f.get_slice(k).get_dtype() == "F32" for k in f.keys())
    cfg = {"merge_method": "fisher", "exclude": ["classifier"],
           "models": [{"model": str(tiny_model_dir / "model"), "parameters": {"fisher": str(out)}}] * 2}
    merged = SafetensorsSource(merge_models(cfg, tmp_path / "merged", progress=False))
    key = "bert.encoder.layer.0.attention.self.query.weight"
    assert torch.allclose(merged.get(key), weights.get(key), rtol=1e-6, atol=1e-7)


def test_cli_errors_are_one_line(tmp_path, tiny_model_dir, capsys):
    model = str(tiny_model_dir / "model")
    data = str(tiny_model_dir / "train.tsv")
    for argv, message in [
        (["--model", model, "--data", str(tmp_path / "nope.tsv"), "-o", str(tmp_path / "f.safetensors")],
         "no such file or folder"),
        (["--model", model, "--data", data, "-o", str(tmp_path / "f.bin")], "must be a .safetensors file"),
        (["--model", model, "--data", data, "--mode", "batch_approx", "--samples", "0", "-o", "x.safetensors"],
         "--samples: must be >= 1"),
    ]:
        assert main(["fisher", *argv]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err
    three = tmp_path / "three.jsonl"
    three.write_text("".join(f'{{"text": "w{i}", "label": {i % 3}}}\n' for i in range(6)))
    assert main(["fisher", "--model", model, "--data", str(three), "-o", str(tmp_path / "f.safetensors")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "has 2 output(s) but --data has 3 classes" in err
    assert not (tmp_path / "f.safetensors").exists()
    assert main(["fisher", "--help"]) == 0 and capsys.readouterr().out.startswith("usage: reparam fisher")
