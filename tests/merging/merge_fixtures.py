import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

SHAPES = {
    "model.embed_tokens.weight": (16, 8),
    "model.layers.0.mlp.weight": (8, 8),
    "model.layers.0.mlp.bias": (8,),
    "model.layers.0.norm.weight": (8,),
    "model.layers.1.mlp.weight": (8, 8),
    "model.layers.1.mlp.bias": (8,),
    "lm_head.weight": (16, 8),
    "logit_scale": (),
}


def make_models(n: int, seed: int = 0, scale: float = 0.05, dtype=torch.float32):
    """Random base and n fine-tuned state dicts (base + small Gaussian deltas) with an int64 buffer."""
    g = torch.Generator().manual_seed(seed)
    base = {k: torch.randn(s, generator=g).to(dtype) for k, s in SHAPES.items()}
    base["model.position_ids"] = torch.arange(16, dtype=torch.int64)[None]
    models = []
    for _ in range(n):
        m = {k: (v.float() + scale * torch.randn(v.shape, generator=g)).to(dtype) if v.is_floating_point()
             else v.clone() for k, v in base.items()}
        models.append(m)
    return base, models


def save_model(sd, folder: Path, shards: int = 1, config: bool = True) -> Path:
    """Write a state dict as an HF folder: model.safetensors, or `shards` files with an index."""
    folder.mkdir(parents=True, exist_ok=True)
    keys = sorted(sd)
    if shards == 1:
        save_file({k: sd[k].contiguous() for k in keys}, str(folder / "model.safetensors"))
    else:
        weight_map = {}
        for i in range(shards):
            part = keys[i::shards]
            name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
            save_file({k: sd[k].contiguous() for k in part}, str(folder / name))
            weight_map.update({k: name for k in part})
        (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    if config:
        (folder / "config.json").write_text(json.dumps({"model_type": "toy", "torch_dtype": "float32"}))
        (folder / "tokenizer_config.json").write_text("{}")
    return folder




def load_folder(folder: Path) -> dict:
    """Every tensor of a merged output folder (one or several shards)."""
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out
