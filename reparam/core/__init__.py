"""Shared machinery: targets, the adapted-layer mechanism, registry, SVD, errors."""
