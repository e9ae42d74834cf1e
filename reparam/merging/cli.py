"""`reparam merge CONFIG.yml -o OUT`: wire with ``add_merge_parser(subparsers)`` in the main CLI.

``run_merge(args)`` returns 0 on success; config and validation problems raise
:class:`~reparam.core.errors.ReparamError` subclasses, which the main CLI reports as one error line (exit 2).
"""
from __future__ import annotations

import argparse
import json


def add_merge_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "merge", help="merge models from a mergekit-style YAML config (streaming, safetensors)",
        description="Merge Hugging Face safetensors models with linear, task_arithmetic, ties, dare_linear, "
                    "dare_ties, slerp, breadcrumbs, breadcrumbs_ties, della, della_linear or model_stock. "
                    "Models may be LoRA adapter folders (reparam or PEFT) on base_model; with `output: adapter` "
                    "the result is one PEFT LoRA adapter (exact, or a truncated SVD at `adapter_rank`).")
    p.add_argument("config", help="mergekit-style YAML config")
    p.add_argument("-o", "--out", required=True, help="output folder (written atomically)")
    p.add_argument("--max-shard-size", default=None, help="largest output shard, e.g. 5GB (default: config or 5GB)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing non-empty output folder")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--no-copy-files", action="store_true", help="do not copy config/tokenizer files from the base")
    p.set_defaults(func=run_merge)
    return p


def run_merge(args) -> int:
    from .adapter_merge import REPORT_FILE, format_report
    from .engine import merge_models

    out = merge_models(args.config, args.out, overwrite=args.overwrite, progress=not args.no_progress,
                       max_shard_size=args.max_shard_size, copy_files=not args.no_copy_files)
    report = out / REPORT_FILE  # written by `output: adapter` merges
    if report.is_file():
        print(format_report(json.loads(report.read_text())))
        print(f"merged adapter written to {out} (PEFT LoRA; errors per module in {REPORT_FILE})")
    else:
        print(f"merged model written to {out}")
    return 0
