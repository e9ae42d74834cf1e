"""The merge engine: header-only validation, optional statistics passes, then a tensor-by-tensor merge.

Streaming (:func:`merge_models`): inputs are memory-mapped safetensors; a reader thread loads the next
tensors (queue of 2 keys) while the current key is merged; each merged tensor is cast and written straight
into its output shard (headers planned from validation), inside a temporary folder renamed into place at the
end. Peak memory is a few keys' worth of tensors for every input (plus float32 work copies).

In memory (:func:`merge_state_dicts`): the same validation and kernels over state dicts; global statistics
use ``torch.kthvalue`` instead of the two-pass histogram. Both paths give bit-identical tensors.
"""
from __future__ import annotations

import dataclasses
import gc
import json
import math
import queue
import re
import shutil
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
import yaml
from tqdm.auto import tqdm

from .adapter_source import open_input
from .config import MergeConfig, load_config
from .errors import MergeConfigError, MergeValidationError
from .io import DictSource, SafetensorsSource, Source, folder_swap, nbytes, parse_size, write_shards
from .keys import TiedOutputs, append_rows, skip_warning, tied_keys, vocab_rows, vocab_warning
from .methods.base import MethodSpec, TensorContext
from .params import build_params, layer_positions, resolve_all
from .registry import get_method
from .sidecars import open_sidecars, sidecar_problems
from .threshold import StreamingOrderStats, keep_threshold, kth_smallest

COPY_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json", "tokenizer.model", "vocab.txt", "vocab.json", "merges.txt",
              "added_tokens.json", "chat_template.jinja", "preprocessor_config.json")
_MAX_LISTED = 20


@dataclass
class KeyPlan:
    key: str
    merge: bool
    shape: tuple[int, ...]
    out_dtype: torch.dtype
    params: Any = None
    per_model: list = field(default_factory=list)
    tail: list = field(default_factory=list)  # on_vocab_mismatch: rows appended after the merged ones (keys.py)
    tied_to: str | None = None  # written as a copy of this key's output (tied weights, keys.py)

    @property
    def out_shape(self) -> tuple[int, ...]:
        """Shape written: `shape` is what the kernel merges (the common rows under vocab truncation)."""
        return (self.tail[-1][2], *self.shape[1:]) if self.tail else self.shape


@dataclass
class Plan:
    spec: MethodSpec
    base: Source | None
    inputs: list[Source]
    keys: list[KeyPlan]
    seed: int
    dtype: torch.dtype | None
    sidecars: list[Source] = field(default_factory=list)  # one per input model (MethodSpec.sidecar)
    tied: TiedOutputs | None = None

    @property
    def ref(self) -> Source:
        return self.base if self.base is not None else self.inputs[0]

    def needs_stats(self) -> bool:
        merged = [k for k in self.keys if k.merge]
        return bool(merged) and self.spec.global_stats is not None and self.spec.global_stats(merged[0].params)


def _float(dtype: torch.dtype) -> bool:
    return dtype.is_floating_point


def build_plan(spec: MethodSpec, base: Source | None, inputs: Sequence[Source], params: Mapping[str, Any],
               model_params: Sequence[Mapping[str, Any]], *, seed: int = 0, dtype: torch.dtype | None = None,
               out_dtype: torch.dtype | None = None, exclude: Iterable[str] = (), on_mismatch: str = "error",
               on_vocab_mismatch: str = "error") -> Plan:
    """Validate everything from headers and resolve parameters per tensor. Once validation has passed, the
    embedding / LM-head tensors of equal shape (only those) are read to find tied ones (keys.py)."""
    if spec.needs_base and base is None:
        raise MergeConfigError(f"merge_method {spec.name!r} needs a base_model")
    if base is not None and not spec.takes_base:
        raise MergeConfigError(f"merge_method {spec.name!r} takes no base_model: tensors that are not merged "
                               f"are copied from the first model (use `exclude` to keep heads out of the merge)")
    n = len(inputs)
    if n < spec.min_models or (spec.max_models is not None and n > spec.max_models):
        want = (f"exactly {spec.min_models}" if spec.max_models == spec.min_models
                else f"at least {spec.min_models}")
        raise MergeConfigError(f"merge_method {spec.name!r} takes {want} model(s) besides the base model, got {n}")
    ref = base if base is not None else inputs[0]
    sources = ([base] if base is not None else []) + list(inputs)
    ref_keys = sorted(ref.keys(), key=ref.order_key)  # file by file: each input file is closed when done
    ref_set = set(ref_keys)
    key_sets = [set(src.keys()) for src in sources]
    problems: list[str] = []
    for src, have in zip(sources, key_sets):
        extra = sorted(have - ref_set)
        if extra and on_mismatch == "error":
            problems.append(f"{src.name}: {len(extra)} tensor(s) not in {ref.name}: {', '.join(extra[:5])}"
                            + (" ..." if len(extra) > 5 else ""))
    patterns = [re.compile(p) for p in exclude]
    skipped: list[tuple[str, str]] = []
    truncated: dict[str, tuple] = {}
    sidecars = open_sidecars(spec, inputs, model_params)
    pos = layer_positions(ref_keys)
    plans: list[KeyPlan] = []
    for key in ref_keys:
        shape, rdt = ref.shape(key), ref.dtype(key)
        out_dt = (out_dtype or dtype or rdt) if _float(rdt) else rdt
        merge = _float(rdt) and not any(p.search(key) for p in patterns)
        rows = None
        if merge and on_vocab_mismatch == "truncate" and all(key in have for have in key_sets):
            rows = vocab_rows(key, sources)
            if rows is not None:
                truncated[key] = rows
                shape = (rows[0], *shape[1:])
        if merge:
            bad = []
            for src, have in zip(sources, key_sets):
                if src is ref:
                    continue
                if key not in have:
                    bad.append(f"{src.name}: tensor {key!r} is missing (present in {ref.where(key)})")
                elif rows is None and src.shape(key) != shape:
                    bad.append(f"tensor {key!r}: {src.where(key)} has shape {list(src.shape(key))}, "
                               f"but {ref.where(key)} has shape {list(shape)}"
                               + (" (vocabulary sizes differ: `on_vocab_mismatch: truncate` merges the common "
                                  "rows)" if vocab_rows(key, [ref, src]) else ""))
                elif not _float(src.dtype(key)):
                    bad.append(f"tensor {key!r}: {src.where(key)} has dtype {src.dtype(key)}, "
                               f"{ref.where(key)} has {rdt}")
            bad += sidecar_problems(spec, sidecars, inputs, key, shape)
            if bad and on_mismatch == "skip":
                merge, rows, shape = False, None, ref.shape(key)
                truncated.pop(key, None)
                skipped.append((key, bad[0]))
            if on_mismatch == "error":
                problems.extend(bad)
        kp = KeyPlan(key, merge, shape, out_dt, tail=rows[1] if rows else [])
        if merge:
            x = pos[key]
            try:
                kp.params = build_params(spec.params_cls, resolve_all(params, key, x), f"tensor {key!r}")
                kp.per_model = [build_params(spec.model_params_cls, resolve_all(mp, key, x),
                                             f"model {src.name}, tensor {key!r}")
                                for mp, src in zip(model_params, inputs)]
                if spec.check is not None:
                    spec.check(kp.params, kp.per_model, key)
            except (MergeConfigError, ValueError) as e:
                raise MergeConfigError(f"merge_method {spec.name!r}: {e}") from None
        plans.append(kp)
        if len(problems) > _MAX_LISTED:
            break
    if problems:
        more = " (first problems only)" if len(problems) > _MAX_LISTED else ""
        raise MergeValidationError(f"models do not fit together{more}:\n  " + "\n  ".join(problems[:_MAX_LISTED]))
    tied = tied_keys(ref, sources)  # reads only embedding / LM-head tensors of equal shape
    by_key = {kp.key: kp for kp in plans}
    for i, kp in enumerate(plans):
        if kp.key in tied:  # written as a copy of the merged tensor it is tied to (sorted first)
            primary = by_key[tied[kp.key]]
            if kp.merge != primary.merge:
                raise MergeConfigError(f"tensors {primary.key!r} and {kp.key!r} are tied (identical in every "
                                       f"model) but only one of them is merged: exclude both or neither")
            plans[i] = dataclasses.replace(primary, key=kp.key, merge=False, tied_to=primary.key)
            truncated.pop(kp.key, None)
    plans.sort(key=lambda kp: kp.tied_to is not None)  # stable: a tied copy comes after the key it copies
    if on_mismatch == "skip":
        skip_warning(skipped, sorted(set().union(*key_sets) - ref_set), ref)
    if truncated:
        vocab_warning(truncated, ref)
    merged = [kp for kp in plans if kp.merge]
    if spec.check_keys is not None and merged:
        try:
            spec.check_keys([kp.key for kp in merged], merged[0].per_model)
        except ValueError as e:
            raise MergeConfigError(f"merge_method {spec.name!r}: {e}") from None
    plan = Plan(spec, base, list(inputs), plans, seed, dtype, sidecars, TiedOutputs(tied) if tied else None)
    if plan.needs_stats() and spec.stats is None:
        for i, src in enumerate(inputs):
            ds = {kp.per_model[i].density for kp in plans if kp.merge}
            if len(ds) > 1:
                raise MergeConfigError(f"scope 'global' needs one density per model; {src.name} has "
                                       f"{sorted(ds)} across tensors")
    return plan


def _load(src: Source, key: str, dtype: torch.dtype | None, rows: int | None = None) -> torch.Tensor:
    t = src.get(key) if rows is None else src.get(key)[:rows]
    return t.to(dtype) if dtype is not None and t.is_floating_point() else t


def _load_key(plan: Plan, kp: KeyPlan):
    if not kp.merge:
        return None, [_load(plan.ref, kp.key, plan.dtype)]
    rows = kp.shape[0] if kp.tail else None  # vocab truncation: only the common rows are merged
    dtype = None if plan.spec.casts_inputs and plan.dtype == torch.float32 else plan.dtype
    base = _load(plan.base, kp.key, dtype, rows) if plan.base is not None else None
    return base, [_load(s, kp.key, dtype, rows) for s in plan.inputs]


def _load_sidecars(plan: Plan, kp: KeyPlan) -> list[torch.Tensor] | None:
    """Each model's sidecar tensor for a merged key (e.g. its Fisher), as stored: never cast to the merge dtype."""
    return [s.get(kp.key) for s in plan.sidecars] if kp.merge and plan.sidecars else None


def _load_merge_inputs(plan: Plan, kp: KeyPlan):
    """(base, tensors, sidecar tensors or None): what _merge_key needs, e.g. for a reader thread."""
    return (*_load_key(plan, kp), _load_sidecars(plan, kp))


def _merge_key(plan: Plan, kp: KeyPlan, base, tensors, thresholds, sidecars=None) -> torch.Tensor:
    if kp.tied_to is not None:
        return plan.tied.take(kp.tied_to)
    if not kp.merge:
        out = tensors[0].to(kp.out_dtype)
    else:
        if sidecars is None:
            sidecars = _load_sidecars(plan, kp)
        ctx = TensorContext(kp.key, plan.seed, list(range(len(plan.inputs))), thresholds, sidecars, kp.out_dtype)
        out = plan.spec.kernel(base, tensors, kp.per_model, kp.params, ctx).to(kp.out_dtype)
        if kp.tail:
            out = append_rows(out, kp.key, kp.tail)
    if plan.tied is not None:
        plan.tied.keep(kp.key, out)
    return out


def _abs_deltas(base: torch.Tensor, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    b = base.float()
    return [(t.float() - b).abs() for t in tensors]


class StatsRun:
    """What a global-statistics function (``MethodSpec.stats``, default :func:`trim_thresholds`) works with:
    the merged tensors' plans, D (their total size), and :meth:`order_stats`, which resolves exact per-model
    order statistics of values derived key by key: in memory with ``kthvalue`` on the concatenation,
    streaming with radix selection over 2 (float32) or 4 (float64) sweeps. Both give the same floats."""

    def __init__(self, plan: Plan, streaming: bool, progress: bool = False):
        self.plan, self.streaming, self.progress = plan, streaming, progress
        self.merged = [kp for kp in plan.keys if kp.merge]
        self.total = sum(math.prod(kp.shape) for kp in self.merged)
        self.n_models = len(plan.inputs)

    def load_dtype(self, kp: KeyPlan) -> torch.dtype:
        """dtype of the base tensor (else the first model's) as the kernel will receive it."""
        return self.plan.dtype or self.plan.ref.dtype(kp.key)

    def order_stats(self, values: Callable, ranks: Sequence[Sequence[int]], dtype: torch.dtype = torch.float32,
                    desc: str = "statistics") -> list[list[float]]:
        """``values(base, tensors, kp)`` -> one tensor (or None) per model for one key; ``ranks[i]``: the
        1-indexed ascending ranks wanted for model i. Returns the values at those ranks, per model."""
        active = [i for i, r in enumerate(ranks) if r]
        if not active:
            return [[] for _ in ranks]
        if not self.streaming:
            chunks: dict[int, list] = {i: [] for i in active}
            for kp in self.merged:
                got = values(*_load_key(self.plan, kp), kp)
                for i in active:
                    chunks[i].append(got[i].reshape(-1))
            cat = {i: torch.cat(chunks.pop(i)) for i in active}
            return [[kth_smallest(cat[i], k) for k in r] if r else [] for i, r in enumerate(ranks)]
        sel = {i: StreamingOrderStats(ranks[i], dtype) for i in active}
        passes = sel[active[0]].passes
        for sweep in range(passes):
            bar = tqdm(total=len(self.merged), desc=f"{desc} ({sweep + 1}/{passes})", unit="tensor",
                       disable=not self.progress)
            for kp, (base, ts) in prefetch(self.merged, lambda kp: _load_key(self.plan, kp)):
                got = values(base, ts, kp)
                for i in active:
                    sel[i].feed(got[i])
                bar.update(1)
            bar.close()
            for s in sel.values():
                s.next_pass()
        return [sel[i].values() if i in sel else [] for i in range(len(ranks))]


def trim_thresholds(run: StatsRun) -> list[float | None]:
    """TIES global scope: per model, the |delta| threshold of its density over all merged tensors."""
    mode = run.merged[0].params.topk_mode
    ranks = [keep_threshold(run.total, run.merged[0].per_model[i].density, mode) for i in range(run.n_models)]
    vals = run.order_stats(lambda base, ts, kp: [_abs_deltas(base, [t])[0] if ranks[i] else None
                                                 for i, t in enumerate(ts)],
                           [[k] if k else [] for k in ranks], desc="statistics")
    return [None if k is None else (math.inf if k == 0 else vals[i][0]) for i, k in enumerate(ranks)]


def _global_stats(run: StatsRun) -> list:
    return (run.plan.spec.stats or trim_thresholds)(run)


def thresholds_in_memory(plan: Plan) -> list:
    return _global_stats(StatsRun(plan, streaming=False))


def prefetch(items: Sequence, load: Callable, depth: int = 2):
    """Yield (item, load(item)) while a background thread loads up to `depth` items ahead."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    end = object()

    def worker():
        try:
            for it in items:
                if stop.is_set():
                    return
                q.put((it, load(it)))
            q.put(end)
        except BaseException as e:  # handed to the consumer
            q.put(("__error__", e))

    th = threading.Thread(target=worker, name="reparam-merge-reader", daemon=True)
    th.start()
    try:
        while True:
            got = q.get()
            if got is end:
                return
            if got[0] == "__error__":
                raise got[1]
            yield got
    finally:
        stop.set()
        while th.is_alive():
            try:
                q.get(timeout=0.05)
            except queue.Empty:
                pass
        th.join()


def thresholds_streaming(plan: Plan, progress: bool = False) -> list:
    """Exact per-model global statistics in streaming sweeps (TIES: histogram, then the located bin)."""
    return _global_stats(StatsRun(plan, streaming=True, progress=progress))


def _per_model_values(model_params: Mapping[str, Any] | None, n: int) -> list[dict[str, Any]]:
    """Pure-function per-model parameters: a scalar for all models, or a list/tuple with one per model."""
    out = [{} for _ in range(n)]
    for name, v in (model_params or {}).items():
        if v is None:
            continue
        if isinstance(v, (list, tuple)):
            if len(v) != n:
                raise MergeConfigError(f"{name}: got {len(v)} values for {n} models")
            for d, x in zip(out, v):
                d[name] = x
        else:
            for d in out:
                d[name] = v
    return out


def merge_state_dicts(method: str, base: Mapping[str, torch.Tensor] | None,
                      models: Sequence[Mapping[str, torch.Tensor]], params: Mapping[str, Any] | None = None,
                      model_params: Mapping[str, Any] | None = None, *, seed: int = 0,
                      exclude: Iterable[str] = (), dtype: torch.dtype | None = None,
                      out_dtype: torch.dtype | None = None, on_mismatch: str = "error",
                      on_vocab_mismatch: str = "error") -> dict[str, torch.Tensor]:
    """Merge in-memory state dicts with a registered method.

    `params` are the method's global parameters (config names, e.g. ``{"lambda": 0.5}``); `model_params`
    maps a per-model parameter name to one value for all models or a list with one value per model.
    """
    spec = get_method(method)
    bsrc = DictSource(base, "base") if base is not None else None
    inputs = [DictSource(m, f"model[{i}]") for i, m in enumerate(models)]
    plan = build_plan(spec, bsrc, inputs, dict(params or {}), _per_model_values(model_params, len(models)),
                      seed=seed, dtype=dtype, out_dtype=out_dtype, exclude=exclude, on_mismatch=on_mismatch,
                      on_vocab_mismatch=on_vocab_mismatch)
    thresholds = thresholds_in_memory(plan) if plan.needs_stats() else None
    out = {}
    for kp in plan.keys:
        b, ts = _load_key(plan, kp)
        out[kp.key] = _merge_key(plan, kp, b, ts, thresholds)
    return out


def _open_sources(cfg: MergeConfig):
    spec = get_method(cfg.merge_method)
    base = SafetensorsSource(cfg.base_model) if cfg.base_model is not None else None
    base_id = Path(cfg.base_model).resolve() if base is not None else None
    inputs, model_params = [], []
    for entry in cfg.models:
        if base_id is not None and Path(entry.path).resolve() == base_id and spec.needs_base:
            continue  # the base model listed among the models: it is the base, not a task vector
        inputs.append(open_input(entry.path, base, cfg.adapter_check_base))  # a model, or an adapter on base
        model_params.append({**cfg.model_defaults, **entry.parameters})
    return spec, base, inputs, model_params


@contextmanager
def _older_objects_frozen():
    """Keep the objects that exist before a merge out of the garbage collector's full collections while it runs.

    A merge allocates enough small objects per tensor to set off a full collection now and then, and each one
    walks every object of the process (torch alone brings several hundred thousand): ~0.1 s per 1B-parameter
    merge on the Python thread that feeds the kernels, 12 ms with them frozen. They are unfrozen afterwards; a
    process that froze objects itself (gc.get_freeze_count() > 0) is left as it is."""
    if gc.get_freeze_count():
        yield
        return
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def merge_models(config: dict | str | Path | MergeConfig, out_dir: str | Path, *, overwrite: bool = False,
                 progress: bool = True, max_shard_size: int | str | None = None, copy_files: bool = True) -> Path:
    """Merge the models of a mergekit-style config (dict or YAML path) into the HF folder `out_dir`.

    Validation (config, parameters, every tensor's presence/shape/dtype) runs first from file headers only;
    nothing is written if it fails. The output appears atomically (temporary folder renamed into place).
    """
    with _older_objects_frozen():
        return _merge_models(config, out_dir, overwrite=overwrite, progress=progress,
                             max_shard_size=max_shard_size, copy_files=copy_files)


def _merge_models(config, out_dir, *, overwrite, progress, max_shard_size, copy_files) -> Path:
    cfg = load_config(config)
    if cfg.output == "adapter":  # `output: adapter`: the merged LoRA adapters written as one PEFT adapter
        from .adapter_merge import merge_adapters
        return merge_adapters(cfg, out_dir, overwrite=overwrite, progress=progress)
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise MergeConfigError(f"output {str(out)!r} exists and is not empty (pass overwrite=True)")
    shard_bytes = parse_size(max_shard_size) if max_shard_size is not None else cfg.max_shard_size
    spec, base, inputs, model_params = _open_sources(cfg)
    try:
        plan = build_plan(spec, base, inputs, cfg.parameters, model_params, seed=cfg.seed, dtype=cfg.dtype,
                          out_dtype=cfg.out_dtype, exclude=cfg.exclude, on_mismatch=cfg.on_mismatch,
                          on_vocab_mismatch=cfg.on_vocab_mismatch)
        thresholds = thresholds_streaming(plan, progress) if plan.needs_stats() else None
    except BaseException:
        for s in ([base] if base else []) + inputs:
            s.close()
        raise

    entries = [(kp.key, kp.out_shape, kp.out_dtype) for kp in plan.keys]
    bar = tqdm(total=sum(nbytes(shape, dt) for _, shape, dt in entries), unit="B", unit_scale=True,
               unit_divisor=1024, desc=f"merge ({spec.name})", disable=not progress)
    stream = prefetch(plan.keys, lambda kp: _load_key(plan, kp))

    def merged():
        for kp, (b, ts) in stream:
            yield _merge_key(plan, kp, b, ts, thresholds)

    done = [0]

    def written(key, size):
        done[0] += 1
        bar.update(size)
        bar.set_postfix(tensors=f"{done[0]}/{len(plan.keys)}", refresh=False)

    try:
        with folder_swap(out) as tmp:
            write_shards(tmp, entries, merged(), shard_bytes, written)
            if copy_files:
                _copy_side_files(plan, cfg, tmp)
            (tmp / "reparam_merge_config.yml").write_text(yaml.safe_dump(_provenance(cfg, plan), sort_keys=False))
    finally:
        stream.close()
        bar.close()
        for s in ([base] if base else []) + inputs + plan.sidecars:
            s.close()
    return out


def _copy_side_files(plan: Plan, cfg: MergeConfig, tmp: Path) -> None:
    folder = plan.ref.folder
    if folder is None:
        return
    for name in COPY_FILES:
        src = folder / name
        if src.is_file():
            shutil.copy2(src, tmp / name)
    cfg_path = tmp / "config.json"
    vocab = max((kp.out_shape[0] for kp in plan.keys if kp.tail), default=None)
    if cfg_path.is_file() and vocab is not None:  # on_vocab_mismatch: truncate kept rows beyond the reference's
        try:
            data = json.loads(cfg_path.read_text())
            if data.get("vocab_size") not in (None, vocab):
                cfg_path.write_text(json.dumps({**data, "vocab_size": vocab}, indent=2) + "\n")
        except (ValueError, TypeError):
            pass
    out_dtype = cfg.out_dtype or cfg.dtype
    if cfg_path.is_file() and out_dtype is not None:
        try:
            data = json.loads(cfg_path.read_text())
            data["torch_dtype"] = str(out_dtype).replace("torch.", "")
            cfg_path.write_text(json.dumps(data, indent=2) + "\n")
        except (ValueError, TypeError):
            pass


def _provenance(cfg: MergeConfig, plan: Plan) -> dict:
    """The config as given, plus the method parameters in effect (defaults included, e.g. TIES scope)."""
    raw = {k: v for k, v in cfg.raw.items()}
    raw.setdefault("seed", cfg.seed)
    out = {"reparam_merge": raw}
    merged = [kp for kp in plan.keys if kp.merge]
    if merged:
        out["effective_parameters"] = {f.name.rstrip("_"): getattr(merged[0].params, f.name)
                                       for f in dataclasses.fields(merged[0].params)}
        out["effective_parameters_tensor"] = merged[0].key
    return out
