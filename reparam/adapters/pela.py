"""PELA: a smaller model by low-rank approximation, then distillation from the original (specs/adapters/pela.md).

    W0 = U diag(σ) Vᵀ,   W_L = diag(√σ_r) V_rᵀ (r x d_in),   W_R = U_r diag(√σ_r) (d_out x r)
    y  = (x W_Lᵀ) W_Rᵀ + b + δb,     r = floor(d_in·d_out / (c·(d_in + d_out)))          (§2)
    L  = L_task + α_fd·L_fd + β·L_logit + λ_wpr·L_wpr                                        (§4)
    L_wpr = mean_layers (‖W_R W_L − W0‖_max − ε)²,   L_fd = mean_blocks MSE(h_student, h_teacher)

As an adapter: the factorised layer computes the whole output (the base matmul is skipped), W0 stays frozen in
the layer (the regulariser's target; the adapter loads onto the original checkpoint; unload(merge_active=False)
gives the original back). merge writes the dense W_R W_L (§6). The deliverable is export_factorised: a model
whose Linears are nn.Sequential(Linear(d_in, r, bias=False), Linear(r, d_out)) (§2), see load_factorised.
"""
from __future__ import annotations

import copy
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..core.errors import AdapterFileError, ConfigError
from ..core.layers import LINEAR, Adapter, adapter_dtype, layer_kind, linear_dims, wide
from ..core.registry import MethodConfig, register
from ..core.svd import svd_split
from ..training.callbacks import Callback
from .lora import as_matrix

FORMAT = "pela-factorised"


def pela_rank(d_in: int, d_out: int, compression: float) -> int:
    """§2 rank rule: r(d_in + d_out) ≈ d_in·d_out / c, floored (at least 1)."""
    return max(1, int(d_in * d_out // (compression * (d_in + d_out))))


@dataclass
class PelaConfig(MethodConfig):
    compression: float = 2.0  # c: parameters of a factorised layer ≈ 1/c of the dense one
    r: int | None = None  # a fixed rank instead of the rank rule, capped per layer at min(d_in, d_out) (= exact)
    name_omit: list = field(default_factory=lambda: ["norm", "head", "patch_embed", "downsample"])
    min_out_features: int = 10  # Linears with fewer outputs (small heads) stay dense
    alpha_fd: float = 1.0  # feature distillation weight (DeiT/Swin recipes; ALBEF 0.1); 0 = stage 3, plain fine-tuning
    beta_logit: float = 0.0  # logit MSE weight (DeiT code default 0)
    lambda_wpr: float = 1.0  # weight-perturbation regulariser weight (Swin/ALBEF recipes)
    epsilon: float = 1e-3
    wpr_form: str = "squared_to_eps"  # faithful (ε − δ)²; "hinge": relu(δ − ε)²
    block_pattern: str = r"(.*\.)?(layer|layers|h|blocks|block)\.\d+"  # modules whose outputs are distilled
    svd_dtype: str = "float32"  # spec §8: float32 is adequate; float64 as the reference NumPy code

    def __post_init__(self):
        self.check(self.compression > 1, "compression", "must be > 1")
        self.check(self.r is None or isinstance(self.r, int) and self.r > 0, "r", "must be a positive integer or None")
        self.check(isinstance(self.name_omit, (list, tuple)) and all(isinstance(s, str) for s in self.name_omit),
                   "name_omit", "must be a list of strings")
        for f in ("alpha_fd", "beta_logit", "lambda_wpr", "epsilon"):
            self.check(getattr(self, f) >= 0, f, "must be >= 0")
        self.check(self.wpr_form in ("squared_to_eps", "hinge"), "wpr_form", "must be 'squared_to_eps' or 'hinge'")
        self.check(self.svd_dtype in ("float32", "float64"), "svd_dtype", "must be 'float32' or 'float64'")
        try:
            re.compile(self.block_pattern)
        except re.error as e:
            self.check(False, "block_pattern", f"not a valid regex ({e})")

    def select_layers(self, layers: dict) -> list[str]:
        """§2 eligibility: skip names containing a name_omit word and Linears with out_features < min_out_features."""
        return [n for n, m in layers.items() if not any(w in n for w in self.name_omit)
                and linear_dims(m)[1] >= self.min_out_features]


class PelaAdapter(Adapter):
    supported_kinds = (LINEAR,)
    computes_layer_output = True
    regularizer_reduction = "mean"  # L_wpr is a mean over the factorised layers
    default_regularizer_weight = 1.0  # `reparam finetune` adds reparam.regularizer (λ·L_wpr + α·L_fd) to the loss

    def __init__(self, layer, config: PelaConfig, init: bool = True):
        super().__init__(layer, config)
        d_in, d_out = linear_dims(layer)
        self.r = min(config.r or pela_rank(d_in, d_out, config.compression), d_in, d_out)
        factory = dict(dtype=adapter_dtype(layer), device=layer.weight.device)
        self.weight_L = nn.Parameter(torch.zeros(self.r, d_in, **factory))  # the first Linear, "<name>.0.weight"
        self.weight_R = nn.Parameter(torch.zeros(d_out, self.r, **factory))  # the second, "<name>.1.weight"
        # The second Linear's bias trains (§3) as an offset, so merge/unmerge and W0's checkpoint stay consistent.
        self.bias_delta = nn.Parameter(torch.zeros(d_out, **factory)) if layer.bias is not None else None
        self.dense_before_merge = None  # W0 while merged (merge writes W_R W_L over it)
        if init:
            self.initialise(layer)

    @torch.no_grad()
    def initialise(self, layer):
        dtype = torch.float64 if self.config.svd_dtype == "float64" else self.weight_L.dtype  # float64 base: float64
        U_r, S_r, Vh_r, _ = svd_split(as_matrix(layer, layer.weight), self.r, "principal", dtype)
        root = S_r.sqrt()
        self.weight_L.copy_(root[:, None] * Vh_r)
        self.weight_R.copy_(U_r * root[None, :])

    def factor_bias(self, layer) -> torch.Tensor | None:
        return None if layer.bias is None else layer.bias.to(self.weight_R.dtype) + self.bias_delta

    def layer_output(self, layer, x):
        h = F.linear(x.to(self.weight_L.dtype), self.weight_L)
        return F.linear(h, self.weight_R, self.factor_bias(layer)).to(layer.weight.dtype)

    def forward(self, layer, x, out):  # behind another adapter: the factorised layer still replaces the output
        return self.layer_output(layer, x)

    def product(self) -> torch.Tensor:
        return wide(self.weight_R) @ wide(self.weight_L)

    def delta_weight(self, layer):
        return as_matrix(layer, self.product()) - wide(self.base_weight(layer))

    def delta_bias(self, layer):
        return None if self.bias_delta is None else wide(self.bias_delta)

    def merge_into(self, layer, weight):  # §6: the dense W = W_R W_L, exact; W0 kept to unmerge
        self.dense_before_merge = weight.clone()
        return as_matrix(layer, self.product())

    def unmerge_from(self, layer, weight):
        dense, self.dense_before_merge = self.dense_before_merge, None
        return dense

    def base_weight(self, layer):
        return layer.weight if self.dense_before_merge is None else self.dense_before_merge.to(layer.weight.dtype)

    def regularizer(self, layer):
        if self.config.lambda_wpr == 0:
            return None
        W0 = wide(as_matrix(layer, self.base_weight(layer))).to(self.weight_R.dtype)
        deviation = (self.weight_R @ self.weight_L - W0).abs().flatten().max()  # max entry, not an operator norm
        gap = deviation - self.config.epsilon
        if self.config.wpr_form == "hinge":
            gap = F.relu(gap)
        return self.config.lambda_wpr * gap.square()

    @classmethod
    def training_callbacks(cls):
        return [PelaDistillation()]

    @classmethod
    def model_regularizer(cls, model, name):
        distiller = getattr(model, "reparam_pela_distiller", None)
        return distiller.pop_loss() if distiller is not None and distiller.adapter_name == name else None


def _first_tensor(output):
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)):
        return output[0]
    return output.logits if hasattr(output, "logits") else output[0]


class FeatureDistiller:
    """Stage 2 (§4): a frozen teacher (the un-factorised model) sees each training forward's exact inputs; the
    student's block outputs are captured in its one forward. pop_loss() gives α_fd·L_fd + β·L_logit for it."""

    def __init__(self, model: nn.Module, name: str, config: PelaConfig):
        from ..core.model import unload

        self.adapter_name, self.config = name, config
        self.teacher = unload(copy.deepcopy(model), merge_active=False).eval().requires_grad_(False)
        pattern = re.compile(config.block_pattern)
        blocks = [n for n, _ in model.named_modules() if pattern.fullmatch(n)]
        if config.alpha_fd and not blocks:
            raise ConfigError(f"pela: block_pattern={config.block_pattern!r} matches no module; set it to the "
                              "names of the transformer blocks to distil")
        self.student_h, self.teacher_h, self.teacher_out, self.loss = [], [], None, None
        self.collecting = False
        student, teacher = dict(model.named_modules()), dict(self.teacher.named_modules())
        self.hooks = [model.register_forward_pre_hook(self._run_teacher, with_kwargs=True),
                      model.register_forward_hook(self._compute_loss)]
        for n in blocks:
            self.hooks.append(student[n].register_forward_hook(self._capture(self.student_h)))
            self.hooks.append(teacher[n].register_forward_hook(self._capture(self.teacher_h)))

    def _capture(self, store):
        def hook(module, args, output):
            if self.collecting:
                store.append(_first_tensor(output))
        return hook

    def _run_teacher(self, model, args, kwargs):
        if not (model.training and torch.is_grad_enabled()):  # evaluation: no teacher
            return
        self.student_h.clear()
        self.teacher_h.clear()
        self.collecting = True
        with torch.no_grad():
            self.teacher_out = _first_tensor(self.teacher(*args, **kwargs))

    def _compute_loss(self, model, args, output):
        if not self.collecting:
            return
        self.collecting = False
        if len(self.student_h) != len(self.teacher_h):
            raise ConfigError(f"pela: {len(self.student_h)} student vs {len(self.teacher_h)} teacher hidden states")
        loss = None
        if self.config.alpha_fd and self.student_h:
            fd = sum(F.mse_loss(s, t.to(s.dtype)) for s, t in zip(self.student_h, self.teacher_h)) / len(self.student_h)
            loss = self.config.alpha_fd * fd
        if self.config.beta_logit:
            logit = F.mse_loss(_first_tensor(output), self.teacher_out)
            loss = self.config.beta_logit * logit if loss is None else loss + self.config.beta_logit * logit
        self.loss = loss
        self.student_h.clear()
        self.teacher_h.clear()

    def pop_loss(self):
        loss, self.loss = self.loss, None
        return loss

    def remove(self):
        for h in self.hooks:
            h.remove()


class PelaDistillation(Callback):
    """Attaches a FeatureDistiller for the run (reparam.training.train adds it; with a HF Trainer use
    HFTrainerCallback(method_callbacks(model)) and add reparam.regularizer(model) to the loss)."""

    def on_train_begin(self, state):
        from ..core.model import active_adapters, get_record

        model = state.model
        for name in active_adapters(model):
            config = get_record(model, name).config
            if config.method == "pela" and (config.alpha_fd or config.beta_logit):
                model.reparam_pela_distiller = FeatureDistiller(model, name, config)
                return

    def on_train_end(self, state):
        distiller = state.model.__dict__.pop("reparam_pela_distiller", None)
        if distiller is not None:
            distiller.remove()


def factorised_state(model: nn.Module, name: str = "default") -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """The plain state dict of the factorised model (`<m>.0.weight`, `<m>.1.weight`, `<m>.1.bias` per layer) and
    the rank of each factorised module."""
    from ..core.model import adapted_layers, get_record

    if get_record(model, name).config.method != "pela":
        raise ConfigError(f"adapter {name!r} is not a pela adapter")
    layers = {n: layer for n, layer in adapted_layers(model) if name in layer.adapters}
    state, ranks = {}, {}
    for key, t in model.state_dict().items():
        owner, _, leaf = key.rpartition(".")
        if owner in layers and leaf in ("weight", "bias"):
            continue
        if ".adapters." not in key:
            state[key] = t
    for n, layer in layers.items():
        adapter = layer.adapters[name]
        dtype = layer.weight.dtype
        state[f"{n}.0.weight"] = adapter.weight_L.detach().to(dtype)
        state[f"{n}.1.weight"] = adapter.weight_R.detach().to(dtype)
        if layer.bias is not None:
            state[f"{n}.1.bias"] = adapter.factor_bias(layer).detach().to(dtype)
        ranks[n] = adapter.r
    return state, ranks


def export_factorised(model: nn.Module, directory, name: str = "default") -> Path:
    """Write the factorised model: model.safetensors (metadata format="pela-factorised", pela_ranks as JSON) and,
    for a Hugging Face model, config.json with "pela_ranks". Load with load_factorised."""
    from ..io.files import write_json, write_safetensors

    state, ranks = factorised_state(model, name)
    directory = Path(directory)
    path = directory / "model.safetensors"
    write_safetensors(path, state, {"format": FORMAT, "pela_ranks": json.dumps(ranks)})
    if hasattr(model, "config") and hasattr(model.config, "to_dict"):
        write_json(directory / "config.json", {**model.config.to_dict(), "pela_ranks": ranks})
    return path


def factorise_architecture(model: nn.Module, ranks: dict[str, int]) -> nn.Module:
    """Replace each named Linear (or Conv1D) by nn.Sequential(Linear(d_in, r, bias=False), Linear(r, d_out)),
    uninitialised."""
    modules = dict(model.named_modules())
    for n, r in ranks.items():
        old = modules.get(n)
        if old is None or layer_kind(old) != LINEAR:
            raise AdapterFileError(f"pela: module {n!r} is not a Linear in {type(model).__name__}")
        (d_in, d_out), kw = linear_dims(old), dict(dtype=old.weight.dtype, device=old.weight.device)
        pair = nn.Sequential(nn.Linear(d_in, r, bias=False, **kw),
                             nn.Linear(r, d_out, bias=old.bias is not None, **kw))
        parent, _, leaf = n.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, leaf, pair)
    return model


def load_factorised(directory, model: nn.Module) -> nn.Module:
    """Load export_factorised's output into `model`, a fresh instance of the original architecture (e.g.
    AutoModel...from_config(config) or the original checkpoint): its Linears become the factor pairs."""
    from ..io.files import read_safetensors

    path = Path(directory) / "model.safetensors"
    tensors, metadata = read_safetensors(path)
    if metadata.get("format") != FORMAT:
        raise AdapterFileError(f"{path}: not a PELA factorised model (metadata format={metadata.get('format')!r})")
    factorise_architecture(model, json.loads(metadata["pela_ranks"]))
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as e:
        raise AdapterFileError(f"{path}: does not fit {type(model).__name__} ({str(e).splitlines()[0]})") from None
    return model


register("pela", PelaConfig, PelaAdapter,
         "PELA: each Linear becomes two low-rank factors from its SVD (compression c), distilled from the original")
