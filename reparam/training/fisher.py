"""Diagonal Fisher information of a model on its own data (spec merge/fisher.md), the input of Fisher merging.

    fisher = compute_fisher(model, data, n_examples=4096, mode="auto")   # {parameter name: float32 tensor}
    save_fisher("fisher.safetensors", fisher, mode=..., n_examples=...)  # the sidecar `merge_method: fisher` reads

For example x with log-likelihood gradients g_y = d log p(y|x) / d theta, taken per example (never summed over a
batch before squaring), F = (1/n) sum_x f(x) with, per `mode`:

* ``exact``: f(x) = sum_y p(y|x) g_y^2, one backward pass per class (the reference default);
* ``sampled``: the mean of g_y^2 over ``samples`` labels y ~ p(.|x) (unbiased for ``exact``); for a causal LM each
  position's token is sampled from the model and the log-probabilities are summed over the sequence;
* ``empirical``: g_y^2 with the gold label y (not the true Fisher);
* ``batch_approx`` (MergeLM / FusionBench, fast, never the default): per batch, backprop
  sum_b sum_y sqrt(p_by) log p_by with p detached and square that gradient; cross terms between classes and
  examples make it differ from ``exact`` even at batch size 1. Divided by the number of examples, as MergeLM.
* ``auto`` (default): ``exact`` for a classifier with at most 32 classes and for regression, else ``sampled``
  (not found in the paper; recommended choice of the spec).

Regression heads (one output f) use the unit-variance Gaussian likelihood log p(y|x) = -(y - f)^2 / 2, so
``exact`` is (df/dtheta)^2, ``sampled`` draws y ~ N(f, 1), ``empirical`` is (y - f)^2 (df/dtheta)^2 (MergeLM squares
the MSE-loss gradient: 4x that, the same after the merge's normalisation) and ``batch_approx`` squares the
gradient of the batch's mean MSE loss, as MergeLM. A causal LM supports ``sampled`` and ``empirical``.

The model runs in eval mode (no dropout); every parameter gets a Fisher (``requires_grad`` is switched on for
the pass and restored), named as in ``model.state_dict()``, accumulated in float32: half precision would flush
the tiny values to zero. Examples: a seeded random subset of ``n_examples`` rows (all rows by default).
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..core.errors import ConfigError
from ..io.files import write_safetensors
from .loop import _device_of, _logits, _model_inputs

MODES = ("auto", "exact", "sampled", "empirical", "batch_approx")
EXACT_MAX_CLASSES = 32
FORMAT = "reparam-fisher"


def resolve_mode(mode: str, kind: str, num_labels: int | None) -> str:
    """The estimator `mode` means for this data (``auto`` resolved); a combination that cannot work is an error."""
    if mode not in MODES:
        raise ConfigError(f"fisher mode must be one of {', '.join(MODES)}, got {mode!r}")
    if kind == "causal-lm":
        if mode in ("exact", "batch_approx"):
            raise ConfigError(f"fisher mode {mode!r} needs one output distribution per example; a causal LM "
                              f"predicts a whole sequence: use 'sampled' (or 'empirical')")
        return "sampled" if mode == "auto" else mode
    if mode == "auto":
        return "exact" if num_labels == 1 or num_labels <= EXACT_MAX_CLASSES else "sampled"
    return mode


def _weighted_log_likelihoods(logits: torch.Tensor, labels: torch.Tensor, mode: str, kind: str, samples: int,
                              gen: torch.Generator) -> list[tuple[float, torch.Tensor]]:
    """One example's (weight, scalar) pairs: f(x) = sum of weight * (d scalar / d theta)^2."""
    if kind == "causal-lm":  # position t predicts token t + 1; the example's log-likelihood sums the positions
        lp = F.log_softmax(logits[0, :-1].float(), dim=-1)
        if mode == "empirical":
            gold = labels[0, 1:].to(lp.device)
            keep = gold != -100
            return [(1.0, lp[keep].gather(1, gold[keep, None]).sum())]
        probs = lp.detach().exp().cpu()
        draws = [torch.multinomial(probs, 1, generator=gen)[:, 0].to(lp.device) for _ in range(samples)]
        return [(1.0 / samples, lp.gather(1, y[:, None]).sum()) for y in draws]
    if logits.shape[-1] == 1:  # regression: d log p / d theta = (y - f) df/dtheta
        f = logits.reshape(()).float()
        if mode == "exact":
            return [(1.0, f)]
        if mode == "sampled":
            noise = torch.randn(samples, generator=gen, dtype=torch.float64)
            return [(float(noise.square().mean()), f)]
        return [((float(labels.reshape(())) - float(f.detach())) ** 2, f)]
    lp = F.log_softmax(logits[0].float(), dim=-1)
    if mode == "exact":
        return [(p, lp[c]) for c, p in enumerate(lp.detach().exp().tolist()) if p > 0]
    if mode == "sampled":  # a label drawn k times contributes k/S of its squared gradient: one pass per label
        ys = torch.multinomial(lp.detach().exp().cpu(), samples, replacement=True, generator=gen)
        counts = torch.bincount(ys, minlength=lp.numel()).tolist()
        return [(k / samples, lp[y]) for y, k in enumerate(counts) if k]
    return [(1.0, lp[int(labels.reshape(()))])]


def _batch_approx_objective(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    if logits.shape[-1] == 1:
        return F.mse_loss(logits.reshape(-1).float(), labels.float().to(logits.device))
    lp = F.log_softmax(logits.float(), dim=-1)
    return (lp.detach().exp().sqrt() * lp).sum()


def compute_fisher(model: nn.Module, data, n_examples: int | None = None, *, mode: str = "auto", samples: int = 1,
                   batch_size: int = 2, seed: int = 0, progress: bool = False) -> dict[str, torch.Tensor]:
    """Diagonal Fisher of `model` on `n_examples` rows of `data` (TextClassificationData or LMBlocks).

    Returns {parameter name: float32 tensor on the CPU}. batch_size: rows per backward pass, ``batch_approx``
    only (the other modes need per-example gradients). seed: which rows, and the sampled labels.
    """
    kind = getattr(data, "kind", "classification")
    mode = resolve_mode(mode, kind, getattr(data, "num_labels", None))
    if n_examples is None:
        n_examples = len(data)
    if not isinstance(n_examples, int) or not 1 <= n_examples <= len(data):
        raise ConfigError(f"n_examples must be an integer in [1, {len(data)}] (the rows of the data), "
                          f"got {n_examples!r}")
    if samples < 1 or batch_size < 1:
        raise ConfigError(f"samples and batch_size must be >= 1, got {samples} and {batch_size}")
    gen = torch.Generator().manual_seed(seed)
    rows = sorted(torch.randperm(len(data), generator=gen)[:n_examples].tolist())
    named = list(model.named_parameters())
    if not named:
        raise ConfigError(f"{type(model).__name__} has no parameters")
    params = [p for _, p in named]
    device = _device_of(model)
    accum = [torch.zeros(p.shape, dtype=torch.float32, device=device) for p in params]
    was_training, flags = model.training, [p.requires_grad for p in params]
    model.eval()
    for p in params:
        p.requires_grad_(True)
    try:
        step = batch_size if mode == "batch_approx" else 1
        for start in tqdm(range(0, len(rows), step), desc=f"fisher ({mode})", unit="batch" if step > 1 else "ex",
                          disable=not progress):
            batch = data.collate(rows[start:start + step])
            logits = _logits(model(**_model_inputs(model, batch, device)))
            if mode == "batch_approx":
                terms = [(1.0, _batch_approx_objective(logits, batch["labels"]))]
            else:
                terms = _weighted_log_likelihoods(logits, batch["labels"], mode, kind, samples, gen)
            for j, (weight, value) in enumerate(terms):
                grads = torch.autograd.grad(value, params, retain_graph=j < len(terms) - 1, allow_unused=True)
                for acc, g in zip(accum, grads):
                    if g is not None:  # None: a parameter this output does not depend on (its Fisher is 0)
                        acc.add_(g.detach().float().square(), alpha=weight)
    finally:
        model.train(was_training)
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)
    return {name: (acc / len(rows)).cpu() for (name, _), acc in zip(named, accum)}


def save_fisher(path: str | Path, fisher: dict[str, torch.Tensor], *, mode: str, n_examples: int,
                **metadata) -> Path:
    """Write the sidecar atomically: float32 tensors, metadata format/mode/n_examples plus `metadata` as text."""
    path = Path(path)
    meta = {"format": FORMAT, "mode": mode, "n_examples": str(n_examples)}
    meta.update({k: str(v) for k, v in metadata.items() if v is not None})
    write_safetensors(path, {k: v.float() for k, v in fisher.items()}, metadata=meta)
    return path


__all__ = ["compute_fisher", "save_fisher", "resolve_mode", "MODES"]
