"""Rank allocations of adapters trained with a rank allocator (AdaLoRA, ...): the per-module ranks for
`reparam inspect`, and `reparam plot-ranks ADAPTER_DIR -o ranks.png`, a heatmap of layers x module kinds.

Convention: such a method's config has a `rank_pattern` field mapping a module to its allocation, either a list
of booleans over its initial components (AdaLoRA) or a rank; a module not in it has the config's `r`.
"""
from __future__ import annotations

import re
from pathlib import Path

from .common import CLIError

_LAYER = re.compile(r"^(.*?\.)?(\d+)\.(.+)$")  # "bert.encoder.layer.3.attention.self.query": 3, "attention.self.query"


def module_ranks(config: dict) -> dict[str, int] | None:
    """Rank of each adapted module from an adapter's saved config (read_adapter's), or None for fixed-rank methods."""
    fields = config["config"]
    if "rank_pattern" not in fields:
        return None
    pattern = fields["rank_pattern"] or {}
    return {m: (sum(map(bool, pattern[m])) if isinstance(pattern[m], list) else int(pattern[m])) if m in pattern
            else int(fields.get("r") or 0) for m in config["modules"]}


def rank_grid(ranks: dict[str, int]):
    """(layer labels, kind labels, rows of ranks or None) of a layers x module-kind table."""
    cells, layers, kinds = {}, [], []
    for module, rank in ranks.items():
        match = _LAYER.match(module)
        layer, kind = (match.group(2), match.group(3)) if match else ("-", module)
        cells[layer, kind] = rank
        layers += [layer] if layer not in layers else []
        kinds += [kind] if kind not in kinds else []
    layers.sort(key=lambda x: (not x.isdigit(), int(x) if x.isdigit() else 0))
    return layers, kinds, [[cells.get((layer, kind)) for kind in kinds] for layer in layers]


def plot_ranks(ranks: dict[str, int], output, title: str = "") -> Path:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    import numpy as np

    layers, kinds, rows = rank_grid(ranks)
    grid = np.array([[np.nan if v is None else v for v in row] for row in rows], dtype=float)
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(kinds), 1.4 + 0.4 * len(layers)))
    image = ax.imshow(np.ma.masked_invalid(grid), cmap="viridis", aspect="auto", vmin=0)
    for (i, j), value in np.ndenumerate(grid):
        if not np.isnan(value):
            ax.text(j, i, str(int(value)), ha="center", va="center", color="w" if value < np.nanmax(grid) / 2 else "k")
    ax.set_xticks(range(len(kinds)), [k.replace(".", ".\n") for k in kinds], fontsize=8)
    ax.set_yticks(range(len(layers)), layers)
    ax.set_xlabel("module")
    ax.set_ylabel("layer")
    ax.set_title(title or f"rank allocation (total {sum(ranks.values())})")
    fig.colorbar(image, ax=ax, label="rank")
    fig.tight_layout()
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, dpi=120)
    plt.close(fig)
    return output


def cmd_plot_ranks(args) -> int:
    from ..io.adapter_files import read_adapter

    _, config = read_adapter(args.adapter_dir)
    ranks = module_ranks(config)
    if ranks is None:
        raise CLIError(f"{args.adapter_dir}: method {config['method']!r} has a fixed rank; plot-ranks needs an "
                       f"adapter trained with a rank allocator (e.g. adalora)")
    out = plot_ranks(ranks, args.output, f"{config['method']} rank allocation, total {sum(ranks.values())}")
    print(f"rank allocation of {len(ranks)} modules (total {sum(ranks.values())}) drawn to {out}")
    return 0


def add_plot_ranks_parser(sub) -> None:
    p = sub.add_parser("plot-ranks", help="draw an adapter's rank allocation as a heatmap (layers x module kinds)",
                       description="Draw the final rank of every module of an adapter trained with a rank "
                                   "allocator (e.g. adalora) as a heatmap: layers x module kinds.")
    p.add_argument("adapter_dir", metavar="ADAPTER_DIR", help="reparam adapter directory")
    p.add_argument("--output", "-o", required=True, help="image file to write (.png, .svg, .pdf)")
    p.set_defaults(func=cmd_plot_ranks)
