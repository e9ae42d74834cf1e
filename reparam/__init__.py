"""reparam: adapt, compress, merge and prune pretrained PyTorch models."""
from . import adapters as _adapters  # noqa: F401  (registers the built-in methods)
from .adapters.dora import DoraConfig
from .adapters.lora import LoraConfig, PissaConfig, RsLoraConfig
from .adapters.prefix import collapse_prefix
from .core.errors import AdapterFileError, BaseModelMismatch, ConfigError, ReparamError, TargetError
from .core.model import (active_adapters, adapt, delete_adapter, disabled, explain, merge, regularizer,
                         set_active, trainable_summary, unload, unmerge)
from .core.registry import make_config, methods
from .io.adapter_files import load_adapter, save_adapter
from .io.peft_compat import export_peft, import_peft
from .merging import merge_models

__version__ = "0.1.0"

__all__ = [
    "adapt", "explain", "set_active", "active_adapters", "disabled", "delete_adapter", "merge", "unmerge",
    "unload", "regularizer", "trainable_summary", "methods", "make_config", "save_adapter", "load_adapter",
    "export_peft", "import_peft", "merge_models", "collapse_prefix", "LoraConfig", "RsLoraConfig", "PissaConfig", "DoraConfig",
    "ReparamError", "ConfigError", "TargetError", "AdapterFileError", "BaseModelMismatch",
]
