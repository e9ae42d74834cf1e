"""`reparam delta extract|apply|remove|info`: task vectors and weight signatures as files.

Wired into the main CLI with ``add_delta_parser(subparsers)``. Problems with the inputs raise
:class:`~reparam.core.errors.ReparamError` subclasses, which the main CLI prints as one error line (exit 2).
"""
from __future__ import annotations

import argparse

from .common import fmt_bytes

LAYERS_HELP = ("tensors to cover: comma-separated items, each 're:REGEX' (runs to the end of the value), "
               "a block number or range 'N' / 'N-M', 'shallow:K' (first K conv layers), or a tensor/module "
               "name; repeatable (default: every floating-point tensor)")


def add_delta_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "delta", help="extract, apply, remove or inspect a task vector / weight signature file",
        description="Task vectors (finetuned - base) and Robust Weight Signatures as safetensors files: "
                    "extract one from two models, add it to a model with a scale, remove it, or inspect it.")
    sub = p.add_subparsers(dest="delta_command", metavar="ACTION", required=True)

    e = sub.add_parser("extract", help="write finetuned - base (or a weight signature) to a delta file",
                       description="Stream two models (HF folders, sharded or not, or .safetensors files) "
                                   "tensor by tensor and write their difference on the chosen layers.")
    e.add_argument("--base", required=True, help="base model the fine-tuned model started from")
    e.add_argument("--finetuned", required=True, help="fine-tuned model")
    e.add_argument("-o", "--out", required=True, help="delta file (.safetensors) or folder to write it in")
    e.add_argument("--layers", action="append", default=None, help=LAYERS_HELP)
    e.add_argument("--exclude", action="append", default=[], metavar="REGEX",
                   help="leave out matching tensors, e.g. a task head (repeatable)")
    e.add_argument("--clean", default=None, help="clean fine-tuned model: write the Robust Weight Signature "
                                                 "(delta with its component along clean - base removed)")
    e.add_argument("--dtype", choices=["float32", "float64", "bfloat16", "float16"], default=None,
                   help="storage dtype (default: each tensor's own dtype)")
    e.add_argument("--quantize", type=int, default=None, metavar="LEVELS",
                   help="store linear-quantised codes with LEVELS levels (2..256)")
    e.add_argument("--bn-stats", action="store_true", help="include BatchNorm running statistics")
    e.add_argument("--overwrite", action="store_true", help="replace an existing delta file")
    e.add_argument("--no-progress", action="store_true", help="no progress bar")
    e.set_defaults(func=run_extract)

    for name, summary in (("apply", "write model + scale * delta"), ("remove", "write model - scale * delta")):
        a = sub.add_parser(name, help=summary, description=f"{summary[0].upper()}{summary[1:]} as a Hugging Face "
                           "model folder (written atomically; config and tokenizer files are copied).")
        a.add_argument("--model", required=True, help="model folder or .safetensors file")
        a.add_argument("--delta", required=True, nargs="+", help="delta file(s); several are summed")
        a.add_argument("-o", "--out", required=True, help="output folder")
        a.add_argument("--scale", type=float, nargs="+", default=[1.0],
                       help="one scale for every delta or one per delta (default 1.0)")
        a.add_argument("--force", action="store_true",
                       help="apply even if the model is not one the delta was extracted from")
        a.add_argument("--overwrite", action="store_true", help="replace an existing non-empty output folder")
        a.add_argument("--max-shard-size", default="5GB", help="largest output shard (default 5GB)")
        a.add_argument("--no-copy-files", action="store_true", help="do not copy config/tokenizer files")
        a.add_argument("--no-progress", action="store_true", help="no progress bar")
        a.set_defaults(func=run_apply, remove=name == "remove")

    i = sub.add_parser("info", help="show what a delta file holds",
                       description="Print a delta file's sources, layers, dtype, quantisation and tensors.")
    i.add_argument("delta", metavar="DELTA", help="delta file or folder")
    i.add_argument("--brief", action="store_true", help="omit the per-tensor shapes")
    i.set_defaults(func=run_info)
    return p


def _layers(values: list[str] | None) -> list[str] | None:
    from ..merging.layer_select import parse_layers

    items = [item for v in values or [] for item in (parse_layers(v) or [])]
    return items or None


def run_extract(args) -> int:
    from ..merging.delta import delta_info, extract_delta

    path = extract_delta(args.base, args.finetuned, args.out, layers=_layers(args.layers), exclude=args.exclude,
                         clean=args.clean, dtype=args.dtype, quantize=args.quantize, bn_stats=args.bn_stats,
                         overwrite=args.overwrite, progress=not args.no_progress)
    info = delta_info(path)
    print(f"{'weight signature' if info['kind'] == 'signature' else 'task vector'} of {len(info['tensors'])} "
          f"tensor(s), {info['parameters']:,} parameters, written to {path} ({fmt_bytes(info['size'])})")
    return 0


def run_apply(args) -> int:
    from ..merging.delta import apply_delta, remove_delta

    fn = remove_delta if args.remove else apply_delta
    scale = args.scale[0] if len(args.scale) == 1 else args.scale
    out = fn(args.model, args.delta, args.out, scale=scale, force=args.force, overwrite=args.overwrite,
             max_shard_size=args.max_shard_size, copy_files=not args.no_copy_files, progress=not args.no_progress)
    scales = ", ".join(map(str, args.scale))
    print(f"{'removed' if args.remove else 'applied'} {len(args.delta)} delta(s) (scale {scales}) to {args.model}; "
          f"model written to {out}")
    return 0


def run_info(args) -> int:
    from ..merging.delta import delta_info

    info = delta_info(args.delta)
    kind = "weight signature" if info["kind"] == "signature" else "task vector"
    print(f"delta: {info['file']} ({kind}, format {info['format']})")
    for role in ("base", "finetuned", "clean"):
        if info.get(role):
            print(f"{role}: {info[role]}")
    print(f"layers: {', '.join(info['layers']) if info['layers'] else 'all'}"
          + (f"; excluding {', '.join(info['exclude'])}" if info["exclude"] else "")
          + ("; BatchNorm statistics included" if info["bn_stats"] else ""))
    q = info["quantization"]
    print(f"dtype: {info['dtype']}; quantization: {'linear, ' + str(q['levels']) + ' levels' if q else 'none'}")
    if not args.brief:
        width = max((len(k) for k in info["tensors"]), default=10)
        for key, t in info["tensors"].items():
            print(f"  {key:<{width}}  {'x'.join(map(str, t['shape'])) or 'scalar'}  {t['dtype']}")
    print(f"tensors: {len(info['tensors'])}; parameters: {info['parameters']:,}; file: {fmt_bytes(info['size'])}")
    return 0
