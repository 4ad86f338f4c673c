import numpy as np
import pytest

from dtrain.sampler import ElasticSampler, IndexPermutation


@pytest.mark.parametrize("n", [1, 2, 3, 5, 64, 1000, 4097])
def test_permutation_is_a_bijection(n):
    values = IndexPermutation(n, seed=3, epoch=1)(np.arange(n))
    assert sorted(values.tolist()) == list(range(n))


def test_permutation_depends_on_seed_and_epoch_only():
    n = 1000
    a = IndexPermutation(n, 0, 0)(np.arange(n))
    assert np.array_equal(a, IndexPermutation(n, 0, 0)(np.arange(n)))
    assert not np.array_equal(a, IndexPermutation(n, 0, 1)(np.arange(n)))
    assert not np.array_equal(a, IndexPermutation(n, 1, 0)(np.arange(n)))
    assert not np.array_equal(a, np.arange(n))


def test_permutation_is_pointwise_at_any_position():
    perm = IndexPermutation(2 * 10**9, 0, 0)
    values = perm(np.arange(10**9, 10**9 + 1000))
    assert len(set(values.tolist())) == 1000 and values.max() < 2 * 10**9
    assert np.array_equal(values[10:20], perm(np.arange(10**9 + 10, 10**9 + 20)))
    with pytest.raises(IndexError):
        perm([2 * 10**9])


def test_take_crosses_epochs_and_sees_every_sample_once_per_epoch():
    sampler = ElasticSampler(10, seed=0)
    batches = [sampler.take(4) for _ in range(5)]  # 20 samples: exactly two epochs
    epochs = np.concatenate([b.epochs for b in batches])
    indices = np.concatenate([b.indices for b in batches])
    for e in (0, 1):
        assert sorted(indices[epochs == e].tolist()) == list(range(10))
    assert (sampler.epoch, sampler.samples_in_epoch) == (2, 0)


def test_shards_of_a_global_batch_partition_it():
    batch = ElasticSampler(100, seed=0).take(12)
    shards = [batch.deal(r, 4) for r in range(4)]
    assert np.array_equal(np.concatenate([s.indices for s in shards]), batch.indices)
    micro = shards[1].split(3)
    assert [len(m) for m in micro] == [1, 1, 1]


def test_state_round_trip_continues_the_same_stream():
    a = ElasticSampler(50, seed=4)
    a.take(17)
    b = ElasticSampler(50, seed=4)
    b.load_state_dict(a.state_dict())
    assert np.array_equal(a.take(40).indices, b.take(40).indices)
    assert len(repr(a.state_dict()).encode()) < 1024


def test_dynamic_mode_indices_are_positions():
    batch = ElasticSampler(8, seed=0, mode="dynamic").take(10)
    assert batch.indices.tolist() == list(range(8)) + [0, 1]
    assert batch.epochs.tolist() == [0] * 8 + [1, 1]


def epoch_coverage(batches):
    epochs = np.concatenate([b.epochs for b in batches])
    indices = np.concatenate([b.indices for b in batches])
    return {int(e): sorted(indices[epochs == e].tolist()) for e in np.unique(epochs)}


def test_a_resize_waits_for_the_epoch_to_end_by_default():
    sampler = ElasticSampler(10, seed=0)
    batches = [sampler.take(4)]
    sampler.resize(6)
    batches += [sampler.take(4) for _ in range(3)]  # 6 more of epoch 0, then 6 of epoch 1
    coverage = epoch_coverage(batches)
    assert coverage[0] == list(range(10)) and coverage[1] == list(range(6))


def test_a_resize_now_ends_the_epoch_where_it_stands():
    sampler = ElasticSampler(10, seed=0)
    first = sampler.take(4)
    sampler.resize(6, now=True)
    assert (sampler.epoch, sampler.samples_in_epoch, sampler.epoch_length) == (1, 0, 6)
    coverage = epoch_coverage([first, sampler.take(6)])
    assert len(coverage[0]) == 4 and coverage[1] == list(range(6))


def test_batch_size_changes_keep_the_same_sequence():
    a, b = ElasticSampler(50, seed=2), ElasticSampler(50, seed=2)
    one = np.concatenate([a.take(6).indices for _ in range(10)])
    other = np.concatenate([b.take(n).indices for n in (6, 6, 20, 8, 20)])
    assert np.array_equal(one, other)
