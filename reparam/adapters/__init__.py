"""Adapting methods: one file per method; importing a file registers its method."""
from . import (adalora, dora, ewa, flora, gradnormlorp, hft, hut, increlora, lora, mam, moment_probing,  # noqa: F401
               nola, pela, prefix, sara, soma, sorsa, spiel, svfit, triadaptlora, unified_adapters, weight_compander)
