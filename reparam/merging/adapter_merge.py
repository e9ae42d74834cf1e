"""LoRA adapters merged in adapter space: N adapters for one base in, one PEFT LoRA adapter out.

``output: adapter`` in a merge config (or :func:`merge_adapters`) writes ``adapter_config.json`` +
``adapter_model.safetensors`` instead of a model; every model entry must be an adapter folder
(adapter_source.py) on ``base_model``. With merged = θ0 + ΔW per adapted module:

* exact (``adapter_rank: exact``, the default for ``linear`` and ``task_arithmetic``): ΔW = Σ_i c_i s_i B_i A_i
  (task arithmetic: c_i = λ w_i, divided by Σ w if normalize; linear: c_i = w_i / Σ w), so the factors are
  concatenated: B = [c_1 s_1 B_1, ..., c_N s_N B_N], A = [A_1; ...; A_N], rank Σ r_i, and the PEFT scale is
  1 (lora_alpha = r). PiSSA counts as its rank-2r LoRA on W0; DoRA has no such form.
* truncated SVD (``adapter_rank: N``, any method): the dense merged update ΔW of each module, exactly as the
  model merge computes it, is replaced by its best rank-N approximation (Eckart–Young) B = U_N √S_N,
  A = √S_N V_Nᵀ; each module's relative error ‖ΔW − B A‖_F / ‖ΔW‖_F and the overall one
  √(Σ‖ΔW − B A‖²) / √(Σ‖ΔW‖²) are measured on the residual and saved in ``reparam_adapter_merge.json``.

Modules with a smaller rank are padded with zero factors, so the adapter has one rank (PEFT's and
reparam's loaders need no rank_pattern). Tensors the adapters save in full (modules_to_save) are merged
densely as in a model merge. Tensors no adapter touches are the base's by construction, so a ``linear``
merge must average (normalize, or weights summing to 1). Module names are the adapters'; adapters that name
one base tensor differently (different model classes) are an error. Factors are written in float32 (or
``out_dtype``); the output folder appears atomically, after every tensor is computed.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import torch
import yaml
from tqdm.auto import tqdm

from ..core.layers import CONV, EMBEDDING, LINEAR
from ..core.svd import svd_split
from ..io.files import write_json, write_safetensors
from ..io.peft_compat import CONFIG_FILE, PREFIX, WEIGHTS_FILE, task_type_of
from .adapter_source import AdapterSource, LoraModule
from .config import MergeConfig, load_config
from .engine import (_load_key, _merge_key, _open_sources, _provenance, build_plan, prefetch,
                     thresholds_streaming)
from .errors import MergeConfigError, MergeValidationError
from .io import folder_swap

REPORT_FILE = "reparam_adapter_merge.json"
EXACT_METHODS = ("linear", "task_arithmetic")


def linear_coefficients(method: str, params, per_model: Sequence, key: str) -> list[float]:
    """c_i with merged = θ0 + Σ_i c_i τ_i, for the linear methods (the divisors of methods/gta.py, linear.py)."""
    w = [float(m.weight) for m in per_model]
    total = sum(w)
    if method == "task_arithmetic":
        divisor = total if params.normalize and abs(total) >= 1e-8 else 1.0
        return [params.lambda_ * x / divisor for x in w]
    if not params.normalize and abs(total - 1.0) > 1e-6:
        raise MergeConfigError(f"linear merge with normalize: false and weights summing to {total} scales the base "
                               f"weights (tensor {key!r}); an adapter cannot express it")
    return [x / total if params.normalize else x for x in w]


def truncated_factors(delta: torch.Tensor, rank: int, compute_dtype=torch.float32):
    """Best rank-k (k = min(rank, shape)) factors of the matrix `delta`: (B, A, ‖ΔW − B A‖_F², ‖ΔW‖_F²)."""
    d = delta.to(compute_dtype)
    k = min(rank, *d.shape)
    norm_sq = float(d.square().sum())
    if norm_sq == 0.0:
        return d.new_zeros(d.shape[0], k), d.new_zeros(k, d.shape[1]), 0.0, 0.0
    U, S, Vh, residual = svd_split(d, k, "principal", compute_dtype, cache=False)
    root = S.sqrt()  # split √S to both factors: balanced scales for any later fine-tuning
    return U * root, root[:, None] * Vh, float(residual.square().sum()), norm_sq


def _as_matrix(t: torch.Tensor, lm: LoraModule) -> torch.Tensor:
    """A weight-shaped update as the d_out x (d_in·kernel) matrix that B A is."""
    return t.flatten(1) if lm.kind == CONV else (t.T if lm.transposed else t)


def _peft_tensors(lm: LoraModule, B: torch.Tensor, A: torch.Tensor, rank: int, weight_shape) -> dict:
    """The module's factors, zero-padded to `rank`, under PEFT's names and shapes."""
    B = torch.cat([B, B.new_zeros(B.shape[0], rank - B.shape[1])], 1)
    A = torch.cat([A, A.new_zeros(rank - A.shape[0], A.shape[1])], 0)
    if lm.kind == CONV:
        A = A.reshape(rank, *weight_shape[1:])
        B = B.reshape(B.shape[0], rank, *[1] * (len(weight_shape) - 2))
    names = ("lora_embedding_A", "lora_embedding_B") if lm.kind == EMBEDDING else ("lora_A.weight", "lora_B.weight")
    return {f"{PREFIX}{lm.module}.{names[0]}": A, f"{PREFIX}{lm.module}.{names[1]}": B}


def _output_names(inputs: Sequence[AdapterSource]) -> tuple[dict[str, LoraModule], dict[str, str]]:
    """base key -> LoraModule (the first adapter's) and base key -> full tensor name; adapters must agree."""
    modules: dict[str, tuple[LoraModule, str]] = {}
    full: dict[str, tuple[str, str]] = {}
    for src in inputs:
        for key, lm in src.lora.items():
            first, who = modules.setdefault(key, (lm, src.name))
            if (first.module, first.kind, first.transposed) != (lm.module, lm.kind, lm.transposed):
                raise MergeValidationError(f"tensor {key!r} is module {first.module!r} ({first.kind}) in {who} "
                                           f"but {lm.module!r} ({lm.kind}) in {src.name}: adapters of different "
                                           f"model classes cannot be merged into one adapter")
        for key, (name, _) in src.full.items():
            first_name, who = full.setdefault(key, (name, src.name))
            if first_name != name:
                raise MergeValidationError(f"tensor {key!r} is {first_name!r} in {who} but {name!r} in {src.name}")
    adapted = {lm.module for lm, _ in modules.values()}
    clash = sorted(key for key, (name, _) in full.items() if key in modules or name.rsplit(".", 1)[0] in adapted)
    if clash:
        raise MergeValidationError(f"tensor(s) {', '.join(clash[:8])} are saved in full by one adapter and belong to "
                                   f"a LoRA module: merge into a model (output: model) instead")
    return {k: lm for k, (lm, _) in modules.items()}, {k: name for k, (name, _) in full.items()}


def _exact_rank_check(cfg: MergeConfig, spec_name: str, inputs: Sequence[AdapterSource]) -> int | None:
    """None for the exact concatenation, else the truncated-SVD rank; errors where exact is impossible."""
    if cfg.adapter_rank not in (None, "exact"):
        return int(cfg.adapter_rank)
    if spec_name not in EXACT_METHODS:
        raise MergeConfigError(f"merge_method {spec_name!r} has no exact adapter form (only "
                               f"{', '.join(EXACT_METHODS)}); set adapter_rank: N for a rank-N truncated SVD")
    dora = [s.name for s in inputs if any(lm.dora for lm in s.lora.values())]
    if dora:
        raise MergeConfigError(f"DoRA adapter(s) {', '.join(dora)} have no exact concatenated form; "
                               f"set adapter_rank: N for a rank-N truncated SVD")
    return None


def _task_type(inputs: Sequence[AdapterSource]) -> str | None:
    for src in inputs:
        task = src.config.get("task_type") if src.format == "peft" else task_type_of(src.config.get("base_model_class"))
        if task:
            return task
    return None


def merge_adapters(config: dict | str | Path | MergeConfig, out_dir: str | Path, *, overwrite: bool = False,
                   progress: bool = True) -> Path:
    """Merge the LoRA adapters of a merge config into one PEFT LoRA adapter folder `out_dir` (module docstring).

    Returns the folder; its ``reparam_adapter_merge.json`` holds the rank and the relative errors."""
    cfg = load_config(config)
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise MergeConfigError(f"output {str(out)!r} exists and is not empty (pass overwrite=True)")
    if cfg.base_model is None:
        raise MergeConfigError("output: adapter needs base_model, the model the adapters were trained on")
    spec, base, inputs, model_params = _open_sources(cfg)
    plan = None
    try:
        plain = [s.name for s in inputs if not isinstance(s, AdapterSource)]
        if plain:
            raise MergeConfigError(f"output: adapter merges LoRA adapters only; not adapter folders: "
                                   f"{', '.join(plain)}")
        svd_rank = _exact_rank_check(cfg, spec.name, inputs)
        plan = build_plan(spec, base, inputs, cfg.parameters, model_params, seed=cfg.seed, dtype=cfg.dtype,
                          out_dtype=torch.float32, exclude=cfg.exclude, on_mismatch=cfg.on_mismatch)
        modules, full = _output_names(inputs)
        merged_keys = [kp for kp in plan.keys if kp.merge]
        if spec.name == "linear":  # tensors no adapter touches must stay the base's
            for kp in merged_keys:
                linear_coefficients(spec.name, kp.params, kp.per_model, kp.key)
        factor_dtype = cfg.out_dtype or torch.float32
        factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # key -> (B, A) matrices, scale folded in
        errors: dict[str, tuple[float, float]] = {}  # key -> (‖residual‖², ‖ΔW‖²)
        saved: dict[str, torch.Tensor] = {}
        if svd_rank is None:
            for kp in merged_keys:
                if kp.key in modules:
                    factors[kp.key] = _concatenate(kp, spec.name, inputs)
        dense = [kp for kp in merged_keys if kp.key in full or (svd_rank is not None and kp.key in modules)]
        thresholds = thresholds_streaming(plan, progress) if dense and plan.needs_stats() else None
        bar = tqdm(total=len(dense), desc=f"merge adapters ({spec.name})", unit="tensor", disable=not progress)
        for kp, (b, ts) in prefetch(dense, lambda kp: _load_key(plan, kp)):
            merged = _merge_key(plan, kp, b, ts, thresholds)  # float32: the plan's out_dtype
            if kp.key in full:
                saved[f"{PREFIX}{full[kp.key]}"] = merged.to(cfg.out_dtype or base.dtype(kp.key))
            else:
                delta = _as_matrix(merged - b.to(merged.dtype), modules[kp.key])
                B, A, res_sq, norm_sq = truncated_factors(delta, svd_rank)
                factors[kp.key], errors[kp.key] = (B, A), (res_sq, norm_sq)
            bar.update(1)
        bar.close()
    finally:
        for s in [base] + inputs + (plan.sidecars if plan is not None else []):
            s.close()
    rank = max((B.shape[1] for B, _ in factors.values()), default=1)
    tensors = dict(saved)
    for key, (B, A) in factors.items():
        tensors.update(_peft_tensors(modules[key], B.to(factor_dtype), A.to(factor_dtype), rank, plan.ref.shape(key)))
    report = _report(cfg, spec.name, inputs, modules, factors, errors, rank, svd_rank)
    _write(out, tensors, _peft_config(cfg, inputs, modules, full, factors, rank), report, _provenance(cfg, plan))
    return out


def _concatenate(kp, method: str, inputs: Sequence[AdapterSource]) -> tuple[torch.Tensor, torch.Tensor]:
    """B = [c_i s_i B_i ...], A = [A_i; ...] over the adapters that adapt this tensor: B A = Σ c_i s_i B_i A_i."""
    coefficients = linear_coefficients(method, kp.params, kp.per_model, kp.key)
    Bs, As = [], []
    for c, src in zip(coefficients, inputs):
        if kp.key in src.lora:
            src.check_weight(kp.key)  # the dense path checks as it reads W0; here only the factors are read
            B, A = src.factors(kp.key)
            Bs.append(c * src.lora[kp.key].scale * B)
            As.append(A)
    return torch.cat(Bs, 1), torch.cat(As, 0)


def _report(cfg, method, inputs, modules, factors, errors, rank, svd_rank) -> dict:
    per_module = {}
    for key, (B, _) in sorted(factors.items()):
        res_sq, norm_sq = errors.get(key, (0.0, 0.0))
        per_module[modules[key].module] = {"rank": B.shape[1], "relative_error": math.sqrt(res_sq / norm_sq)
                                           if norm_sq else 0.0, "delta_norm": math.sqrt(norm_sq)}
    total_res, total_norm = sum(e[0] for e in errors.values()), sum(e[1] for e in errors.values())
    return {"merge_method": method, "mode": "exact" if svd_rank is None else "truncated_svd",
            "adapter_rank": "exact" if svd_rank is None else svd_rank, "rank": rank,
            "base_model": cfg.base_model, "adapters": [s.name for s in inputs],
            "overall_relative_error": math.sqrt(total_res / total_norm) if total_norm else 0.0,
            "modules": per_module}


def _peft_config(cfg, inputs, modules, full, factors, rank) -> dict:
    # PEFT sets fan_in_fan_out per layer from its class (Conv1D or Linear); the flag only names the model's kind.
    conv1d = any(lm.transposed for key, lm in modules.items() if key in factors and lm.kind == LINEAR)
    return {
        "peft_type": "LORA", "task_type": _task_type(inputs), "r": rank, "lora_alpha": rank,  # scale α/r = 1
        "lora_dropout": 0.0, "use_rslora": False, "use_dora": False, "fan_in_fan_out": conv1d,
        "target_modules": sorted(modules[k].module for k in factors),
        "modules_to_save": sorted({name.rsplit(".", 1)[0] for name in full.values()}) or None,
        "bias": "none", "init_lora_weights": True, "inference_mode": True,
        "base_model_name_or_path": cfg.base_model, "rank_pattern": {}, "alpha_pattern": {},
    }


def _write(out: Path, tensors: dict, peft_config: dict, report: dict, provenance: dict) -> None:
    with folder_swap(out) as tmp:
        write_safetensors(tmp / WEIGHTS_FILE, tensors, {"format": "pt"})
        write_json(tmp / CONFIG_FILE, peft_config)
        write_json(tmp / REPORT_FILE, report)
        (tmp / "reparam_merge_config.yml").write_text(yaml.safe_dump(provenance, sort_keys=False))


def format_report(report: dict, worst: int = 5) -> str:
    """A few lines for the terminal: mode, rank, overall error and the modules with the largest errors."""
    lines = [f"adapter merge ({report['merge_method']}, {report['mode']}): rank {report['rank']}, "
             f"{len(report['modules'])} modules, overall relative error {report['overall_relative_error']:.3e}"]
    if report["mode"] != "exact":
        ranked = sorted(report["modules"].items(), key=lambda kv: -kv[1]["relative_error"])[:worst]
        lines += [f"  {m}: rank {v['rank']}, relative error {v['relative_error']:.3e}" for m, v in ranked]
    return "\n".join(lines)
