"""Errors raised by the merge engine. Each message names the model file, tensor, parameter or value at fault."""
from ..core.errors import ConfigError, ReparamError


class MergeConfigError(ConfigError):
    """The merge config is invalid: unknown method or parameter, bad value, missing model path."""


class MergeValidationError(ReparamError):
    """The input models do not fit together (missing tensor, shape or dtype mismatch)."""


__all__ = ["MergeConfigError", "MergeValidationError"]
