"""Method registry: mergekit method names -> :class:`~reparam.merging.methods.base.MethodSpec`."""
from __future__ import annotations

from .errors import MergeConfigError
from .methods import breadcrumbs, dare, della, linear, model_stock, slerp, task_arithmetic, ties
from .methods import darex
from .methods import pcb
from .methods import fisher
from .methods.base import MethodSpec

METHODS: dict[str, MethodSpec] = {s.name: s for s in (
    linear.SPEC, task_arithmetic.SPEC, ties.SPEC, dare.SPEC_LINEAR, dare.SPEC_TIES, slerp.SPEC,
    breadcrumbs.SPEC, breadcrumbs.SPEC_TIES, della.SPEC, della.SPEC_LINEAR, model_stock.SPEC,
    darex.SPEC, pcb.SPEC, fisher.SPEC,
)}


def get_method(name: str) -> MethodSpec:
    try:
        return METHODS[name]
    except KeyError:
        raise MergeConfigError(f"unknown merge_method {name!r}; valid: {', '.join(sorted(METHODS))}") from None


def method_names() -> list[str]:
    return sorted(METHODS)
