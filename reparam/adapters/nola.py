"""NOLA (Koohpayegani et al., ICLR 2024, arXiv 2310.02556; specs/adapters/nola.md): LoRA factors as trained
linear mixtures of frozen pseudo-random bases that are regenerated from integer seeds, never stored.

    A = A_0 + Σ_i α_i A_basis[i]   (r × d_in),    B = Σ_j β_j B_basis[j]   (d_out × r)
    y = x W0ᵀ + b0 + s · (x Aᵀ) Bᵀ,   ΔW = s · B A,   s = alpha / r

Only α (k values) and β (l values) train; the file holds them plus three int64 seeds per layer (A bases,
B bases, the offset A_0), so an adapter is (k + l) floats per layer whatever r, d_in, d_out are.
Bases are drawn U(−1, 1)/√count in float32 by a private CPU torch.Generator (spec §10.1-3: the same numbers on
every machine, the global RNG untouched) and moved to the layer's device. The mixing is an autograd Function
that regenerates the bases in backward instead of keeping them alive (§5); `chunks` bounds the peak memory and
does not change the result (the generator fills the stack sequentially either way).
"""
from __future__ import annotations

import hashlib
import math
import warnings
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..core.layers import LINEAR, Adapter, adapter_dtype, linear_dims, wide
from ..core.registry import MethodConfig, register
from .lora import as_matrix

INITS = ("code", "vit")
GENERATOR = {"device": "cpu", "dtype": "float32"}  # the fixed convention of spec §10.1, recorded with the adapter


@dataclass
class NolaConfig(MethodConfig):
    r: int = 8
    alpha: float = 8.0
    num_basis_A: int = 128  # k; 128 is the default of the authors' PEFT fork (§7); their scripts use 512
    num_basis_B: int = 128  # l
    dropout: float = 0.0
    # "code": α = β = 0 and a frozen Kaiming-uniform offset A_0, so ΔW = 0 at init (official GPT-2/LLaMA code).
    # "vit": no offset, α = 1/k, β = 1/l (official ViT code; ΔW ≠ 0 at init).
    init: str = "code"
    seed: int = 0  # per-layer seeds are derived from it and the module name
    chunks: int = 1  # generate each basis stack in this many pieces (peak memory / chunks; same numbers)
    # Not in the spec: keep the generated bases in memory (k·r·d_in + l·d_out·r floats per layer) instead of
    # regenerating them at each forward and backward; faster on CPU, gives up NOLA's memory saving in training.
    cache_bases: bool = False
    # How the bases were generated (device, dtype, torch version), filled in by adapt and checked at load (§10.1).
    generated_with: dict = field(default_factory=dict)

    def __post_init__(self):
        for name in ("r", "num_basis_A", "num_basis_B", "chunks"):
            value = getattr(self, name)
            self.check(isinstance(value, int) and not isinstance(value, bool) and value > 0, name,
                       "must be a positive integer")
        self.check(0.0 <= self.dropout < 1.0, "dropout", "must be in [0, 1)")
        self.check(self.init in INITS, "init", f"must be one of {', '.join(INITS)}")
        self.check(isinstance(self.seed, int) and not isinstance(self.seed, bool), "seed", "must be an integer")
        self.check(isinstance(self.cache_bases, bool), "cache_bases", "must be true or false")
        self.check(isinstance(self.generated_with, dict), "generated_with", "must be a mapping")

    @property
    def scale(self) -> float:
        return self.alpha / self.r


def layer_seed(seed: int, module: str, factor: str) -> int:
    """A stable 63-bit seed per (config seed, module, factor): distinct bases per layer and factor (§10.5)."""
    digest = hashlib.sha256(f"nola/{seed}/{module}/{factor}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def uniform_pieces(seed: int, shape: tuple[int, ...], pieces: int):
    """U(−1, 1) float32 tensors of shape (n_p, *shape[1:]) filling `shape` along dim 0 in order, from a private
    CPU generator seeded with `seed`. Any split gives the same numbers as one call (sequential fill)."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    for rows in torch.arange(shape[0]).tensor_split(min(pieces, shape[0])):
        yield torch.empty((len(rows), *shape[1:])).uniform_(-1.0, 1.0, generator=generator)


class RandomBases:
    """`count` frozen bases of `shape`, scaled 1/√count, regenerated from `seed` whenever they are needed."""

    def __init__(self, seed: int, count: int, shape: tuple[int, int], chunks: int, cache: dict | None):
        self.seed, self.count, self.shape, self.chunks, self.cache = seed, count, shape, chunks, cache

    def pieces(self, like: torch.Tensor):
        """(slice of basis indices, bases there) in like's dtype and device."""
        if self.cache is not None:  # cache_bases: the whole stack, generated once per device and dtype
            key = (self.seed, like.device, like.dtype)
            if key not in self.cache:
                self.cache.clear()
                self.cache[key] = self.materialise(like)
            yield slice(0, self.count), self.cache[key]
            return
        start = 0
        for piece in uniform_pieces(self.seed, (self.count, *self.shape), self.chunks):
            yield slice(start, start + len(piece)), self.scaled(piece, like)
            start += len(piece)

    def materialise(self, like: torch.Tensor) -> torch.Tensor:
        """The whole stack [count, *shape] at once."""
        return self.scaled(next(uniform_pieces(self.seed, (self.count, *self.shape), 1)), like)

    def scaled(self, generated: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        # Scaled in float32, then cast (§10.3): the values do not depend on the adapter's dtype.
        return (generated / math.sqrt(self.count)).to(like.device, like.dtype)

    def mix(self, coef: torch.Tensor) -> torch.Tensor:
        """Σ_b coef[b] · basis[b]."""
        out = coef.new_zeros(self.shape)
        for index, basis in self.pieces(coef):
            out += torch.einsum("b,boi->oi", coef[index], basis)
        return out

    def project(self, grad: torch.Tensor) -> torch.Tensor:
        """grad_coef[b] = Σ_{o,i} grad[o, i] · basis[b, o, i]."""
        # A matrix-vector product: einsum("oi,boi->b") is ~100x slower on CPU (it copies the stack).
        return torch.cat([basis.flatten(1) @ grad.flatten() for _, basis in self.pieces(grad)])


class MixBases(torch.autograd.Function):
    """coef ↦ Σ_b coef[b] basis[b], keeping only the seed (not the bases); backward regenerates them (§5)."""

    @staticmethod
    def forward(ctx, coef, bases: RandomBases):
        ctx.bases = bases
        return bases.mix(coef)

    @staticmethod
    def backward(ctx, grad):
        return ctx.bases.project(grad.contiguous()), None


class NolaAdapter(Adapter):
    supported_kinds = (LINEAR,)

    def __init__(self, layer, config: NolaConfig, init: bool = True):
        super().__init__(layer, config)
        self.scale = config.scale
        d_in, d_out = linear_dims(layer)
        self.a_shape, self.b_shape = (config.r, d_in), (d_out, config.r)
        dtype, device = adapter_dtype(layer), layer.weight.device
        self.coef_A = nn.Parameter(torch.zeros(config.num_basis_A, dtype=dtype, device=device))  # α
        self.coef_B = nn.Parameter(torch.zeros(config.num_basis_B, dtype=dtype, device=device))  # β
        seeds = {f: layer_seed(config.seed, layer.reparam_name, f) for f in ("A", "B", "A0")} if init else {}
        for factor in ("A", "B", "A0"):  # saved with the adapter; a loaded file overwrites them before restore
            self.register_buffer(f"seed_{factor}", torch.tensor(seeds.get(factor, 0), dtype=torch.int64, device=device))
        # Not found in the official code (there A_0 comes from the global RNG and must be saved); recommended
        # choice (§10.4): A_0 is regenerated from its own seed, so nothing but coefficients and seeds is stored.
        self.register_buffer("offset_A", torch.zeros(self.a_shape, dtype=dtype, device=device), persistent=False)
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else None
        self.basis_cache = {"A": {}, "B": {}} if config.cache_bases else {"A": None, "B": None}
        if init:
            config.generated_with.update(GENERATOR, torch=torch.__version__)
            self.restore(layer)
            if config.init == "vit":
                with torch.no_grad():
                    self.coef_A.fill_(1.0 / config.num_basis_A)
                    self.coef_B.fill_(1.0 / config.num_basis_B)

    @torch.no_grad()
    def restore(self, layer):
        """Regenerate the offset from the (possibly just loaded) seed; bases are regenerated on use."""
        recorded = {k: self.config.generated_with.get(k) for k in (*GENERATOR, "torch")}
        if recorded != {**GENERATOR, "torch": torch.__version__}:
            warnings.warn(f"nola on {layer.reparam_name}: bases were generated with {recorded}, now with "
                          f"{GENERATOR} on torch {torch.__version__}; the CPU stream is normally stable, check the outputs")
        for cache in self.basis_cache.values():
            if cache is not None:
                cache.clear()
        if self.config.init == "code":  # Kaiming-uniform(a=√5) on (r, d_in) = U(−1/√d_in, 1/√d_in), as nn.Linear
            offset = next(uniform_pieces(int(self.seed_A0), self.a_shape, 1)) / math.sqrt(self.a_shape[1])
            self.offset_A.copy_(offset)
        else:
            self.offset_A.zero_()

    def bases(self, factor: str) -> RandomBases:
        count, shape = ((self.config.num_basis_A, self.a_shape) if factor == "A"
                        else (self.config.num_basis_B, self.b_shape))
        return RandomBases(int(getattr(self, f"seed_{factor}")), count, shape, self.config.chunks,
                           self.basis_cache[factor])

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """A (r × d_in) and B (d_out × r) in the adapter's dtype, differentiable in α and β."""
        A = self.offset_A + MixBases.apply(self.coef_A, self.bases("A"))
        return A, MixBases.apply(self.coef_B, self.bases("B"))

    def forward(self, layer, x, out):
        A, B = self.factors()
        h = x.to(A.dtype)
        if self.dropout is not None:
            h = self.dropout(h)
        # The scale goes on the r-wide intermediate; added in place into the base output, as LoRA does.
        return out.add_(F.linear(F.linear(h, A) * self.scale, B).to(out.dtype))

    def delta_weight(self, layer):
        """s · B A (§6) in the layer's weight layout, float32 or float64."""
        with torch.no_grad():
            A, B = self.factors()
        return as_matrix(layer, self.scale * (wide(B) @ wide(A)))

    @torch.no_grad()
    def peft_lora_factors(self, layer):
        """ΔW on W0 as a LoRA at scale 1: A, s·B."""
        A, B = self.factors()
        return wide(A).contiguous(), (self.scale * wide(B)).contiguous()


register("nola", NolaConfig, NolaAdapter,
         "NOLA: LoRA factors mixed from k + l seeded random bases; only the mixing coefficients train")
