"""Labelled text data for sequence classification and token blocks for causal-LM training.

Sources: GLUE task folders (original TSV layout), .csv/.tsv/.jsonl files, Hugging Face `datasets` names.
Text is tokenised once at load time; `batches()` plans length-grouped batches (dynamic padding) from a
seeded generator, and `collate()` pads one batch to its own longest row.
"""
from __future__ import annotations

import csv
import json
import random
from pathlib import Path

import torch

from ..core.errors import ReparamError
from .metrics import METRICS_BY_TASK


class DataError(ReparamError):
    """A data file is missing, malformed, lacks a column, or has a label that cannot be parsed."""


# task -> (header?, text columns, label column, label kind); columns are names, or 0-based indices without header
GLUE_TASKS = {
    "sst-2": (True, ("sentence",), "label", "int"),
    "cola": (False, (3,), 1, "int"),
    "mrpc": (True, ("#1 String", "#2 String"), "Quality", "int"),
    "rte": (True, ("sentence1", "sentence2"), "label", "entail"),
    "sts-b": (True, ("sentence1", "sentence2"), "score", "float"),
    "qnli": (True, ("question", "sentence"), "label", "entail"),
}
_TASK_ALIASES = {"sst2": "sst-2", "stsb": "sts-b", "sts": "sts-b"}
ENTAILMENT_LABELS = {"entailment": 0, "not_entailment": 1}


def _norm_task(name: str) -> str:
    n = name.strip().lower().replace("_", "-")
    return _TASK_ALIASES.get(n, n)


def _where(path, line=None, column=None) -> str:
    s = str(path)
    if line is not None:
        s += f", line {line}"
    if column is not None:
        s += f", column {column!r}"
    return s


class _Batched:
    """Shared batch planning: a batch is a list of row indices."""

    lengths: list[int]

    def __len__(self) -> int:
        return len(self.lengths)

    def batches(self, batch_size: int, seed: int = 0, epoch: int = 0, shuffle: bool = True,
                group_by_length: bool = True, chunk_batches: int = 50) -> list[list[int]]:
        """The batch plan of one epoch, a pure function of (seed, epoch).

        With shuffle: rows are permuted with a generator seeded by (seed, epoch); with group_by_length the
        permutation is cut into chunks of `chunk_batches` batches, each chunk sorted by length (longest first) so
        a batch holds rows of similar length, and the batches are then shuffled. Without shuffle: file order.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        n = len(self.lengths)
        if not shuffle:
            return [list(range(i, min(i + batch_size, n))) for i in range(0, n, batch_size)]
        g = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(epoch))
        order = torch.randperm(n, generator=g).tolist()
        if group_by_length:
            chunk = batch_size * chunk_batches
            grouped = []
            for i in range(0, n, chunk):
                part = order[i:i + chunk]
                part.sort(key=lambda j: -self.lengths[j])  # stable: ties keep their shuffled order
                grouped.extend(part)
            order = grouped
        plan = [order[i:i + batch_size] for i in range(0, n, batch_size)]
        if group_by_length:
            perm = torch.randperm(len(plan), generator=g).tolist()
            plan = [plan[k] for k in perm]
        return plan

    def iter_batches(self, batch_size: int, seed: int = 0, epoch: int = 0, shuffle: bool = True):
        for idx in self.batches(batch_size, seed, epoch, shuffle):
            yield self.collate(idx)


class TextClassificationData(_Batched):
    """Tokenised sentences (or sentence pairs) with labels.

    task: task name ("sst-2", "custom", ...); num_labels: classes (1 = regression, float labels);
    metric_names: metrics `evaluate` reports; label_names: class names when the labels were strings.
    """

    kind = "classification"

    def __init__(self, encodings: dict[str, list[list[int]]], labels: list, *, num_labels: int,
                 metric_names: list[str], task: str = "custom", source: str = "", pad_id: int = 0,
                 label_names: list[str] | None = None, pad_to: int | None = None):
        self.encodings = encodings
        self.labels = labels
        self.num_labels = num_labels
        self.metric_names = list(metric_names)
        self.task = task
        self.source = source
        self.pad_id = pad_id
        self.label_names = label_names
        self.pad_to = pad_to
        self.lengths = [len(x) for x in encodings["input_ids"]]

    @property
    def is_regression(self) -> bool:
        return self.num_labels == 1

    def collate(self, indices) -> dict[str, torch.Tensor]:
        """Pad the rows `indices` to their longest row (or to `pad_to` when set): input_ids, attention_mask,
        token_type_ids (when the tokenizer gives them) and labels."""
        indices = list(indices)
        width = self.pad_to or max((self.lengths[i] for i in indices), default=1)
        out: dict[str, torch.Tensor] = {}
        for key, rows in self.encodings.items():
            pad = self.pad_id if key == "input_ids" else 0
            t = torch.full((len(indices), width), pad, dtype=torch.long)
            for r, i in enumerate(indices):
                seq = rows[i][:width]
                t[r, :len(seq)] = torch.tensor(seq, dtype=torch.long)
            out[key] = t
        mask = torch.zeros((len(indices), width), dtype=torch.long)
        for r, i in enumerate(indices):
            mask[r, :min(self.lengths[i], width)] = 1
        out["attention_mask"] = mask
        dtype = torch.float32 if self.is_regression else torch.long
        out["labels"] = torch.tensor([self.labels[i] for i in indices], dtype=dtype)
        return out

    def __repr__(self) -> str:
        return (f"TextClassificationData(task={self.task!r}, rows={len(self)}, num_labels={self.num_labels}, "
                f"metrics={self.metric_names})")


class LMBlocks(_Batched):
    """Fixed-length token blocks for causal-LM training (labels = input_ids)."""

    kind = "causal-lm"
    num_labels = None
    metric_names: list[str] = []
    task = "causal-lm"

    def __init__(self, blocks: torch.Tensor, source: str = ""):
        self.blocks = blocks
        self.source = source
        self.lengths = [blocks.shape[1]] * blocks.shape[0]

    def collate(self, indices) -> dict[str, torch.Tensor]:
        ids = self.blocks[list(indices)].clone()
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}

    def __repr__(self) -> str:
        return f"LMBlocks(blocks={len(self)}, block_size={self.blocks.shape[1] if len(self) else 0})"


# ---------------------------------------------------------------------------------------------- reading rows

def _read_tsv(path: Path, header: bool, delimiter: str = "\t", quote_none: bool = True):
    """(header or None, [(line_number, row)]) of a delimited file; every row must have the header's width."""
    try:
        f = open(path, encoding="utf-8-sig", newline="")
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from None
    with f:
        kw = {"quoting": csv.QUOTE_NONE} if quote_none else {}
        reader = csv.reader(f, delimiter=delimiter, **kw)
        rows = []
        try:
            for row in reader:
                rows.append((reader.line_num, row))
        except (csv.Error, UnicodeDecodeError) as e:
            raise DataError(f"{_where(path, reader.line_num + 1)}: cannot parse ({e})") from None
    rows = [(n, r) for n, r in rows if r]  # blank lines
    if not rows:
        raise DataError(f"{path}: file is empty")
    head = None
    if header:
        head = rows[0][1]
        rows = rows[1:]
    width = len(head) if head is not None else len(rows[0][1]) if rows else 0
    for n, r in rows:
        if len(r) != width:
            raise DataError(f"{_where(path, n)}: expected {width} tab/comma-separated fields, found {len(r)}")
    return head, rows


def _column_index(path, head, col, line=1) -> int:
    if isinstance(col, int):
        return col
    if col not in head:
        raise DataError(f"{_where(path, line, col)}: no such column (columns: {', '.join(head)})")
    return head.index(col)


def _parse_label(value: str, kind: str, path, line, column):
    v = value.strip()
    try:
        if kind == "int":
            return int(v)
        if kind == "float":
            return float(v)
        if kind == "entail":
            return ENTAILMENT_LABELS[v]
    except (ValueError, KeyError):
        expect = {"int": "an integer class id", "float": "a number",
                  "entail": "'entailment' or 'not_entailment'"}[kind]
        raise DataError(f"{_where(path, line, column)}: label {value!r} is not {expect}") from None
    raise ValueError(kind)


def _read_glue(folder: Path, split: str, task: str | None):
    task = _norm_task(task or folder.name)
    if task not in GLUE_TASKS:
        raise DataError(f"{folder}: unknown GLUE task {task!r} (known: {', '.join(GLUE_TASKS)}); "
                        f"pass task= or a .tsv/.csv/.jsonl file")
    split = {"validation": "dev", "val": "dev", "eval": "dev"}.get(split, split)
    path = folder / f"{split}.tsv"
    if not path.is_file():
        have = ", ".join(sorted(p.name for p in folder.glob("*.tsv"))) or "none"
        raise DataError(f"{path}: file not found (split {split!r}; .tsv files in the folder: {have})")
    header, text_cols, label_col, kind = GLUE_TASKS[task]
    head, rows = _read_tsv(path, header)
    idx = [_column_index(path, head, c) for c in text_cols]
    li = _column_index(path, head, label_col)
    for n, r in rows:
        if max(idx + [li]) >= len(r):
            raise DataError(f"{_where(path, n)}: row has {len(r)} fields, task {task} needs column {max(idx + [li])}")
    texts = [tuple(r[i] for i in idx) for _, r in rows]
    labels = [_parse_label(r[li], kind, path, n, label_col) for n, r in rows]
    num_labels = 1 if kind == "float" else 2
    return texts, labels, num_labels, task, list(METRICS_BY_TASK[task]), None


_TEXT_COLUMN_CHOICES = (("text",), ("sentence",), ("text_a", "text_b"), ("sentence1", "sentence2"),
                        ("question", "sentence"), ("premise", "hypothesis"))


def _pick_text_columns(path, columns, text_column):
    if text_column is not None:
        cols = (text_column,) if isinstance(text_column, str) else tuple(text_column)
        for c in cols:
            if c not in columns:
                raise DataError(f"{_where(path, 1, c)}: no such column (columns: {', '.join(map(str, columns))})")
        return cols
    for choice in _TEXT_COLUMN_CHOICES[2:]:
        if all(c in columns for c in choice):
            return choice
    for choice in _TEXT_COLUMN_CHOICES[:2]:
        if choice[0] in columns:
            return choice
    raise DataError(f"{_where(path, 1)}: no text column: expected 'text', 'sentence', or 'text_a'+'text_b' "
                    f"(columns: {', '.join(map(str, columns))})")


def _records_to_examples(path, records, text_column, label_column):
    """records: [(line, dict)] -> texts, raw labels with their lines."""
    columns = list(records[0][1].keys()) if records else []
    cols = _pick_text_columns(path, columns, text_column)
    texts, raw = [], []
    for n, rec in records:
        row = []
        for c in cols:
            if c not in rec or rec[c] is None:
                raise DataError(f"{_where(path, n, c)}: missing value")
            row.append(str(rec[c]))
        if label_column not in rec or rec[label_column] is None or rec[label_column] == "":
            raise DataError(f"{_where(path, n, label_column)}: missing label"
                            + ("" if label_column in columns else f" (columns: {', '.join(map(str, columns))})"))
        texts.append(tuple(row))
        raw.append((n, rec[label_column]))
    return texts, raw


def _labels_from_raw(path, raw, label_column, label_names=None):
    """Integer classes, floats (regression), or strings mapped to ids (sorted, or by `label_names`)."""
    values = [v for _, v in raw]
    if label_names is not None or any(isinstance(v, str) and not _is_number(v) for v in values):
        names = list(label_names) if label_names is not None else sorted({str(v).strip() for v in values})
        lookup = {s: i for i, s in enumerate(names)}
        out = []
        for n, v in raw:
            key = str(v).strip()
            if key not in lookup:
                raise DataError(f"{_where(path, n, label_column)}: label {v!r} is not one of {names}")
            out.append(lookup[key])
        return out, max(len(names), 2), names
    nums = []
    for n, v in raw:
        try:
            nums.append(float(v))
        except (TypeError, ValueError):
            raise DataError(f"{_where(path, n, label_column)}: label {v!r} is not a number") from None
    if all(x.is_integer() for x in nums):
        ints = [int(x) for x in nums]
        for (n, v), x in zip(raw, ints):
            if x < 0:
                raise DataError(f"{_where(path, n, label_column)}: class label {v!r} is negative")
        return ints, max(max(ints, default=1) + 1, 2), None
    return nums, 1, None


def _is_number(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


def _read_file(path: Path, text_column, label_column, label_names):
    suffix = path.suffix.lower()
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    if suffix in (".jsonl", ".json"):
        records = []
        try:
            lines = path.read_text(encoding="utf-8-sig").splitlines()
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: not UTF-8 text ({e})") from None
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{_where(path, n)}: not valid JSON ({e.msg})") from None
            if not isinstance(rec, dict):
                raise DataError(f"{_where(path, n)}: expected a JSON object, found {type(rec).__name__}")
            records.append((n, rec))
    elif suffix in (".csv", ".tsv"):
        head, rows = _read_tsv(path, True, "\t" if suffix == ".tsv" else ",", quote_none=suffix == ".tsv")
        records = [(n, dict(zip(head, r))) for n, r in rows]
        if records and label_column not in head:
            raise DataError(f"{_where(path, 1, label_column)}: no such column (columns: {', '.join(head)})")
    else:
        raise DataError(f"{path}: unsupported file type {suffix!r} (use .csv, .tsv or .jsonl, or a GLUE folder)")
    if not records:
        raise DataError(f"{path}: no data rows")
    texts, raw = _records_to_examples(path, records, text_column, label_column)
    labels, num_labels, names = _labels_from_raw(path, raw, label_column, label_names)
    return texts, labels, num_labels, names


def _read_hf(name: str, split: str, hf_config, text_column, label_column, label_names):
    try:
        import datasets  # noqa: F401  (optional dependency)
    except ImportError:
        raise DataError(f"{name!r} is not a file or folder here; loading it as a Hugging Face dataset needs "
                        f"the `datasets` package (pip install datasets)") from None
    if name.startswith("hf:"):
        name = name[3:]
    # "glue/sst2" and "owner/name/config": the last part is the config name
    if hf_config is None and (name.count("/") == 2 or (name.count("/") == 1 and name.split("/")[0] in
                                                         ("glue", "super_glue"))):
        name, hf_config = name.rsplit("/", 1)
    split = {"dev": "validation"}.get(split, split)
    try:
        ds = datasets.load_dataset(name, hf_config, split=split)
    except Exception as e:  # noqa: BLE001  (network, unknown name, unknown split: report all the same way)
        raise DataError(f"Hugging Face dataset {name!r} (config {hf_config!r}, split {split!r}): "
                        f"cannot load ({type(e).__name__}: {e})") from None
    where = f"hf:{name}" + (f"/{hf_config}" if hf_config else "") + f"[{split}]"
    if label_names is None:
        feats = getattr(ds, "features", None) or {}
        feat = feats.get(label_column) if hasattr(feats, "get") else None
        names = getattr(feat, "names", None)
    else:
        names = label_names
    records = [(i + 1, dict(rec)) for i, rec in enumerate(ds)]
    if not records:
        raise DataError(f"{where}: no rows")
    texts, raw = _records_to_examples(where, records, text_column, label_column)
    if names is not None and all(isinstance(v, int) for _, v in raw):
        for n, v in raw:
            if not 0 <= v < len(names):
                raise DataError(f"{_where(where, n, label_column)}: label {v!r} outside 0..{len(names) - 1}")
        return texts, [v for _, v in raw], max(len(names), 2), list(names), hf_config or name
    labels, num_labels, names = _labels_from_raw(where, raw, label_column, names)
    return texts, labels, num_labels, names, hf_config or name


def _subset(n: int, limit, limit_seed):
    if limit is None or limit >= n:
        return list(range(n))
    if limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    if limit_seed is None:
        return list(range(limit))
    rng = random.Random(limit_seed)
    return sorted(rng.sample(range(n), limit))


def load_task(source, tokenizer, split: str = "train", *, task: str | None = None, max_length: int = 128,
              limit: int | None = None, limit_seed: int | None = None, text_column=None,
              label_column: str = "label", label_names=None, hf_config: str | None = None,
              pad_to: int | None = None) -> TextClassificationData:
    """Load a sequence-classification dataset and tokenise it once.

    source: a GLUE task folder (split "train"/"dev"; the task is the folder name unless `task` says),
    a .csv/.tsv/.jsonl file (text column `text`, `sentence` or `text_a`+`text_b`; `label`), or a Hugging Face
    datasets name ("hf:glue/sst2", or any name that is not an existing path) when `datasets` is installed.
    limit: keep the first `limit` rows, or with `limit_seed` a seeded random subset of that size.
    pad_to: pad every batch to this fixed width instead of its longest row.
    String labels are mapped to ids in sorted order unless `label_names` gives the order.
    """
    src = str(source)
    path = Path(src).expanduser()
    names = None
    file_suffixes = (".csv", ".tsv", ".jsonl", ".json")
    if not src.startswith("hf:") and path.is_dir():
        texts, labels, num_labels, task_name, metrics, names = _read_glue(path, split, task)
    elif not src.startswith("hf:") and (path.exists() or path.suffix.lower() in file_suffixes):
        if not path.exists():
            raise DataError(f"{path}: file or folder not found")
        texts, labels, num_labels, names = _read_file(path, text_column, label_column, label_names)
        task_name = _norm_task(task) if task else "custom"
        metrics = None
    else:  # "hf:<name>[/<config>]", or a name that is no file or folder here
        texts, labels, num_labels, names, hf_task = _read_hf(src, split, hf_config, text_column, label_column,
                                                             label_names)
        task_name = _norm_task(task or hf_task)
        metrics = None
    if metrics is None:
        if task_name in METRICS_BY_TASK:
            metrics = list(METRICS_BY_TASK[task_name])
        else:
            metrics = ["pearson", "spearman"] if num_labels == 1 else ["accuracy"]
    keep = _subset(len(texts), limit, limit_seed)
    texts = [texts[i] for i in keep]
    labels = [labels[i] for i in keep]
    enc = _tokenize(tokenizer, texts, max_length)
    pad_id = tokenizer.pad_token_id if getattr(tokenizer, "pad_token_id", None) is not None else 0
    return TextClassificationData(enc, labels, num_labels=num_labels, metric_names=metrics, task=task_name,
                                  source=src, pad_id=pad_id, label_names=names, pad_to=pad_to)


def _tokenize(tokenizer, texts, max_length):
    if not texts:
        return {"input_ids": []}
    pair = len(texts[0]) == 2
    a = [t[0] for t in texts]
    b = [t[1] for t in texts] if pair else None
    enc = tokenizer(a, b, truncation=True, max_length=max_length, padding=False)
    out = {"input_ids": [list(x) for x in enc["input_ids"]]}
    if "token_type_ids" in enc:
        out["token_type_ids"] = [list(x) for x in enc["token_type_ids"]]
    return out


def load_text_blocks(path, tokenizer, block_size: int = 128, *, limit: int | None = None, start: float = 0.0,
                     end: float = 1.0) -> LMBlocks:
    """A plain UTF-8 text file cut into consecutive blocks of `block_size` tokens (no special tokens).

    start/end: the character fraction of the file to use (0.0-0.9 train, 0.9-1.0 validation).
    limit: at most this many blocks (only as much text as needed is tokenised).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    if block_size < 2:
        raise ValueError(f"block_size must be >= 2, got {block_size}")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {e.start})") from None
    text = text[int(len(text) * start):int(len(text) * end)]
    want = None if limit is None else limit * block_size
    ids: list[int] = []
    pos, step = 0, 32_768
    while pos < len(text) and (want is None or len(ids) < want):
        cut = text.rfind("\n", pos, pos + step) if pos + step < len(text) else len(text)
        if cut <= pos:
            cut = min(pos + step, len(text))
        ids.extend(tokenizer(text[pos:cut], add_special_tokens=False, truncation=False)["input_ids"])
        pos = cut
    n = len(ids) // block_size
    if limit is not None:
        n = min(n, limit)
    if n == 0:
        raise DataError(f"{path}: only {len(ids)} tokens, fewer than one block of {block_size}")
    blocks = torch.tensor(ids[:n * block_size], dtype=torch.long).view(n, block_size)
    return LMBlocks(blocks, source=str(path))
