"""SaRA (Hu et al., ICLR 2025, arXiv 2409.06633; specs/adapters/sara.md): train the smallest-magnitude weights.

    M = |W0| < τ   (per tensor, from the pretrained values),   p = W0[M] at init (trainable, 1-D, nnz values)
    W = W0 ⊙ (1 − M) + scatter(p, M),   y = layer(x; W)   ΔW = scatter(p − W0[M], M)

Unstructural backpropagation (§6): p is a compact 1-D leaf per tensor and only it gets a gradient, (∂L/∂W)[M] of
size nnz; the optimizer keeps state for the nnz entries only. On Linear / Conv1D layers the adapter computes the
layer's output as x (W0 + ΔW)ᵀ (MergedSparseLinear: one matmul; ∂L/∂p gathered from a dense gᵀx inside backward);
behind another adapter it adds x ΔWᵀ through CSR sparse kernels on the CPU (the gradient of p as gᵀx sampled at
M) or a dense ΔW on a GPU; on convolutions and embeddings through a dense ΔW scattered from p. The mask is a function
of W0 and τ, so the adapter file holds p alone (in mask order) and the mask is recomputed at load (§3).
SaraStep (a training callback, run by reparam.training.train by itself) adds the rank regulariser on one random
matrix per step, the decoupled weight decay of p and the progressive re-selection (§4, §5).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..core.layers import (CONV, EMBEDDING, LINEAR, Adapter, adapter_dtype, is_fan_in_fan_out, layer_kind,
                           linear_dims, wide)
from ..core.model import active_adapters, adapted_layers, get_record
from ..core.registry import MethodConfig, register
from ..training.callbacks import Callback, learning_rates
from .lora import as_matrix


@dataclass
class SaraConfig(MethodConfig):
    threshold: float = 2e-3  # τ; entries with |w| < τ (strict) train (§2)
    include_bias: bool = True  # the reference trains every tensor, biases included (§10.3)
    rank_weight: float = 5e-4  # λ_rank of the nuclear-norm term; 0 = off (§4)
    rank_min_dim: int = 64  # a 2-D weight is eligible for the rank term when min(shape) > this (§4)
    # Not a fixed count in the spec's library setting; recommended choice: None = half of the run (T_prog ≈ T/2,
    # the reference's 2500 of 5005). -1 disables the re-selection.
    progressive_iter: int | None = None
    reset_optimizer_on_reselect: bool = True  # the memory-efficient (UB) variant resets Adam moments (§10.6)
    weight_decay: float = 1e-2  # decoupled, toward 0 (§5); applied by SaraStep since loops skip 1-D tensors
    seed: int = 0  # the random matrix of step t is drawn from seed + t: reproducible and resume-safe

    def __post_init__(self):
        self.check(isinstance(self.threshold, (int, float)) and self.threshold > 0, "threshold", "must be > 0")
        self.check(isinstance(self.include_bias, bool), "include_bias", "must be true or false")
        self.check(isinstance(self.rank_weight, (int, float)) and self.rank_weight >= 0, "rank_weight", "must be >= 0")
        self.check(isinstance(self.rank_min_dim, int) and self.rank_min_dim >= 0, "rank_min_dim", "must be >= 0")
        self.check(self.progressive_iter is None or isinstance(self.progressive_iter, int)
                   and (self.progressive_iter > 0 or self.progressive_iter == -1),
                   "progressive_iter", "must be a positive step count, -1 (off) or None (half of the run)")
        self.check(isinstance(self.reset_optimizer_on_reselect, bool), "reset_optimizer_on_reselect",
                   "must be true or false")
        self.check(isinstance(self.weight_decay, (int, float)) and self.weight_decay >= 0, "weight_decay",
                   "must be >= 0")


class SparseEntries(nn.Module):
    """The entries |w| < τ of one pretrained tensor: flat positions and pretrained values (recomputed from W0 and
    τ, never saved), the trainable values p (saved, in mask order) and the entries frozen by a re-selection."""

    def __init__(self, tensor: torch.Tensor, threshold: float, dtype):
        super().__init__()
        flat = tensor.detach().reshape(-1)
        index = torch.nonzero(flat.abs() < threshold).squeeze(1)  # in the stored dtype, before any cast (§10.2)
        self.register_buffer("index", index, persistent=False)
        self.register_buffer("initial", flat[index].to(dtype), persistent=False)
        self.register_buffer("frozen", torch.zeros(len(index), dtype=torch.bool, device=flat.device), persistent=False)
        self.register_buffer("held", torch.zeros(0, dtype=dtype, device=flat.device), persistent=False)
        self.values = nn.Parameter(self.initial.clone())  # p starts at W0[M]: identity at init (§2)

    def delta(self, tensor: torch.Tensor) -> torch.Tensor:
        """scatter(p − W0[M], M), shaped like tensor, in the adapter's dtype; differentiable in p."""
        dense = torch.zeros(tensor.numel(), dtype=self.values.dtype, device=tensor.device)
        return dense.index_put((self.index,), self.values - self.initial).view(tensor.shape)

    def trainable(self) -> torch.Tensor:
        return ~self.frozen

    @torch.no_grad()
    def reselect(self, threshold: float) -> None:
        """M ← M ∧ (|W| < τ): entries that grew past τ freeze at their current value (§5)."""
        self.frozen |= self.values.abs() >= threshold
        self.held = self.values.detach().clone()

    @torch.no_grad()
    def hold_frozen(self) -> None:
        if self.frozen.any():
            self.values[self.frozen] = self.held[self.frozen]


# Above this fraction of entries, dense matmuls beat CPU sparse kernels (measured on 384 x 1536, 1024 tokens).
SPARSE_KERNEL_MAX_DENSITY = 0.1


def csr_kernels(pattern, x: torch.Tensor) -> bool:
    """Whether a sparse delta runs through the CSR kernels: a pattern was built (density at most
    SPARSE_KERNEL_MAX_DENSITY) and x is on the CPU. On GPUs the dense delta wins (bench/glue.py on an H200 ran SaRA
    13x slower than LoRA with the CSR kernels)."""
    return pattern is not None and not x.is_cuda


def csr_structure(rows, cols, n_rows: int, n_cols: int):
    """(crow_indices, col_indices, order) of the CSR matrix with entries at (rows, cols); order maps CSR positions
    to the given (mask) order."""
    order = torch.argsort(rows * n_cols + cols)
    crow = torch.zeros(n_rows + 1, dtype=torch.long, device=rows.device)
    crow[1:] = torch.bincount(rows, minlength=n_rows).cumsum(0)
    return crow, cols[order], order


class LinearPattern(nn.Module):
    """The mask of a Linear-family weight as CSR structures of ΔW (d_out × d_in) and of ΔWᵀ (buffers: they follow
    the adapter's device), recomputed from the mask, never saved."""

    def __init__(self, layer, index: torch.Tensor):
        super().__init__()
        d_in, d_out = linear_dims(layer)
        stored_cols = layer.weight.shape[1]
        r, c = index // stored_cols, index % stored_cols
        rows, cols = (c, r) if is_fan_in_fan_out(layer) else (r, c)  # positions in d_out × d_in
        self.shapes = {"forward": (d_out, d_in), "transposed": (d_in, d_out)}
        for name, (a, b, n_rows, n_cols) in {"forward": (rows, cols, d_out, d_in),
                                            "transposed": (cols, rows, d_in, d_out)}.items():
            for part, t in zip(("crow", "col", "order"), csr_structure(a, b, n_rows, n_cols)):
                self.register_buffer(f"{name}_{part}", t, persistent=False)

    def matrix(self, values: torch.Tensor, name: str) -> torch.Tensor:
        with warnings.catch_warnings():  # "sparse CSR support is in beta"
            warnings.simplefilter("ignore", UserWarning)
            return torch.sparse_csr_tensor(getattr(self, f"{name}_crow"), getattr(self, f"{name}_col"),
                                           values[getattr(self, f"{name}_order")], self.shapes[name],
                                           check_invariants=False)


def merged_matrix(weight: torch.Tensor, values: torch.Tensor, index: torch.Tensor, fan_in_fan_out: bool):
    """W0 + scatter(values, index) in the values' dtype, as a d_out × d_in matrix (a new tensor)."""
    merged = weight.to(values.dtype, copy=True)
    merged.view(-1).index_add_(0, index, values)
    return merged.T if fan_in_fan_out else merged


class MergedSparseLinear(torch.autograd.Function):
    """x (W0 + ΔW)ᵀ for the first adapter of a Linear-family layer, ΔW = scatter(values, index) in W0's storage
    layout: one dense matmul forward, and in backward ∂L/∂x = g (W0 + ΔW) and ∂L/∂values = (gᵀx)[index] from one
    dense gᵀx, so a step costs what LoRA's does (bench/method_speed.py) where the CSR kernels cost ~1.5x. W0 + ΔW is
    formed for each matmul and dropped (never kept from forward to backward); the dense ∂L/∂W exists only inside
    backward, where `observe` (SpIEL's accumulation phase) sees it; the parameter gradient stays k-sized."""

    @staticmethod
    def forward(ctx, x, values, weight, index, fan_in_fan_out, observe, bias):
        ctx.save_for_backward(x, values)
        ctx.weight, ctx.index, ctx.fan_in_fan_out, ctx.observe = weight, index, fan_in_fan_out, observe
        return F.linear(x, merged_matrix(weight, values, index, fan_in_fan_out), bias)  # as the plain layer's

    @staticmethod
    def backward(ctx, grad):
        x, values = ctx.saved_tensors
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = grad @ merged_matrix(ctx.weight, values, ctx.index, ctx.fan_in_fan_out)
        grad_w = grad.reshape(-1, grad.shape[-1]).T @ x.reshape(-1, x.shape[-1])  # d_out × d_in
        grad_w = (grad_w.T if ctx.fan_in_fan_out else grad_w).reshape(-1)  # the storage layout of the index
        if ctx.observe is not None:
            ctx.observe(grad_w)
        grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0) if ctx.needs_input_grad[6] else None
        return grad_x, grad_w[ctx.index], None, None, None, None, grad_bias


def merged_sparse_linear(layer, x, values, index, observe=None, bias_delta=None) -> torch.Tensor:
    """The whole output of Linear-family `layer` with scatter(values, index) added to its weight (and bias_delta to
    its bias), computed in the values' dtype and returned in x's."""
    bias = None if layer.bias is None else layer.bias.to(values.dtype)
    if bias_delta is not None:
        bias = bias_delta if bias is None else bias + bias_delta
    return MergedSparseLinear.apply(x.to(values.dtype), values, layer.weight, index, is_fan_in_fan_out(layer),
                                    observe, bias).to(x.dtype)


class SparseLinearDelta(torch.autograd.Function):
    """x ΔWᵀ for x (N × d_in) and ΔW given by its values in mask order. Backward: ∂L/∂x = g ΔW, and ∂L/∂values =
    (gᵀ x) sampled at the mask (SDDMM), i.e. (∂L/∂W)[M] of §2 without forming it densely."""

    @staticmethod
    def forward(ctx, x, values, pattern):
        ctx.save_for_backward(x, values)
        ctx.pattern = pattern
        # CSR @ dense (MKL) and a transposed view: ~3x faster on CPU than dense @ CSR, which re-sorts the matrix.
        return torch.sparse.mm(pattern.matrix(values, "forward"), x.T).T

    @staticmethod
    def backward(ctx, grad):
        x, values = ctx.saved_tensors
        pattern = ctx.pattern
        grad_x = torch.sparse.mm(pattern.matrix(values, "transposed"), grad.T).T if ctx.needs_input_grad[0] else None
        sampled = torch.sparse.sampled_addmm(pattern.matrix(values, "forward"), grad.T, x, beta=0.0)
        grad_values = torch.empty_like(values)
        grad_values[pattern.forward_order] = sampled.values()
        return grad_x, grad_values, None


def layer_output(layer, x, weight, bias):
    """The layer's own forward with the given weight and bias."""
    kind = layer_kind(layer)
    if kind == LINEAR:
        return F.linear(x, as_matrix(layer, weight), bias)
    if kind == CONV:
        return layer._conv_forward(x, weight, bias)
    return F.embedding(x, weight, layer.padding_idx, layer.max_norm, layer.norm_type, layer.scale_grad_by_freq,
                       layer.sparse)


class SaraAdapter(Adapter):
    supported_kinds = (LINEAR, CONV, EMBEDDING)
    # Expected value of SaraStep's one-random-matrix term: the mean over the eligible matrices (§4).
    regularizer_reduction = "mean"

    @classmethod
    def training_callbacks(cls) -> list:
        return [SaraStep()]

    def __init__(self, layer, config: SaraConfig, init: bool = True):
        super().__init__(layer, config)
        dtype = adapter_dtype(layer)
        self.kind = layer_kind(layer)
        self.weight_entries = SparseEntries(layer.weight, config.threshold, dtype)
        # Linear family: ΔW x as sparse kernels (cost ∝ nnz·tokens, no dense d_out × d_in gradient), unless dense.
        sparse = self.kind == LINEAR and len(self.weight_entries.index) <= SPARSE_KERNEL_MAX_DENSITY * layer.weight.numel()
        self.pattern = LinearPattern(layer, self.weight_entries.index) if sparse else None
        bias = getattr(layer, "bias", None)
        self.bias_entries = SparseEntries(bias, config.threshold, dtype) \
            if config.include_bias and isinstance(bias, torch.Tensor) else None

    def entries(self) -> list[SparseEntries]:
        return [e for e in (self.weight_entries, self.bias_entries) if e is not None]

    @property
    def computes_layer_output(self) -> bool:  # first unmerged adapter of a Linear: one merged matmul
        return self.kind == LINEAR

    def layer_output(self, layer, x):
        entries = self.weight_entries
        bias_delta = None if self.bias_entries is None else self.bias_entries.delta(layer.bias)
        return merged_sparse_linear(layer, x, entries.values - entries.initial, entries.index, bias_delta=bias_delta)

    def forward(self, layer, x, out):
        # Behind another adapter: out + layer(x; ΔW, Δb), the output so far is reused and adapters compose.
        delta_bias = None if self.bias_entries is None else self.bias_entries.delta(layer.bias)
        if not csr_kernels(self.pattern, x):  # conv, embedding, a dense mask or a GPU: dense ΔW, differentiable in p
            h = x if self.kind == EMBEDDING else x.to(self.weight_entries.values.dtype)
            return out + layer_output(layer, h, self.weight_entries.delta(layer.weight), delta_bias).to(out.dtype)
        entries = self.weight_entries
        h = x.reshape(-1, x.shape[-1]).to(entries.values.dtype)
        y = SparseLinearDelta.apply(h, entries.values - entries.initial, self.pattern).reshape(*x.shape[:-1], -1)
        return out.add_((y if delta_bias is None else y + delta_bias).to(out.dtype))  # in place, as LoRA

    def delta_weight(self, layer):
        return wide(self.weight_entries.delta(layer.weight).detach())

    def delta_bias(self, layer):
        return None if self.bias_entries is None else wide(self.bias_entries.delta(layer.bias).detach())

    def rank_eligible(self, layer) -> bool:
        """A 2-D weight whose smaller side is > rank_min_dim and that still has trainable entries (§4)."""
        w = layer.weight
        return w.dim() == 2 and min(w.shape) > self.config.rank_min_dim and bool(self.weight_entries.trainable().any())

    def rank_matrix(self, layer) -> torch.Tensor:
        """W_R ⊙ M_R: the trainable values in place, zeros elsewhere (d_out × d_in, adapter dtype)."""
        entries, w = self.weight_entries, layer.weight
        keep = entries.trainable()
        dense = torch.zeros(w.numel(), dtype=entries.values.dtype, device=w.device)
        return as_matrix(layer, dense.index_put((entries.index[keep],), entries.values[keep]).view(w.shape))

    def regularizer(self, layer):
        """λ_rank·‖W ⊙ M‖_* of this matrix (reduction "mean": the expectation of SaraStep's random term)."""
        if self.config.rank_weight == 0 or not self.rank_eligible(layer):
            return None
        return self.config.rank_weight * torch.linalg.matrix_norm(wide(self.rank_matrix(layer)), ord="nuc")


class SaraStep(Callback):
    """SaRA's per-step work for every active SaRA adapter (spec §4-5), in any loop that runs method_callbacks:
    before optimizer.step (gradients clipped): frozen entries get no gradient, and λ_rank·‖W_R ⊙ M_R‖_* of one
    eligible matrix drawn at random is back-propagated into p (skipped when the loop already adds
    reparam.regularizer to its loss). After optimizer.step: p ← p − lr·wd·p, frozen entries are held, and after
    T_prog steps the trainable set is re-selected (optimizer state of p reset unless configured otherwise)."""

    def sara_adapters(self, model):
        for name in active_adapters(model):
            cfg = get_record(model, name).config
            if isinstance(cfg, SaraConfig):
                yield cfg, [(layer, layer.adapters[name]) for _, layer in adapted_layers(model) if name in layer.adapters]

    def before_optimizer_step(self, state):
        for cfg, pairs in self.sara_adapters(state.model):
            for _, adapter in pairs:
                for e in adapter.entries():
                    if e.values.grad is not None and e.frozen.any():
                        e.values.grad[e.frozen] = 0
            if cfg.rank_weight == 0 or getattr(state.config, "regularizer_weight", 0):
                continue
            eligible = [(layer, a) for layer, a in pairs if a.rank_eligible(layer)]
            if eligible:
                pick = torch.randint(len(eligible), (), generator=torch.Generator().manual_seed(cfg.seed + state.global_step))
                layer, adapter = eligible[int(pick)]
                values = adapter.weight_entries.values
                (grad,) = torch.autograd.grad(adapter.regularizer(layer), values)
                values.grad = grad if values.grad is None else values.grad.add_(grad)

    def after_optimizer_step(self, state):
        lr = learning_rates(state.optimizer)
        for cfg, pairs in self.sara_adapters(state.model):
            t_prog = cfg.progressive_iter if cfg.progressive_iter is not None else max(state.total_steps // 2, 1)
            reselect = t_prog != -1 and state.global_step + 1 == t_prog
            for _, adapter in pairs:
                for e in adapter.entries():
                    if cfg.weight_decay and id(e.values) in lr:
                        with torch.no_grad():
                            e.values.mul_(1 - lr[id(e.values)] * cfg.weight_decay)
                    e.hold_frozen()
                    if reselect:
                        e.reselect(cfg.threshold)
                        if cfg.reset_optimizer_on_reselect and state.optimizer is not None:
                            state.optimizer.state.pop(e.values, None)  # Adam restarts its moments (§5 UB variant)
            if reselect:
                state.log({"sara_trainable": sum(int(e.trainable().sum()) for _, a in pairs for e in a.entries())})


register("sara", SaraConfig, SaraAdapter, "SaRA: the entries |w| < τ of W0 train (sparse), nuclear-norm regulariser")
