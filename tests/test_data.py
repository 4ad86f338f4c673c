import numpy as np
import torch

from dtrain.config import DataConfig
from dtrain.data import TRAIN_STREAM, VALIDATION_STREAM, make_examples, mixture_spec, train_streams

SPEC = mixture_spec(DataConfig(points=32, min_components=2, max_components=6))


def test_an_example_is_a_pure_function_of_seed_stream_and_index():
    batch = make_examples(SPEC, 7, TRAIN_STREAM, [5, 900, 3])
    alone = make_examples(SPEC, 7, TRAIN_STREAM, [900])
    reordered = make_examples(SPEC, 7, TRAIN_STREAM, [3, 900])
    for key in batch:
        assert torch.equal(batch[key][1], alone[key][0])
        assert torch.equal(batch[key][1], reordered[key][1])
        assert torch.equal(batch[key][2], reordered[key][0])


def test_seeds_streams_and_indices_give_different_examples():
    base = make_examples(SPEC, 7, TRAIN_STREAM, [0])["points"]
    for other in (
        make_examples(SPEC, 8, TRAIN_STREAM, [0]),
        make_examples(SPEC, 7, VALIDATION_STREAM, [0]),
        make_examples(SPEC, 7, TRAIN_STREAM, [1]),
    ):
        assert not torch.equal(base, other["points"])


def test_dynamic_mode_uses_a_fresh_stream_each_epoch():
    assert train_streams("fixed", 0) == train_streams("fixed", 5) == TRAIN_STREAM
    assert len({int(train_streams("dynamic", e)) for e in range(4)} | {TRAIN_STREAM, VALIDATION_STREAM}) == 6


def test_examples_are_consistent_mixtures():
    ex = make_examples(SPEC, 0, TRAIN_STREAM, np.arange(400))
    k = ex["num_components"]
    assert k.min() >= 2 and k.max() <= 6 and len(set(k.tolist())) == 5
    assert torch.all(ex["labels"] < k[:, None]) and torch.all(ex["labels"] >= 0)
    assert torch.allclose(ex["weights"].sum(1), torch.ones(400))
    assert torch.all(ex["weights"][torch.arange(6)[None, :] >= k[:, None]] == 0)
    picked = torch.gather(ex["means"], 1, ex["labels"][:, :, None].expand(-1, -1, 2))
    assert torch.equal(picked, ex["targets"])
    assert ex["means"].abs().max() <= SPEC.box
    # Noise around each centre has the example's spread (pooled estimate).
    noise = (ex["points"] - ex["targets"]) / ex["sigma"][:, None, None]
    assert abs(noise.std().item() - 1.0) < 0.02 and abs(noise.mean().item()) < 0.02
    sigma = SPEC.box / ex["sigma"]
    assert sigma.min() >= SPEC.min_snr - 1e-4 and sigma.max() <= SPEC.max_snr + 1e-4
