"""`reparam fisher`: the diagonal Fisher of a fine-tuned classifier on its own data, saved as the safetensors
sidecar that ``merge_method: fisher`` reads (each model's ``fisher`` parameter)."""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from .common import BUNDLED_DATA, CLIError, bundled_data_path, load_classifier, load_tokenizer, resolve_data
from .finetune import positive_int


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..training.fisher import MODES

    p.add_argument("--model", required=True, help="fine-tuned sequence classifier (Hugging Face folder)")
    p.add_argument("--data", required=True, help=f"its task data: a GLUE task folder, a .csv/.tsv/.jsonl file, "
                                                 f"'hf:<name>' or '{BUNDLED_DATA}'")
    p.add_argument("--split", default="train", help="split of a GLUE folder / hf: data set (default train)")
    p.add_argument("--examples", type=positive_int, default=4096,
                   help="examples to average over, a seeded random subset (default 4096 as the reference; "
                        "all rows when the split has fewer)")
    p.add_argument("--mode", choices=MODES, default="auto",
                   help="estimator: exact (sum over classes), sampled, empirical (gold label) or batch_approx "
                        "(MergeLM's fast approximation); auto = exact up to 32 classes, else sampled")
    p.add_argument("--samples", type=positive_int, default=1, help="labels drawn per example, sampled mode (default 1)")
    p.add_argument("--batch-size", type=positive_int, default=2, help="rows per backward pass, batch_approx mode only "
                                                                      "(default 2)")
    p.add_argument("--max-length", type=positive_int, default=128, help="max tokens per example (default 128)")
    p.add_argument("--seed", type=int, default=0, help="seed of the example subset and sampled labels (default 0)")
    p.add_argument("--threads", type=positive_int, default=None, help="CPU threads (default: torch's choice)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--output", "-o", required=True, help="sidecar file to write (.safetensors, written atomically)")


def _data_source(data: str, split: str) -> str:
    src = resolve_data(data, None)[0]  # checks that the file or folder exists
    return str(bundled_data_path(split)) if data == BUNDLED_DATA else src


def _check_head(model_path: str, num_labels: int) -> None:
    """A trained classification head must have as many outputs as the data has classes."""
    cfg_file = Path(model_path) / "config.json"
    if not cfg_file.is_file():
        return
    try:
        cfg = json.loads(cfg_file.read_text())
    except (OSError, ValueError):
        return
    archs = cfg.get("architectures")
    if archs and not any("ForSequenceClassification" in a for a in archs):
        raise CLIError(f"--model {model_path}: not a sequence classifier (architectures "
                       f"{archs}); the Fisher needs the fine-tuned model with its head")
    have = len(cfg["id2label"]) if isinstance(cfg.get("id2label"), dict) else cfg.get("num_labels", 2)
    if have != num_labels:
        raise CLIError(f"--model {model_path} has {have} output(s) but --data has {num_labels} "
                       f"{'output (regression)' if num_labels == 1 else 'classes'}")


def run(args) -> int:
    import torch

    from ..training import load_task
    from ..training.fisher import compute_fisher, resolve_mode, save_fisher

    if args.threads:
        torch.set_num_threads(args.threads)
    if not str(args.output).endswith(".safetensors"):
        raise CLIError(f"--output {args.output}: the sidecar must be a .safetensors file")
    start = time.perf_counter()
    src, split = _data_source(args.data, args.split), args.split
    tokenizer = load_tokenizer(args.model)
    data = load_task(src, tokenizer, split, max_length=args.max_length)
    _check_head(args.model, data.num_labels)
    mode = resolve_mode(args.mode, data.kind, data.num_labels)
    n = min(args.examples, len(data))
    model = load_classifier(args.model, num_labels=data.num_labels, seed=args.seed)
    fisher = compute_fisher(model, data, n, mode=mode, samples=args.samples, batch_size=args.batch_size,
                            seed=args.seed, progress=not args.quiet)
    extra = {"samples": args.samples} if mode == "sampled" else {"batch_size": args.batch_size} \
        if mode == "batch_approx" else {}
    out = save_fisher(args.output, fisher, mode=mode, n_examples=n, model=args.model, data=args.data,
                      split=split, seed=args.seed, max_length=args.max_length, **extra)
    values = sum(t.numel() for t in fisher.values())
    norm = float(torch.sqrt(sum((t.double() ** 2).sum() for t in fisher.values())))
    zero = sum(int((t == 0).sum()) for t in fisher.values()) / max(values, 1)
    print(f"fisher ({mode}) of {args.model} on {n} of {len(data)} {split} examples of {args.data}: "
          f"{len(fisher)} tensors, {values:,} values, L2 norm {norm:.4g}, {100 * zero:.1f}% exactly zero")
    print(f"written to {out} in {time.perf_counter() - start:.1f}s")
    return 0
