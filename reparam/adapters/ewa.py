"""EWA — Experts Weights Averaging (spec: /work/shared/specs/adapters/ewa.md).

During training the FFN layers of the chosen transformer blocks become random-uniform-partition MoEs (RUP-MoE, §1):
each layer holds E experts, stored as offsets D_e from the frozen pretrained weight W0 (expert e = W0 + D_e, so
"every expert = copy of the pretrained FFN" is D_e = 0, §2). A block's tokens are split at random into E balanced
chunks, and the SAME split is used by all FFN layers of the block (fc1 and fc2, or gate/up/down), so every token
goes through one whole expert FFN. After every optimizer step the EWA callback pulls experts toward their mean (§3);
evaluation, merge and unload use the dense FFN W0 + mean_e D_e (weight averaging, §4).

Works on any model whose FFN layer names match `ffn_pattern`: BERT/HF-ViT (intermediate.dense, output.dense),
timm ViT (mlp.fc1/fc2), GPT-2 (mlp.c_fc/c_proj, Conv1D layout), LLaMA-style (mlp.gate/up/down_proj). A BERT
encoder is handled exactly like a ViT: every token, [CLS] included, is partitioned (§1, default "yes").
Only the experts train; the rest of the network trains through modules_to_save (EWA is a training scheme, §5).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..core.errors import ConfigError
from ..core.layers import LINEAR, Adapter, adapter_dtype, is_fan_in_fan_out, wide
from ..core.registry import MethodConfig, register
from ..training.callbacks import Callback

FFN_PATTERN = (r"(intermediate\.dense|(?<!attention\.)output\.dense|"
               r"mlp\.(fc1|fc2|c_fc|c_proj|up_proj|gate_proj|down_proj|dense_h_to_4h|dense_4h_to_h))$")
BLOCK = re.compile(r"^(.*\.(\d+))\.")  # the block path and index: "bert.encoder.layer.3" and 3


@dataclass
class EwaConfig(MethodConfig):
    num_experts: int = 4  # recommended E = 4 (§1; paper value not verified)
    share_rate: float = 0.5  # β of the "mean" form P_e <- (1-β)P_e + β·mean (recommended 0.5, §3; not verified)
    ewa_until_step: int | None = None  # Early EWA: average only on optimizer steps < this; None: always
    blocks: str = "every_other"  # "every_other" (odd block indices: 2nd, 4th, ...; recommended §1), "all", or "1,3,5"
    ffn_pattern: str = FFN_PATTERN  # regex (re.search) on module names selecting the FFN layers
    expert_init: str = "copy"  # "copy": experts = the pretrained FFN (§2); "independent": fresh nn.Linear inits

    def __post_init__(self):
        self.check(isinstance(self.num_experts, int) and self.num_experts >= 2, "num_experts", "must be an int >= 2")
        self.check(0.0 <= self.share_rate <= 1.0, "share_rate", "must be in [0, 1]")
        self.check(self.ewa_until_step is None or self.ewa_until_step >= 0, "ewa_until_step", "must be >= 0")
        self.check(self.expert_init in ("copy", "independent"), "expert_init", "must be 'copy' or 'independent'")
        self.block_indices(0)  # validates `blocks`
        try:
            re.compile(self.ffn_pattern)
        except re.error as e:
            raise ConfigError(f"ewa: invalid ffn_pattern={self.ffn_pattern!r}: {e}") from None

    @staticmethod
    def others_only_rate(beta_prime: float, num_experts: int) -> float:
        """β of the implemented mean form equivalent to the "others-only" form's β' (§3): β = β'·E/(E−1)."""
        return beta_prime * num_experts / (num_experts - 1)

    def block_indices(self, count: int) -> set[int]:
        if self.blocks == "every_other":
            return set(range(1, count, 2))
        if self.blocks == "all":
            return set(range(count))
        try:
            return {int(b) for b in str(self.blocks).split(",")}
        except ValueError:
            raise ConfigError(f"ewa: invalid blocks={self.blocks!r}: use 'every_other', 'all' or indices "
                              f"like '1,3'") from None

    def select_layers(self, layers: dict) -> list[str]:
        ffn = [n for n in layers if re.search(self.ffn_pattern, n) and BLOCK.match(n)]
        count = 1 + max((int(BLOCK.match(n).group(2)) for n in ffn), default=-1)
        chosen = self.block_indices(count)
        selected = [n for n in ffn if int(BLOCK.match(n).group(2)) in chosen]
        if not selected:
            raise ConfigError(f"ewa: no FFN layer of blocks={self.blocks!r} among the targets matches "
                              f"ffn_pattern={self.ffn_pattern!r} (targeted: {', '.join(list(layers)[:6])} ...)")
        return selected


class TokenPartition:
    """The random uniform partition of one block's tokens (§1), drawn once per forward and shared by the block's
    FFN layers. Each layer remembers the draw it last used: a layer that sees that draw again starts a new forward
    and draws afresh, so the first FFN layer of the block draws and the following ones reuse its split."""

    def __init__(self):
        self.draw, self.perm = 0, None

    def chunks(self, user: "EwaAdapter", num_tokens: int, num_experts: int, device) -> list[torch.Tensor]:
        if user.used_draw == self.draw or self.perm is None or self.perm.numel() != num_tokens:
            self.perm = torch.randperm(num_tokens, device=device)
            self.draw += 1
        user.used_draw = self.draw
        return list(self.perm.tensor_split(num_experts))  # balanced: sizes ⌊T/E⌋ or ⌈T/E⌉, no token dropped


class EwaAdapter(Adapter):
    supported_kinds = (LINEAR,)
    computes_layer_output = True  # the layer's output is the experts' (training) or their mean's (eval)

    @classmethod
    def training_callbacks(cls) -> list:
        return [ExpertsAveraging()]

    def __init__(self, layer, config: EwaConfig, init: bool = True):
        super().__init__(layer, config)
        E = config.num_experts
        factory = dict(dtype=adapter_dtype(layer), device=layer.weight.device)
        self.expert_weight = nn.Parameter(torch.zeros(E, *layer.weight.shape, **factory))  # D_e, layer layout
        has_bias = getattr(layer, "bias", None) is not None
        self.expert_bias = nn.Parameter(torch.zeros(E, *layer.bias.shape, **factory)) if has_bias else None
        # The block's FFN layers share one partition object; it is runtime state kept beside (not in) the config
        # fields, so it is neither saved nor compared.
        partitions = vars(config).setdefault("_partitions", {})
        self.partition = partitions.setdefault(BLOCK.match(layer.reparam_name).group(1), TokenPartition())
        self.used_draw = 0
        if init and config.expert_init == "independent":
            self._independent_init(layer)

    @torch.no_grad()
    def _independent_init(self, layer):
        """Each expert a fresh nn.Linear-style init (kaiming-uniform a=√5, bias U(±1/√fan_in)), stored as offsets."""
        fan_in = layer.weight.shape[0] if is_fan_in_fan_out(layer) else layer.weight.shape[1]
        for e in range(self.config.num_experts):
            fresh = torch.empty_like(self.expert_weight[e])
            nn.init.kaiming_uniform_(fresh, a=math.sqrt(5))
            self.expert_weight[e].copy_(fresh - wide(layer.weight))
            if self.expert_bias is not None:
                bound = 1 / math.sqrt(fan_in)
                self.expert_bias[e].uniform_(-bound, bound).sub_(wide(layer.bias))

    def _linear(self, layer, x, weight_offset, bias_offset):
        weight = wide(layer.weight) + weight_offset
        if is_fan_in_fan_out(layer):  # Conv1D stores (d_in, d_out)
            weight = weight.T
        bias = None if bias_offset is None else wide(layer.bias) + bias_offset
        return F.linear(x.to(weight.dtype), weight, bias)

    def layer_output(self, layer, x):
        if not self.training:  # evaluation uses the converted dense FFN: deterministic (§1, §9.5)
            return self._linear(layer, x, self.delta_weight(layer), self.delta_bias(layer)).to(x.dtype)
        flat = x.reshape(-1, x.shape[-1])
        chunks = self.partition.chunks(self, flat.shape[0], self.config.num_experts, x.device)
        outs = [self._linear(layer, flat[idx], self.expert_weight[e],
                             None if self.expert_bias is None else self.expert_bias[e])
                for e, idx in enumerate(chunks)]
        out = torch.cat(outs)
        y = out.new_empty(flat.shape[0], out.shape[-1]).index_copy(0, torch.cat(chunks), out)
        return y.reshape(*x.shape[:-1], -1).to(x.dtype)

    def forward(self, layer, x, out):  # stacked after another adapter: EWA replaces the output, it adds nothing
        raise ConfigError(f"ewa on {layer.reparam_name}: an EWA adapter must be the first active adapter of "
                          f"its layer (it computes the whole FFN output)")

    def delta_weight(self, layer):
        """Conversion back to a dense FFN (§4): W0 + mean_e D_e = mean_e (W0 + D_e)."""
        return self.expert_weight.mean(0)

    def delta_bias(self, layer):
        return None if self.expert_bias is None else self.expert_bias.mean(0)

    @torch.no_grad()
    def average_experts(self, beta: float) -> None:
        """One EWA step (§3): P_e <- (1−β)·P_e + β·P̄; W0 is shared, so it acts on the offsets identically."""
        for p in (self.expert_weight, self.expert_bias):
            if p is not None:
                p.lerp_(p.mean(0, keepdim=True).expand_as(p), beta)


@torch.no_grad()
def ewa_step(model: nn.Module, step: int | None = None) -> None:
    """Apply the EWA step to every active EWA adapter of `model` (call after optimizer.step(), §8.1). With `step`
    (the optimizer step index), adapters whose ewa_until_step is reached are left alone (Early EWA)."""
    from ..core.model import adapted_layers

    for _, layer in adapted_layers(model):
        for name in layer.active_adapters:
            adapter = layer.adapters[name]
            until = getattr(adapter.config, "ewa_until_step", None)
            if isinstance(adapter, EwaAdapter) and (step is None or until is None or step < until):
                adapter.average_experts(adapter.config.share_rate)


class ExpertsAveraging(Callback):
    """EWA's per-iteration step, right after optimizer.step (parameters updated, before EMA/checkpoints, §8)."""

    def after_optimizer_step(self, state):
        ewa_step(state.model, state.global_step)


register("ewa", EwaConfig, EwaAdapter,
         "EWA: FFNs of chosen blocks become random-partition MoEs in training, experts averaged each step; "
         "merges to the mean expert (dense FFN)")
