"""`reparam finetune`: adapt a sequence classifier with any registered method, train it, save the adapter."""
from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

from ..core.model import adapt, trainable_summary
from ..core.registry import get_method, make_config
from ..core.svd import set_progress
from ..io.adapter_files import save_adapter
from .common import (BUNDLED_DATA, SIDE_FILE, bundled_model_path, fmt_metrics, head_modules, load_classifier,
                     load_tokenizer, parse_sets, resolve_data)


def positive_int(text: str) -> int:
    v = int(text)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def positive_float(text: str) -> float:
    v = float(text)
    if not v > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {v}")
    return v


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="model folder or Hugging Face name (default: the bundled all-MiniLM-L6-v2)")
    p.add_argument("--data", default=BUNDLED_DATA,
                   help=f"GLUE task folder, .csv/.tsv/.jsonl file, 'hf:<name>', or '{BUNDLED_DATA}' (the bundled "
                        f"sentiment set; default)")
    p.add_argument("--eval-data", default=None, help="evaluation file (default: the folder's dev split, or a "
                                                     "'dev' file beside a training file)")
    p.add_argument("--method", default="lora", help="adapter method (see `reparam methods`; default lora)")
    p.add_argument("--r", type=positive_int, default=None, help="rank (default 8; svfit: all singular values)")
    p.add_argument("--alpha", type=float, default=None, help="scaling numerator alpha (default 2*r; sorsa: none, scale 1)")
    p.add_argument("--dropout", type=float, default=None, help="adapter dropout (default: the method's)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="any other field of the method's config, e.g. --set init=pissa (repeatable)")
    p.add_argument("--targets", default=None,
                   help="modules to adapt: the method's default (all-linear; the task head for moment_probing, the "
                        "key projections for prefix_tuning, keys + FFN outputs for mam_adapter), names/suffixes "
                        "'query,value', or 're:<regex>'")
    p.add_argument("--exclude", default=None, help="modules to leave out (same syntax as --targets)")
    p.add_argument("--modules-to-save", default=None,
                   help="modules trained in full and saved with the adapter (default: the model's head)")
    p.add_argument("--epochs", type=positive_float, default=3.0, help="training epochs (default 3)")
    p.add_argument("--lr", type=positive_float, default=1e-3, help="learning rate (default 1e-3)")
    p.add_argument("--batch-size", type=positive_int, default=16, help="batch size (default 16)")
    p.add_argument("--max-length", type=positive_int, default=128, help="max tokens per example (default 128)")
    p.add_argument("--max-steps", type=positive_int, default=None, help="stop after this many optimizer steps")
    p.add_argument("--limit", type=positive_int, default=None, help="train on a seeded random subset of N examples")
    p.add_argument("--eval-limit", type=positive_int, default=None, help="use only the first N eval examples")
    p.add_argument("--eval-every", type=positive_int, default=None, help="evaluate every N steps")
    p.add_argument("--warmup-ratio", type=float, default=0.06, help="linear warm-up fraction (default 0.06)")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (default 0)")
    p.add_argument("--regularizer-weight", type=float, default=None,
                   help="weight of the method's extra loss terms, reparam.regularizer(model), in the loss "
                        "(default: the method's default_regularizer_weight, 0 if none; pela: 1)")
    p.add_argument("--delta-reg", choices=("none", "l2", "adamr", "adamr_l1"), default="none",
                   help="keep the weights near their start for DARE/DAREx afterwards: l2 penalty or AdamR decay "
                        "(default none)")
    p.add_argument("--delta-reg-strength", type=float, default=0.0,
                   help="strength of --delta-reg (AdamR's weight decay; default 0)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--log", default=None, help="write the training log (JSON lines) here")
    p.add_argument("--threads", type=positive_int, default=None, help="CPU threads (default: torch's choice)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--output", "-o", required=True, help="directory the adapter is saved to")


def build_config(method: str, r, alpha, dropout, sets: list[str]):
    """The method's config from the flags; flags the method has no field for are an error, as is --set key=."""
    spec = get_method(method)
    names = spec.config_cls.field_names()
    fields = {}
    defaults = {f.name: f.default for f in dataclasses.fields(spec.config_cls)}
    if r is not None or "r" in names and defaults["r"] is not None:  # default None (SVFit: all values) is kept
        fields["r"] = 8 if r is None else r
    if alpha is not None or "alpha" in names and defaults["alpha"] is not None:  # None (SORSA: s = 1) is kept
        fields["alpha"] = float(2 * fields.get("r", 8)) if alpha is None else alpha
    if dropout is not None:
        fields["dropout"] = dropout
    fields.update(parse_sets(sets))
    return make_config(method, **fields)


def load_datasets(tokenizer, data, eval_data, max_length, limit=None, eval_limit=None, seed=0):
    from ..training import load_task

    src, split, eval_src, eval_split = resolve_data(data, eval_data)
    train_data = load_task(src, tokenizer, split, max_length=max_length, limit=limit,
                           limit_seed=seed if limit else None)
    dev = None
    if eval_src is not None:
        dev = load_task(eval_src, tokenizer, eval_split, max_length=max_length, limit=eval_limit)
    return train_data, dev


def regularizer_weight(args) -> float:
    if args.regularizer_weight is not None:
        return args.regularizer_weight
    return getattr(get_method(args.method).adapter_cls, "default_regularizer_weight", 0.0)


def run(args) -> int:
    from ..training import TrainConfig, evaluate, train

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.quiet:
        set_progress(False)  # nor the SVD bar of large models
    start = time.perf_counter()
    model_path = args.model or bundled_model_path()
    config = build_config(args.method, args.r, args.alpha, args.dropout, args.sets)  # fail fast, before loading
    tcfg = TrainConfig(lr=args.lr, epochs=args.epochs, max_steps=args.max_steps, batch_size=args.batch_size,
                       warmup_ratio=args.warmup_ratio, weight_decay=args.weight_decay, delta_reg=args.delta_reg,
                       delta_reg_strength=args.delta_reg_strength, regularizer_weight=regularizer_weight(args),
                       eval_every=args.eval_every, seed=args.seed, log_path=args.log, progress=not args.quiet)
    tokenizer = load_tokenizer(model_path)
    train_data, dev = load_datasets(tokenizer, args.data, args.eval_data, args.max_length, args.limit,
                                    args.eval_limit, args.seed)
    model = load_classifier(model_path, num_labels=train_data.num_labels, seed=args.seed)
    adapter_cls = get_method(config.method).adapter_cls
    adapts_head = getattr(adapter_cls, "adapts_head", False)  # Moment Probing
    to_save = args.modules_to_save.split(",") if args.modules_to_save else [] if adapts_head else head_modules(model)
    args.targets = args.targets or (",".join(head_modules(model)) if adapts_head else adapter_cls.default_targets(model))
    adapt(model, config, targets=args.targets, exclude=args.exclude, modules_to_save=to_save or None)
    summary = trainable_summary(model)
    print(f"model: {model_path} ({type(model).__name__}, {train_data.num_labels} labels)")
    print(f"data: {len(train_data)} train" + (f", {len(dev)} eval" if dev is not None else ", no eval set"))
    print(f"method: {config.method} {json.dumps(config.to_dict())}")
    print(str(summary).splitlines()[0])
    before = evaluate(model, dev, batch_size=64) if dev is not None else {}
    result = train(model, train_data, tcfg, eval_data=dev)
    after = evaluate(model, dev, batch_size=64) if dev is not None else {}
    out = Path(args.output)
    path = save_adapter(model, out)
    side = {"model": model_path, "data": args.data, "eval_data": args.eval_data, "num_labels": train_data.num_labels,
            "max_length": args.max_length, "targets": args.targets, "train": dataclasses.asdict(tcfg) if dataclasses.is_dataclass(tcfg) else {},
            "steps": result.steps, "train_loss": result.train_loss, "eval_before": before, "eval_after": after}
    (out / SIDE_FILE).write_text(json.dumps(side, indent=2, default=str) + "\n")
    print(f"trained {result.steps} steps in {result.wall_time:.1f}s (mean loss {result.train_loss:.4f})")
    if dev is not None:
        print(f"eval before: {fmt_metrics(before)}")
        print(f"eval after:  {fmt_metrics(after)}")
    print(f"adapter saved to {out} ({path.name}, {path.stat().st_size:,} bytes); total {time.perf_counter() - start:.1f}s")
    return 0
