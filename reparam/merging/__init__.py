"""Model merging: mergekit-style configs, a streaming safetensors engine, and pure state-dict functions.

>>> from reparam.merging import merge_models
>>> merge_models("merge.yml", "out/")                      # doctest: +SKIP

Methods (mergekit names): linear, task_arithmetic, ties, dare_linear, dare_ties, slerp, breadcrumbs,
breadcrumbs_ties, della, della_linear, model_stock. Parameter names and defaults follow mergekit; each
method module's docstring lists its deliberate differences. The main ones:

* every merge is computed in float32 and cast once (mergekit adds deltas in the load dtype);
* ``weight`` defaults to 1.0 (mergekit requires it); unknown parameters are errors;
* DARE and DELLA rescale by the inverse keep probability by default (papers; ``rescale_mode: l1`` gives
  current mergekit's norm matching); random masks are seeded per (seed, model, tensor), so they are
  reproducible but not mergekit's;
* exact top-k ties are broken by lower index; Breadcrumbs keeps ``density`` even when gamma*numel < 1;
* extensions: TIES ``scope: global`` (whole-model thresholds, one statistics pass of two sweeps),
  ``topk_mode``, ``consensus_method``; config keys ``seed``, ``exclude``, ``on_mismatch``,
  ``max_shard_size``; Model Stock ``clamp_ratio``.
"""
from .config import MergeConfig, load_config
from .engine import merge_models, merge_state_dicts
from .errors import MergeConfigError, MergeValidationError
from .methods.breadcrumbs import breadcrumbs_merge
from .methods.dare import dare, dare_merge
from .methods.della import della_merge
from .methods.linear import linear_merge
from .methods.model_stock import model_stock_merge
from .methods.slerp import slerp, slerp_merge
from .methods.task_arithmetic import task_arithmetic
from .methods.ties import ties_merge
from .registry import METHODS, method_names

__all__ = [
    "merge_models", "merge_state_dicts", "load_config", "MergeConfig", "MergeConfigError", "MergeValidationError",
    "linear_merge", "task_arithmetic", "ties_merge", "dare_merge", "dare", "breadcrumbs_merge", "della_merge",
    "slerp", "slerp_merge", "model_stock_merge", "METHODS", "method_names",
]
