"""Task vectors and weight signatures as files: extract a delta from two models, apply it, remove it.

``extract_delta(base, finetuned, out, layers=...)`` streams tensor by tensor from memory-mapped safetensors
(HF folders, single or sharded, or plain .safetensors files) and writes one safetensors file holding
tau = finetuned - base for the tensors `layers` selects (layer_select.py), computed in float32 (float64
when stored in float64) and rounded once to the storage dtype (default: each tensor's own dtype). The
metadata entry ``reparam_delta`` (JSON) records the sources, the layer spec, the dtype and fingerprints of
the base, the fine-tuned (and clean) model: shape and content hash (strided sample, as adapters use) of
every covered tensor. With ``clean=`` (theta_std) the tensors are Robust Weight Signatures (signatures.py):
tau with its component along clean - base projected out; ``quantize=L`` stores L-level linear codes (uint8)
and a float32 range per tensor (``<name>@range``).

``apply_delta(model, delta, out, scale=1.0)`` writes model + scale * delta as an HF folder; a negative scale
removes (``remove_delta``). Several deltas compose: model + sum_i scale_i * delta_i, the sum in float32,
added and rounded once. Keys, shapes and dtypes are checked from the headers first, each covered tensor's
content hash while streaming: the target, or the result, must be one of the models the delta was extracted
from (apply to the base, remove from the fine-tuned model, restore the base or the clean model), otherwise
it is an error unless force=True (patching another model fine-tuned from the same base, scales other than
+-1). The output folder appears atomically; integer tensors and tensors the delta does not cover are copied.

Exactness: a float32 delta of float32 models gives back the fine-tuned model bit for bit when the deltas are
small against the weights (fine-tuning), not for arbitrary pairs (a value near 0 next to a large one loses
bits); removing it gives the base back within one float32 rounding. dtype="float64" makes both exact for
float32 models, dtype="float32" for bf16/fp16 models; a bf16 delta of bf16 models is within one bf16 rounding.
"""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import torch
from safetensors import safe_open
from tqdm.auto import tqdm

from ..core.model import weight_fingerprint
from ..io.files import atomic_write
from .engine import COPY_FILES, prefetch
from .errors import MergeConfigError, MergeValidationError
from .io import DictSource, SafetensorsSource, ShardWriter, Source, folder_swap, parse_size, write_shards
from .layer_select import parse_layers, select_tensors
from .signatures import dequantize_linear, quantize_linear, signature

FORMAT = "reparam-delta/1"
META_KEY = "reparam_delta"
DELTA_FILE = "reparam_delta.safetensors"
RANGE_SUFFIX = "@range"
DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}
_MAX_LISTED = 20


def delta_path(path: str | Path) -> Path:
    """A ``.safetensors`` path is the delta file itself; any other path is a folder holding DELTA_FILE."""
    path = Path(path)
    return path if path.suffix == ".safetensors" else path / DELTA_FILE


def _open(model, name: str) -> Source:
    return DictSource(model, name) if isinstance(model, Mapping) else SafetensorsSource(model)


def _dtype(dtype) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if str(dtype) not in DTYPES:
        raise MergeConfigError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    return DTYPES[str(dtype)]


def _fit_problems(ref: Source, other: Source, keys: Sequence[str], shapes: Mapping[str, Sequence[int]]) -> list[str]:
    """Header-only check that `other` has every key, with the shape `shapes` gives and a float dtype."""
    problems, have = [], set(other.keys())
    for key in keys:
        if key not in have:
            problems.append(f"{other.name}: tensor {key!r} is missing (present in {ref.where(key)})")
        elif list(other.shape(key)) != list(shapes[key]):
            problems.append(f"tensor {key!r}: {other.where(key)} has shape {list(other.shape(key))}, "
                            f"but {ref.where(key)} has shape {list(shapes[key])}")
        elif not other.dtype(key).is_floating_point:
            problems.append(f"tensor {key!r}: {other.where(key)} has dtype {other.dtype(key)}, not a float")
    return problems


def _raise_problems(what: str, problems: list[str]) -> None:
    if problems:
        more = f" (first {_MAX_LISTED} of {len(problems)})" if len(problems) > _MAX_LISTED else ""
        raise MergeValidationError(f"{what}{more}:\n  " + "\n  ".join(problems[:_MAX_LISTED]))


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not overwrite and (out.is_file() or any(out.iterdir())):
        raise MergeConfigError(f"output {str(out)!r} exists (pass overwrite=True / --overwrite)")


def extract_delta(base, finetuned, out: str | Path, *, layers=None, exclude: Sequence[str] = (), clean=None,
                  dtype=None, quantize: int | None = None, bn_stats: bool = False, overwrite: bool = False,
                  progress: bool = False) -> Path:
    """Write the delta finetuned - base (or, with `clean`, the weight signature) to `out`; returns the file.

    base, finetuned, clean: model folders, .safetensors files or state dicts. layers: see layer_select.py.
    exclude: regexes of tensors to leave out (task heads). dtype: storage dtype (default: each tensor's).
    quantize: number of linear quantisation levels (2..256). bn_stats: include BatchNorm running stats.
    """
    store = _dtype(dtype)
    if quantize is not None and (isinstance(quantize, bool) or not isinstance(quantize, int)
                                 or not 2 <= quantize <= 256):
        raise MergeConfigError(f"quantize must be a number of levels in [2, 256], got {quantize!r}")
    path = delta_path(out)
    _check_out(path, overwrite)
    sources = [_open(base, "base"), _open(finetuned, "finetuned")]
    if clean is not None:
        sources.append(_open(clean, "clean"))
    try:
        bsrc, others = sources[0], sources[1:]
        keys = select_tensors(bsrc, layers, exclude, bn_stats)
        shapes = {k: bsrc.shape(k) for k in keys}
        problems = [p for src in others for p in _fit_problems(bsrc, src, keys, shapes)]
        for src in others:  # a tensor only the fine-tuned model has cannot be a delta: say so, never drop it
            extra = sorted(set(select_tensors(src, layers, exclude, bn_stats, strict=False)) - set(bsrc.keys()))
            problems += [f"{src.where(k)}: tensor {k!r} is not in {bsrc.name}" for k in extra]
        _raise_problems(f"{bsrc.name} and {', '.join(s.name for s in others)} do not fit together", problems)

        # the header (with the fingerprints) goes first in the file: hash in a pass of its own
        roles = ["base", "finetuned"] + (["clean"] if clean is not None else [])
        meta = {"format": FORMAT, "kind": "signature" if clean is not None else "task_vector",
                **{role: src.name for role, src in zip(roles, sources)},
                "layers": parse_layers(layers), "exclude": list(exclude), "bn_stats": bn_stats,
                "dtype": str(store).replace("torch.", "") if store else "as base",
                "quantization": {"method": "linear", "levels": quantize} if quantize else None,
                "fingerprints": {role: {k: weight_fingerprint(src.get(k)) for k in keys}
                                 for role, src in zip(roles, sources)}}
        entries = []
        for k in keys:
            if quantize:
                entries += [(k, shapes[k], torch.uint8), (k + RANGE_SUFFIX, (2,), torch.float32)]
            else:
                entries.append((k, shapes[k], store or bsrc.dtype(k)))

        def tensors(k):
            return [src.get(k) for src in sources]

        def write(tmp):
            writer = ShardWriter(Path(tmp), entries, {"format": "pt", META_KEY: json.dumps(meta)})
            try:
                for k, loaded in tqdm(prefetch(keys, tensors), total=len(keys), desc="extract", unit="tensor",
                                      disable=not progress):
                    b, f = loaded[0], loaded[1]
                    work = torch.float64 if store == torch.float64 else torch.float32
                    d = f.to(work) - b.to(work)
                    if clean is not None:
                        d = signature(d, loaded[2].to(work) - b.to(work))
                    if quantize:
                        try:
                            codes, value_range = quantize_linear(d, quantize, f"tensor {k!r}")
                        except ValueError as e:
                            raise MergeValidationError(str(e)) from None
                        writer.write(k, codes)
                        writer.write(k + RANGE_SUFFIX, value_range)
                    else:
                        writer.write(k, d.to(store or bsrc.dtype(k)))
                writer.close()
            finally:
                writer.abort()

        atomic_write(path, write)
    finally:
        for s in sources:
            s.close()
    return path


def read_delta_header(path: str | Path) -> tuple[Path, dict, dict[str, tuple[list[int], str]]]:
    """(file, metadata, {tensor: (shape, dtype)}) of a delta file, from its header only."""
    file = delta_path(path)
    if not file.is_file():
        raise MergeConfigError(f"delta {str(path)!r}: no such file" + ("" if file == Path(path) else f" ({file})"))
    try:
        with safe_open(str(file), framework="pt") as f:
            meta = (f.metadata() or {}).get(META_KEY)
            tensors = {k: (f.get_slice(k).get_shape(), f.get_slice(k).get_dtype()) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for every kind of damage
        raise MergeValidationError(f"{file}: corrupted, truncated or not a safetensors file ({e})") from None
    try:
        meta = json.loads(meta) if meta is not None else None
    except json.JSONDecodeError as e:
        raise MergeValidationError(f"{file}: {META_KEY} metadata is not valid JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or "base" not in meta.get("fingerprints", {}):
        raise MergeValidationError(f"{file}: not a reparam delta (no {META_KEY} metadata of format {FORMAT})")
    expected = set(meta["fingerprints"]["base"])
    if meta.get("quantization"):
        expected |= {k + RANGE_SUFFIX for k in expected}
    if set(tensors) != expected:
        odd = sorted(set(tensors) ^ expected)
        raise MergeValidationError(f"{file}: tensors do not match its metadata: {', '.join(odd[:5])}")
    return file, meta, tensors


class _Delta:
    """One delta file opened for applying: header checked, tensors read (and decoded) one at a time."""

    def __init__(self, path, scale: float):
        self.file, self.meta, _ = read_delta_header(path)
        self.scale = scale
        self.source = SafetensorsSource(self.file)
        q = self.meta.get("quantization")
        self.levels = q["levels"] if q else None
        self.fingerprint = self.meta["fingerprints"]["base"]
        # hashes of the models it was extracted from: a target (or a result) must be one of them
        self.known = {k: {fps[k]["hash"] for fps in self.meta["fingerprints"].values()} for k in self.fingerprint}

    def get(self, key: str) -> torch.Tensor:
        t = self.source.get(key)
        if self.levels:
            return dequantize_linear(t, self.source.get(key + RANGE_SUFFIX), self.levels)
        return t


def _scales(scale, n: int) -> list[float]:
    values = list(scale) if isinstance(scale, (list, tuple)) else [scale] * n
    if len(values) != n:
        raise MergeConfigError(f"got {len(values)} scale(s) for {n} delta(s)")
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise MergeConfigError(f"scale must be a finite number, got {v!r}")
    return [float(v) for v in values]


def _patch(key: str, target: torch.Tensor, deltas: list[_Delta], loaded: list, force: bool, where: str):
    work = torch.float64 if torch.float64 in (target.dtype, *(t.dtype for t in loaded)) else torch.float32
    total = sum(d.scale * t.to(work) for d, t in zip(deltas, loaded))
    result = (target.to(work) + total).to(target.dtype)
    if not force:
        have = weight_fingerprint(target)["hash"]
        for d in deltas:
            if have not in d.known[key] and weight_fingerprint(result)["hash"] not in d.known[key]:
                raise MergeValidationError(
                    f"{where}: tensor {key!r} is not from the models the delta {d.file} was extracted from "
                    f"(content hash {have}, base {d.fingerprint[key]['hash']}); pass force=True (--force) "
                    f"to apply it anyway")
    return result


def apply_delta(model, delta, out: str | Path, *, scale: float | Sequence[float] = 1.0, force: bool = False,
                overwrite: bool = False, max_shard_size: int | str = "5GB", copy_files: bool = True,
                progress: bool = False) -> Path:
    """Write model + sum_i scale_i * delta_i to the HF folder `out` (see the module docstring); returns it.

    model: a model folder, .safetensors file or state dict; delta: a delta path or a list of them;
    scale: one value for every delta or one per delta (negative: removal).
    """
    paths = list(delta) if isinstance(delta, (list, tuple)) else [delta]
    scales = _scales(scale, len(paths))
    shard_bytes = parse_size(max_shard_size)
    out = Path(out)
    _check_out(out, overwrite)
    deltas: list[_Delta] = []
    target = None
    try:
        for p, s in zip(paths, scales):
            deltas.append(_Delta(p, s))
        target = _open(model, "model")
        covered: dict[str, list[_Delta]] = {}
        for d in deltas:
            for k in d.fingerprint:
                covered.setdefault(k, []).append(d)
        problems = []
        for d in deltas:
            shapes = {k: fp["shape"] for k, fp in d.fingerprint.items()}
            problems += _fit_problems(d.source, target, list(shapes), shapes)
        _raise_problems(f"the delta(s) do not fit {target.name}", problems)

        def load(k):
            return target.get(k), [d.get(k) for d in covered.get(k, [])]

        def produce() -> Iterator[torch.Tensor]:
            for k, (t, loaded) in prefetch(keys, load):
                yield _patch(k, t, covered[k], loaded, force, target.where(k)) if loaded else t

        keys = sorted(target.keys())
        write_model_folder(out, [(k, target.shape(k), target.dtype(k)) for k in keys], produce(),
                           shard_bytes, copy_from=target.folder if copy_files else None, progress=progress)
    finally:
        for s in [target] + [d.source for d in deltas]:
            if s is not None:
                s.close()
    return out


def remove_delta(model, delta, out: str | Path, *, scale: float | Sequence[float] = 1.0, **options) -> Path:
    """apply_delta with the scale negated: model - scale * delta (un-patching, forgetting a task)."""
    scales = _scales(scale, len(delta) if isinstance(delta, (list, tuple)) else 1)
    return apply_delta(model, delta, out, scale=[-s for s in scales], **options)


def write_model_folder(out: Path, entries: list[tuple[str, tuple[int, ...], torch.dtype]],
                       tensors: Iterator[torch.Tensor], shard_bytes: int, copy_from: Path | None = None,
                       progress: bool = False) -> None:
    """Write `tensors` (in `entries` order) as an HF folder in a temporary folder, then rename it to `out`."""
    with tqdm(total=len(entries), desc="apply", unit="tensor", disable=not progress) as bar, folder_swap(out) as tmp:
        write_shards(tmp, entries, tensors, shard_bytes, lambda key, size: bar.update(1))
        for side in COPY_FILES if copy_from is not None else ():
            if (copy_from / side).is_file():
                shutil.copy2(copy_from / side, tmp / side)


def delta_info(path: str | Path) -> dict[str, Any]:
    """What a delta file holds, from its header: metadata, tensor shapes, parameter count, file size."""
    file, meta, tensors = read_delta_header(path)
    covered = {k: shape for k, (shape, _) in tensors.items() if not k.endswith(RANGE_SUFFIX)}
    return {**meta, "file": str(file), "size": file.stat().st_size,
            "tensors": {k: {"shape": shape, "dtype": tensors[k][1]} for k, shape in covered.items()},
            "parameters": sum(math.prod(s) for s in covered.values())}


__all__ = ["extract_delta", "apply_delta", "remove_delta", "delta_info", "read_delta_header", "DELTA_FILE"]
