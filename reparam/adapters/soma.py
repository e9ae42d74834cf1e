"""SoMA (Yun et al., CVPR 2025, arXiv 2412.04077; code name "SoRA"; specs/adapters/soma.md): PiSSA on the
*minor* singular components, so the principal subspace of W0 (its general knowledge) stays frozen.

    W0 = U diag(σ) Vᵀ (exact SVD),   m = indices of the r smallest σ,   s = α/r
    A = diag(√(σ_m/s)) V_mᵀ,   B = U_m diag(√(σ_m/s))          (trainable)
    W_res = W0 − s·B A                                           (frozen; becomes the layer's weight)
    y = x W_resᵀ + b + s·(x Aᵀ) Bᵀ + δb                          (δb: trainable bias offset, bias="all")

The layer is LoRA/PiSSA's (lora.py): the initial factors A0, B0 are saved buffers, so the adapter loads onto the
original checkpoint and exports to PEFT as a rank-2r LoRA on W0, with δb/s as lora_B's bias. The recipe around
it (§3, §5): only blocks >= start_lora_idx are adapted, and weight decay is cosine-annealed (CosineWeightDecay,
which reparam.training.train adds by itself).
"""
from __future__ import annotations

import dataclasses
import math
import re
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from ..core.errors import ConfigError
from ..core.layers import LINEAR, linear_dims, wide
from ..core.model import active_adapters, get_record
from ..core.registry import MethodConfig, register
from ..core.svd import svd
from ..training.callbacks import Callback
from .lora import LoraAdapter

# Block index from a module name: DINOv2 `blocks.<i>.`, BERT/ViT `layer.<i>.`, Llama `layers.<i>.`, GPT-2 `h.<i>.`,
# T5 `block.<i>.`; the first (outermost) match counts.
DEFAULT_BLOCK_PATTERN = r"(?:^|\.)(?:blocks?|layers?|h)\.(\d+)\."
RANK_RAMP = ((20, 8), (16, 4), (12, 2))  # (first block, rank multiplier): r, 2r from 12, 4r from 16, 8r from 20
NITER_PREFIX = "soma_niter_"


@dataclass
class SomaConfig(MethodConfig):
    r: int = 16
    alpha: float = 16.0  # released configs: α = r, s = 1
    dropout: float = 0.0  # the reference never applies its dropout module (§2): an option, off by default
    init: str = "soma"  # exact SVD; "soma_niter_<k>" = randomized SVD, which finds top components only
    first_eigen: bool = False  # True: adapt the principal components instead (= PiSSA)
    start_lora_idx: int = 0  # blocks before it get no adapter and stay frozen (reference DINOv2-L: 8 of 24)
    block_pattern: str | None = DEFAULT_BLOCK_PATTERN  # regex, group 1 = block index; None: no block rule
    rank_ramp: bool = False  # per-block ranks r / 2r / 4r / 8r (RANK_RAMP; unused in the released configs)
    bias: str = "all"  # "all": the biases of the adapted modules train (as a saved offset δb); "none"
    weight_decay_end: float | None = 1e-5  # cosine-anneal weight decay to this over the run; None: no annealing

    def __post_init__(self):
        self.check(isinstance(self.r, int) and not isinstance(self.r, bool) and self.r > 0, "r",
                   "must be a positive integer")
        self.check(0.0 <= self.dropout < 1.0, "dropout", "must be in [0, 1)")
        self.check(self.init == "soma" or self.init.startswith(NITER_PREFIX)
                   and self.init[len(NITER_PREFIX):].isdigit(), "init", "must be soma or soma_niter_<k>")
        self.check(self.init == "soma" or self.first_eigen, "init",
                   "a randomized low-rank SVD returns the top singular components, not the minor ones; "
                   "use init='soma' (exact SVD), or first_eigen=True")
        self.check(isinstance(self.start_lora_idx, int) and self.start_lora_idx >= 0, "start_lora_idx",
                   "must be an integer >= 0")
        if self.block_pattern is not None:
            try:
                groups = re.compile(self.block_pattern).groups
            except re.error as e:
                groups = f"not a valid regex ({e})"
            self.check(groups == 1, "block_pattern", f"must be a regex with one group, the block index; got {groups}")
        self.check(self.block_pattern is not None or not (self.start_lora_idx or self.rank_ramp), "block_pattern",
                   "is needed by start_lora_idx > 0 and rank_ramp")
        self.check(self.bias in ("all", "none"), "bias", "must be 'all' or 'none'")
        self.check(self.weight_decay_end is None or self.weight_decay_end >= 0, "weight_decay_end", "must be >= 0")

    @property
    def scale(self) -> float:
        return self.alpha / self.r

    def block_of(self, module_name: str) -> int | None:
        found = re.search(self.block_pattern, module_name) if self.block_pattern else None
        return int(found.group(1)) if found else None

    def select_modules(self, names):
        """Only modules inside a block numbered >= start_lora_idx; modules outside any block are never adapted."""
        if self.block_pattern is None:
            return names
        kept = [n for n in names if (block := self.block_of(n)) is not None and block >= self.start_lora_idx]
        if not kept:
            blocks = sorted({b for b in map(self.block_of, names) if b is not None})
            raise ConfigError(f"soma: none of the {len(names)} targeted modules lies in a block >= start_lora_idx="
                              f"{self.start_lora_idx} (block_pattern {self.block_pattern!r} finds blocks "
                              f"{blocks or 'none'}), e.g. {names[0]!r}")
        return kept

    def rank_of(self, module_name: str) -> int:
        if not self.rank_ramp:
            return self.r
        block = self.block_of(module_name) or 0
        return self.r * next((mult for first, mult in RANK_RAMP if block >= first), 1)


class SomaAdapter(LoraAdapter):
    supported_kinds = (LINEAR,)

    def __init__(self, layer, config: SomaConfig, init: bool = True):
        d_in, d_out = linear_dims(layer)
        rank = config.rank_of(layer.reparam_name)
        if rank > min(d_in, d_out):
            ramp = f" (r={config.r} with rank_ramp)" if rank != config.r else ""
            raise ConfigError(f"soma on {layer.reparam_name}: rank {rank}{ramp} exceeds min(d_in, d_out)={min(d_in, d_out)}")
        # A ramped module keeps its own rank, and its own scale α/rank as in the reference.
        super().__init__(layer, dataclasses.replace(config, r=rank) if rank != config.r else config, init)
        self.bias_delta = None
        if config.bias == "all" and layer.bias is not None:
            self.bias_delta = nn.Parameter(torch.zeros(d_out, dtype=self.lora_A.dtype, device=self.lora_A.device))

    @classmethod
    def training_callbacks(cls) -> list:
        return [CosineWeightDecay()]

    def svd_init(self):
        init = self.config.init
        niter = None if init == "soma" else int(init[len(NITER_PREFIX):])
        return ("principal" if self.config.first_eigen else "minor"), niter

    @torch.no_grad()
    def initialise_from_svd(self, layer, W):
        if not self.config.first_eigen:  # the exact SVD is cached: the split below reuses it
            sigma = svd(W, self.lora_A.dtype)[1]
            if not sigma[-1] >= 1e-6 * sigma[0]:
                warnings.warn(f"soma on {layer.reparam_name}: sigma_min/sigma_max = {float(sigma[-1] / sigma[0]):.1e} "
                              f"< 1e-6, so A and B start near zero and train slowly at first (spec §9)", stacklevel=2)
        super().initialise_from_svd(layer, W)

    def forward(self, layer, x, out):
        out = super().forward(layer, x, out)
        return out if self.bias_delta is None else out.add_(self.bias_delta.to(out.dtype))

    def delta_bias(self, layer):
        return None if self.bias_delta is None else wide(self.bias_delta)


class CosineWeightDecay(Callback):
    """SoMA's annealed weight decay (§5): each optimizer group that starts with weight decay wd0 > 0 gets
    wd(t) = end + (wd0 − end)·(1 + cos(π·t/T))/2 at optimizer step t of T; groups starting at 0 stay at 0.

    end=None takes weight_decay_end from the model's active SoMA adapter (no annealing when that is None).
    """

    def __init__(self, end: float | None = None):
        self.end = end
        self.initial: list[float] | None = None  # wd0 per group; saved in checkpoints, the optimizer's is annealed

    def on_train_begin(self, state):
        if self.end is None:
            ends = {get_record(state.model, n).config.weight_decay_end for n in active_adapters(state.model)
                    if get_record(state.model, n).config.method == "soma"}
            if len(ends) > 1:
                raise ConfigError(f"soma: active adapters disagree on weight_decay_end ({sorted(map(str, ends))})")
            self.end = ends.pop() if ends else None
        if self.initial is None:
            self.initial = [float(g["weight_decay"]) for g in state.optimizer.param_groups]

    def on_step_begin(self, state):
        if self.end is None:
            return
        progress = min(state.global_step / max(state.total_steps, 1), 1.0)
        cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
        for group, wd0 in zip(state.optimizer.param_groups, self.initial):
            if wd0 > 0:
                group["weight_decay"] = self.end + (wd0 - self.end) * cosine

    def state_dict(self):
        return {"initial": self.initial}

    def load_state_dict(self, state):
        self.initial = state["initial"]


register("soma", SomaConfig, SomaAdapter,
         "SoMA: LoRA from the r smallest singular components of W0 (residual frozen), late blocks only")
