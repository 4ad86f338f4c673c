"""Save on W ranks, load on W' ranks: model and AdamW state match exactly (local disk and S3)."""

import torch
from conftest import torchrun_script

# Savers and loaders differ in every pair: growing (1 -> 2, 1 -> 3) and shrinking (4 -> 2, 4 -> 3,
# one of them to a size that does not divide the shards). Same-size loads are the bitwise resume tests.
SAVES, LOADS = (1, 4), (2, 3)


def assert_same_state(loaded, reference):
    assert loaded["model"].keys() == reference["model"].keys()
    for key, tensor in reference["model"].items():
        assert torch.equal(loaded["model"][key], tensor), key
    ref_opt, got_opt = reference["optimizer"], loaded["optimizer"]
    assert got_opt["state"].keys() == ref_opt["state"].keys() and len(ref_opt["state"]) > 0
    for fqn, entries in ref_opt["state"].items():
        assert set(entries) == {"step", "exp_avg", "exp_avg_sq"}
        for name, value in entries.items():
            assert torch.equal(got_opt["state"][fqn][name], value), (fqn, name)
    assert got_opt["param_groups"] == ref_opt["param_groups"]
    for key in ("step", "samples_seen", "sampler", "schedule"):
        assert loaded[key] == reference[key], key


def roundtrip(base: str, tmp_path, saves, loads, env=None):
    for world in saves:
        result = torchrun_script(
            "roundtrip.py", ["save", str(tmp_path / f"ref{world}.pt"), f"{base}/w{world}"], world, env=env
        )
        assert result.returncode == 0, result.stderr[-3000:]
    for world in loads:
        runs = [f"{base}/w{w}" for w in saves]
        result = torchrun_script("roundtrip.py", ["load", str(tmp_path / f"got{world}"), *runs], world, env=env)
        assert result.returncode == 0, result.stderr[-3000:]
        for i, saved_on in enumerate(saves):
            reference = torch.load(tmp_path / f"ref{saved_on}.pt", weights_only=True)
            loaded = torch.load(tmp_path / f"got{world}.{i}", weights_only=True)
            assert_same_state(loaded, reference)


def test_every_world_size_loads_every_world_size_exactly(tmp_path):
    roundtrip(str(tmp_path / "runs"), tmp_path, SAVES, LOADS)


def test_the_same_round_trip_through_s3(tmp_path, s3_env):
    roundtrip("s3://dtrain-test/roundtrip", tmp_path, saves=(3,), loads=(2,), env=s3_env)
