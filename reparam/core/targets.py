"""Which modules of a model an adapter goes on.

A target spec is "all-linear", or a list whose items are each:
  * a module name, matched exactly or as a dotted suffix ("query" matches "...self.query"),
  * a regex, written "re:<pattern>" or given as a compiled pattern, matched against the full name,
  * a module class (every module that is an instance of it).
A single string other than "all-linear" is one item ("query,value" splits on commas, for the CLI).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

from .errors import TargetError

# Output heads that "all-linear" leaves alone: adapting the layer that produces the logits is rarely wanted,
# and PEFT excludes it too. A classification head is trained in full (modules_to_save) instead.
HEAD_NAMES = ("classifier", "score", "lm_head", "qa_outputs", "cls", "embed_out", "output_projection")


def conv1d_class():
    """Hugging Face's GPT-2 style Conv1D (a Linear stored as d_in x d_out), or None without transformers."""
    try:
        from transformers.pytorch_utils import Conv1D
    except Exception:  # transformers is optional for adapting plain torch models
        return None
    return Conv1D


def is_linear_like(module: nn.Module) -> bool:
    c1d = conv1d_class()
    return isinstance(module, nn.Linear) or (c1d is not None and isinstance(module, c1d))


def head_module_names(model: nn.Module) -> set[str]:
    names = set()
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    for name, module in model.named_modules():
        parts = name.split(".")
        if (out_emb is not None and module is out_emb) or any(p in HEAD_NAMES for p in parts[-2:]):
            names.add(name)
    return names


@dataclass
class Match:
    name: str
    module: nn.Module
    reason: str  # which target item matched it


def normalise_targets(targets) -> list:
    if targets is None:
        raise TargetError("no targets given; pass names, suffixes, 're:<regex>', module classes or 'all-linear'")
    if isinstance(targets, (str, re.Pattern, type)):
        targets = [targets]
    items = []
    for t in targets:
        if isinstance(t, str) and t != "all-linear" and not t.startswith("re:") and "," in t:
            items.extend(s.strip() for s in t.split(",") if s.strip())
        else:
            items.append(t)
    return items


def _item_label(item) -> str:
    if isinstance(item, type):
        return item.__name__
    if isinstance(item, re.Pattern):
        return f"re:{item.pattern}"
    return str(item)


def _matches(item, name: str, module: nn.Module, heads: set[str]) -> bool:
    if item == "all-linear":
        return is_linear_like(module) and name not in heads
    if isinstance(item, type):
        return isinstance(module, item)
    if isinstance(item, re.Pattern):
        return item.fullmatch(name) is not None
    if isinstance(item, str) and item.startswith("re:"):
        return re.fullmatch(item[3:], name) is not None
    if isinstance(item, str):
        return name == item or name.endswith("." + item)
    raise TargetError(f"target {item!r} is not a name, 're:<regex>', compiled regex, module class or 'all-linear'")


def resolve_targets(model: nn.Module, targets, exclude=()) -> list[Match]:
    """Match modules; a target item that matches nothing is an error naming it."""
    items = normalise_targets(targets)
    for item in items:
        if isinstance(item, str) and item.startswith("re:"):
            try:
                re.compile(item[3:])
            except re.error as e:
                raise TargetError(f"target {item!r} is not a valid regex: {e}") from None
    excluded = set(normalise_targets(exclude)) if exclude else set()
    heads = head_module_names(model) if "all-linear" in items else set()
    found: dict[str, Match] = {}
    hits = {_item_label(i): 0 for i in items}
    for name, module in model.named_modules():
        if not name or getattr(module, "is_reparam_adapter", False):
            continue
        if any(_matches(e, name, module, set()) for e in excluded):
            continue
        for item in items:
            if _matches(item, name, module, heads):
                hits[_item_label(item)] += 1
                found.setdefault(name, Match(name, module, _item_label(item)))
    missing = [label for label, n in hits.items() if n == 0]
    if missing:
        raise TargetError(
            f"target(s) {', '.join(map(repr, missing))} matched no module of {type(model).__name__}; "
            f"see reparam.explain(model, targets) or `reparam targets --model M` for the module names"
        )
    return list(found.values())


def describe(module: nn.Module) -> str:
    w = getattr(module, "weight", None)
    shape = "x".join(map(str, w.shape)) if w is not None and hasattr(w, "shape") else "-"
    base = getattr(module, "reparam_base_class", type(module))
    return f"{base.__name__}({shape})"
