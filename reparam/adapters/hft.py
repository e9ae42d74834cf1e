"""HFT, Half Fine-Tuning (Hui et al., arXiv 2404.18466; specs/adapters/hft.md): in each round a seeded random half
of the targeted weight tensors trains in full, the other half keeps its previous value.

    S_round = sample_half(targets, seed + round)      (category level, §2)     W = W0 + ΔW,  ΔW trainable iff in S

The spec's HFT is a pure trainability mask on the model's own tensors (§3). Here each targeted tensor gets a dense
ΔW (zeros at init, the same shape as the weight) so HFT uses reparam's adapter machinery unchanged: the adapted
layer runs ONE matmul with W0 + ΔW (computes_layer_output), only the selected ΔW get weight gradients, merge is
W0 + ΔW (§6: the model stays the original architecture) and the saved file is the task vector θ − θ0. Biases follow
their parent matrix (§2). LayerNorms are not adaptable layer kinds in reparam, so the norm category of §2 is not
covered (they stay frozen).

HftRounds (a training callback, run by reparam.training.train by itself) draws the selection at the start of each
round, sets requires_grad, rewrites the optimizer's param groups to exactly the selected tensors and drops their
optimizer state (§4, pitfalls 2-3), and logs the selection (pitfall 1).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
from torch import nn

from ..core.errors import ConfigError
from ..core.layers import CONV, EMBEDDING, LINEAR, Adapter, adapter_dtype, wide
from ..core.model import active_adapters, adapted_layers, get_record
from ..core.registry import MethodConfig, register
from ..training.callbacks import Callback
from .sara import layer_output

GRANULARITIES = ("category", "param")
ROUNDS = ("epoch", "stage")


@dataclass
class HftConfig(MethodConfig):
    ratio: float = 0.5  # fraction of tensors trainable per round (§2 option, default "half")
    granularity: str = "category"  # "category": half of each category per block (§2); "param": half of all tensors
    rounds: str = "epoch"  # "epoch": re-draw every epoch; "stage": one draw for the whole run (§4)
    round: int = 0  # index of the first round of this run: a later stage (DPO, next CL task) passes round + 1
    seed: int = 0  # selection of round k is drawn from seed + k (§4, reproducible)
    bias: bool = True  # biases follow their parent matrix (§2)

    def __post_init__(self):
        self.check(isinstance(self.ratio, (int, float)) and 0 < self.ratio <= 1, "ratio", "must be in (0, 1]")
        self.check(self.granularity in GRANULARITIES, "granularity", f"must be one of {', '.join(GRANULARITIES)}")
        self.check(self.rounds in ROUNDS, "rounds", f"must be one of {', '.join(ROUNDS)}")
        self.check(isinstance(self.round, int) and self.round >= 0, "round", "must be an integer >= 0")
        self.check(isinstance(self.seed, int), "seed", "must be an integer")
        self.check(isinstance(self.bias, bool), "bias", "must be true or false")


class HftAdapter(Adapter):
    supported_kinds = (LINEAR, CONV, EMBEDDING)
    computes_layer_output = True  # one matmul with W0 + ΔW: no extra cost over full fine-tuning

    @classmethod
    def training_callbacks(cls) -> list:
        return [HftRounds()]

    def __init__(self, layer, config: HftConfig, init: bool = True):
        super().__init__(layer, config)
        factory = dict(dtype=adapter_dtype(layer), device=layer.weight.device)
        self.weight_delta = nn.Parameter(torch.zeros(layer.weight.shape, **factory))
        bias = getattr(layer, "bias", None)
        self.bias_delta = nn.Parameter(torch.zeros(bias.shape, **factory)) \
            if config.bias and isinstance(bias, torch.Tensor) else None

    def layer_output(self, layer, x):
        weight = (wide(layer.weight) + self.weight_delta).to(layer.weight.dtype)
        bias = getattr(layer, "bias", None)
        if self.bias_delta is not None:
            bias = (wide(bias) + self.bias_delta).to(bias.dtype)
        return layer_output(layer, x, weight, bias)

    def forward(self, layer, x, out):
        """Behind another unmerged adapter: add the layer's output for ΔW (+ Δb)."""
        h = x.to(self.weight_delta.dtype) if x.is_floating_point() else x  # embeddings take integer ids
        return out + layer_output(layer, h, self.weight_delta, self.bias_delta).to(out.dtype)

    def delta_weight(self, layer):
        return wide(self.weight_delta.detach())

    def delta_bias(self, layer):
        return None if self.bias_delta is None else wide(self.bias_delta.detach())


def category(module_name: str) -> tuple[str, str]:
    """(block, category) of a module: the block is the last numeric path component (e.g. layer.3), the category
    attention / ffn inside a block, or "other" (embeddings, heads, pooler) outside any block (§2)."""
    numbers = re.findall(r"(?:^|\.)(\d+)(?=\.|$)", module_name)
    if not numbers:
        return "", "other"
    parts = module_name.lower().split(".")
    return numbers[-1], "attention" if any("attn" in p or "attention" in p for p in parts) else "ffn"


def sample_half(names: list[str], config: HftConfig, round_index: int) -> set[str]:
    """The trainable module names of round `round_index`: per (category, block) group ⌊r·n⌋ tensors, plus one more
    in a random subset of the groups so the category total is round(r·N) (§2, FFN 2-of-3 / 1-of-3 scheme)."""
    gen = torch.Generator().manual_seed(config.seed + round_index)
    groups: dict[tuple, list[str]] = {}
    for n in sorted(names):
        key = ("all", "") if config.granularity == "param" else category(n)[::-1]
        groups.setdefault(key, []).append(n)
    chosen: set[str] = set()
    for cat in sorted({k[0] for k in groups}):
        blocks = [k for k in sorted(groups) if k[0] == cat]
        counts = {k: math.floor(config.ratio * len(groups[k])) for k in blocks}
        total = math.floor(config.ratio * sum(len(groups[k]) for k in blocks) + 0.5)
        uneven = [k for k in blocks if counts[k] < config.ratio * len(groups[k])]
        for i in torch.randperm(len(uneven), generator=gen)[: max(total - sum(counts.values()), 0)].tolist():
            counts[uneven[i]] += 1
        for k in blocks:
            members = groups[k]
            chosen.update(members[i] for i in torch.randperm(len(members), generator=gen)[: counts[k]].tolist())
    return chosen


def hft_parameters(model, name: str) -> dict[str, list[nn.Parameter]]:
    """{module name: [ΔW, Δb]} of HFT adapter `name`."""
    return {mod: [p for p in layer.adapters[name].parameters()]
            for mod, layer in adapted_layers(model) if name in layer.adapters}


def select_round(model, name: str, round_index: int) -> set[str]:
    """Make exactly the tensors of round `round_index` trainable (requires_grad); returns their module names."""
    config = get_record(model, name).config
    if not isinstance(config, HftConfig):
        raise ConfigError(f"adapter {name!r} is a {config.method!r} adapter, not hft")
    params = hft_parameters(model, name)
    chosen = sample_half(list(params), config, round_index)
    for mod, ps in params.items():
        for p in ps:
            p.requires_grad_(mod in chosen)
    return chosen


class HftRounds(Callback):
    """Draws each round's selection for every active HFT adapter (§4). The optimizer's param groups are cut to the
    selected tensors (frozen ones get neither updates nor weight decay, pitfall 3) and every HFT tensor's state is
    dropped at a new round (fresh Adam moments, pitfall 2). Other trainable tensors (a task head) are untouched."""

    def __init__(self):
        self.rounds: dict[str, int] = {}  # adapter name -> round in force
        self.groups = None  # the optimizer's original param lists

    def round_of(self, config: HftConfig, state) -> int:
        return config.round + (int(state.epoch + 1e-9) if config.rounds == "epoch" else 0)

    def on_train_begin(self, state):
        self.rounds = {}
        self.on_step_begin(state)

    def on_step_begin(self, state):
        model, optimizer = state.model, state.optimizer
        for name in active_adapters(model):
            config = get_record(model, name).config
            if not isinstance(config, HftConfig) or self.rounds.get(name) == self.round_of(config, state):
                continue
            r = self.rounds[name] = self.round_of(config, state)
            chosen = select_round(model, name, r)
            hft = {id(p) for ps in hft_parameters(model, name).values() for p in ps}
            if optimizer is not None:
                if self.groups is None:
                    self.groups = [list(g["params"]) for g in optimizer.param_groups]
                for g, params in zip(optimizer.param_groups, self.groups):
                    g["params"] = [p for p in params if id(p) not in hft or p.requires_grad]
                for p in list(optimizer.state):
                    if id(p) in hft:
                        del optimizer.state[p]
            state.log({"hft_adapter": name, "hft_round": r, "hft_trainable": sorted(chosen)})

    def state_dict(self):
        return {"rounds": dict(self.rounds)}

    def load_state_dict(self, state):
        self.rounds = {}  # re-drawn (seeded, so identical) at the next step begin


register("hft", HftConfig, HftAdapter,
         "HFT: half fine-tuning, a seeded random half of the tensors (per category) trains each round")
