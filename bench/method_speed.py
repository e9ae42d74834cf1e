"""Training-step time and peak memory of every adapting method as ratios to reparam LoRA, and its set-up cost.

Methods and budgets are bench/glue.py's VARIANTS (LoRA: r=8, alpha=16, all Linear layers, classifier trained),
on the bundled all-MiniLM-L6-v2 with 2 labels; batch 32 x sequence 64 random token ids (fixed seed).

Step: one optimizer step of reparam.training.train: forward, loss (+ the method's regulariser), backward, the
method's training callbacks (SORSA's regulariser step, rank allocators, SpIEL / SaRA re-selection, GradNormLoRP's
projected update, ...) and AdamW. Going through train() keeps every method's per-step work in the time; its own
overhead (collation, logging) is the same for every row, so ratios are if anything a little closer to 1.

Time: all variants live in one process. Each round runs `--steps` steps of every variant in rotated order, one
train() call per variant (its first step unmeasured: optimizer state, allocator start); the per-round median step
time is divided by LoRA's of the same round, and the table reports the median ratio over `--rounds` rounds (the
machine is shared: pairing within a round cancels most outside load).

Memory: each variant in fresh child processes (this script with --child; MALLOC_MMAP_THRESHOLD_=65536 so freed
blocks go back to the OS): VmHWM during `--mem-steps` training steps minus VmRSS after model load, adapt and one
no-grad forward (gradients, optimizer state, activations, temporaries), median of `--mem-repeats` children.

Set-up: wall time of adapt() (SVD for SORSA, SVFit, SoMA, PELA, PiSSA), measured once per variant.

    python bench/method_speed.py                          # every method: 5 rounds x 6 steps, 1 memory child each
    python bench/method_speed.py --variants sorsa,nola --rounds 3 --no-memory
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from glue import VARIANTS  # noqa: E402  (same configs and budgets as the GLUE table)
from speed import BATCH, SEQ, SEED, _cpu_name, _status_kb, load_base, paired  # noqa: E402

from reparam.training import TrainConfig, train  # noqa: E402
from reparam.training.callbacks import Callback  # noqa: E402
from reparam.training.data import TextClassificationData  # noqa: E402

SKIP = {"full", "head", "peft-lora", "peft-adalora"}  # not reparam adapters: bench/speed.py and glue.py cover them


class StepTimer(Callback):
    def __init__(self):
        self.times, self.t0 = [], None

    def on_step_begin(self, state):
        self.t0 = time.perf_counter()

    def on_step_end(self, state):
        self.times.append(time.perf_counter() - self.t0)


def data(vocab: int, rows: int) -> TextClassificationData:
    g = torch.Generator().manual_seed(SEED)
    ids = torch.randint(0, vocab, (rows, SEQ), generator=g).tolist()
    labels = torch.randint(0, 2, (rows,), generator=g).tolist()
    return TextClassificationData({"input_ids": ids, "attention_mask": [[1] * SEQ] * rows}, labels, num_labels=2,
                                  metric_names=["accuracy"])


def build(variant: str, total_steps: int):
    model = load_base()
    t0 = time.perf_counter()
    model, callbacks = VARIANTS[variant].build(model, total_steps)
    setup = time.perf_counter() - t0
    return model, callbacks, setup, sum(p.numel() for p in model.parameters() if p.requires_grad)


def run_steps(variant: str, model, callbacks, steps: int, train_data) -> list[float]:
    timer = StepTimer()
    cfg = TrainConfig(lr=VARIANTS[variant].lr, max_steps=steps, batch_size=BATCH, progress=False, log_every=10**9,
                      regularizer_weight=VARIANTS[variant].regularizer_weight)
    train(model, train_data, cfg, callbacks=[*callbacks, timer])
    return timer.times


def child(variant: str, steps: int) -> dict:
    model, callbacks, _, _ = build(variant, steps)
    train_data = data(model.config.vocab_size, BATCH * steps)
    with torch.no_grad():
        model(**{k: v for k, v in train_data.collate(list(range(BATCH))).items() if k != "labels"})
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base_kb = _status_kb("VmRSS")
    run_steps(variant, model, callbacks, steps, train_data)
    return {"variant": variant, "peak_rss_delta_mb": (_status_kb("VmHWM") - base_kb) / 1024}


def measure_memory(variant: str, steps: int, threads: int, repeats: int) -> float:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS=str(threads))
    runs = []
    for _ in range(repeats):
        out = subprocess.run([sys.executable, __file__, "--child", variant, "--mem-steps", str(steps), "--threads",
                              str(threads)], env=env, capture_output=True, text=True, check=False)
        if out.returncode != 0:
            raise RuntimeError(f"memory child for {variant} failed:\n{out.stderr[-3000:]}")
        runs.append(json.loads(out.stdout.strip().splitlines()[-1])["peak_rss_delta_mb"])
    return statistics.median(runs)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--variants", default=",".join(v for v in VARIANTS if v not in SKIP and v != "lora"))
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=6, help="steps per variant per round (the first unmeasured)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--mem-steps", type=int, default=3)
    ap.add_argument("--mem-repeats", type=int, default=1)
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--out", default=str(HERE / "results"))
    ap.add_argument("--update", action="store_true",
                    help="keep the other variants' rows of the output JSON (their ratios come from their own run, "
                         "each paired with its own LoRA rounds)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(child(args.child, args.mem_steps)))
        return
    variants = ["lora"] + [v for v in args.variants.split(",") if v and v != "lora"]
    bad = [v for v in variants if v not in VARIANTS or v in SKIP]
    if bad:
        ap.error(f"unknown or non-adapter variant(s) {bad}; choose from {[v for v in VARIANTS if v not in SKIP]}")
    total = args.rounds * args.steps
    built = {v: build(v, total) for v in variants}
    train_data = data(built["lora"][0].config.vocab_size, BATCH * args.steps)
    step_ms = {v: [] for v in variants}
    for rnd in range(args.rounds):
        k = rnd % len(variants)
        for v in variants[k:] + variants[:k]:
            model, callbacks, _, _ = built[v]
            step_ms[v].append(1e3 * statistics.median(run_steps(v, model, callbacks, args.steps, train_data)[1:]))
        print(f"round {rnd + 1}/{args.rounds}", file=sys.stderr)
    memory = {} if args.no_memory else {v: measure_memory(v, args.mem_steps, args.threads, args.mem_repeats)
                                        for v in variants}
    out = Path(args.out)
    previous = out / "method_speed.json"
    rows = {v: r for v, r in json.loads(previous.read_text())["rows"].items()
            if v not in variants and v in VARIANTS} if args.update and previous.exists() else {}
    for v in variants:
        ratio = paired(step_ms[v], step_ms["lora"])
        rows[v] = {"budget": VARIANTS[v].budget, "trainable": built[v][3], "setup_s": built[v][2],
                   "step_ms": statistics.median(step_ms[v]), "time_ratio": ratio,
                   "peak_rss_delta_mb": memory.get(v),
                   "memory_ratio": memory[v] / memory["lora"] if memory else None}
    rows = {v: rows[v] for v in ["lora", *(v for v in VARIANTS if v in rows and v != "lora")]}  # table order
    lines = [f"Batch {BATCH} x seq {SEQ}, {args.threads} threads, {args.rounds} rounds x {args.steps} steps; "
             f"torch {torch.__version__}; {_cpu_name()}."
             + (" Rows not in this run's --variants kept from an earlier run (--update)." if args.update else ""), "",
             "| method | budget | trainable | set-up s | step ms | time / LoRA [p25-p75] | peak RSS Δ MB | memory / LoRA |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for v, r in rows.items():
        t = r["time_ratio"]
        mem = f"{r['peak_rss_delta_mb']:.0f} | {r['memory_ratio']:.2f}" if r["memory_ratio"] is not None else "- | -"
        lines.append(f"| {v} | {r['budget']} | {r['trainable']:,} | {r['setup_s']:.2f} | {r['step_ms']:.0f} | "
                     f"{t['median']:.2f} [{t['p25']:.2f}-{t['p75']:.2f}] | {mem} |")
    md = "\n".join(lines) + "\n"
    print(md)
    out.mkdir(parents=True, exist_ok=True)
    (out / "method_speed.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1) + "\n")
    (out / "method_speed.md").write_text("# Method step time and memory vs reparam LoRA\n\n" + md)


if __name__ == "__main__":
    main()
