"""Which tensors a delta covers: the ``layers`` spec of :func:`reparam.merging.extract_delta`.

A spec is ``None`` / ``"all"`` (every floating-point tensor), a comma-separated string, or a list of items.
A tensor is selected when any item matches it:

* ``re:<regex>``: names the regex finds (``re.search``). In a string spec a ``re:`` item runs to the end of
  the string, so a regex may contain commas (put it last);
* ``N`` or ``N-M`` (or an int): transformer blocks N..M, by the block number in the name (``layers.N.``,
  ``layer.N.``, ``h.N.``, ``blocks.N.``, ``block.N.``, as for merge gradients);
* ``shallow:K``: the Robust Weight Signatures shallow set (weight_signatures.md, "Layer selection"): the first
  K convolution layers, i.e. 4-D weights in natural name order, each with the other tensors of its module
  (its bias). ResNet blocks counted as one layer are selected with block numbers or a regex instead;
* anything else: a tensor name, or a module name selecting every tensor under it (``bert.embeddings``).

An item that selects nothing is an error. Integer tensors are never selected (key handling rule 1), nor are
BatchNorm running statistics unless asked (rule 5; RWS excludes them from signatures).
"""
from __future__ import annotations

import re
from typing import Iterable, Sequence

from .errors import MergeConfigError
from .io import Source
from .params import block_index

_RANGE = re.compile(r"(\d+)(?:-(\d+))?")
BN_STATS = ("running_mean", "running_var")


def natural_key(name: str) -> list:
    """Sort key that orders ``features.2`` before ``features.10`` (state-dict order for numbered modules)."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def parse_layers(layers: str | int | Sequence[str | int] | None) -> list[str] | None:
    """The items of a layers spec as strings; None means every tensor."""
    if layers is None:
        return None
    if isinstance(layers, int) and not isinstance(layers, bool):
        return [str(layers)]
    if isinstance(layers, str):
        text = layers.strip()
        if text in ("", "all"):
            return None
        items: list[str] = []
        while text:
            if text.startswith("re:"):
                items.append(text)
                break
            head, _, text = text.partition(",")
            items.append(head.strip())
            text = text.strip()
        return [i for i in items if i]
    items = [str(x).strip() for x in layers]
    if not items or any(not x for x in items):
        raise MergeConfigError(f"layers {list(layers)!r}: expected non-empty items")
    return items


def _shallow(keys: list[str], source: Source, k: int, strict: bool) -> set[str]:
    modules: list[str] = []
    for key in keys:
        if len(modules) == k:
            break
        module = key.rpartition(".")[0]
        if len(source.shape(key)) == 4 and key.endswith("weight") and module not in modules:
            modules.append(module)
    if len(modules) < k and strict:
        raise MergeConfigError(f"layers 'shallow:{k}': {source.name} has only {len(modules)} convolution "
                               f"layer(s) (4-D weights)")
    return {key for key in keys if key.rpartition(".")[0] in modules}


def _matches(item: str, keys: list[str], source: Source, strict: bool) -> set[str]:
    if item.startswith("re:"):
        try:
            pattern = re.compile(item[3:])
        except re.error as e:
            raise MergeConfigError(f"layers item {item!r}: invalid regex ({e})") from None
        return {k for k in keys if pattern.search(k)}
    if item.startswith("shallow:"):
        count = item[len("shallow:"):]
        if not count.isdigit() or int(count) < 1:
            raise MergeConfigError(f"layers item {item!r}: expected shallow:K with K a positive integer")
        return _shallow(keys, source, int(count), strict)
    m = _RANGE.fullmatch(item)
    if m:
        lo, hi = int(m.group(1)), int(m.group(2) if m.group(2) is not None else m.group(1))
        if hi < lo:
            raise MergeConfigError(f"layers item {item!r}: empty block range")
        return {k for k in keys if (b := block_index(k)) is not None and lo <= b <= hi}
    return {k for k in keys if k == item or k.startswith(item + ".")}


def select_tensors(source: Source, layers=None, exclude: Iterable[str] = (), bn_stats: bool = False,
                   strict: bool = True) -> list[str]:
    """Names of the tensors of `source` a delta covers, in natural order (header-only).

    strict=False: an item (or the whole selection) may select nothing.
    """
    keys = sorted((k for k in source.keys() if source.dtype(k).is_floating_point
                   and (bn_stats or not k.endswith(BN_STATS))), key=natural_key)
    items = parse_layers(layers)
    if items is None:
        chosen = set(keys)
    else:
        chosen = set()
        for item in items:
            found = _matches(item, keys, source, strict)
            if not found and strict:
                raise MergeConfigError(f"layers item {item!r} matches no floating-point tensor of {source.name}")
            chosen |= found
    for pattern in exclude:
        try:
            rx = re.compile(pattern)
        except re.error as e:
            raise MergeConfigError(f"exclude {pattern!r}: invalid regex ({e})") from None
        chosen = {k for k in chosen if not rx.search(k)}
    if not chosen and strict:
        raise MergeConfigError(f"the layer selection leaves no tensor of {source.name}")
    return [k for k in keys if k in chosen]
