"""Model merging: mergekit-style configs, a streaming safetensors engine, and pure state-dict functions.

>>> from reparam.merging import merge_models
>>> merge_models("merge.yml", "out/")                      # doctest: +SKIP

Methods (mergekit names): linear, task_arithmetic, ties, dare_linear, dare_ties, slerp, breadcrumbs,
breadcrumbs_ties, della, della_linear, model_stock. Parameter names and defaults follow mergekit; each
method module's docstring lists its deliberate differences. The main ones:

* every merge is computed in float32 and cast once (mergekit adds deltas in the load dtype);
* ``weight`` defaults to 1.0 (mergekit requires it); unknown parameters are errors;
* DARE and DELLA rescale by the inverse keep probability by default (papers; ``rescale_mode: l1`` gives
  current mergekit's norm matching); random masks come from a counter-based stream keyed by (seed, model,
  tensor), so they are reproducible (whatever the threads or chunking) but not mergekit's;
* TIES, DARE and task arithmetic on float32/bfloat16 CPU tensors (up to 4 models) run in fused numba kernels
  (fused.py), bit for bit equal to the torch code that serves everything else;
* exact top-k ties are broken by lower index, and top-k keeps floor(density*numel) entries (mergekit 0.1.5
  keeps at least one); Breadcrumbs keeps ``density`` even when gamma*numel < 1 (as mergekit 0.1.5 does);
* extensions: TIES ``scope: global`` (whole-model thresholds, one statistics pass of two sweeps),
  ``topk_mode``, ``consensus_method``; config keys ``seed``, ``exclude``, ``on_mismatch``,
  ``on_vocab_mismatch`` (``truncate`` keeps the extra rows, mergekit drops them), ``max_shard_size``; Model
  Stock ``clamp_ratio``; tied embedding / LM-head tensors are merged once and re-tied (keys.py).
  tests/merging/test_mergekit_parity.py runs mergekit itself and checks each of these.
* ``darex`` (DAREx-q, not in mergekit): DARE's masks with survivors rescaled by 1/q; q is chosen beforehand in
  Python with ``search_q_validation`` (labelled dev set) or ``search_q_output_change`` (unlabelled text).
* ``fisher`` (Fisher-weighted averaging, not in mergekit): each model's ``fisher`` parameter names its diagonal
  Fisher sidecar (``reparam fisher`` writes one); the first model is the target (its head is kept).
* ``pcb`` (PCB-merging, not in mergekit): whole-model statistics by default (``scope: global``); per-task
  lambda_i (per-model ``weight``) can be searched by CMA-ES on a validation metric with ``pcb_search``.
* LoRA adapters (reparam's or PEFT's folders) may be listed as models on ``base_model`` (adapter_source.py);
  ``output: adapter`` merges them into one PEFT LoRA adapter (adapter_merge.py, ``merge_adapters``).
"""
from .adapter_merge import merge_adapters
from .config import MergeConfig, load_config
from .darex_q import search_q_output_change, search_q_validation
from .delta import apply_delta, delta_info, extract_delta, remove_delta
from .engine import merge_models, merge_state_dicts
from .errors import MergeConfigError, MergeValidationError
from .methods.breadcrumbs import breadcrumbs_merge
from .methods.dare import dare, dare_merge
from .methods.darex import darex, darex_merge
from .methods.della import della_merge
from .methods.fisher import fisher_merge
from .methods.linear import linear_merge
from .methods.model_stock import model_stock_merge
from .methods.pcb import pcb_merge
from .methods.pcb_search import pcb_components, pcb_search
from .methods.slerp import slerp, slerp_merge
from .methods.task_arithmetic import task_arithmetic
from .methods.ties import ties_merge
from .registry import METHODS, method_names

__all__ = [
    "merge_models", "merge_state_dicts", "load_config", "MergeConfig", "MergeConfigError", "MergeValidationError",
    "linear_merge", "task_arithmetic", "ties_merge", "dare_merge", "dare", "breadcrumbs_merge", "della_merge",
    "slerp", "slerp_merge", "model_stock_merge", "METHODS", "method_names",
    "darex", "darex_merge", "search_q_validation", "search_q_output_change",
    "extract_delta", "apply_delta", "remove_delta", "delta_info",
    "fisher_merge",
    "pcb_merge", "pcb_search", "pcb_components",
    "merge_adapters",
]
