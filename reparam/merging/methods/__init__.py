"""Merge methods: one module per method, each with parameter dataclasses, a per-tensor kernel and a pure
state-dict function."""
