"""Choosing DAREx's q (spec darex.md §2): a 1-D search over q scored on a labelled dev set (§2a, "q_v") or, with
no labels, by how little pruning changes the fine-tuned model's outputs (§2b).

A merge config cannot run these searches (they need the model class, data and forward passes), so choosing q is
a Python step whose result goes into the YAML::

    q, table = search_q_validation(model, "path/to/base", dev_data, density=0.01, exclude=["classifier"])
    print(q)   # merge_method: darex, parameters {density: 0.01, q: <q>}, exclude: ['classifier'], seed: 0

Both searches prune the model exactly as ``reparam merge`` with ``merge_method: darex`` would for one model of
weight 1 with the same density, seed, model index and exclude list: the masks are DARE's, drawn once per seed,
and each candidate q only rewrites theta_0 + mask*delta/q into the model in place (spec "Memory"). The model
gets its fine-tuned weights back afterwards. Memory: (2 + number of seeds) float32 copies of the pruned tensors.

Not implemented: the analytical per-layer q_e (§2c) and the decoders' top-5 logit MSE objective (pass
``output_fn`` to score another output than the last hidden state).
"""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Callable, Iterable, Mapping, NamedTuple, Sequence

import torch
from torch import nn

from ..core.errors import ReparamError
from .errors import MergeConfigError, MergeValidationError
from .io import SafetensorsSource
from .sparsify import bernoulli, generator_for


class QSearchResult(NamedTuple):
    q: float
    table: list[tuple[float, float]]  # (q, score) in the order tried; higher score is better


def _grid(start: float, stop: float, step: float, inclusive: bool) -> list[float]:
    # start + i*step rounded, so the coarse and the fine pass name the same q by the same float
    out, i = [], 0
    while True:
        x = round(start + i * step, 10)
        if x > stop + 1e-12 or (not inclusive and x >= stop - 1e-12):
            return out
        out.append(x)
        i += 1


def search_1d(score: Callable[[float], float], lo: float, hi: float, step: float = 0.1, decay: float = 0.1,
              patience: int = 3) -> tuple[float, dict[float, float]]:
    """Maximise score(x) over [lo, hi] (reference ``find_optimal_param``, spec §2a): a coarse pass with `step`,
    then a fine pass with step*decay around the best x; each pass stops after `patience` + 1 misses in a row.
    Returns the best x (first one on ties) and every score, in the order tried (NaN counts as -inf)."""
    if not (step > 0 and 0 < decay <= 1 and patience >= 0 and lo <= hi):
        raise MergeConfigError(f"search_1d needs step > 0, 0 < decay <= 1, patience >= 0 and lo <= hi; got "
                               f"step={step}, decay={decay}, patience={patience}, lo={lo}, hi={hi}")
    results: dict[float, float] = {}

    def one_pass(xs):
        best, miss = -math.inf, 0
        for x in xs:
            if x not in results:
                s = float(score(x))
                results[x] = -math.inf if math.isnan(s) else s
            if results[x] >= best:
                best, miss = results[x], 0
            else:
                miss += 1
                if miss > patience:
                    break

    one_pass(_grid(lo, hi, step, inclusive=True))
    x0 = max(results, key=results.get)
    lo2 = max(lo + step * decay, x0 - step * (1 - decay))
    one_pass([x for x in _grid(lo2, x0 + step, step * decay, inclusive=False) if x <= hi])
    return max(results, key=results.get), results


class DroppedDeltas:
    """The model's deltas to `base` with DAREx masks drawn once per seed; ``apply(q, seed)`` writes
    theta_0 + mask*delta/q into the model in place, ``restore()`` puts the fine-tuned weights back.

    base: a state dict or a safetensors model path. Pruned: every floating-point tensor of the model's state
    dict not matched by an `exclude` regex (re.search); each must be in `base` with the same shape.
    Use as a context manager to restore on exit.
    """

    def __init__(self, model: nn.Module, base: Mapping[str, torch.Tensor] | str | Path, density: float,
                 seeds: Iterable[int] = (0,), *, exclude: Sequence[str] = (), model_index: int = 0):
        _check_density(density)
        self.model, self.seeds = model, [int(s) for s in seeds]
        if not self.seeds:
            raise MergeConfigError("seeds is empty: give at least one drop seed")
        patterns = [re.compile(p) for p in exclude]
        state = {k: t for k, t in model.state_dict().items()
                 if t.is_floating_point() and not any(p.search(k) for p in patterns)}
        base = _load_base(base, state)
        missing = sorted(set(state) - set(base))
        if missing:
            raise MergeValidationError(f"{len(missing)} tensor(s) of the model are not in the base model: "
                                       f"{', '.join(missing[:5])}" + (" ..." if len(missing) > 5 else "") +
                                       "; exclude them (e.g. exclude=['classifier'])")
        self.targets, self.base, self.finetuned = state, {}, {}
        self.kept: dict[int, dict[str, torch.Tensor]] = {s: {} for s in self.seeds}
        for name, t in state.items():
            if tuple(base[name].shape) != tuple(t.shape):
                raise MergeValidationError(f"tensor {name!r}: base has shape {list(base[name].shape)}, "
                                           f"the model has {list(t.shape)}")
            b = base[name].float()
            delta = t.detach().cpu().float() - b  # as the merge engine: float32, on the CPU generator's device
            self.base[name], self.finetuned[name] = b, t.detach().clone()
            for s in self.seeds:
                self.kept[s][name] = bernoulli(delta, density, generator_for(s, model_index, name), "none")

    @torch.no_grad()
    def apply(self, q: float, seed: int) -> None:
        if not 0 < q <= 1:
            raise MergeConfigError(f"q must be in (0, 1], got {q!r}")
        for name, target in self.targets.items():
            target.copy_(self.base[name] + self.kept[seed][name] / q)

    @torch.no_grad()
    def restore(self) -> None:
        for name, target in self.targets.items():
            target.copy_(self.finetuned[name])

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.restore()
        return False


def _load_base(base, wanted: Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
    if not isinstance(base, (str, Path)):
        return base
    src = SafetensorsSource(base)
    try:
        have = set(src.keys())
        return {k: src.get(k) for k in wanted if k in have}
    finally:
        src.close()


def _check_density(density) -> None:
    if not isinstance(density, (int, float)) or isinstance(density, bool) or not 0 < density < 1:
        raise MergeConfigError(f"density must be in (0, 1) to search q (1 - p: the keep rate), got {density!r}")


def _q_range(density, lo, hi) -> tuple[float, float]:
    _check_density(density)
    lo = density if lo is None else lo
    if not (density <= lo <= hi <= 1):
        raise MergeConfigError(f"the q range must satisfy density <= lo <= hi <= 1 (q below 1 - p rescales "
                               f"beyond DARE); got density={density}, lo={lo}, hi={hi}")
    return lo, hi


def _search(score, lo, hi, step, decay, patience) -> QSearchResult:
    best, results = search_1d(score, lo, hi, step, decay, patience)
    return QSearchResult(best, list(results.items()))


def search_q_validation(model: nn.Module, base, data, density: float, *, metric: str | None = None,
                        seeds: Iterable[int] = (0,), lo: float | None = None, hi: float = 1.0, step: float = 0.1,
                        decay: float = 0.1, patience: int = 3, exclude: Sequence[str] = (), model_index: int = 0,
                        batch_size: int = 64) -> QSearchResult:
    """Global q by validation (spec §2a): score(q) = `metric` of ``reparam.training.evaluate`` on the labelled
    `data` for the pruned model, averaged over the drop `seeds` (reference: seed 0 only). `metric` defaults to
    the data's first metric (accuracy, matthews, pearson, ...); "loss" is minimised (score = -loss).
    q is searched over [lo, hi], lo defaulting to density (DARE's q)."""
    from ..training import evaluate

    lo, hi = _q_range(density, lo, hi)
    names = ["loss", *getattr(data, "metric_names", [])]
    metric = metric or (names[1] if len(names) > 1 else "loss")
    if metric not in names:
        raise MergeConfigError(f"metric {metric!r} is not reported for this data; available: {', '.join(names)}")
    sign = -1.0 if metric == "loss" else 1.0
    with DroppedDeltas(model, base, density, seeds, exclude=exclude, model_index=model_index) as drops:
        def score(q):
            values = []
            for s in drops.seeds:
                drops.apply(q, s)
                values.append(sign * evaluate(model, data, batch_size)[metric])
            return sum(values) / len(values)

        return _search(score, lo, hi, step, decay, patience)


def last_hidden_state(model: nn.Module, batch: dict) -> torch.Tensor:
    """Encoders' output for the output-change objective: the last hidden states of a Hugging Face model
    (``output_hidden_states=True``); for another module, its output (a tensor, or the first element)."""
    if hasattr(getattr(model, "config", None), "output_hidden_states"):
        return model(**batch, output_hidden_states=True).hidden_states[-1]
    out = model(**batch)
    return out if isinstance(out, torch.Tensor) else out[0]


def mean_without_outlier(values: Sequence[float]) -> float:
    """Mean after dropping the single value farthest from the mean (spec §2b; only with 3 or more values)."""
    values = list(values)
    if len(values) >= 3:
        mean = sum(values) / len(values)
        values.pop(max(range(len(values)), key=lambda i: abs(values[i] - mean)))
    return sum(values) / len(values)


def calibration_windows(texts: Iterable[str], tokenizer, n: int = 50, length: int = 128, seed: int = 0
                        ) -> torch.Tensor:
    """`n` windows of `length` token ids cut at seeded random places from the concatenated `texts` (spec §2b:
    50 x 128 tokens of unlabelled task text, seed 0). No special tokens are added."""
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
    if len(ids) < length:
        raise ReparamError(f"the calibration texts give {len(ids)} tokens, fewer than one window of {length}")
    starts = torch.randint(0, len(ids) - length + 1, (n,), generator=torch.Generator().manual_seed(seed))
    flat = torch.tensor(ids, dtype=torch.long)
    return torch.stack([flat[s:s + length] for s in starts.tolist()])


def search_q_output_change(model: nn.Module, base, inputs: torch.Tensor | Mapping[str, torch.Tensor],
                           density: float, *, seeds: Iterable[int] = (0, 1, 2, 3),
                           output_fn: Callable[[nn.Module, dict], torch.Tensor] = last_hidden_state,
                           lo: float | None = None, hi: float = 1.0, step: float = 0.1, decay: float = 0.1,
                           patience: int = 3, exclude: Sequence[str] = (), model_index: int = 0,
                           batch_size: int = 16) -> QSearchResult:
    """Global q without labels (spec §2b): score(q) = -(mean absolute difference between ``output_fn`` of the
    pruned model and of the unpruned fine-tuned model), averaged over the drop `seeds` after removing the value
    farthest from the mean. `inputs`: token ids [n, length] (e.g. :func:`calibration_windows`; the attention
    mask is all ones) or a dict of model inputs sharing the first dimension."""
    lo, hi = _q_range(density, lo, hi)
    if isinstance(inputs, torch.Tensor):
        inputs = {"input_ids": inputs, "attention_mask": torch.ones_like(inputs)}
    device = next(iter(model.parameters())).device
    n = len(next(iter(inputs.values())))
    batches = [{k: v[i:i + batch_size].to(device) for k, v in inputs.items()} for i in range(0, n, batch_size)]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), DroppedDeltas(model, base, density, seeds, exclude=exclude,
                                            model_index=model_index) as drops:
            # the reference is the unpruned fine-tuned model, never the base (spec pitfall)
            reference = [output_fn(model, b).float() for b in batches]

            def change() -> float:
                total = sum(float((output_fn(model, b).float() - r).abs().sum()) for b, r in zip(batches, reference))
                return total / sum(r.numel() for r in reference)

            def score(q):
                values = []
                for s in drops.seeds:
                    drops.apply(q, s)
                    values.append(change())
                return -mean_without_outlier(values)

            return _search(score, lo, hi, step, decay, patience)
    finally:
        model.train(was_training)
