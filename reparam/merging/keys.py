"""Key handling shared by every merge method (specs/merge/README.md, "Key handling rules" 3 and 4).

* Vocabulary mismatch (``on_vocab_mismatch: truncate``): an embedding or LM head whose row count differs
  between the models (tokens added by a fine-tune) is merged over the common leading rows; the remaining rows
  are copied from the first model, in config order with the base model first, that has them. The output
  keeps every row, and its ``config.json`` gets the new ``vocab_size``.
* Tied weights: embedding / LM-head tensors that are identical in every model (e.g. ``lm_head.weight`` stored
  next to ``model.embed_tokens.weight``, T5's ``shared`` and ``*.embed_tokens``) are merged once under the
  first name and written again under the others, so they stay tied, a random mask (DARE) cannot untie them
  and global statistics count them once. A model folder whose ``config.json`` says
  ``tie_word_embeddings: false`` has no tied tensors.
* ``on_mismatch: skip``: the tensors copied from the reference instead of merged are reported in one warning.
"""
from __future__ import annotations

import json
import re
import warnings
from collections import defaultdict
from typing import Sequence

import torch

from .io import Source

# Module names of input embeddings and output heads, the only tensors whose rows are vocabulary entries and
# the only tensors tested for ties (a content check on every tensor would read whole models twice).
EMBEDDING_KEY_RE = re.compile(r"(?:^|\.)(?:embed_tokens|embed_in|embed_out|word_embeddings|wte|shared|lm_head"
                              r"|output|decoder)\.weight$")
_MAX_WARNED = 10

Segment = tuple[Source, int, int]  # rows [start, stop) of a tensor copied from one source


def vocab_rows(key: str, sources: Sequence[Source]) -> tuple[int, list[Segment]] | None:
    """For an embedding / LM head whose shapes differ only in the number of rows: the common row count and
    the segments of the remaining rows, each from the first source that has it. None for any other key."""
    shapes = [tuple(src.shape(key)) for src in sources]
    if not EMBEDDING_KEY_RE.search(key) or len(set(shapes)) == 1:
        return None
    if any(len(s) == 0 or s[1:] != shapes[0][1:] for s in shapes):
        return None
    common = min(s[0] for s in shapes)
    tail, covered = [], common
    for src, s in zip(sources, shapes):
        if s[0] > covered:
            tail.append((src, covered, s[0]))
            covered = s[0]
    return common, tail


def append_rows(merged: torch.Tensor, key: str, tail: Sequence[Segment]) -> torch.Tensor:
    """The merged common rows followed by the copied rows (cast to the merged tensor's dtype)."""
    return torch.cat([merged] + [src.get(key)[start:stop].to(merged.dtype) for src, start, stop in tail])


def vocab_warning(truncated: dict[str, tuple[int, list[Segment]]], ref: Source) -> None:
    lines = [f"{key}: rows [0, {common}) merged; " + ", ".join(f"rows [{a}, {b}) copied from {src.name}"
                                                               for src, a, b in tail)
             for key, (common, tail) in list(truncated.items())[:_MAX_WARNED]]
    warnings.warn("on_vocab_mismatch: truncate: the models' vocabularies differ; only the common leading rows "
                  "are merged:\n  " + "\n  ".join(lines)
                  + f"\nThe tokenizer files are copied from {ref.name}: use the tokenizer of the model the extra "
                    f"rows come from if its added tokens should be usable.", stacklevel=3)


def _says_untied(ref: Source) -> bool:
    path = ref.folder / "config.json" if ref.folder is not None else None
    if path is None or not path.is_file():
        return False
    try:
        return json.loads(path.read_text()).get("tie_word_embeddings") is False
    except (ValueError, AttributeError):
        return False


def _identical(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)


def tied_keys(ref: Source, sources: Sequence[Source]) -> dict[str, str]:
    """{tied key: the key it is merged under} for embedding / LM-head tensors of equal shape and dtype that are
    identical in every source. The first key in sorted order is the one merged."""
    if _says_untied(ref):
        return {}
    present = [set(src.keys()) for src in sources]
    groups = defaultdict(list)
    for key in sorted(ref.keys()):
        if EMBEDDING_KEY_RE.search(key) and all(key in have for have in present):
            groups[(tuple(ref.shape(key)), ref.dtype(key))].append(key)
    tied = {}
    for keys in groups.values():
        classes = [keys] if len(keys) > 1 else []
        for src in sources:  # split each class into keys whose tensors are equal in this source too
            refined = []
            for cls in classes:
                tensors = {k: src.get(k) for k in cls}
                buckets: list[list[str]] = []
                for k in cls:
                    same = next((b for b in buckets if _identical(tensors[b[0]], tensors[k])), None)
                    if same is None:
                        buckets.append([k])
                    else:
                        same.append(k)
                refined += [b for b in buckets if len(b) > 1]
            classes = refined
        for cls in classes:
            tied.update({k: cls[0] for k in cls[1:]})
    return tied


class TiedOutputs:
    """Merged tensors of keys that others are tied to, kept only until the last tied copy has been taken."""

    def __init__(self, tied: dict[str, str]):
        self.waiting: dict[str, int] = defaultdict(int)
        for primary in tied.values():
            self.waiting[primary] += 1
        self.values: dict[str, torch.Tensor] = {}
        self.left: dict[str, int] = {}

    def keep(self, key: str, tensor: torch.Tensor) -> None:
        if key in self.waiting:
            self.values[key], self.left[key] = tensor, self.waiting[key]

    def take(self, primary: str) -> torch.Tensor:
        tensor = self.values[primary]
        self.left[primary] -= 1
        if not self.left[primary]:
            del self.values[primary]
        return tensor


def skip_warning(skipped: list[tuple[str, str]], dropped: list[str], ref: Source) -> None:
    """One warning listing what `on_mismatch: skip` did (the first few of each kind, and how many)."""
    parts = []
    if skipped:
        parts.append(f"{len(skipped)} tensor(s) copied from {ref.name} instead of merged:\n  "
                     + "\n  ".join(reason for _, reason in skipped[:_MAX_WARNED])
                     + ("\n  ..." if len(skipped) > _MAX_WARNED else ""))
    if dropped:
        parts.append(f"{len(dropped)} tensor(s) not in {ref.name} left out of the output: "
                     + ", ".join(dropped[:_MAX_WARNED]) + (" ..." if len(dropped) > _MAX_WARNED else ""))
    if parts:
        warnings.warn("on_mismatch: skip: " + "\n".join(parts), stacklevel=3)
