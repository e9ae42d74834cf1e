"""`reparam demo`: LoRA on the bundled MiniLM and sentiment set, then save, reload, merge and check."""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from ..core.layers import AdaptedLayer
from ..core.model import adapt, merge, trainable_summary, unload
from ..core.registry import make_config
from ..io.adapter_files import load_adapter, save_adapter
from .common import BUNDLED_DATA, bundled_model_path, head_modules, load_classifier, load_tokenizer
from .finetune import load_datasets, positive_float, positive_int


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="model folder (default: the bundled all-MiniLM-L6-v2)")
    p.add_argument("--epochs", type=positive_float, default=3.0, help="training epochs (default 3)")
    p.add_argument("--lr", type=positive_float, default=3e-3, help="learning rate (default 3e-3)")
    p.add_argument("--r", type=positive_int, default=8, help="LoRA rank (default 8)")
    p.add_argument("--alpha", type=float, default=16.0, help="LoRA alpha (default 16)")
    p.add_argument("--batch-size", type=positive_int, default=16, help="batch size (default 16)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--output", "-o", default=None, help="save the adapter here (default: a temporary directory)")
    p.add_argument("--threads", type=positive_int, default=1,
                   help="CPU threads (default 1: the model is small, and on a busy 2-core machine more threads "
                        "than free cores make each step several times slower)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


@torch.no_grad()
def predict(model, data) -> torch.Tensor:
    model.eval()
    return torch.cat([model(**{k: v for k, v in data.collate(idx).items() if k != "labels"}).logits
                      for idx in data.batches(64, shuffle=False)])


def check(label: str, ref: torch.Tensor, got: torch.Tensor, tol: float = 1e-4) -> bool:
    same = bool((ref.argmax(-1) == got.argmax(-1)).all())
    diff = (ref - got).abs().max().item()
    ok = same and diff <= tol
    print(f"  {label:<36} predictions {'identical' if same else 'DIFFER'}, max |logit diff| {diff:.2e}  "
          f"{'OK' if ok else 'FAIL'}")
    return ok


def run(args) -> int:
    from ..training import TrainConfig, evaluate, train

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    model_path = args.model or bundled_model_path()
    tokenizer = load_tokenizer(model_path)
    train_data, dev = load_datasets(tokenizer, BUNDLED_DATA, None, max_length=64)
    model = load_classifier(model_path, num_labels=train_data.num_labels, seed=args.seed)
    name = "the bundled all-MiniLM-L6-v2" if args.model is None else model_path
    print(f"reparam demo: LoRA (r={args.r}, alpha={args.alpha:g}) on {name}, "
          f"bundled sentiment set ({len(train_data)} train / {len(dev)} dev sentences)")
    before = evaluate(model, dev, batch_size=64)
    print(f"dev accuracy before fine-tuning: {before['accuracy']:.3f}")

    config = make_config("lora", r=args.r, alpha=args.alpha)
    adapt(model, config, targets="all-linear", modules_to_save=head_modules(model))
    print(str(trainable_summary(model)).splitlines()[0])
    tcfg = TrainConfig(lr=args.lr, epochs=args.epochs, batch_size=args.batch_size, seed=args.seed,
                       progress=not args.quiet)
    t0 = time.perf_counter()
    result = train(model, train_data, tcfg)
    train_time = time.perf_counter() - t0
    after = evaluate(model, dev, batch_size=64)
    print(f"trained {result.steps} steps ({args.epochs:g} epochs) in {train_time:.1f}s")
    print(f"dev accuracy after fine-tuning:  {after['accuracy']:.3f}")
    reference = predict(model, dev)

    with tempfile.TemporaryDirectory(prefix="reparam-demo-") as tmp:
        out = Path(args.output or tmp)
        path = save_adapter(model, out)
        print(f"adapter saved: {path} ({path.stat().st_size / 1024:.0f} KiB)")
        print("round trip:")
        fresh = load_classifier(model_path, num_labels=train_data.num_labels, seed=args.seed + 1)
        load_adapter(fresh, out)
        ok = check("reloaded onto a fresh base model", reference, predict(fresh, dev))
    merge(fresh)
    ok &= check("merged into the base weights", reference, predict(fresh, dev))
    plain = unload(fresh)
    ok &= check("unloaded (plain transformers model)", reference, predict(plain, dev))
    n_adapted = sum(1 for _, m in plain.named_modules() if isinstance(m, AdaptedLayer))
    ok &= n_adapted == 0
    print(f"total time {time.perf_counter() - start:.1f}s -> {'OK' if ok else 'FAIL'}")
    return 0 if ok else 1
