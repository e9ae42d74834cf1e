import json
import sys
import types

import pytest
import torch

from reparam import ReparamError
from reparam.training import DataError, load_task, load_text_blocks
from tests.training.tiny import synthetic_data, tokenizer

TEXT = "/work/shared/data/text/tinyshakespeare.txt"


@pytest.fixture(scope="module")
def tok(minilm_path):
    return tokenizer(minilm_path)


@pytest.mark.parametrize("task,split,rows,num_labels,metrics,first_label", [
    ("SST-2", "dev", 872, 2, ["accuracy"], 1),
    ("CoLA", "dev", 1043, 2, ["matthews"], 1),
    ("MRPC", "dev", 408, 2, ["f1", "accuracy"], 1),
    ("RTE", "dev", 277, 2, ["accuracy"], 1),
    ("STS-B", "dev", 1500, 1, ["pearson", "spearman"], 5.0),
    ("QNLI", "dev", 5463, 2, ["accuracy"], 0),
])
def test_glue_tasks_parse(tok, glue_dir, task, split, rows, num_labels, metrics, first_label):
    d = load_task(glue_dir / task, tok, split, limit=16)
    assert len(d) == 16
    assert d.num_labels == num_labels and d.metric_names == metrics
    assert d.labels[0] == first_label
    if num_labels == 1:
        assert all(isinstance(v, float) and 0 <= v <= 5 for v in d.labels)
    else:
        assert set(d.labels) <= {0, 1}
    b = d.collate(range(4))
    assert b["input_ids"].shape == b["attention_mask"].shape
    assert b["labels"].dtype == (torch.float32 if num_labels == 1 else torch.long)


def test_glue_row_counts_and_pairs(tok, glue_dir):
    # full dev files: official GLUE counts (checks header / no-header / BOM / QUOTE_NONE handling)
    for task, rows in [("CoLA", 1043), ("MRPC", 408), ("RTE", 277)]:
        d = load_task(glue_dir / task, tok, "dev", max_length=32)
        assert len(d) == rows, task
    d = load_task(glue_dir / "RTE", tok, "dev", limit=3)
    ids = d.encodings["input_ids"][0]
    assert ids.count(tok.sep_token_id) == 2  # a sentence pair
    assert max(d.encodings["token_type_ids"][0]) == 1
    # RTE's first dev row is labelled not_entailment -> 1
    assert d.labels[0] == 1


def test_limit_seeded_subset(tok, glue_dir):
    a = load_task(glue_dir / "SST-2", tok, "dev", limit=20, limit_seed=3)
    b = load_task(glue_dir / "SST-2", tok, "dev", limit=20, limit_seed=3)
    first = load_task(glue_dir / "SST-2", tok, "dev", limit=20)
    assert a.encodings["input_ids"] == b.encodings["input_ids"]
    assert a.encodings["input_ids"] != first.encodings["input_ids"]


def test_missing_split_file_named(tok, glue_dir):
    with pytest.raises(DataError, match=r"QNLI/train\.tsv: file not found.*dev\.tsv"):
        load_task(glue_dir / "QNLI", tok, "train")


def test_csv_tsv_jsonl(tok, tmp_path):
    (tmp_path / "a.csv").write_text('text,label\n"a good, fine film",1\nbad plot,0\n')
    (tmp_path / "b.tsv").write_text("text_a\ttext_b\tlabel\nthe film\ta plot\tyes\nthe film\tsad\tno\n")
    (tmp_path / "c.jsonl").write_text(json.dumps({"sentence": "nice", "label": 0.5}) + "\n"
                                      + json.dumps({"sentence": "sad", "label": 2.25}) + "\n")
    a = load_task(tmp_path / "a.csv", tok)
    assert a.labels == [1, 0] and a.num_labels == 2 and a.metric_names == ["accuracy"]
    assert tok.decode(a.encodings["input_ids"][0], skip_special_tokens=True) == "a good, fine film"
    b = load_task(tmp_path / "b.tsv", tok)
    assert b.label_names == ["no", "yes"] and b.labels == [1, 0]
    assert b.encodings["input_ids"][0].count(tok.sep_token_id) == 2
    c = load_task(tmp_path / "c.jsonl", tok)
    assert c.num_labels == 1 and c.labels == [0.5, 2.25] and c.metric_names == ["pearson", "spearman"]


def test_bad_input_errors_name_file_line_column(tok, tmp_path):
    p = tmp_path / "bad.csv"
    p.write_text("text,label\nok,1\nfine,maybe\n")
    with pytest.raises(ReparamError, match=r"bad\.csv, line 3, column 'label': label 'maybe' is not one of"):
        load_task(p, tok, label_names=["0", "1"])
    p.write_text("words,label\nok,1\n")
    with pytest.raises(DataError, match=r"bad\.csv, line 1: no text column.*columns: words, label"):
        load_task(p, tok)
    p.write_text("text,score\nok,1\n")
    with pytest.raises(DataError, match=r"bad\.csv, line 1, column 'label': no such column"):
        load_task(p, tok)
    p.write_text("text,label\nok,1\nextra,1,2\n")
    with pytest.raises(DataError, match=r"bad\.csv, line 3: expected 2"):
        load_task(p, tok)
    j = tmp_path / "bad.jsonl"
    j.write_text('{"text": "a", "label": 1}\n{"text": "b"\n')
    with pytest.raises(DataError, match=r"bad\.jsonl, line 2: not valid JSON"):
        load_task(j, tok)
    j.write_text('{"text": "a", "label": 1}\n{"text": "b"}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl, line 2, column 'label': missing label"):
        load_task(j, tok)
    with pytest.raises(DataError, match=r"nope\.tsv: file or folder not found"):
        load_task(tmp_path / "nope.tsv", tok)


def test_glue_unparsable_label(tok, tmp_path):
    d = tmp_path / "RTE"
    d.mkdir()
    (d / "dev.tsv").write_text("index\tsentence1\tsentence2\tlabel\n0\ta\tb\tentailment\n1\ta\tb\tneutral\n")
    with pytest.raises(DataError, match=r"RTE/dev\.tsv, line 3, column 'label': label 'neutral' is not "
                                        r"'entailment' or 'not_entailment'"):
        load_task(d, tok, "dev")
    s = tmp_path / "STS-B"
    s.mkdir()
    (s / "train.tsv").write_text("sentence1\tsentence2\tscore\na\tb\t4.5\na\tb\tx\n")
    with pytest.raises(DataError, match=r"STS-B/train\.tsv, line 3, column 'score': label 'x' is not a number"):
        load_task(s, tok)


def test_hf_datasets_lazy(tok, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import fails as if not installed
    with pytest.raises(DataError, match=r"needs the `datasets` package"):
        load_task("hf:glue/sst2", tok)
    fake = types.ModuleType("datasets")
    calls = []

    class FakeLabel:
        names = ["negative", "positive"]

    class FakeDS(list):
        features = {"label": FakeLabel()}

    def load_dataset(name, config=None, split=None):
        calls.append((name, config, split))
        return FakeDS([{"sentence": "nice film", "label": 1, "idx": 0}, {"sentence": "bad", "label": 0, "idx": 1}])

    fake.load_dataset = load_dataset
    monkeypatch.setitem(sys.modules, "datasets", fake)
    d = load_task("hf:glue/sst2", tok, "dev")
    assert calls == [("glue", "sst2", "validation")]
    assert d.labels == [1, 0] and d.label_names == ["negative", "positive"] and d.metric_names == ["accuracy"]


def test_length_grouped_batches_are_seeded_and_cover_all():
    d = synthetic_data(n=500, min_len=3, max_len=60)
    plan = d.batches(8, seed=1, epoch=0)
    assert sorted(i for b in plan for i in b) == list(range(500))
    assert plan == d.batches(8, seed=1, epoch=0)
    assert plan != d.batches(8, seed=1, epoch=1) and plan != d.batches(8, seed=2, epoch=0)
    def waste(p):  # padding tokens the plan's batches carry
        return sum(max(d.lengths[i] for i in b) * len(b) - sum(d.lengths[i] for i in b) for b in p)

    random_plan = [list(range(i, min(i + 8, 500))) for i in range(0, 500, 8)]
    assert waste(plan) < 0.25 * waste(random_plan)  # grouping by length removes most padding
    b = d.collate(plan[0])
    assert b["input_ids"].shape[1] == max(d.lengths[i] for i in plan[0])
    assert torch.equal(b["attention_mask"].sum(1), torch.tensor([d.lengths[i] for i in plan[0]]))


def test_text_blocks(tok):
    d = load_text_blocks(TEXT, tok, block_size=32, limit=10)
    assert len(d) == 10 and d.blocks.shape == (10, 32)
    b = d.collate([0, 3])
    assert torch.equal(b["labels"], b["input_ids"])
    first = tok.decode(d.blocks[0].tolist())
    assert first.startswith("first citizen")
    val = load_text_blocks(TEXT, tok, block_size=32, limit=2, start=0.9)
    assert not torch.equal(val.blocks[0], d.blocks[0])
    with pytest.raises(DataError, match="file not found"):
        load_text_blocks("/nonexistent.txt", tok)
