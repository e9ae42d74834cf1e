"""Errors reparam raises on bad input. Each names the offending file, key, field or module."""


class ReparamError(ValueError):
    """Base class: a problem with what the user gave us (not a bug in reparam)."""


class ConfigError(ReparamError):
    """A method config or option is invalid (unknown field, bad value)."""


class TargetError(ReparamError):
    """A target spec matched nothing, or matched a module kind the method cannot adapt."""


class AdapterFileError(ReparamError):
    """An adapter file is missing, corrupted, of the wrong format, or does not fit the model."""


class BaseModelMismatch(AdapterFileError):
    """An adapter is being loaded onto a different base model than the one it was trained on."""
