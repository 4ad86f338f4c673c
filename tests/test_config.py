import json

import pytest

from dtrain import train
from dtrain.config import ConfigError, ExperimentConfig, all_keys, micro_batches, validate


def run_main(argv, capsys):
    """The exit code, whether the parser exits or main returns it."""
    try:
        code = train.main(argv, prog="dtrain train")
    except SystemExit as stop:
        code = stop.code
    return code, capsys.readouterr()


def test_help_lists_every_option_with_its_default(capsys):
    code, out = run_main(["--help"], capsys)
    assert code == 0
    for key in all_keys():
        assert f"--{key}" in out.out
    assert "(default: 64)" in out.out and "--run-dir" in out.out and "--preset" in out.out


def test_precedence_preset_then_file_then_command_line(tmp_path):
    from dtrain.config import build_parser, parse_args

    file = tmp_path / "c.toml"
    file.write_text("[train]\nlr = 0.5\nmax_steps = 7\n[model]\nlayers = 3\n")
    _, settings = parse_args(
        build_parser("t", ""),
        ["--preset", "tiny", "--config", str(file), "--train.max_steps=9", "--data.mode", "dynamic"],
    )
    config = settings.resolve()
    assert config.preset_name == "tiny" and config.model.width == 32  # from the preset
    assert config.model.layers == 3 and config.train.lr == 0.5  # from the file
    assert config.train.max_steps == 9 and config.data.mode == "dynamic"  # command line wins
    assert ExperimentConfig.from_dict(json.loads(config.to_json())) == config


@pytest.mark.parametrize(
    "argv, words",
    [
        (["--train.global_batch_size=-4"], "--train.global_batch_size=-4 must be positive"),
        (["--train.foo=1"], "unknown option --train.foo"),
        (["--train.max_step=1"], "did you mean 'train.max_steps'"),
        (["--train.lr=fast"], "train.lr='fast'"),
        (["--model.heads=3"], "not divisible by --model.heads=3"),
        (["--data.mode=random"], "use fixed or dynamic"),
        (["--train.micro_batch_size=5"], "multiple of 5"),
        (["--preset", "huge"], "invalid choice: 'huge'"),
        (["--config", "/nonexistent.toml"], "does not exist"),
        (["--train.lr=nan"], "--train.lr=nan is not a finite number"),
        (["--checkpoint.interval_seconds=inf"], "is not a finite number"),
        (["--train.max_steps=inf"], "expected int"),
        (["--checkpoint.stop_signals=SIGKILL"], "SIGKILL cannot be caught"),
        (["--checkpoint.stop_signals=SIGTERM,NOPE"], "'NOPE' is not a signal"),
        (["--checkpoint.endpoint_url=s3.example.com"], "is not an http(s) URL"),
        (["--checkpoint.storage_timeout=0"], "storage_timeout must be positive"),
        (["--train.heartbeat_timeout=0.2"], "--train.heartbeat_timeout=0.2 is under a second"),
        (["--train.heartbeat_timeout=-1"], "--train.heartbeat_timeout=-1.0 must not be negative"),
        (["--resume=yesterday"], "--resume='yesterday' is not latest, best, never, restart"),
    ],
)
def test_bad_values_stop_with_one_line_naming_the_key(argv, words, capsys):
    code, out = run_main(argv, capsys)
    assert code == 2
    assert words in out.err
    assert len(out.err.strip().splitlines()) == 1


def test_bad_file_keys_are_named(tmp_path):
    file = tmp_path / "c.json"
    file.write_text('{"train": {"max_step": 1}}')
    with pytest.raises(ConfigError, match="unknown key 'train.max_step'.*did you mean 'train.max_steps'"):
        from dtrain.config import load_file

        ExperimentConfig.from_dict(load_file(str(file)), source=str(file))


def test_global_batch_split_follows_world_size():
    config = ExperimentConfig.preset("tiny")
    config.train.global_batch_size, config.train.micro_batch_size = 32, 4
    assert micro_batches(config, 1) == (4, 8)
    assert micro_batches(config, 2) == (4, 4)
    assert micro_batches(config, 8) == (4, 1)
    with pytest.raises(ConfigError, match="cannot be split over 3 ranks"):
        validate(config, world_size=3)
    with pytest.raises(ConfigError, match="multiple of 64"):
        micro_batches(config, 16)


@pytest.mark.parametrize(
    "name, text, words",
    [
        ("list.json", "[1, 2]", "holds a list"),
        ("section.json", '{"train": 5}', "section 'train' in"),
        ("value.json", '{"train": {"lr": [1]}}', "train.lr=[1]"),
        ("flag.json", '{"train": {"max_steps": true}}', "train.max_steps=True"),
        ("preset.toml", "preset = 3", "preset 3"),
        ("bad.toml", "[train\nlr = 1", "is not valid TOML"),
        ("binary.toml", "\udcff", "is not valid TOML"),
    ],
)
def test_config_files_of_the_wrong_shape_are_one_line(tmp_path, capsys, name, text, words):
    path = tmp_path / name
    path.write_bytes(text.encode("utf-8", "surrogateescape"))
    code, out = run_main(["--config", str(path), "--run-dir", str(tmp_path / "run")], capsys)
    assert code == 2, out
    assert words in out.err and len(out.err.strip().splitlines()) == 1, out.err
    assert not (tmp_path / "run").exists()
