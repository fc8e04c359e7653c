import pytest
import torch

from gnt_shiftadd.experiment import SceneTensors, build_model, load_scene


@pytest.fixture
def dense(tiny_config):
    """(cfg, a dense tiny GNT in eval mode without dropout, its scene's tensors): what the conversions start from."""
    cfg = tiny_config("model.dropout=0.0")
    tensors = SceneTensors(load_scene(cfg), torch.device("cpu"))
    model = build_model(cfg, torch.device("cpu")).eval()
    return cfg, model, tensors
