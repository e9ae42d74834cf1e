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
import json
import math
import os
import queue
import re
import shutil
import threading
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
import yaml
from tqdm.auto import tqdm

from .config import MergeConfig, load_config
from .errors import MergeConfigError, MergeValidationError
from .io import (INDEX_NAME, SINGLE_NAME, DictSource, SafetensorsSource, ShardWriter, Source, nbytes, parse_size,
                 plan_shards)
from .methods.base import MethodSpec, TensorContext
from .params import build_params, layer_positions, resolve_all
from .registry import get_method
from .threshold import StreamingKth, keep_threshold, kth_smallest

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


@dataclass
class Plan:
    spec: MethodSpec
    base: Source | None
    inputs: list[Source]
    keys: list[KeyPlan]
    seed: int
    dtype: torch.dtype | None

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
               out_dtype: torch.dtype | None = None, exclude: Iterable[str] = (), on_mismatch: str = "error") -> Plan:
    """Validate everything from headers (no tensor data read) and resolve parameters per tensor."""
    if spec.needs_base and base is None:
        raise MergeConfigError(f"merge_method {spec.name!r} needs a base_model")
    n = len(inputs)
    if n < spec.min_models or (spec.max_models is not None and n > spec.max_models):
        want = (f"exactly {spec.min_models}" if spec.max_models == spec.min_models
                else f"at least {spec.min_models}")
        raise MergeConfigError(f"merge_method {spec.name!r} takes {want} model(s) besides the base model, got {n}")
    ref = base if base is not None else inputs[0]
    sources = ([base] if base is not None else []) + list(inputs)
    ref_keys = sorted(ref.keys())
    ref_set = set(ref_keys)
    key_sets = [set(src.keys()) for src in sources]
    problems: list[str] = []
    for src, have in zip(sources, key_sets):
        extra = sorted(have - ref_set)
        if extra and on_mismatch == "error":
            problems.append(f"{src.name}: {len(extra)} tensor(s) not in {ref.name}: {', '.join(extra[:5])}"
                            + (" ..." if len(extra) > 5 else ""))
    patterns = [re.compile(p) for p in exclude]
    pos = layer_positions(ref_keys)
    plans: list[KeyPlan] = []
    for key in ref_keys:
        shape, rdt = ref.shape(key), ref.dtype(key)
        out_dt = (out_dtype or dtype or rdt) if _float(rdt) else rdt
        merge = _float(rdt) and not any(p.search(key) for p in patterns)
        if merge:
            bad = []
            for src, have in zip(sources, key_sets):
                if src is ref:
                    continue
                if key not in have:
                    bad.append(f"{src.name}: tensor {key!r} is missing (present in {ref.where(key)})")
                elif src.shape(key) != shape:
                    bad.append(f"tensor {key!r}: {src.where(key)} has shape {list(src.shape(key))}, "
                               f"but {ref.where(key)} has shape {list(shape)}")
                elif not _float(src.dtype(key)):
                    bad.append(f"tensor {key!r}: {src.where(key)} has dtype {src.dtype(key)}, "
                               f"{ref.where(key)} has {rdt}")
            if bad and on_mismatch == "skip":
                merge = False
            if on_mismatch == "error":
                problems.extend(bad)
        kp = KeyPlan(key, merge, shape, out_dt)
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
    plan = Plan(spec, base, list(inputs), plans, seed, dtype)
    if plan.needs_stats():
        for i, src in enumerate(inputs):
            ds = {kp.per_model[i].density for kp in plans if kp.merge}
            if len(ds) > 1:
                raise MergeConfigError(f"scope 'global' needs one density per model; {src.name} has "
                                       f"{sorted(ds)} across tensors")
    return plan


def _load(src: Source, key: str, dtype: torch.dtype | None) -> torch.Tensor:
    t = src.get(key)
    return t.to(dtype) if dtype is not None and t.is_floating_point() else t


def _load_key(plan: Plan, kp: KeyPlan):
    if not kp.merge:
        return None, [_load(plan.ref, kp.key, plan.dtype)]
    base = _load(plan.base, kp.key, plan.dtype) if plan.base is not None else None
    return base, [_load(s, kp.key, plan.dtype) for s in plan.inputs]


def _merge_key(plan: Plan, kp: KeyPlan, base, tensors, thresholds) -> torch.Tensor:
    if not kp.merge:
        return tensors[0].to(kp.out_dtype)
    ctx = TensorContext(kp.key, plan.seed, list(range(len(plan.inputs))), thresholds)
    return plan.spec.kernel(base, tensors, kp.per_model, kp.params, ctx).to(kp.out_dtype)


def _abs_deltas(base: torch.Tensor, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    b = base.float()
    return [(t.float() - b).abs() for t in tensors]


def _threshold_ranks(plan: Plan) -> list[int | None]:
    merged = [kp for kp in plan.keys if kp.merge]
    total = sum(math.prod(kp.shape) for kp in merged)
    mode = merged[0].params.topk_mode
    return [keep_threshold(total, merged[0].per_model[i].density, mode) for i in range(len(plan.inputs))]


def _finish_thresholds(ranks, values) -> list[float | None]:
    return [None if k is None else (math.inf if k == 0 else values[i]) for i, k in enumerate(ranks)]


def thresholds_in_memory(plan: Plan) -> list[float | None]:
    ranks = _threshold_ranks(plan)
    merged = [kp for kp in plan.keys if kp.merge]
    values = {}
    for i, k in enumerate(ranks):
        if k:
            chunks = []
            for kp in merged:
                base, ts = _load_key(plan, kp)
                chunks.append(_abs_deltas(base, [ts[i]])[0].reshape(-1))
            values[i] = kth_smallest(chunks, k)
    return _finish_thresholds(ranks, values)


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


def thresholds_streaming(plan: Plan, progress: bool = False) -> list[float | None]:
    """Exact per-model global thresholds in two streaming passes (histogram, then the located bin)."""
    ranks = _threshold_ranks(plan)
    active = [i for i, k in enumerate(ranks) if k]
    values = {}
    if active:
        merged = [kp for kp in plan.keys if kp.merge]
        counters = {i: StreamingKth(ranks[i]) for i in active}
        for step in ("count", "collect"):
            bar = tqdm(total=len(merged), desc=f"statistics ({step})", unit="tensor", disable=not progress)
            for kp, (base, ts) in prefetch(merged, lambda kp: _load_key(plan, kp)):
                absd = _abs_deltas(base, [ts[i] for i in active])
                for i, a in zip(active, absd):
                    getattr(counters[i], step)(a)
                bar.update(1)
            bar.close()
            if step == "count":
                for c in counters.values():
                    c.locate()
        values = {i: c.value() for i, c in counters.items()}
    return _finish_thresholds(ranks, values)


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
                      out_dtype: torch.dtype | None = None, on_mismatch: str = "error") -> dict[str, torch.Tensor]:
    """Merge in-memory state dicts with a registered method.

    `params` are the method's global parameters (config names, e.g. ``{"lambda": 0.5}``); `model_params`
    maps a per-model parameter name to one value for all models or a list with one value per model.
    """
    spec = get_method(method)
    bsrc = DictSource(base, "base") if base is not None else None
    inputs = [DictSource(m, f"model[{i}]") for i, m in enumerate(models)]
    plan = build_plan(spec, bsrc, inputs, dict(params or {}), _per_model_values(model_params, len(models)),
                      seed=seed, dtype=dtype, out_dtype=out_dtype, exclude=exclude, on_mismatch=on_mismatch)
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
        inputs.append(SafetensorsSource(entry.path))
        model_params.append({**cfg.model_defaults, **entry.parameters})
    return spec, base, inputs, model_params


def _swap_into_place(tmp: Path, out: Path) -> None:
    if out.exists():
        old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


def merge_models(config: dict | str | Path | MergeConfig, out_dir: str | Path, *, overwrite: bool = False,
                 progress: bool = True, max_shard_size: int | str | None = None, copy_files: bool = True) -> Path:
    """Merge the models of a mergekit-style config (dict or YAML path) into the HF folder `out_dir`.

    Validation (config, parameters, every tensor's presence/shape/dtype) runs first from file headers only;
    nothing is written if it fails. The output appears atomically (temporary folder renamed into place).
    """
    cfg = load_config(config)
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise MergeConfigError(f"output {str(out)!r} exists and is not empty (pass overwrite=True)")
    shard_bytes = parse_size(max_shard_size) if max_shard_size is not None else cfg.max_shard_size
    spec, base, inputs, model_params = _open_sources(cfg)
    try:
        plan = build_plan(spec, base, inputs, cfg.parameters, model_params, seed=cfg.seed, dtype=cfg.dtype,
                          out_dtype=cfg.out_dtype, exclude=cfg.exclude, on_mismatch=cfg.on_mismatch)
        thresholds = thresholds_streaming(plan, progress) if plan.needs_stats() else None
    except BaseException:
        for s in ([base] if base else []) + inputs:
            s.close()
        raise

    by_key = {kp.key: kp for kp in plan.keys}
    shards = plan_shards([(kp.key, kp.shape, kp.out_dtype) for kp in plan.keys], shard_bytes)
    names = ([SINGLE_NAME] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    cleanup: list[Callable[[], None]] = []
    try:
        total = sum(nbytes(kp.shape, kp.out_dtype) for kp in plan.keys)
        bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=f"merge ({spec.name})",
                   disable=not progress)
        cleanup.append(bar.close)
        stream = prefetch(plan.keys, lambda kp: _load_key(plan, kp))
        cleanup.append(stream.close)
        weight_map = {}
        done = 0
        for name, keys in zip(names, shards):
            writer = ShardWriter(tmp / name, [(k, by_key[k].shape, by_key[k].out_dtype) for k in keys])
            cleanup.append(writer.abort)
            for k in keys:
                kp, (b, ts) = next(stream)
                assert kp.key == k
                merged = _merge_key(plan, kp, b, ts, thresholds)
                writer.write(k, merged)
                weight_map[k] = name
                done += 1
                bar.update(nbytes(kp.shape, kp.out_dtype))
                bar.set_postfix(tensors=f"{done}/{len(plan.keys)}", refresh=False)
            writer.close()
        stream.close()
        bar.close()
        if len(shards) > 1:
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        if copy_files:
            _copy_side_files(plan, cfg, tmp)
        (tmp / "reparam_merge_config.yml").write_text(yaml.safe_dump(_provenance(cfg, plan), sort_keys=False))
        _swap_into_place(tmp, out)
    except BaseException:
        for fn in cleanup:
            fn()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        for s in ([base] if base else []) + inputs:
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
