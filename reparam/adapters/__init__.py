"""Adapting methods: one file per method; importing a file registers its method."""
from . import dora, lora  # noqa: F401
