"""PEFT LoRA files both ways, without PEFT installed: `adapter_config.json` + `adapter_model.safetensors`.

PEFT's keys are `base_model.model.<module>.lora_A.weight` / `.lora_B.weight` (Linear, Conv),
`.lora_embedding_A` / `.lora_embedding_B` (Embedding), `.lora_magnitude_vector` (DoRA), and
`base_model.model.<module>.<param>` for modules_to_save. Our tensors have the same shapes.
A PiSSA adapter exports as the rank-2r LoRA on the original W0 of lora.md §2.3. Any other method whose
adapter has `peft_lora_factors(layer) -> (A, B)` (its update on the original W0 as B A at scale 1, e.g. SVFit)
exports as a LoRA with alpha = r, per-module ranks in rank_pattern / alpha_pattern.
Imported rank_pattern / alpha_pattern become LoraConfig.r_pattern / alpha_pattern (same matching as PEFT).
"""
from __future__ import annotations

import math
import re
from pathlib import Path

import torch
from torch import nn

from ..core.errors import AdapterFileError, ConfigError
from ..core.layers import EMBEDDING, is_fan_in_fan_out
from ..core.model import adapt, delete_adapter, get_record
from ..core.registry import get_method
from .adapter_files import load_state
from .files import read_json, read_safetensors, write_json, write_safetensors

PREFIX = "base_model.model."
CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
EXPORTABLE = ("lora", "rslora", "pissa", "dora", "soma")


def _peft_names(adapter) -> dict[str, str]:
    """Our state-dict key -> PEFT's key suffix."""
    if getattr(adapter, "kind", None) == EMBEDDING:
        return {"lora_A": "lora_embedding_A", "lora_B": "lora_embedding_B"}
    names = {"lora_A": "lora_A.weight", "lora_B": "lora_B.weight"}
    if hasattr(adapter, "magnitude"):
        names["magnitude"] = "lora_magnitude_vector"
    return names


def task_type_of(cls: str | None) -> str | None:
    """PEFT's task_type for a model class name (BertForSequenceClassification -> SEQ_CLS), or None."""
    for suffix, task in (("ForSequenceClassification", "SEQ_CLS"), ("ForCausalLM", "CAUSAL_LM"),
                         ("ForTokenClassification", "TOKEN_CLS"), ("ForQuestionAnswering", "QUESTION_ANS")):
        if cls and cls.endswith(suffix):
            return task
    return None


def _pissa_alpha_factor(cfg) -> float:
    """α' / α of PiSSA's rank-2r export: s = α/r (or α/√r) unchanged at twice the rank."""
    return math.sqrt(2) if getattr(cfg, "use_rslora", False) else 2


def export_peft(model: nn.Module, directory, name: str = "default") -> Path:
    """Write adapter `name` in PEFT's LoRA format; peft.PeftModel.from_pretrained gives the same logits."""
    rec = get_record(model, name)
    factored = hasattr(get_method(rec.config.method).adapter_cls, "peft_lora_factors")
    if rec.config.method not in EXPORTABLE and not factored:
        raise AdapterFileError(f"method {rec.config.method!r} has no PEFT LoRA export (exportable: {', '.join(EXPORTABLE)})")
    cfg = rec.config
    modules = dict(model.named_modules())
    tensors, pissa, fan_in_fan_out, ranks = {}, False, False, {}
    module_r, module_alpha, biases = {}, {}, {}  # non-factored: each module's exported (r, alpha)
    for m in rec.modules:
        layer = modules[m]
        adapter = layer.adapters[name]
        fan_in_fan_out |= is_fan_in_fan_out(layer)
        state = {k: v for k, v in adapter.state_dict().items() if k in ("lora_A", "lora_B", "magnitude")}
        if factored:  # ΔW on W0 = B A at scale 1; the rank may differ per module
            A, B = adapter.peft_lora_factors(layer)
            state, ranks[m] = {"lora_A": A, "lora_B": B}, A.shape[0]
        else:  # the adapter's config has the module's own r and alpha (r_pattern / alpha_pattern resolved)
            module_r[m], module_alpha[m] = adapter.config.r, adapter.config.alpha
        if not factored and adapter.pissa:  # W_res + s·BA = W0 + s·(BA − B0A0): a rank-2r LoRA on W0
            pissa = True
            state["lora_A"] = torch.cat([adapter.lora_A, -adapter.lora_A0], 0)
            state["lora_B"] = torch.cat([adapter.lora_B, adapter.lora_B0], 1)
            module_r[m], module_alpha[m] = 2 * module_r[m], module_alpha[m] * _pissa_alpha_factor(cfg)
        bias = adapter.delta_bias(layer)
        if bias is not None:  # PEFT's lora_bias: lora_B's bias, which PEFT scales by s like B A
            biases[m] = bias.detach() / (1.0 if factored else adapter.scale)
        for k, peft_key in _peft_names(adapter).items():
            tensors[f"{PREFIX}{m}.{peft_key}"] = state[k]
    if biases:  # lora_bias is one switch for all modules: those without a bias offset get zeros
        for m in rec.modules:
            out_features = tensors[f"{PREFIX}{m}.lora_B.weight"].shape[0]
            tensors[f"{PREFIX}{m}.lora_B.bias"] = biases.get(m, torch.zeros(out_features))
    for m in rec.modules_to_save:
        for k, v in modules[m].state_dict().items():
            tensors[f"{PREFIX}{m}.{k}"] = v
    r, alpha = getattr(cfg, "r", None), getattr(cfg, "alpha", None)
    if pissa:  # keep the scale s with twice the rank; modules of another rank (SoMA's rank_ramp) keep s = α/r too
        r, alpha = 2 * cfg.r, cfg.alpha * _pissa_alpha_factor(cfg)
    # Modules whose r / alpha differ from the global ones (r_pattern, SoMA's rank_ramp): exact-name patterns.
    rank_pattern = {re.escape(m): k for m, k in module_r.items() if k != r}
    alpha_pattern = {re.escape(m): a for m, a in module_alpha.items() if a != alpha}
    if ranks:  # scale 1 = alpha / r: the most common rank is r, the others go in the patterns (exact names)
        r = alpha = max(sorted(set(ranks.values())), key=list(ranks.values()).count)
        rank_pattern = alpha_pattern = {re.escape(m): k for m, k in ranks.items() if k != r}
    task_type = task_type_of(type(model).__name__)
    if task_type == "SEQ_CLS" and not rec.modules_to_save:
        # PEFT's SEQ_CLS adds the classifier to modules_to_save and then expects its weights in the file; an
        # adapter that left the head untouched loads as a plain PeftModel instead (same forward).
        task_type = None
    config = {
        "peft_type": "LORA", "task_type": task_type, "r": r, "lora_alpha": alpha,
        "lora_dropout": getattr(cfg, "dropout", 0.0), "use_rslora": getattr(cfg, "use_rslora", False),
        "use_dora": cfg.method == "dora",
        "target_modules": rec.modules, "modules_to_save": rec.modules_to_save or None,
        "fan_in_fan_out": fan_in_fan_out, "bias": "none", "init_lora_weights": True, "inference_mode": True,
        "base_model_name_or_path": getattr(getattr(model, "config", None), "_name_or_path", None),
        "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern,
    }
    if biases:  # only then: PEFT < 0.14 has no lora_bias field
        config["lora_bias"] = True
    directory = Path(directory)
    write_safetensors(directory / WEIGHTS_FILE, tensors, {"format": "pt"})
    write_json(directory / CONFIG_FILE, config)
    return directory


def import_peft(model: nn.Module, directory, name: str = "default") -> nn.Module:
    """Load a LoRA / rsLoRA / DoRA adapter written by PEFT onto `model`; it becomes active."""
    directory = Path(directory)
    cfg_path, weights_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
    peft_cfg = read_json(cfg_path)
    if peft_cfg.get("peft_type") != "LORA":
        raise AdapterFileError(f"{cfg_path}: peft_type {peft_cfg.get('peft_type')!r} is not supported (only LORA)")
    if peft_cfg.get("lora_bias") or peft_cfg.get("bias", "none") != "none":
        raise AdapterFileError(f"{cfg_path}: LoRA biases (bias={peft_cfg.get('bias')!r}) are not supported")
    for key in ("r", "lora_alpha", "target_modules"):
        if key not in peft_cfg:
            raise AdapterFileError(f"{cfg_path}: missing {key!r}")
    tensors, _ = read_safetensors(weights_path)
    method = "dora" if peft_cfg.get("use_dora") else "lora"
    try:  # rank_pattern / alpha_pattern: per-module r / alpha, matched as PEFT matches them (lora.pattern_value)
        config = get_method(method).config_cls(r=int(peft_cfg["r"]), alpha=float(peft_cfg["lora_alpha"]),
                                               dropout=float(peft_cfg.get("lora_dropout") or 0.0),
                                               use_rslora=bool(peft_cfg.get("use_rslora", False)),
                                               r_pattern=dict(peft_cfg.get("rank_pattern") or {}),
                                               alpha_pattern=dict(peft_cfg.get("alpha_pattern") or {}))
    except ConfigError as e:
        raise AdapterFileError(f"{cfg_path}: {e}") from None
    targets = peft_cfg["target_modules"]
    targets = "re:" + targets if isinstance(targets, str) else targets  # PEFT: a string is a full-name regex
    # PEFT keeps modules_to_save out of the adapted set and saves them whole.
    to_save = peft_cfg.get("modules_to_save") or []
    present = {k[len(PREFIX):].rsplit(".", 1)[0] for k in tensors if k.startswith(PREFIX)}
    to_save = [m for m in to_save if any(p == m or p.endswith("." + m) for p in present)]
    adapt(model, config, targets=targets, name=name, init=False, modules_to_save=to_save or None,
          exclude=to_save or None)
    try:
        rec = get_record(model, name)
        modules = dict(model.named_modules())
        ours = {}
        for m in rec.modules:
            for k, peft_key in _peft_names(modules[m].adapters[name]).items():
                if f"{PREFIX}{m}.{peft_key}" in tensors:
                    ours[f"{m}.{k}"] = tensors.pop(f"{PREFIX}{m}.{peft_key}")
        for m in rec.modules_to_save:
            for k in modules[m].state_dict():
                if f"{PREFIX}{m}.{k}" in tensors:
                    ours[f"{m}.{k}"] = tensors.pop(f"{PREFIX}{m}.{k}")
        if tensors:
            raise AdapterFileError(f"{weights_path}: tensors matching nothing in the model: {', '.join(sorted(tensors)[:8])}")
        load_state(model, name, ours, weights_path)
    except BaseException:
        delete_adapter(model, name)
        raise
    return model
