"""Safe file I/O: atomic writes (temp file, then rename) and safetensors/JSON reads whose errors name the
file and what is wrong, never a traceback from inside safetensors."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..core.errors import AdapterFileError


def atomic_write(path: Path, write) -> None:
    """Call write(tmp_path), then rename over `path`: a crash leaves the old file intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json(path: Path, obj) -> None:
    text = json.dumps(obj, indent=2, sort_keys=False) + "\n"
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def read_json(path: Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise AdapterFileError(f"{path}: file not found")
    try:
        obj = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AdapterFileError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise AdapterFileError(f"{path}: expected a JSON object, found {type(obj).__name__}")
    return obj


def read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors and the metadata of a safetensors file, or an AdapterFileError naming the problem."""
    path = Path(path)
    if not path.is_file():
        raise AdapterFileError(f"{path}: file not found")
    size = path.stat().st_size
    if size < 8:
        raise AdapterFileError(f"{path}: truncated or empty ({size} bytes); not a safetensors file")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for every kind of damage
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise AdapterFileError(f"{path}: corrupted, truncated or not a safetensors file ({reason})") from None
    return tensors, metadata
