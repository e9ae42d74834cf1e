import pytest
from safetensors.torch import save_file

from merge_fixtures import make_models, save_model


@pytest.fixture
def models_on_disk(tmp_path):
    """base (sharded, 3 files) + 3 fine-tuned models (one single-file folder, one sharded, one bare file)."""
    base, models = make_models(3, seed=1)
    bpath = save_model(base, tmp_path / "base", shards=3)
    paths = [save_model(models[0], tmp_path / "m0"), save_model(models[1], tmp_path / "m1", shards=2)]
    save_file({k: v.contiguous() for k, v in models[2].items()}, str(tmp_path / "m2.safetensors"))
    paths.append(tmp_path / "m2.safetensors")
    return base, models, bpath, paths
