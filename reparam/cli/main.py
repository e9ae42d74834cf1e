"""The `reparam` command: finetune, demo, inspect, export, targets, methods.

Every command exits 0 on success, 1 when a check fails (demo), and 2 on bad arguments or input, with one line
`reparam: error: <message>` on stderr and no traceback.
"""
from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

from ..core.errors import ReparamError
from ..merging.cli import add_merge_parser
from . import demo, finetune
from . import fisher as fisher_cmd
from .common import bundled_model_path, fmt_bytes, fmt_metrics, load_classifier, read_side_file
from .delta import add_delta_parser
from .ranks import add_plot_ranks_parser, module_ranks

PROG = "reparam"


def cmd_targets(args) -> int:
    from ..core.model import explain

    model_path = args.model or bundled_model_path()
    model = load_classifier(model_path, num_labels=2)
    found = explain(model, args.targets, exclude=args.exclude)
    width = max(len(n) for n, _ in found)
    for name, desc in found:
        print(f"{name:<{width}}  {desc}")
    print(f"{len(found)} module(s) of {type(model).__name__} match {args.targets!r}"
          + (f" (excluding {args.exclude!r})" if args.exclude else ""))
    return 0


def group_by_module(tensors: dict, modules: list[str]) -> dict[str, list[tuple[str, list[int]]]]:
    """{module: [(tensor name inside it, shape)]}; a name may be nested (an adapter's `bottleneck.down.weight`)."""
    groups: dict[str, list] = defaultdict(list)
    for key, t in tensors.items():
        module = max((m for m in modules if key.startswith(m + ".")), key=len, default=key.rpartition(".")[0])
        groups[module].append((key[len(module) + 1:], list(t.shape)))
    return groups


def inspect_peft(directory: Path, args) -> int:
    from ..io.files import read_json, read_safetensors
    from ..io.peft_compat import CONFIG_FILE, PREFIX, WEIGHTS_FILE

    cfg = read_json(directory / CONFIG_FILE)
    print(f"{directory}: PEFT adapter ({CONFIG_FILE}), not a reparam adapter; "
          f"load it with reparam.import_peft(model, {str(directory)!r})")
    for key in ("peft_type", "task_type", "r", "lora_alpha", "lora_dropout", "use_rslora", "use_dora",
                "target_modules", "modules_to_save", "base_model_name_or_path"):
        value = cfg.get(key)
        if isinstance(value, list) and len(value) > 4:
            value = f"{len(value)} modules: {', '.join(value[:3])}, ..."
        if key in cfg:
            print(f"  {key}: {value}")
    weights = directory / WEIGHTS_FILE
    if weights.is_file():
        tensors, _ = read_safetensors(weights)
        if not args.brief:
            for key, t in tensors.items():
                print(f"  {key.removeprefix(PREFIX)}  {'x'.join(map(str, t.shape)) or 'scalar'}")
        print(f"parameters: {sum(t.numel() for t in tensors.values()):,} in {len(tensors)} tensors")
        print(f"files: {WEIGHTS_FILE} {fmt_bytes(weights.stat().st_size)}")
    return 0


def cmd_inspect(args) -> int:
    from ..io.adapter_files import CONFIG_FILE, TENSORS_FILE, read_adapter
    from ..io.peft_compat import CONFIG_FILE as PEFT_CONFIG

    directory = Path(args.adapter_dir)
    if directory.is_dir() and not (directory / TENSORS_FILE).exists() and (directory / PEFT_CONFIG).exists():
        return inspect_peft(directory, args)
    tensors, config = read_adapter(directory)
    to_save = config.get("modules_to_save", [])
    groups = group_by_module(tensors, config["modules"] + to_save)
    print(f"adapter: {directory} (name {config.get('name', 'default')!r}, format {config['format']})")
    print(f"method: {config['method']}")
    ranks = module_ranks(config)  # methods with a rank allocator: the rank pattern is shown per module below
    print("config: " + ", ".join(f"{k}={v!r}" for k, v in config["config"].items() if k != "rank_pattern" or ranks is None))
    print(f"base model class: {config.get('base_model_class', '?')}")
    print(f"adapted modules: {len(config['modules'])}; modules saved in full: {len(to_save)}"
          + (f" ({', '.join(to_save)})" if to_save else ""))
    if not args.brief:
        width = max((len(m) for m in groups), default=10)
        for module in config["modules"] + to_save:
            shapes = ", ".join(f"{p} {'x'.join(map(str, s)) or 'scalar'}" for p, s in groups.get(module, []))
            rank = f"rank {ranks[module]:<3} " if ranks and module in ranks else ""
            print(f"  {module:<{width}}  {rank}{shapes}")
    if ranks:
        print(f"ranks: total {sum(ranks.values())} over {len(ranks)} modules "
              f"(min {min(ranks.values())}, max {max(ranks.values())})")
    n_params = sum(t.numel() for t in tensors.values())
    n_saved = sum(t.numel() for k, t in tensors.items() if k.rpartition(".")[0] in to_save)
    print(f"parameters: {n_params:,} ({n_params - n_saved:,} adapter + {n_saved:,} in saved modules)")
    size = (directory / TENSORS_FILE).stat().st_size
    print(f"files: {TENSORS_FILE} {fmt_bytes(size)}"
          + (f", {CONFIG_FILE} {fmt_bytes((directory / CONFIG_FILE).stat().st_size)}"
             if (directory / CONFIG_FILE).is_file() else ""))
    side = read_side_file(directory)
    if side:
        print(f"trained by `reparam finetune` on {side.get('data')} from {side.get('model')}")
        if side.get("eval_after"):
            print(f"  eval: {fmt_metrics(side['eval_after'])}")
    return 0


def adapter_num_labels(tensors: dict, config: dict) -> int | None:
    """Rows of the saved head's output layer (the last 2-D weight among modules_to_save)."""
    weights = [t for k, t in tensors.items() if k.rpartition(".")[0] in config.get("modules_to_save", [])
               and k.endswith("weight") and t.dim() == 2]
    return int(weights[-1].shape[0]) if weights else None


def cmd_export(args) -> int:
    from ..io.adapter_files import load_adapter, read_adapter
    from ..io.peft_compat import export_peft

    tensors, config = read_adapter(args.adapter_dir)
    side = read_side_file(args.adapter_dir)
    model_path = args.model or side.get("model") or bundled_model_path()
    num_labels = side.get("num_labels") or adapter_num_labels(tensors, config) or 2
    model = load_classifier(model_path, num_labels=num_labels, model_class=config.get("base_model_class"))
    load_adapter(model, args.adapter_dir, check_base=not args.no_check_base)
    if args.format == "pela-factorised":
        from ..adapters.pela import export_factorised

        out = export_factorised(model, args.output, name=config.get("name", "default"))
        print(f"exported the factorised {config['method']} model ({len(config['modules'])} modules) to {out}")
        return 0
    out = export_peft(model, args.output, name=config.get("name", "default"))
    print(f"exported {config['method']} adapter ({len(config['modules'])} modules) on {model_path} "
          f"as a PEFT LoRA adapter to {out}")
    return 0


def cmd_methods(args) -> int:
    from ..core.registry import methods

    for name, spec in methods().items():
        print(f"{name:<10} {spec.summary}")
        print(f"{'':<10} fields: {', '.join(spec.config_cls.field_names())}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Adapt, merge and export pretrained PyTorch models "
                                     "with parameter-efficient methods.")
    parser.add_argument("--version", action="version", version=f"{PROG} {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("finetune", help="adapt a sequence classifier, train it, save the adapter",
                       description="Adapt a model (a sequence classifier) with a method, train it on a "
                                   "classification data set, evaluate it and save the adapter.")
    finetune.add_arguments(p)
    p.set_defaults(func=finetune.run)

    p = sub.add_parser("demo", help="LoRA on the bundled model and sentiment set, then save/reload/merge checks",
                       description="Fine-tune the bundled all-MiniLM-L6-v2 with LoRA on the bundled sentiment "
                                   "set, then check that a saved, reloaded and merged adapter predicts the same.")
    demo.add_arguments(p)
    p.set_defaults(func=demo.run)

    p = sub.add_parser("inspect", help="show what an adapter directory holds",
                       description="Print an adapter's method, config, modules, tensor shapes and size.")
    p.add_argument("adapter_dir", metavar="ADAPTER_DIR", help="directory written by save_adapter or finetune")
    p.add_argument("--brief", action="store_true", help="omit the per-module tensor shapes")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("export", help="write an adapter in another format (PEFT)",
                       description="Load a reparam adapter onto its base model and write it as a PEFT adapter.")
    p.add_argument("adapter_dir", metavar="ADAPTER_DIR", help="reparam adapter directory")
    p.add_argument("--format", choices=["peft", "pela-factorised"], default="peft",
                   help="output format (default peft; pela-factorised: a pela adapter's factorised model, "
                        "reparam.adapters.pela.load_factorised reads it)")
    p.add_argument("--output", "-o", required=True, help="output directory")
    p.add_argument("--model", default=None, help="base model (default: the one finetune recorded, else the "
                                                 "bundled all-MiniLM-L6-v2)")
    p.add_argument("--no-check-base", action="store_true", help="load even if the base weights differ")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("targets", help="list the modules a target spec adapts",
                       description="List the modules of a model that --targets selects, with type and shape.")
    p.add_argument("--model", default=None, help="model folder or name (default: the bundled all-MiniLM-L6-v2)")
    p.add_argument("--targets", default="all-linear", help="target spec (default all-linear)")
    p.add_argument("--exclude", default=None, help="modules to leave out")
    p.set_defaults(func=cmd_targets)

    add_merge_parser(sub)
    add_delta_parser(sub)
    add_plot_ranks_parser(sub)

    p = sub.add_parser("fisher", help="diagonal Fisher of a fine-tuned classifier, the sidecar of Fisher merging",
                       description="Compute the diagonal Fisher information of a fine-tuned classifier on its own "
                                   "task data and save it as a safetensors sidecar (merge_method: fisher).")
    fisher_cmd.add_arguments(p)
    p.set_defaults(func=fisher_cmd.run)

    p = sub.add_parser("methods", help="list the registered methods and their config fields",
                       description="List the registered adaptation methods and their config fields.")
    p.set_defaults(func=cmd_methods)
    return parser


def _version() -> str:
    from .. import __version__

    return __version__


def error(message: str) -> int:
    lines = str(message).strip().splitlines() or ["unknown error"]
    print(f"{PROG}: error: {lines[0]}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit code (argparse's own exits, --help and usage errors, included)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version, usage errors
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    try:
        return args.func(args)
    except ReparamError as e:
        return error(str(e))
    except OSError as e:  # a model folder or file that is not there or not readable
        return error(str(e) or type(e).__name__)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
