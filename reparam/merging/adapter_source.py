"""LoRA adapters as merge inputs: an adapter folder on top of ``base_model``, seen as a whole model.

A model entry of a merge config may be an adapter folder, detected from the files present:

* reparam's (``reparam_adapter.safetensors``; methods lora, rslora, pissa, dora), or
* PEFT's LoRA (``adapter_config.json`` + ``adapter_model.safetensors``; rsLoRA, DoRA, rank/alpha patterns).

:class:`AdapterSource` presents every tensor of the base, with each adapted weight replaced by

    W0 + s·B A                               s = α/r (LoRA) or α/√r (rsLoRA); PiSSA: s·(B A − B0 A0)
    m · (W0 + s·B A) / ‖W0 + s·B A‖_row      DoRA, as reparam/adapters/dora.py and PEFT merge it

computed on demand, tensor by tensor, in float32 (float64 for a float64 base); tensors the adapter saves in
full (modules_to_save, PEFT biases) replace the base's. So every merge method takes adapters unchanged.
The factors' shapes are checked against the base's headers when the source opens; a reparam adapter's base
fingerprint (content hash) when each weight is read, unless ``check_base=False``.

Names: an adapted module ``m`` is the base tensor ``m.weight``, with one prefix dropped or added for the
whole adapter when the checkpoint has or lacks the architecture prefix (``bert.``): the edit that matches the
most modules wins; a module still unmatched is an error naming it. Layout: Linear weights are d_out x d_in,
Embedding and HF Conv1D weights d_in x d_out: read off the base shapes (PEFT's ``lora_embedding_*`` keys mark
embeddings); a square weight follows PEFT's ``fan_in_fan_out``, or for reparam the adapter's non-square ones.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from ..adapters.lora import LoraConfig
from ..adapters.lora import pattern_value as peft_pattern_value  # PEFT's rank/alpha_pattern lookup
from ..core.errors import AdapterFileError, BaseModelMismatch, ReparamError
from ..core.layers import CONV, EMBEDDING, LINEAR, wide
from ..core.model import weight_fingerprint
from ..core.registry import get_method
from ..io.adapter_files import TENSORS_FILE, parse_adapter_config
from ..io.files import read_json
from ..io.peft_compat import CONFIG_FILE, PREFIX, WEIGHTS_FILE
from .errors import MergeConfigError, MergeValidationError
from .io import SafetensorsSource, Source
from .params import _EMBED_RE

REPARAM_PARTS = {"lora_A": "A", "lora_B": "B", "lora_A0": "A0", "lora_B0": "B0", "magnitude": "magnitude"}
PEFT_PARTS = {"lora_A.weight": "A", "lora_B.weight": "B", "lora_embedding_A": "A", "lora_embedding_B": "B",
              "lora_magnitude_vector": "magnitude"}
# PEFT options under which the saved factors are not W0 + s·B A on the saved base model.
PEFT_UNSUPPORTED = ("lora_bias", "use_qalora", "layer_replication", "alora_invocation_tokens", "velora_config",
                    "monteclora_config", "use_bdlora", "arrow_config", "kasa_config", "target_parameters",
                    "trainable_token_indices", "megatron_config")
BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")
_LISTED = 8


@dataclass
class LoraModule:
    """One adapted module: where its factors are in the adapter file and how its delta lands on the base."""

    module: str  # name in the adapter (PEFT's base_model.model. removed)
    parts: dict[str, str]  # role (A, B, A0, B0, magnitude) -> tensor name in the adapter file
    scale: float  # s
    kind: str = LINEAR  # LINEAR, CONV or EMBEDDING
    transposed: bool | None = None  # weight stored d_in x d_out; None: inferred from the base shape
    fingerprint: dict | None = None  # reparam: shape and content hash of the weight it was trained on
    key: str = ""  # the base tensor it adapts

    @property
    def dora(self) -> bool:
        return "magnitude" in self.parts


def adapter_format(path: str | Path) -> str | None:
    """'reparam' or 'peft' for an adapter folder, None for anything else."""
    p = Path(path)
    if not p.is_dir():
        return None
    if (p / TENSORS_FILE).is_file():
        return "reparam"
    return "peft" if (p / CONFIG_FILE).is_file() else None


def open_input(path: str | Path, base: Source | None, check_base: bool = True) -> Source:
    """A merge input: an adapter folder on top of `base`, or a model (folder or .safetensors file)."""
    if adapter_format(path) is None:
        return SafetensorsSource(path)
    if base is None:
        raise MergeConfigError(f"{path} is an adapter: merging it needs the base_model it was trained on")
    return AdapterSource(path, base, check_base)


def _listed(names: list[str]) -> str:
    return ", ".join(names[:_LISTED]) + (f" and {len(names) - _LISTED} more" if len(names) > _LISTED else "")


def _rename(rule: tuple[str, str], name: str) -> str:
    drop, add = rule
    return add + (name[len(drop):] if drop and name.startswith(drop) else name)


def prefix_rule(modules: list[str], base_keys: set[str]) -> tuple[str, str]:
    """(drop, add): the one prefix edit that maps the most module names m to base tensors m.weight."""
    unmatched = [m for m in modules if f"{m}.weight" not in base_keys]
    if not unmatched:
        return "", ""
    m = unmatched[0]
    parts = m.split(".")
    rules = [("", "")] + [(".".join(parts[:i]) + ".", "") for i in range(1, len(parts))]
    suffix = f".{m}.weight"
    rules += [("", k[:len(k) - len(suffix) + 1]) for k in sorted(base_keys) if k.endswith(suffix)]
    return max(rules, key=lambda rule: sum(f"{_rename(rule, x)}.weight" in base_keys for x in modules))


class AdapterSource(Source):
    """A LoRA-family adapter folder on top of the base model `base` (see the module docstring)."""

    def __init__(self, path: str | Path, base: Source, check_base: bool = True):
        self.path, self.name, self.base, self.check_base = Path(path), str(path), base, check_base
        self.format = adapter_format(path)
        if self.format is None:
            raise MergeConfigError(f"{path}: not an adapter folder (no {TENSORS_FILE} or {CONFIG_FILE})")
        self.file = self.path / (TENSORS_FILE if self.format == "reparam" else WEIGHTS_FILE)
        if not self.file.is_file():
            raise AdapterFileError(f"{self.path}: no {self.file.name} (only safetensors adapters can be merged)")
        self.tensors = SafetensorsSource(self.file)  # headers only
        self.config = self._reparam_config() if self.format == "reparam" else read_json(self.path / CONFIG_FILE)
        modules, full = self._parse_reparam() if self.format == "reparam" else self._parse_peft()
        base_keys = set(base.keys())
        self.rule = prefix_rule([lm.module for lm in modules], base_keys)
        unmatched = []
        for lm in modules:
            lm.key = f"{_rename(self.rule, lm.module)}.weight"
            if lm.key not in base_keys:
                unmatched.append(lm.module)
        if unmatched:
            raise MergeValidationError(f"{self.file}: adapted module(s) with no weight in base model {base.name}: "
                                       f"{_listed(unmatched)}")
        self.lora = {lm.key: lm for lm in modules}
        # Tensors saved in full: base key -> (name in the model, e.g. classifier.weight; tensor name in the file).
        self.full = {_rename(self.rule, name): (name, file_key) for name, file_key in full.items()}
        self._check_shapes()

    # ---- reading the adapter ------------------------------------------------------------------------------

    def _reparam_config(self) -> dict:
        with safe_open(str(self.file), framework="pt") as f:
            return parse_adapter_config(self.file, f.metadata() or {})

    def _parse_reparam(self) -> tuple[list[LoraModule], dict[str, str]]:
        cfg = self.config
        try:
            method_cfg = get_method(cfg["method"]).config_cls.from_dict(cfg["config"])
        except ReparamError as e:
            raise AdapterFileError(f"{self.file}: {e}") from None
        if not isinstance(method_cfg, LoraConfig):
            raise AdapterFileError(f"{self.file}: method {cfg['method']!r} is not a LoRA-family adapter "
                                   f"(mergeable: lora, rslora, pissa, dora)")
        names = set(self.tensors.keys())
        fingerprints = cfg.get("base_fingerprint") or {}
        modules = [self._module(m, {role: f"{m}.{p}" for p, role in REPARAM_PARTS.items() if f"{m}.{p}" in names},
                                method_cfg.scale, fingerprint=fingerprints.get(m)) for m in cfg["modules"]]
        full = {n: n for n in names if any(n.startswith(f"{m}.") for m in cfg.get("modules_to_save") or [])}
        unexplained = sorted(names - set(full) - {n for lm in modules for n in lm.parts.values()})
        if unexplained:
            raise AdapterFileError(f"{self.file}: tensor(s) of no listed module: {_listed(unexplained)}")
        return modules, full

    def _parse_peft(self) -> tuple[list[LoraModule], dict[str, str]]:
        cfg, where = self.config, self.path / CONFIG_FILE
        if cfg.get("peft_type") != "LORA":
            raise AdapterFileError(f"{where}: peft_type {cfg.get('peft_type')!r} is not supported (only LORA)")
        for opt in PEFT_UNSUPPORTED:
            if cfg.get(opt):
                raise AdapterFileError(f"{where}: {opt}={cfg[opt]!r} is not supported in merges")
        init = cfg.get("init_lora_weights")
        if isinstance(init, str) and init.startswith(BASE_CHANGING_INITS):
            raise AdapterFileError(f"{where}: init_lora_weights={init!r} adapters apply to a modified base model; "
                                   f"save them with path_initial_model_for_weight_conversion to merge them")
        if "lora_alpha" not in cfg:
            raise AdapterFileError(f"{where}: missing 'lora_alpha'")
        parts: dict[str, dict[str, str]] = {}
        embedding, full = set(), {}
        for name in self.tensors.keys():
            if not name.startswith(PREFIX):
                raise AdapterFileError(f"{self.file}: tensor {name!r} lacks PEFT's {PREFIX!r} prefix")
            rest = name[len(PREFIX):]
            suffix = next((s for s in PEFT_PARTS if rest.endswith("." + s)), None)
            if suffix is not None:
                module = rest[:-len(suffix) - 1]
                parts.setdefault(module, {})[PEFT_PARTS[suffix]] = name
                if suffix.startswith("lora_embedding"):
                    embedding.add(module)
            elif "lora_" in rest or "trainable_tokens" in rest:
                raise AdapterFileError(f"{self.file}: tensor {name!r} is not a LoRA factor reparam can merge")
            else:
                full[rest] = name  # modules_to_save, or biases trained with bias='all' / 'lora_only'
        modules = []
        for module, p in sorted(parts.items()):
            a_shape = self.tensors.shape(p["A"]) if "A" in p else (1,)
            alpha = float(peft_pattern_value(cfg.get("alpha_pattern"), module, cfg["lora_alpha"]))
            scale = alpha / (math.sqrt(a_shape[0]) if cfg.get("use_rslora") else a_shape[0])  # r: A's rows
            kind = EMBEDDING if module in embedding else CONV if len(a_shape) > 2 else LINEAR
            modules.append(self._module(module, p, scale, kind, True if kind == EMBEDDING else None))
        return modules, full

    def _module(self, name: str, parts: dict[str, str], scale: float, kind: str = LINEAR,
                transposed: bool | None = None, fingerprint: dict | None = None) -> LoraModule:
        if "A" not in parts or "B" not in parts:
            raise AdapterFileError(f"{self.file}: module {name!r} lacks lora_A or lora_B "
                                   f"(has {', '.join(sorted(parts.values()))})")
        return LoraModule(name, parts, scale, kind, transposed, fingerprint)

    # ---- header-only validation ---------------------------------------------------------------------------

    def _check_shapes(self) -> None:
        problems = []
        for lm in self.lora.values():
            problems += self._fit(lm)
        if problems:
            raise MergeValidationError(f"{self.file} does not fit base model {self.base.name}:\n  "
                                       + "\n  ".join(problems[:20]))
        # A square weight's layout is not in its shape: PEFT's fan_in_fan_out says it; for reparam, a model whose
        # non-square Linear weights are all d_in x d_out is a Conv1D model (GPT-2).
        known = [lm.transposed for lm in self.lora.values() if lm.kind == LINEAR and lm.transposed is not None]
        square_default = (bool(self.config.get("fan_in_fan_out")) if self.format == "peft"
                          else bool(known) and all(known))
        for lm in self.lora.values():
            if lm.transposed is None:
                lm.transposed = square_default

    def _fit(self, lm: LoraModule) -> list[str]:
        shape = self.tensors.shape
        where = f"module {lm.module!r}"
        a, b = shape(lm.parts["A"]), shape(lm.parts["B"])
        if len(b) < 2 or len(a) < 2 or b[1] != a[0] or len(a) != len(b):
            return [f"{where}: lora_B {list(b)} and lora_A {list(a)} are not factors of one rank"]
        for extra, like in (("A0", a), ("B0", b)):
            if extra in lm.parts and shape(lm.parts[extra]) != like:
                return [f"{where}: lora_{extra} has shape {list(shape(lm.parts[extra]))}, expected {list(like)}"]
        for role in lm.parts:
            if not self.tensors.dtype(lm.parts[role]).is_floating_point:
                return [f"{where}: {lm.parts[role]} has dtype {self.tensors.dtype(lm.parts[role])} (not a float)"]
        w = self.base.shape(lm.key)
        if len(a) > 2:
            lm.kind, expected = CONV, (b[0], *a[1:])
        else:
            straight, flipped = (b[0], a[1]), (a[1], b[0])
            if lm.transposed is None:  # read the layout off the base shape (PEFT fixes fan_in_fan_out per layer)
                lm.transposed = None if straight == flipped else w == flipped
                if lm.transposed and _EMBED_RE.search(lm.key):
                    lm.kind = EMBEDDING
            expected = flipped if lm.transposed else straight
        if w != tuple(expected):
            return [f"{where}: lora_B {list(b)} x lora_A {list(a)} gives a {list(expected)} update, but "
                    f"{lm.key!r} in {self.base.where(lm.key)} has shape {list(w)}"]
        if lm.fingerprint and list(lm.fingerprint.get("shape", w)) != list(w):
            return [f"{where}: trained on a weight of shape {lm.fingerprint['shape']}, {lm.key!r} has {list(w)}"]
        if lm.dora:
            if lm.kind != LINEAR:
                return [f"{where}: DoRA on a {lm.kind} layer cannot be merged (only Linear layers)"]
            if shape(lm.parts["magnitude"]) != (b[0],):
                return [f"{where}: DoRA magnitude has shape {list(shape(lm.parts['magnitude']))}, expected [{b[0]}]"]
        return []

    # ---- the Source interface -----------------------------------------------------------------------------

    def keys(self):
        return self.base.keys() + sorted(set(self.full) - set(self.base.keys()))

    def shape(self, key):
        return self.tensors.shape(self.full[key][1]) if key in self.full else self.base.shape(key)

    def dtype(self, key):
        if key in self.full:
            return self.tensors.dtype(self.full[key][1])
        bdt = self.base.dtype(key)
        return (torch.float64 if bdt == torch.float64 else torch.float32) if key in self.lora else bdt

    def where(self, key):
        if key in self.full:
            return f"{self.file} ({self.full[key][1]})"
        return f"{self.file} (module {self.lora[key].module})" if key in self.lora else self.base.where(key)

    def factors(self, key: str, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, A) as matrices, d_out x rank and rank x (d_in·kernel), with s·B A the module's update
        (s = self.lora[key].scale); PiSSA's initial factors are appended: B = [B, B0], A = [A; −A0]."""
        lm = self.lora[key]
        B, A = (self.tensors.get(lm.parts[r]).to(dtype) for r in ("B", "A"))
        if "A0" in lm.parts:
            B = torch.cat([B, self.tensors.get(lm.parts["B0"]).to(dtype)], 1)
            A = torch.cat([A, -self.tensors.get(lm.parts["A0"]).to(dtype)], 0)
        return B.flatten(1), A.flatten(1)

    def check_weight(self, key: str, W0: torch.Tensor | None = None) -> None:
        """BaseModelMismatch if a reparam adapter was trained on other weights than the base's `key` (W0)."""
        lm = self.lora[key]
        if not (self.check_base and lm.fingerprint):
            return
        found = weight_fingerprint(self.base.get(key) if W0 is None else W0)["hash"]
        if found != lm.fingerprint.get("hash"):
            raise BaseModelMismatch(
                f"{self.file}: module {lm.module} was trained on other weights than {lm.key!r} in "
                f"{self.base.where(key)} (content hash {found} != {lm.fingerprint.get('hash')}); "
                f"set adapter_check_base: false to merge anyway")

    def get(self, key):
        if key in self.full:
            return self.tensors.get(self.full[key][1])
        if key not in self.lora:
            return self.base.get(key)
        lm = self.lora[key]
        W0 = self.base.get(key)
        self.check_weight(key, W0)
        W = wide(W0)
        B, A = self.factors(key, W.dtype)
        update = lm.scale * (B @ A)  # d_out x (d_in·kernel)
        if lm.kind == CONV:
            return W + update.reshape(W.shape)
        mat = W.T if lm.transposed else W
        merged = mat + update
        if lm.dora:
            magnitude = self.tensors.get(lm.parts["magnitude"]).to(W.dtype)
            merged = (magnitude / torch.linalg.norm(merged, dim=1))[:, None] * merged
        return merged.T if lm.transposed else merged

    def close(self):
        self.tensors.close()
