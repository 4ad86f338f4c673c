from types import SimpleNamespace

import pytest
import torch

from dtrain.config import ExperimentConfig
from dtrain.model import build_model, count_parameters, parameters_of


def tiny_model():
    torch.manual_seed(0)
    config = ExperimentConfig.preset("tiny")
    return build_model(config.model, dim=3).eval()


def test_output_permutes_with_the_input():
    model = tiny_model()
    points = torch.randn(4, 20, 3) * 5
    perm = torch.randperm(20)
    out = model(points)
    assert out.shape == points.shape
    torch.testing.assert_close(model(points[:, perm]), out[:, perm], rtol=1e-5, atol=1e-5)


def test_output_moves_and_scales_with_the_input():
    model = tiny_model()
    points = torch.randn(2, 16, 3)
    shift = torch.tensor([3.0, -1.0, 10.0])
    torch.testing.assert_close(model(points + shift), model(points) + shift, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(model(points * 7), model(points) * 7, rtol=1e-4, atol=1e-4)


def test_presets_span_test_to_gpu_sizes():
    sizes = {name: count_parameters(build_model(ExperimentConfig.preset(name).model, 2)) for name in ("tiny", "small")}
    assert sizes["tiny"] < 50_000 < sizes["small"]
    large = ExperimentConfig.preset("large").model
    # 12 w^2 per block dominates; count without allocating 300M parameters.
    assert 12 * large.width**2 * large.layers > 200_000_000


@pytest.mark.parametrize("width,layers,heads,mlp_ratio,dim", [(128, 4, 4, 4, 2), (32, 2, 2, 3, 5), (64, 1, 8, 2, 3)])
def test_the_parameters_counted_without_building_are_the_built_ones(width, layers, heads, mlp_ratio, dim):
    config = SimpleNamespace(width=width, layers=layers, heads=heads, mlp_ratio=mlp_ratio, dropout=0.0)
    assert parameters_of(config, dim) == count_parameters(build_model(config, dim))
