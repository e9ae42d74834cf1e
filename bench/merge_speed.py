"""Merge speed and peak memory: reparam vs mergekit vs the I/O floor, on synthetic Llama-style models.

Models: a base and three fine-tunes (base + Gaussian noise, std FT_STD) with random bf16 weights, written
directly as sharded safetensors in the Hugging Face layout (config.json of a LlamaConfig,
model-0000x-of-0000y.safetensors, model.safetensors.index.json, Llama's tensor names, untied lm_head). No
model object is ever built. They are generated once into the cache folder (default bench/.cache/merge_speed/,
one sub-folder per size, written to a temporary folder and renamed into place) and reused while the size's
spec is unchanged. Sizes: tiny (29M parameters, 59 MB per model), 0.5b (0.50B, 1.0 GB), 1b (1.10B, 2.2 GB,
TinyLlama-1.1B's shapes).

Methods, one YAML each, given unchanged to both tools: linear (the three fine-tunes, weight 1), ties and
dare_ties (base + the three fine-tunes, weight 1, density 0.5, normalize true); dtype float32 (--dtype),
out_dtype bfloat16, so both tools compute in float32 and write bf16. Output: one shard (both tools' default
shard limits exceed the largest output).

Tools, each run as its own subprocess:
  floor     this script with --floor-child: opens every input listed in the config (memory-mapped), touches
            every byte of every tensor (copies it into a scratch buffer), and writes an output of the merged
            model's size (the reference input's tensors, in key order) into a temporary folder renamed into
            place, with the engine's own shard writer. The least any merge that reads its inputs can cost.
  reparam   `python -m reparam.cli.main merge CONFIG -o OUT --no-progress`
  mergekit  `mergekit-yaml CONFIG OUT --no-cuda --no-copy-tokenizer --no-write-model-card --quiet
            --random-seed 0 -j THREADS` (CPU only; lazy unpickling left at its default, off: it only
            affects pickled .bin inputs; synchronous writes, its default)

Every child gets OMP_NUM_THREADS=MKL_NUM_THREADS=--threads. Before measuring, every input file is read once
(page cache warm) and each tool is started once unmeasured (its libraries in the page cache). Runs are
interleaved: each round runs every (method, tool) once, the order rotated by one per round; after each
run the output is checked (every tensor of the base present with its shape, dtype bf16) and deleted, so
every run starts from the same cache state.

Wall time: from spawn to exit (includes Python and library start-up for every tool). Ratios to the floor and
reparam/mergekit are medians of per-round ratios (both runs sit in the same round).
Peak RSS: ru_maxrss of the tool's process from os.wait4 (the kernel's high-water mark of that process alone;
the tool is forked from a ~10 MB launcher, not from this process, whose RSS Linux would fold into it). It
counts the input pages a tool has touched through memory maps while they stay mapped (shared, clean page
cache), so a tool that keeps all inputs mapped peaks near their total size even if it allocates little.
Peak anon: the highest RssAnon (private memory: tensors, buffers) seen by polling /proc/PID/status every
20 ms: a sample, so it can miss a peak shorter than that.

Run:  python bench/merge_speed.py --size 1b            (full; needs about 4x the model size free in RAM)
      python bench/merge_speed.py --size tiny --threads 1 --repeats 3 --out /tmp/ms
Writes bench/results/merge_speed.json and .md (or --out PREFIX.json/.md) after every run, prints the table.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

import torch
import yaml

from speed import _cpu_name, paired  # bench/speed.py (bench/ is on sys.path when this runs as a script)

from reparam.io.files import atomic_write, write_json
from reparam.merging.io import INDEX_NAME, SafetensorsSource, ShardWriter, nbytes, plan_shards

HERE = Path(__file__).resolve().parent
SIZES = {  # Llama shapes; shard_mb: the input shard limit, small enough that every size is sharded
    "tiny": dict(hidden=512, intermediate=1536, layers=4, heads=8, kv_heads=4, vocab=16384, shard_mb=25),
    "0.5b": dict(hidden=1280, intermediate=3456, layers=24, heads=20, kv_heads=5, vocab=32000, shard_mb=400),
    "1b": dict(hidden=2048, intermediate=5632, layers=22, heads=32, kv_heads=4, vocab=32000, shard_mb=1000),
}
MODELS = ("base", "ft1", "ft2", "ft3")
INIT_STD, FT_STD, SEED = 0.02, 0.002, 0
METHODS = ("linear", "ties", "dare_ties")
TOOLS = ("floor", "reparam", "mergekit")
OUT_SHARD_BYTES = 5 * 10**9  # the engine's default; the floor writes the same single shard
GB = 1e9


# ---------------------------------------------------------------- synthetic models

def llama_tensors(s: dict) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of a LlamaForCausalLM state dict, in its order."""
    h, kv = s["hidden"], s["hidden"] // s["heads"] * s["kv_heads"]
    out = [("model.embed_tokens.weight", (s["vocab"], h))]
    for i in range(s["layers"]):
        p = f"model.layers.{i}."
        out += [(p + "self_attn.q_proj.weight", (h, h)), (p + "self_attn.k_proj.weight", (kv, h)),
                (p + "self_attn.v_proj.weight", (kv, h)), (p + "self_attn.o_proj.weight", (h, h)),
                (p + "mlp.gate_proj.weight", (s["intermediate"], h)), (p + "mlp.up_proj.weight", (s["intermediate"], h)),
                (p + "mlp.down_proj.weight", (h, s["intermediate"])),
                (p + "input_layernorm.weight", (h,)), (p + "post_attention_layernorm.weight", (h,))]
    return out + [("model.norm.weight", (h,)), ("lm_head.weight", (s["vocab"], h))]


def llama_config(s: dict) -> dict:
    from transformers import LlamaConfig  # only for the config's field names and defaults
    return LlamaConfig(vocab_size=s["vocab"], hidden_size=s["hidden"], intermediate_size=s["intermediate"],
                       num_hidden_layers=s["layers"], num_attention_heads=s["heads"],
                       num_key_value_heads=s["kv_heads"], max_position_embeddings=2048, tie_word_embeddings=False,
                       architectures=["LlamaForCausalLM"], dtype="bfloat16").to_dict()


def generate_models(dest: Path, size: str) -> None:
    """Write base, ft1..ft3 into dest/ (via a temporary sibling folder renamed into place)."""
    spec = SIZES[size]
    shapes = dict(llama_tensors(spec))
    shards = plan_shards([(k, shp, torch.bfloat16) for k, shp in shapes.items()], spec["shard_mb"] * 10**6)
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    tmp = dest.parent / f".{dest.name}.tmp-{uuid.uuid4().hex[:8]}"
    gens = {m: torch.Generator().manual_seed(SEED + i) for i, m in enumerate(MODELS)}
    config = json.dumps(llama_config(spec), indent=2) + "\n"
    try:
        for m in MODELS:
            (tmp / m).mkdir(parents=True)
            (tmp / m / "config.json").write_text(config)
        for name, keys in zip(names, shards):
            writers = {m: ShardWriter(tmp / m / name, [(k, shapes[k], torch.bfloat16) for k in keys]) for m in MODELS}
            for k in keys:
                base = (torch.ones(shapes[k]) if k.endswith("norm.weight")
                        else torch.randn(shapes[k], generator=gens["base"]) * INIT_STD)
                writers["base"].write(k, base.to(torch.bfloat16))
                for m in MODELS[1:]:
                    writers[m].write(k, (base + FT_STD * torch.randn(shapes[k], generator=gens[m])).to(torch.bfloat16))
            for w in writers.values():
                w.close()
        index = {"metadata": {"total_size": sum(nbytes(shp, torch.bfloat16) for shp in shapes.values())},
                 "weight_map": {k: name for name, keys in zip(names, shards) for k in keys}}
        for m in MODELS:
            (tmp / m / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        (tmp / "spec.json").write_text(json.dumps(_cache_spec(size)) + "\n")
        if dest.exists():
            shutil.rmtree(dest)  # a stale cache of another spec
        os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _cache_spec(size: str) -> dict:
    return {"size": size, **SIZES[size], "init_std": INIT_STD, "ft_std": FT_STD, "seed": SEED, "models": MODELS}


def ensure_models(cache: Path, size: str) -> dict[str, Path]:
    dest = cache / size
    try:
        fresh = json.loads((dest / "spec.json").read_text()) == json.loads(json.dumps(_cache_spec(size)))
    except (OSError, ValueError):
        fresh = False
    if not fresh:
        print(f"generating {size} models into {dest} ...", file=sys.stderr)
        t0 = time.perf_counter()
        dest.parent.mkdir(parents=True, exist_ok=True)
        generate_models(dest, size)
        print(f"  done in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return {m: dest / m for m in MODELS}


def method_config(method: str, paths: dict[str, Path], dtype: str) -> dict:
    fts = [str(paths[m]) for m in MODELS[1:]]
    if method == "linear":
        cfg = {"merge_method": "linear", "models": [{"model": m, "parameters": {"weight": 1.0}} for m in fts]}
    else:
        cfg = {"merge_method": method, "base_model": str(paths["base"]),
               "models": [{"model": m, "parameters": {"weight": 1.0, "density": 0.5}} for m in fts],
               "parameters": {"normalize": True}}
    return {**cfg, "dtype": dtype, "out_dtype": "bfloat16"}


def config_inputs(cfg: dict) -> list[str]:
    return ([cfg["base_model"]] if cfg.get("base_model") else []) + [m["model"] for m in cfg["models"]]


# ---------------------------------------------------------------- the floor (child process)

def floor_child(config_path: str, out: str) -> None:
    """Read every byte of every input tensor and write an output of the merged size, atomically."""
    cfg = yaml.safe_load(Path(config_path).read_text())
    sources = [SafetensorsSource(p) for p in config_inputs(cfg)]
    ref, out_dtype = sources[0], torch.bfloat16
    entries = [(k, ref.shape(k), out_dtype) for k in ref.keys()]
    (keys,) = plan_shards(entries, OUT_SHARD_BYTES)  # outputs here are one shard, as the tools write them
    scratch = torch.empty(max(nbytes(shp, dt) for _, shp, dt in entries), dtype=torch.uint8)
    dest = Path(out)
    tmp = dest.parent / f".{dest.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    writer = ShardWriter(tmp / "model.safetensors", entries)
    for k in keys:
        for src in sources:  # safetensors tensors are lazy views of the mapped file: copy to touch the bytes
            raw = src.get(k).reshape(-1).view(torch.uint8)
            scratch[:raw.numel()].copy_(raw)
        writer.write(k, ref.get(k).to(out_dtype))
    writer.close()
    shutil.copy2(Path(config_inputs(cfg)[0]) / "config.json", tmp / "config.json")
    os.replace(tmp, dest)


# ---------------------------------------------------------------- measured runs

# Runs argv[2:] as a child of this tiny interpreter (started with -S: no torch, ~10 MB) and writes that child's
# wall time, exit code, os.wait4 rusage and highest sampled RssAnon to argv[1] as JSON. Linux folds the memory
# image that a process had before exec into its ru_maxrss, and a child spawned straight from the benchmark
# (torch loaded) would start from the benchmark's own RSS; from here it starts from ~10 MB.
LAUNCHER = r"""
import json, os, sys, time
out, cmd = sys.argv[1], sys.argv[2:]
t0 = time.perf_counter()
pid = os.fork()
if pid == 0:
    try:
        os.execvp(cmd[0], cmd)
    finally:
        os._exit(127)
anon_kb = 0
while True:
    got, status, usage = os.wait4(pid, os.WNOHANG)
    if got:
        break
    try:
        with open(f"/proc/{pid}/status") as f:
            anon_kb = max([anon_kb] + [int(l.split()[1]) for l in f if l.startswith("RssAnon:")])
    except (OSError, ValueError):
        pass  # exiting
    time.sleep(0.02)
with open(out, "w") as f:
    json.dump({"wall_s": time.perf_counter() - t0, "rc": os.waitstatus_to_exitcode(status),
               "maxrss_kb": usage.ru_maxrss, "anon_kb": anon_kb, "cpu_s": usage.ru_utime + usage.ru_stime}, f)
"""


def run_child(cmd: list[str], env: dict, log: Path) -> dict:
    """Run cmd (output to `log`); wall time, exit code, its own ru_maxrss and the sampled peak RssAnon."""
    result = log.with_name(log.name + ".rusage.json")
    result.unlink(missing_ok=True)
    with open(log, "wb") as logf:
        subprocess.run([sys.executable, "-S", "-c", LAUNCHER, str(result), *cmd], env=env, stdout=logf,
                       stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    if not result.is_file():
        raise RuntimeError(f"the launcher of {cmd[0]} wrote no result; see {log}")
    r = json.loads(result.read_text())
    return {"wall_s": r["wall_s"], "rc": r["rc"], "peak_rss_gb": r["maxrss_kb"] * 1024 / GB,
            "peak_anon_gb": r["anon_kb"] * 1024 / GB, "cpu_s": r["cpu_s"]}


def check_output(out: Path, ref: SafetensorsSource) -> str | None:
    """None if `out` holds every tensor of `ref` with its shape in bf16, else what is wrong."""
    try:
        got = SafetensorsSource(out)
    except Exception as e:  # a missing or unreadable output is a result to report, not a crash
        return f"unreadable output: {e}"
    try:
        missing = sorted(set(ref.keys()) - set(got.keys()))
        if missing:
            return f"{len(missing)} tensor(s) missing, e.g. {missing[0]}"
        bad = [k for k in ref.keys() if got.shape(k) != ref.shape(k) or got.dtype(k) != torch.bfloat16]
        return f"{len(bad)} tensor(s) with a wrong shape or dtype, e.g. {bad[0]}" if bad else None
    finally:
        got.close()


def tool_command(tool: str, config: Path, out: Path, threads: int, mergekit: str | None) -> list[str]:
    if tool == "floor":
        return [sys.executable, str(Path(__file__).resolve()), "--floor-child", str(config), str(out)]
    if tool == "reparam":
        return [sys.executable, "-m", "reparam.cli.main", "merge", str(config), "-o", str(out), "--no-progress"]
    return [mergekit, str(config), str(out), "--no-cuda", "--no-copy-tokenizer", "--no-write-model-card", "--quiet",
            "--random-seed", str(SEED), "-j", str(threads)]


def find_mergekit(given: str | None) -> str | None:
    if given:
        return given if Path(given).is_file() or shutil.which(given) else None
    beside = Path(sys.executable).parent / "mergekit-yaml"
    return shutil.which("mergekit-yaml") or (str(beside) if beside.is_file() else None)


def mergekit_version(exe: str) -> str:
    """Version of the mergekit package seen by the interpreter of the mergekit-yaml script (its shebang)."""
    try:
        first = Path(shutil.which(exe) or exe).read_text(errors="replace").splitlines()[0]
        python = first[2:].strip() if first.startswith("#!") else sys.executable
        return subprocess.run([python, "-c", "import importlib.metadata as m; print(m.version('mergekit'))"],
                              capture_output=True, text=True, timeout=120).stdout.strip() or "?"
    except (OSError, IndexError, subprocess.SubprocessError):
        return "?"


def warm_page_cache(files: list[Path]) -> float:
    """Read every input file once so that all runs find them in the page cache; returns GB read."""
    buf, total = bytearray(1 << 24), 0
    for f in files:
        with open(f, "rb", buffering=0) as fh:
            while n := fh.readinto(buf):
                total += n
    return total / GB


# ---------------------------------------------------------------- summary

def summarise(runs: list[dict], meta: dict) -> dict:
    ok = [r for r in runs if r["rc"] == 0 and r["output_error"] is None]
    by = {}
    for r in ok:
        by.setdefault((r["method"], r["tool"]), {})[r["round"]] = r
    rows = []
    for method in meta["methods"]:
        for tool in meta["tools"]:
            mine = by.get((method, tool), {})
            failed = [r for r in runs if r["method"] == method and r["tool"] == tool and r not in ok]
            row = {"method": method, "tool": tool, "runs": len(mine), "failed": len(failed)}
            if mine:
                walls = [r["wall_s"] for r in mine.values()]
                row.update(wall_s=statistics.median(walls), wall_min=min(walls), wall_max=max(walls),
                           cpu_s=statistics.median(r["cpu_s"] for r in mine.values()),
                           peak_rss_gb=statistics.median(r["peak_rss_gb"] for r in mine.values()),
                           peak_anon_gb=statistics.median(r["peak_anon_gb"] for r in mine.values()))
                row["over_floor"] = _paired(mine, by.get((method, "floor"), {}), "wall_s")
                row["cpu_over_floor"] = _paired(mine, by.get((method, "floor"), {}), "cpu_s")
            if tool == "reparam" and (method, "mergekit") in by and mine:
                other = by[(method, "mergekit")]
                row["time_vs_mergekit"] = _paired(mine, other, "wall_s")
                row["cpu_vs_mergekit"] = _paired(mine, other, "cpu_s")
                row["rss_vs_mergekit"] = row["peak_rss_gb"] / statistics.median(r["peak_rss_gb"] for r in other.values())
                row["anon_vs_mergekit"] = row["peak_anon_gb"] / statistics.median(
                    r["peak_anon_gb"] for r in other.values())
            if failed:
                row["last_failure"] = failed[-1].get("log_tail") or failed[-1]["output_error"]
            rows.append(row)
    return {"meta": meta, "rows": rows, "runs": runs}


def _paired(a: dict, b: dict, field: str) -> dict | None:
    rounds = sorted(set(a) & set(b))
    if not rounds:
        return None
    return paired([a[i][field] for i in rounds], [b[i][field] for i in rounds])


def _fmt(x, spec: str) -> str:
    return "" if x is None else format(x, spec)


def table(res: dict) -> str:
    m = res["meta"]
    lines = [f"Synthetic Llama `{m['size']}` ({m['params'] / 1e9:.3f}B parameters, {m['model_gb']:.2f} GB bf16 per "
             f"model, {m['input_shards']} input shards), dtype {m['dtype']} -> bf16, {m['threads']} thread(s), "
             f"{m['repeats']} interleaved round(s); reparam {m['reparam']}, mergekit {m['mergekit']}, "
             f"torch {m['torch']}; {m['cpu']} ({m['cores']} cores).", "",
             "| method | tool | wall s, median [min-max] | x floor | CPU s | CPU x floor | peak RSS GB | peak anon GB "
             "| reparam/mergekit time | CPU | peak RSS | peak anon |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in res["rows"]:
        if not r["runs"]:
            lines.append(f"| {r['method']} | {r['tool']} | failed ({r['failed']}) |" + " |" * 9)
            continue
        of, cf = r.get("over_floor"), r.get("cpu_over_floor")
        tv, cv = r.get("time_vs_mergekit"), r.get("cpu_vs_mergekit")
        lines.append(
            f"| {r['method']} | {r['tool']} | {r['wall_s']:.2f} [{r['wall_min']:.2f}-{r['wall_max']:.2f}] | "
            f"{_fmt(of and of['median'], '.2f')} | {r['cpu_s']:.2f} | {_fmt(cf and cf['median'], '.2f')} | "
            f"{r['peak_rss_gb']:.3f} | {r['peak_anon_gb']:.3f} | {_fmt(tv and tv['median'], '.3f')} | "
            f"{_fmt(cv and cv['median'], '.3f')} | {_fmt(r.get('rss_vs_mergekit'), '.3f')} | "
            f"{_fmt(r.get('anon_vs_mergekit'), '.3f')} |")
    lines += ["", "Targets (issue): every method within 1.5x of the floor; TIES at least 5x faster than mergekit "
              "(reparam/mergekit time <= 0.2) at lower peak memory."]
    for r in res["rows"]:
        if r["tool"] != "reparam" or not r["runs"]:
            continue
        of, tv = r.get("over_floor"), r.get("time_vs_mergekit")
        verdicts = []
        if of:
            verdicts.append(f"x floor {of['median']:.2f} {'met' if of['median'] <= 1.5 else 'MISSED'}")
        if r["method"] == "ties" and tv:
            verdicts.append(f"time vs mergekit {tv['median']:.3f} {'met' if tv['median'] <= 0.2 else 'MISSED'}")
            verdicts.append(f"peak RSS vs mergekit {r['rss_vs_mergekit']:.3f} "
                            f"{'met' if r['rss_vs_mergekit'] < 1 else 'MISSED'}, peak anon {r['anon_vs_mergekit']:.3f} "
                            f"{'met' if r['anon_vs_mergekit'] < 1 else 'MISSED'}")
        lines.append(f"- {r['method']}: " + "; ".join(verdicts))
    if m["mergekit"] == "missing":
        lines.append("- mergekit was not found (--mergekit PATH): reparam and the floor only.")
    elif m["mergekit"] == "not run":
        lines.append("- mergekit not run (--tools): reparam and the floor only.")
    lines += ["", "The last four columns are reparam/mergekit ratios. CPU s: user + system time of the process "
              "(all threads; less sensitive than wall time to other load on the machine). Peak RSS: ru_maxrss "
              "(os.wait4), includes memory-mapped input pages while mapped; peak anon: highest RssAnon polled every "
              "20 ms (private memory). GB = 10^9 bytes. Ratios: medians of per-round ratios."]
    return "\n".join(lines) + "\n"


def save(res: dict, prefix: Path) -> None:
    write_json(prefix.with_suffix(".json"), res)
    text = table(res)
    atomic_write(prefix.with_suffix(".md"), lambda tmp: Path(tmp).write_text("# Merge speed\n\n" + text))


# ---------------------------------------------------------------- main

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", choices=list(SIZES), default="1b")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved rounds (default 3)")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="threads per tool (default: all cores)")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--tools", default=",".join(TOOLS))
    ap.add_argument("--dtype", default="float32", help="the configs' working dtype (default float32)")
    ap.add_argument("--mergekit", default=None, help="mergekit-yaml executable (default: on PATH or beside python)")
    ap.add_argument("--cache", type=Path, default=HERE / ".cache" / "merge_speed", help="where the models live")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "merge_speed", help="results prefix (.json/.md)")
    ap.add_argument("--floor-child", nargs=2, metavar=("CONFIG", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.floor_child:
        floor_child(*args.floor_child)
        return 0
    methods = [x for x in args.methods.split(",") if x]
    tools = [x for x in args.tools.split(",") if x]
    for name, got, valid in (("--methods", methods, METHODS), ("--tools", tools, TOOLS)):
        if not got or any(x not in valid for x in got):
            ap.error(f"{name} takes a comma list of {', '.join(valid)}; got {','.join(got)!r}")
    asked_mergekit = "mergekit" in tools
    mergekit = find_mergekit(args.mergekit) if asked_mergekit else None
    if asked_mergekit and mergekit is None:
        print(f"mergekit is missing ({args.mergekit or 'mergekit-yaml not on PATH nor beside python'}): "
              "reporting reparam and the floor only", file=sys.stderr)
        tools.remove("mergekit")

    paths = ensure_models(args.cache, args.size)
    work = args.cache / f"work-{uuid.uuid4().hex[:8]}"
    work.mkdir(parents=True)
    configs = {}
    for method in methods:
        configs[method] = work / f"{method}.yml"
        configs[method].write_text(yaml.safe_dump(method_config(method, paths, args.dtype), sort_keys=False))
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
           "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    ref = SafetensorsSource(paths["base"])
    input_files = sorted({Path(ref.where(k)).name for k in ref.keys()})
    meta = {"size": args.size, **SIZES[args.size], "params": sum(torch.Size(ref.shape(k)).numel() for k in ref.keys()),
            "model_gb": sum(nbytes(ref.shape(k), ref.dtype(k)) for k in ref.keys()) / GB,
            "input_shards": len(input_files), "dtype": args.dtype, "threads": args.threads, "repeats": args.repeats,
            "methods": methods, "tools": tools, "configs": {m: yaml.safe_load(c.read_text()) for m, c in configs.items()},
            "commands": {t: tool_command(t, Path("CONFIG"), Path("OUT"), args.threads, mergekit) for t in tools},
            "reparam": _reparam_version(),
            "mergekit": mergekit_version(mergekit) if mergekit else ("missing" if asked_mergekit else "not run"),
            "torch": torch.__version__, "python": platform.python_version(), "cpu": _cpu_name(),
            "cores": os.cpu_count(), "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    runs: list[dict] = []
    try:
        gb = warm_page_cache([paths[m] / f for m in MODELS for f in input_files])
        print(f"page cache warmed: {gb:.2f} GB of inputs read", file=sys.stderr)
        for tool in tools:  # start each tool once, unmeasured: its libraries into the page cache
            cmd = {"floor": [sys.executable, "-c", "import torch, yaml, safetensors, reparam.merging.io"],
                   "reparam": [sys.executable, "-m", "reparam.cli.main", "merge", "--help"],
                   "mergekit": [mergekit or "", "--help"]}[tool]
            subprocess.run(cmd, env=env, capture_output=True)
        order = [(m, t) for m in methods for t in tools]
        for rnd in range(args.repeats):
            k = rnd % len(order)
            for method, tool in order[k:] + order[:k]:
                out = work / f"out-{method}-{tool}"
                log = work / f"{method}-{tool}.log"
                r = {"round": rnd, "method": method, "tool": tool,
                     **run_child(tool_command(tool, configs[method], out, args.threads, mergekit), env, log)}
                r["output_error"] = check_output(out, ref) if r["rc"] == 0 else None
                if r["rc"] != 0 or r["output_error"]:
                    r["log_tail"] = log.read_text(errors="replace")[-2000:]
                shutil.rmtree(out, ignore_errors=True)
                os.sync()  # nothing of this run left to write back during the next one
                runs.append(r)
                status = "ok" if r["rc"] == 0 and not r["output_error"] else f"FAILED rc={r['rc']} {r['output_error'] or ''}"
                print(f"round {rnd + 1}/{args.repeats} {method:9s} {tool:8s} {r['wall_s']:7.2f} s "
                      f"RSS {r['peak_rss_gb']:.3f} GB anon {r['peak_anon_gb']:.3f} GB {status}", file=sys.stderr)
                save(summarise(runs, meta), args.out)
    finally:
        ref.close()
        shutil.rmtree(work, ignore_errors=True)
    print(table(summarise(runs, meta)))
    return 0


def _reparam_version() -> str:
    import reparam
    return getattr(reparam, "__version__", "?")


if __name__ == "__main__":
    sys.exit(main())
