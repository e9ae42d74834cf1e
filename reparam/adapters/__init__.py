"""Adapting methods: one file per method; importing a file registers its method."""
from . import adalora, dora, lora, soma, sorsa, svfit  # noqa: F401
