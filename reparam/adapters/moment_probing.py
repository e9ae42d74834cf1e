"""Moment Probing (MP) and MP+ (spec: specs/adapters/moment_probing.md, Gao et al., ICCV 2023).

MP is a *head* method, not a per-layer weight update: the backbone stays frozen and a new head classifies from
the first-order moment (one token) and a second-order moment (multi-head cross-covariance of the other tokens),
averaging the two logits (§2). MP+ adds PSRP, a token-wise scale/shift of every block's MLP output (§3).
Nothing merges (§7): the head is a new classifier and PSRP is input-dependent; `merge` raises a clear error.

Transformers other than ViT: the "class token" is the encoder's first token ([CLS]) by default; a causal LM has
no summary token in front, so `class_token="last"` uses the last valid token there, and the remaining valid
tokens are the "patches" (padding is masked out, N = number of valid patch tokens per sample).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..core.errors import ConfigError, ReparamError, TargetError
from ..core.layers import LINEAR, Adapter, linear_dims
from ..core.registry import MethodConfig, register
from ..io.files import read_safetensors, write_json, write_safetensors

PAIR_MODES = ("near", "n/2", "cn2")
NO_MERGE = ("moment_probing: nothing to merge — the MP head is a new classifier and MP+'s PSRP recalibration is "
            "token-wise (input-dependent), so it cannot be folded into weights (§7)")
CENTER_MODES = ("scalar", "per_channel")
# Where x' (the block input after the attention residual) and the MLP output live, per architecture:
# (module whose first input is x', module whose output is MLP(...)), as dotted suffixes inside one block.
PSRP_SITES = {
    "bert": ("intermediate", "output.dense"),  # post-LN: LN(x' + b + (1+w)·dense(...)) — PSRP before the residual
    "gpt2": ("ln_2", "mlp"),
    "llama": ("post_attention_layernorm", "mlp"),
}


@dataclass
class MomentProbingConfig:
    num_classes: int
    hidden_size: int
    proj_dim: int = 512
    num_heads: int = 4
    pairs: str = "near"
    center: str = "scalar"  # reference: one scalar mean per sample (pitfall 1); "per_channel" = true covariance
    class_token: str = "first"  # "first" ([CLS] / ViT class token) or "last" (causal LMs)
    psrp: bool = False  # MP+
    psrp_reduction: int = 16
    psrp_zero_init: bool = False  # recommended option (§5): zero up-projections, identity at init

    def __post_init__(self):
        def check(ok, field, why):
            if not ok:
                raise ConfigError(f"moment_probing: invalid {field}={getattr(self, field)!r}: {why}")
        check(self.pairs in PAIR_MODES, "pairs", f"must be one of {PAIR_MODES}")
        check(self.center in CENTER_MODES, "center", f"must be one of {CENTER_MODES}")
        check(self.class_token in ("first", "last"), "class_token", "must be 'first' or 'last'")
        check(self.num_heads >= 2, "num_heads", "needs at least two heads to form pairs")
        check(self.proj_dim % self.num_heads == 0, "proj_dim", f"must be divisible by num_heads={self.num_heads}")
        check(self.proj_dim // self.num_heads >= 7, "proj_dim", f"proj_dim / num_heads must be at least 7: two "
              f"3x3 stride-2 convolutions run over each head's d x d moment (num_heads={self.num_heads})")
        check(self.num_classes >= 1 and self.hidden_size >= 1, "num_classes", "sizes must be positive")

    def head_pairs(self) -> list[tuple[int, int]]:
        h = self.num_heads
        if self.pairs == "near":
            return [(i, i + 1) for i in range(h - 1)]
        if self.pairs == "n/2":
            return [(i, i + h // 2) for i in range(h // 2)]
        return [(i, j) for i in range(h) for j in range(i + 1, h)]


def conv_out(n: int) -> int:
    """Side of a 3×3, stride-2, unpadded convolution's output."""
    return (n - 3) // 2 + 1


def cross_covariance(p: torch.Tensor, q: torch.Tensor, mask: torch.Tensor, center: str) -> torch.Tensor:
    """S = (1/N) P̃ᵀ Q̃ per sample ([B, N, d] → [B, d, d]), then each column scaled to unit L2 norm (pitfall 2).
    mask [B, N] (1 = real token): padded tokens count neither in the mean nor in N."""
    m = mask.unsqueeze(-1).to(p.dtype)
    n = m.sum(1, keepdim=True).clamp_min(1)  # [B, 1, 1]
    if center == "scalar":  # reference: average over tokens *and* channels
        dims, count = (1, 2), n * p.shape[-1]
    else:
        dims, count = (1,), n
    mean_p, mean_q = (p * m).sum(dims, keepdim=True) / count, (q * m).sum(dims, keepdim=True) / count
    s = ((p - mean_p) * m).transpose(1, 2) @ ((q - mean_q) * m) / n
    return F.normalize(s, dim=1)


class MomentProbingHead(nn.Module):
    """§2: logits = (classifier1(class token) + classifier2(convs(cross-covariances))) / 2."""

    def __init__(self, config: MomentProbingConfig):
        super().__init__()
        self.config = config
        d_head = config.proj_dim // config.num_heads
        n_pairs = len(config.head_pairs())
        self.classifier1 = nn.Linear(config.hidden_size, config.num_classes)
        self.proj = nn.Linear(config.hidden_size, config.proj_dim)
        self.head_norm = nn.LayerNorm(d_head)  # one LayerNorm shared by all heads
        self.convs = nn.Sequential(nn.Conv2d(n_pairs, n_pairs, 3, stride=2, bias=False), nn.GELU(),
                                   nn.Conv2d(n_pairs, n_pairs, 3, stride=2, bias=False))
        self.classifier2 = nn.Linear(n_pairs * conv_out(conv_out(d_head)) ** 2, config.num_classes)  # pitfall 3

    def split_tokens(self, x: torch.Tensor, mask: torch.Tensor | None):
        """(class token [B, D], other tokens [B, T-1, D], their mask [B, T-1])."""
        mask = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device) if mask is None else mask.bool()
        if self.config.class_token == "first":
            return x[:, 0], x[:, 1:], mask[:, 1:]
        last = mask.long().cumsum(1).argmax(1)  # index of the last real token (right or left padding)
        rows = torch.arange(x.shape[0], device=x.device)
        others = mask.clone()
        others[rows, last] = False
        return x[rows, last], x, others

    def second_order(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        heads = self.proj(tokens).chunk(self.config.num_heads, dim=-1)
        norm, center = self.head_norm, self.config.center
        return torch.stack([cross_covariance(norm(heads[a]), norm(heads[b]), mask, center)
                            for a, b in self.config.head_pairs()], dim=1)  # [B, pairs, d, d]

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        cls, tokens, tmask = self.split_tokens(hidden, mask)
        logit2 = self.classifier2(self.convs(self.second_order(tokens, tmask)).flatten(1))
        return (self.classifier1(cls) + logit2) / 2

    def parameter_counts(self) -> dict[str, int]:
        """Both conventions of §4: all head parameters, and the official README's (the two classifiers only)."""
        full = sum(p.numel() for p in self.parameters())
        readme = sum(p.numel() for m in (self.classifier1, self.classifier2) for p in m.parameters())
        return {"all": full, "readme": readme}


class PSRP(nn.Module):
    """§3: b(x') + (1 + w(x')) ⊙ mlp_out, with w, b from one shared ReLU bottleneck of x' (no biases)."""

    def __init__(self, dim: int, reduction: int, zero_init: bool):
        super().__init__()
        self.down = nn.Linear(dim, max(1, dim // reduction), bias=False)
        self.up_scale = nn.Linear(self.down.out_features, dim, bias=False)
        self.up_shift = nn.Linear(self.down.out_features, dim, bias=False)
        if zero_init:  # recommended option: MP+ starts as the frozen backbone
            nn.init.zeros_(self.up_scale.weight)
            nn.init.zeros_(self.up_shift.weight)
        self.block_input = None  # x', captured by a pre-hook on the block's site for it

    def forward(self, mlp_out: torch.Tensor) -> torch.Tensor:
        x, self.block_input = self.block_input, None  # keep no reference to the activation after use
        h = torch.relu(self.down(x.to(self.down.weight.dtype)))
        return (self.up_shift(h) + (1 + self.up_scale(h)) * mlp_out.to(h.dtype)).to(mlp_out.dtype)


def find_blocks(backbone: nn.Module, sites: tuple[str, str]) -> list[tuple[str, nn.Module, nn.Module]]:
    """(block name, x' module, MLP module) for every module holding both sites."""
    modules = dict(backbone.named_modules())
    found = []
    for name, _ in modules.items():
        pre = f"{name}.{sites[0]}" if name else sites[0]
        post = f"{name}.{sites[1]}" if name else sites[1]
        if pre in modules and post in modules:
            found.append((name, modules[pre], modules[post]))
    return found


def install_psrp(backbone: nn.Module, config: MomentProbingConfig, psrp_sites=None, active=lambda: True):
    """MP+ (§3): a PSRP in every block of `backbone`, applied by hooks while active(). Returns (modules, handles)."""
    model_type = getattr(getattr(backbone, "config", None), "model_type", None)
    sites = psrp_sites or PSRP_SITES.get(model_type)
    if sites is None:
        raise ConfigError(f"moment_probing: psrp=True needs psrp_sites for model type {model_type!r}; "
                          f"known: {sorted(PSRP_SITES)}")
    blocks = find_blocks(backbone, sites)
    if not blocks:
        raise TargetError(f"moment_probing: no block has both {sites[0]!r} and {sites[1]!r}")
    modules, handles = nn.ModuleDict(), []
    device = next(backbone.parameters()).device
    for name, pre, post in blocks:
        module = PSRP(config.hidden_size, config.psrp_reduction, config.psrp_zero_init).to(device)
        modules[name.replace(".", "_")] = module
        capture = (lambda _m, args, p=module: setattr(p, "block_input", args[0]) if active() else None)
        handles.append(pre.register_forward_pre_hook(capture))
        handles.append(post.register_forward_hook(lambda _m, _a, out, p=module: p(out) if active() else None))
    return modules, handles


class MomentProbingModel(nn.Module):
    """A frozen Hugging Face backbone (anything returning last_hidden_state, e.g. AutoModel / model.model of a
    causal LM) + the MP head, and PSRP in every block for MP+. forward(input_ids, attention_mask) -> logits."""

    def __init__(self, backbone: nn.Module, config: MomentProbingConfig, psrp_sites: tuple[str, str] | None = None):
        super().__init__()
        self.config = config
        backbone = getattr(backbone, "base_model", backbone)  # a *ForSequenceClassification / *ForCausalLM: its body
        self.backbone = backbone.requires_grad_(False)  # final norm included (pitfall 5)
        self.head = MomentProbingHead(config)
        self.psrp, self.hooks = install_psrp(backbone, config, psrp_sites) if config.psrp else (nn.ModuleDict(), [])

    def forward(self, input_ids=None, attention_mask=None, **kwargs):
        if self.config.psrp:
            out = self.backbone(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        else:  # §9: MP needs no backward through the backbone
            with torch.no_grad():
                out = self.backbone(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        return self.head(out.last_hidden_state, attention_mask)

    def trainable_state(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.state_dict().items() if not k.startswith("backbone.")}

    def merge(self):
        raise ReparamError(NO_MERGE)

    def save(self, directory) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        config = json.dumps(asdict(self.config))
        write_safetensors(directory / "moment_probing.safetensors",
                          {k: v.contiguous() for k, v in self.trainable_state().items()}, {"config": config})
        write_json(directory / "moment_probing.json", asdict(self.config))

    @classmethod
    def load(cls, backbone: nn.Module, directory, psrp_sites=None) -> "MomentProbingModel":
        tensors, meta = read_safetensors(Path(directory) / "moment_probing.safetensors")
        model = cls(backbone, MomentProbingConfig(**json.loads(meta["config"])), psrp_sites)
        missing = set(model.trainable_state()) ^ set(tensors)
        if missing:
            raise ReparamError(f"moment_probing: saved tensors do not fit this backbone: {sorted(missing)[:5]}")
        model.load_state_dict(tensors, strict=False)
        return model


# --- the registered method: reparam.adapt(model, make_config("moment_probing"), targets="classifier") ----------

@dataclass
class MomentProbingMethodConfig(MethodConfig):
    """MomentProbingConfig without the sizes, which come from the targeted head (its inputs and outputs)."""
    proj_dim: int = 512
    num_heads: int = 4
    pairs: str = "near"
    center: str = "scalar"
    class_token: str = "first"
    psrp: bool = False
    psrp_reduction: int = 16
    psrp_zero_init: bool = False

    def __post_init__(self):
        self.head_config(1, 1)  # the same checks, the same messages

    def head_config(self, num_classes: int, hidden_size: int) -> MomentProbingConfig:
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return MomentProbingConfig(num_classes=num_classes, hidden_size=hidden_size, **values)


class MomentProbingAdapter(Adapter):
    """Replaces a model's classification head (a Linear: BERT's `classifier`, Llama's `score`) by the MP head, fed
    with the backbone's last hidden states and attention mask, which hooks on `model.base_model` capture in the
    same forward. The head's own weight is ignored; the backbone stays frozen (MP+: PSRP in every block)."""

    supported_kinds = (LINEAR,)
    computes_layer_output = True
    adapts_head = True  # `reparam finetune` targets the task head and trains nothing else

    def __init__(self, layer, config: MomentProbingMethodConfig, init: bool = True):
        super().__init__(layer, config)
        d_in, d_out = linear_dims(layer)
        self.head_config = config.head_config(d_out, d_in)
        self.head = MomentProbingHead(self.head_config)
        self.psrp = nn.ModuleDict()
        self.handles: list = []
        self.hidden = self.mask = None

    @classmethod
    def attach_model(cls, model, name, layers):
        backbone = getattr(model, "base_model", model)
        if backbone is model:
            raise TargetError("moment_probing needs a Hugging Face model with a task head (e.g. "
                              "*ForSequenceClassification): it reads the hidden states of model.base_model")
        for layer in layers:
            layer.adapters[name].hook(backbone, layer, name)

    def hook(self, backbone, layer, name):
        active = (lambda: name in layer.active_adapters and not layer.adapters_disabled)

        def before(_m, args, kwargs):
            self.mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)

        def after(_m, _args, _kwargs, out):
            self.hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]

        self.handles = [backbone.register_forward_pre_hook(before, with_kwargs=True),
                        backbone.register_forward_hook(after, with_kwargs=True)]
        if self.config.psrp:
            self.psrp, more = install_psrp(backbone, self.head_config, active=active)
            self.handles += more

    def layer_output(self, layer, x):
        hidden, mask, self.hidden, self.mask = self.hidden, self.mask, None, None  # no activation kept after use
        if hidden is None:
            raise ReparamError(f"moment_probing: {layer.reparam_name} runs only inside the model's forward, "
                               f"which hands it the backbone's hidden states")
        logits = self.head(hidden.to(self.head.proj.weight.dtype), mask).to(x.dtype)
        # A head applied per token (Llama's `score`: [B, T, H] -> [B, T, C], pooled at the last token afterwards)
        # gets the MP logits at every position, so whichever position the model pools returns them.
        return logits.unsqueeze(1).expand(-1, x.shape[1], -1) if x.dim() == 3 else logits

    def forward(self, layer, x, out):  # behind another adapter on the head: the head's output is replaced
        return self.layer_output(layer, x)

    def delta_weight(self, layer):
        raise ReparamError(NO_MERGE + "; use unload(model, merge_active=False) to remove it")

    def detach_from(self, layer):
        for h in self.handles:
            h.remove()
        self.handles = []


register("moment_probing", MomentProbingMethodConfig, MomentProbingAdapter,
         "Moment Probing: the head classifies from the first token and multi-head cross-covariances of the "
         "others (psrp=True: MP+, with PSRP recalibration in every block); target the classification head")
