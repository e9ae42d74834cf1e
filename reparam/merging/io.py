"""Model inputs (memory-mapped safetensors, header-only metadata) and the streaming safetensors writer.

Inputs: a Hugging Face model folder (``model.safetensors``, or shards listed in
``model.safetensors.index.json``, or a single ``*.safetensors`` file) or a plain ``.safetensors`` file.
Tensors are read one at a time through ``safetensors.safe_open`` (memory-mapped); shapes and dtypes come
from the file headers without reading any tensor data.

Output: :class:`ShardWriter` writes one safetensors file whose header is known in advance (names, dtypes
and shapes come from validation), so each tensor's bytes go straight to disk as soon as it is merged and
no shard is ever held in memory.
"""
from __future__ import annotations

import json
import os
import queue
import re
import shutil
import struct
import threading
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable, Mapping

import torch
from safetensors import safe_open

from .errors import MergeConfigError, MergeValidationError

ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
for _name, _attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2")):
    if hasattr(torch, _attr):
        ST_DTYPES[_name] = getattr(torch, _attr)
ST_NAMES = {v: k for k, v in ST_DTYPES.items()}
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


class Source:
    """Common interface of a model's tensors: header-only metadata and one-tensor reads."""

    name: str

    def keys(self) -> list[str]: ...
    def shape(self, key: str) -> tuple[int, ...]: ...
    def dtype(self, key: str) -> torch.dtype: ...
    def where(self, key: str) -> str: ...
    def get(self, key: str) -> torch.Tensor: ...
    def close(self) -> None: ...
    folder: Path | None = None

    def order_key(self, key: str):
        """Sort key that visits tensors file by file (see SafetensorsSource), so finished files can be closed."""
        return (0, key)


class DictSource(Source):
    """An in-memory state dict seen through the :class:`Source` interface."""

    def __init__(self, sd: Mapping[str, torch.Tensor], name: str):
        self.sd, self.name = sd, name

    def keys(self):
        return list(self.sd.keys())

    def shape(self, key):
        return tuple(self.sd[key].shape)

    def dtype(self, key):
        return self.sd[key].dtype

    def where(self, key):
        return self.name

    def get(self, key):
        return self.sd[key]

    def close(self):
        pass


class SafetensorsSource(Source):
    """A model folder or a .safetensors file, memory-mapped."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.name = str(path)
        self.folder = self.path if self.path.is_dir() else None
        files = self._resolve()
        self._file_index = {f: i for i, f in enumerate(files)}
        self._handles = {}
        self._read: dict[Path, set[str]] = {}  # keys read from each open file since it was (re)opened
        self._count: dict[Path, int] = {}
        self._file_of: dict[str, Path] = {}
        self._meta: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
        for f in files:
            h = self._open(f)
            for k in h.keys():
                if k in self._file_of:
                    raise MergeValidationError(f"{self.name}: tensor {k!r} is in both {self._file_of[k].name} "
                                               f"and {f.name}")
                sl = h.get_slice(k)
                st = sl.get_dtype()
                if st not in ST_DTYPES:
                    raise MergeValidationError(f"{f}: tensor {k!r} has unsupported dtype {st}")
                self._file_of[k] = f
                self._meta[k] = (tuple(sl.get_shape()), ST_DTYPES[st])
            self._count[f] = len(h.keys())

    def _resolve(self) -> list[Path]:
        p = self.path
        if not p.exists():
            raise MergeConfigError(f"model path {str(p)!r} does not exist")
        if p.is_file():
            if p.suffix != ".safetensors":
                raise MergeConfigError(f"{p}: only .safetensors files are supported")
            return [p]
        index = p / INDEX_NAME
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError, TypeError) as e:
                raise MergeValidationError(f"{index}: not a valid safetensors index ({e})") from None
            files = sorted({p / f for f in weight_map.values()})
            missing = [str(f) for f in files if not f.is_file()]
            if missing:
                raise MergeValidationError(f"{index} lists shard(s) that do not exist: {', '.join(missing)}")
            return files
        if (p / SINGLE_NAME).is_file():
            return [p / SINGLE_NAME]
        found = sorted(p.glob("*.safetensors"))
        if len(found) == 1:
            return found
        if not found:
            raise MergeConfigError(f"model folder {str(p)!r} has no safetensors weights "
                                   f"(expected {SINGLE_NAME} or {INDEX_NAME})")
        raise MergeConfigError(f"model folder {str(p)!r} has several .safetensors files but no {INDEX_NAME}: "
                               f"{', '.join(f.name for f in found)}")

    def _open(self, f: Path):
        try:
            h = safe_open(str(f), framework="pt")
        except Exception as e:  # safetensors raises its own error types
            raise MergeValidationError(f"{f}: cannot read safetensors header ({e})") from None
        self._handles[f] = h
        return h

    def keys(self):
        return list(self._file_of)

    def shape(self, key):
        return self._meta[key][0]

    def dtype(self, key):
        return self._meta[key][1]

    def where(self, key):
        return str(self._file_of[key])

    def order_key(self, key):
        return (self._file_index[self._file_of[key]], key)

    def get(self, key):
        f = self._file_of[key]
        h = self._handles.get(f) or self._open(f)
        t = h.get_tensor(key)
        read = self._read.setdefault(f, set())
        read.add(key)
        if len(read) == self._count[f]:
            # Every tensor of this file has been read: unmap it, so its pages leave the process's resident set
            # (visiting keys file by file keeps one mapped file per model). A later pass reopens it.
            del self._handles[f], self._read[f]
        return t

    def close(self):
        self._handles.clear()
        self._read.clear()


def open_source(path: str | Path) -> SafetensorsSource:
    return SafetensorsSource(path)


def parse_size(size: int | str) -> int:
    """Bytes from an int or a string like '5GB', '500MB', '2GiB' (decimal units as Hugging Face)."""
    if isinstance(size, int) and not isinstance(size, bool):
        if size <= 0:
            raise MergeConfigError(f"max_shard_size must be positive, got {size}")
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*", str(size), re.IGNORECASE)
    if not m:
        raise MergeConfigError(f"max_shard_size {size!r} is not a size like 5GB, 500MB or a byte count")
    unit = (m.group(2) or "B").upper()
    mult = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
            "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}[unit]
    value = int(float(m.group(1)) * mult)
    if value <= 0:
        raise MergeConfigError(f"max_shard_size must be positive, got {size!r}")
    return value


def nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    n = 1
    for s in shape:
        n *= s
    return n * torch.empty((), dtype=dtype).element_size()


def plan_shards(entries: list[tuple[str, tuple[int, ...], torch.dtype]], max_bytes: int) -> list[list[str]]:
    """Greedy split of the ordered entries into shards of at most max_bytes (a larger tensor gets its own)."""
    shards: list[list[str]] = [[]]
    size = 0
    for key, shape, dtype in entries:
        b = nbytes(shape, dtype)
        if shards[-1] and size + b > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += b
    return shards if shards[0] else []


class ShardWriter:
    """Write one safetensors file whose tensors (names, shapes, dtypes, order) are known up front.

    The bytes go to the file from a background thread, up to `depth` tensors behind: writing into the page
    cache stalls once the kernel throttles dirty pages (seconds per GB on a slow disk), and the next tensors
    can be merged meanwhile. A write error is raised by the next write() or close()."""

    def __init__(self, path: Path, entries: list[tuple[str, tuple[int, ...], torch.dtype]],
                 metadata: dict[str, str] | None = None, depth: int = 2):
        header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
        offset = 0
        self.expected = []
        for key, shape, dtype in entries:
            b = nbytes(shape, dtype)
            header[key] = {"dtype": ST_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + b]}
            self.expected.append((key, tuple(shape), dtype))
            offset += b
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self.f = open(path, "wb")
        self.f.write(struct.pack("<Q", len(raw)))
        self.f.write(raw)
        self.pos = 0
        self._pending: queue.Queue = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._drain, name="reparam-shard-writer", daemon=True)
        self._thread.start()

    def _drain(self) -> None:
        while (buf := self._pending.get()) is not None:
            if self._error is None:
                try:
                    self.f.write(buf)
                except BaseException as e:  # raised in the caller's thread by the next write() / close()
                    self._error = e

    def _raise_error(self) -> None:
        if self._error is not None:
            raise self._error

    def write(self, key: str, tensor: torch.Tensor) -> None:
        self._raise_error()
        ek, es, ed = self.expected[self.pos]
        if key != ek or tuple(tensor.shape) != es or tensor.dtype != ed:
            raise RuntimeError(f"writer expected {ek} {es} {ed}, got {key} {tuple(tensor.shape)} {tensor.dtype}")
        t = tensor.detach().cpu().contiguous().reshape(-1)
        if t.numel():
            self._pending.put(memoryview(t.view(torch.uint8).numpy()))  # the view keeps `t` alive until written
        self.pos += 1

    def _finish(self) -> None:
        if self._thread.is_alive():
            self._pending.put(None)
            self._thread.join()
        self.f.close()

    def abort(self) -> None:
        """Close the file after a failure (the caller deletes the temporary folder)."""
        if not self.f.closed:
            self._error = self._error or RuntimeError("aborted")  # skip what is still queued
            self._finish()

    def close(self) -> None:
        self._finish()
        self._raise_error()
        if self.pos != len(self.expected):
            raise RuntimeError(f"shard closed after {self.pos} of {len(self.expected)} tensors")


def _swap_into_place(tmp: Path, out: Path) -> None:
    if out.exists():
        old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


@contextmanager
def folder_swap(out: Path):
    """A temporary folder beside `out` to write into: renamed into place when the block succeeds (an existing `out`
    is replaced), deleted when it fails, so `out` is never half-written."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _swap_into_place(tmp, out)


def write_shards(folder: Path, entries: list[tuple[str, tuple[int, ...], torch.dtype]], tensors: Iterable[torch.Tensor],
                 max_bytes: int, on_written: Callable[[str, int], None] | None = None) -> None:
    """Write `tensors` (in `entries` order: name, shape, dtype) into `folder` in the Hugging Face layout: one
    model.safetensors, or shards of at most `max_bytes` plus their index. on_written(name, bytes) after each."""
    shards = plan_shards(entries, max_bytes)
    names = ([SINGLE_NAME] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    spec = {k: (shape, dt) for k, shape, dt in entries}
    it = iter(tensors)
    weight_map: dict[str, str] = {}
    for name, keys in zip(names, shards):
        writer = ShardWriter(folder / name, [(k, *spec[k]) for k in keys])
        try:
            for k in keys:
                writer.write(k, next(it))
                weight_map[k] = name
                if on_written is not None:
                    on_written(k, nbytes(*spec[k]))
        except BaseException:
            writer.abort()
            raise
        writer.close()
    if len(shards) > 1:
        total = sum(nbytes(shape, dt) for _, shape, dt in entries)
        (folder / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                    indent=2) + "\n")
