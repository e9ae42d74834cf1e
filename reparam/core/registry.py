"""Method registry and the config base class every method's config derives from."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from .errors import ConfigError

_METHODS: dict[str, "MethodSpec"] = {}


@dataclass(frozen=True)
class MethodSpec:
    name: str
    config_cls: type
    adapter_cls: type
    summary: str


@dataclass
class MethodConfig:
    """Base for method configs: dataclasses whose unknown fields are an error, never ignored."""

    method = "base"  # class attribute, overridden by each registered config

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "MethodConfig":
        valid = cls.field_names()
        unknown = [k for k in values if k not in valid]
        if unknown:
            raise ConfigError(
                f"unknown field(s) {', '.join(map(repr, unknown))} for method '{cls.method}'; "
                f"valid fields: {', '.join(valid)}"
            )
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def select_modules(self, names: list[str]) -> list[str]:
        """The targeted module names this method adapts; a method may narrow them (SoMA adapts late blocks only)."""
        return names

    def select_layers(self, layers: dict) -> list[str]:
        """Like select_modules, given {name: module} for methods that decide by layer shape (PELA skips small heads)."""
        return self.select_modules(list(layers))

    def check(self, condition: bool, field: str, message: str) -> None:
        if not condition:
            raise ConfigError(f"{self.method}: invalid {field}={getattr(self, field)!r}: {message}")


def register(name: str, config_cls: type, adapter_cls: type, summary: str) -> None:
    config_cls.method = name
    _METHODS[name] = MethodSpec(name, config_cls, adapter_cls, summary)


def get_method(name: str) -> MethodSpec:
    if name not in _METHODS:
        raise ConfigError(f"unknown method {name!r}; registered methods: {', '.join(sorted(_METHODS))}")
    return _METHODS[name]


def methods() -> dict[str, MethodSpec]:
    """All registered methods by name, each with its config class and adapter class."""
    return dict(sorted(_METHODS.items()))


def make_config(method: str, **fields: Any) -> MethodConfig:
    return get_method(method).config_cls.from_dict(fields)
