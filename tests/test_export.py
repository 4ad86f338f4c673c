import pytest
import torch

from dtrain.config import ExperimentConfig
from dtrain.export import load_model
from dtrain.model import build_model


def test_a_plain_torch_save_of_a_full_model_state_loads_for_inference(tmp_path):
    config = ExperimentConfig.preset("tiny")
    torch.manual_seed(3)
    model = build_model(config.model, config.data.dim).eval()
    points = torch.randn(2, 16, 2)
    torch.save(model.state_dict(), tmp_path / "plain.pt")
    torch.save({"model_state_dict": model.state_dict(), "epoch": 3}, tmp_path / "wrapped.pt")
    for name in ("plain.pt", "wrapped.pt"):
        loaded, _ = load_model(str(tmp_path / name), config=config)
        assert torch.equal(loaded(points), model(points))
    with pytest.raises(ValueError, match="pass config="):
        load_model(str(tmp_path / "plain.pt"))
