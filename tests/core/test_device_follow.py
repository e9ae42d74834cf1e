"""Every method's adapter state follows model.to(device): tensors an adapter keeps outside its parameters and
buffers would stay on the CPU when the model moves to a GPU, and the first forward or rank growth there fails
(seen on CUDA with SpIEL's positions and IncreLoRA / TriAdaptLoRA growth). The meta device stands in for a GPU."""
import pytest
import torch

import reparam
from tests.helpers import adapt_tiny_mlp

FIELDS = {"adalora": {"r": 4, "target_r": 2}, "increlora": {"target_rank": 2}, "spiel": {"density": 0.25},
          "nola": {"cache_bases": True}, "sara": {"threshold": 0.5}, "pela": {"compression": 1.5},
          "svfit": {"r": 4}, "soma": {"r": 4, "block_pattern": r"fc(\d)"}}
# EWA splits FFN blocks into experts, Moment Probing replaces a Hugging Face model's task head, prefix tuning and MAM
# need Hugging Face attention: none fits the two-Linear TinyMLP (Moment Probing keeps no tensors between forwards;
# EWA's are parameters; tests/adapters/test_prefix.py moves a prefix-tuned BERT to the meta device).
SKIP = {"ewa", "moment_probing", "prefix_tuning", "mam_adapter"}


def stray_tensors(module):
    """(attribute, tensor) pairs a module holds outside its parameters and buffers, one container level deep."""
    for name, value in vars(module).items():
        values = value.values() if isinstance(value, dict) else value if isinstance(value, (list, tuple)) else [value]
        for v in values:
            if isinstance(v, torch.Tensor) and not isinstance(v, torch.nn.Parameter):
                yield name, v


@pytest.mark.parametrize("method", sorted(set(reparam.methods()) - SKIP))
def test_adapter_tensors_follow_model_to(method):
    _, model = adapt_tiny_mlp(method, **FIELDS.get(method, {}))
    model.to("meta")
    left = [f"{type(m).__name__}.{name}" for m in model.modules() for name, t in stray_tensors(m)
            if t.device.type != "meta"]
    assert not left, f"{method}: tensors left on the CPU after model.to('meta'): {left}"


@pytest.mark.parametrize("method,grow", [("increlora", lambda a: a.add_components(1)),
                                         ("triadaptlora", lambda a: a.add_block(1))])
def test_grown_components_on_the_model_device_and_dtype(method, grow):
    _, model = adapt_tiny_mlp(method)
    model.to(torch.float64).to("meta")
    adapter = model.fc1.adapters["default"]
    for p in grow(adapter):
        assert (p.device.type, p.dtype) == ("meta", torch.float64)
