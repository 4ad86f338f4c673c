import numpy as np
import torch

from dtrain.metrics import kmeans_centres, set_mean_centres, squared_error, wasserstein


def test_wasserstein_is_zero_for_a_permutation_and_positive_otherwise():
    rng = np.random.default_rng(0)
    clouds = rng.normal(size=(3, 10, 2))
    assert np.allclose(wasserstein(clouds[:, ::-1], clouds), 0)
    shifted = clouds + np.array([3.0, 4.0])
    assert np.allclose(wasserstein(shifted, clouds), 5.0)


def test_kmeans_recovers_well_separated_clusters():
    rng = np.random.default_rng(0)
    centres = np.array([[-10.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    labels = rng.integers(0, 3, size=60)
    targets = centres[labels][None]
    points = targets + 0.1 * rng.normal(size=targets.shape)
    predicted = kmeans_centres(points, [3], seeds=[0])
    assert np.abs(predicted - targets).max() < 0.2


def test_trivial_predictor_and_squared_error():
    points = torch.tensor([[[0.0, 0.0], [2.0, 4.0]]])
    assert torch.equal(set_mean_centres(points), torch.tensor([[[1.0, 2.0], [1.0, 2.0]]]))
    assert squared_error(points, torch.zeros_like(points)).item() == 5.0
