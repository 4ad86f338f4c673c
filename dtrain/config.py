"""Experiment configuration: dataclasses, presets, files and command-line overrides.

Precedence, lowest first: the dataclass defaults (the ``small`` preset), the
chosen preset, a TOML or JSON file, then ``--section.key=value`` options.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import hashlib
import json
import math
import signal
import tomllib
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ConfigError


def opt(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass
class ModelConfig:
    width: int = opt(128, "transformer width (embedding size)")
    layers: int = opt(4, "number of transformer blocks")
    heads: int = opt(4, "attention heads per block; must divide width")
    mlp_ratio: int = opt(4, "MLP hidden size as a multiple of width")
    dropout: float = opt(0.0, "dropout probability, seeded per (seed, step, rank)")


@dataclass
class DataConfig:
    dim: int = opt(2, "dimension D of each point")
    points: int = opt(64, "points N per example")
    min_components: int = opt(2, "fewest mixture components K per example")
    max_components: int = opt(5, "most mixture components K per example")
    box: float = opt(10.0, "component means are uniform in [-box, box]^D")
    min_snr: float = opt(3.0, "lowest signal-to-noise ratio box/sigma (smaller: more overlap)")
    max_snr: float = opt(10.0, "highest signal-to-noise ratio box/sigma")
    weight_concentration: float = opt(1.0, "Dirichlet concentration of the mixture weights")
    mode: str = opt("fixed", "fixed: the same train_samples examples every epoch; dynamic: fresh ones")
    train_samples: int = opt(64_000, "examples per epoch")
    val_samples: int = opt(512, "examples in the fixed validation set")
    seed: int = opt(0, "seed of the training examples and their order")
    val_seed: int = opt(1, "seed of the validation set")
    record_indices: bool = opt(False, "append each rank's consumed sample indices to RUN/samples/")
    resize_now: bool = opt(
        False,
        "on resume with a new train_samples: end the current epoch now "
        "(default: finish it at its old length, resize from the next one)",
    )
    allow_new_order: bool = opt(
        False,
        "on resume, accept a new data.seed or data.mode: a new epoch "
        "starts with it at once (otherwise that is an error)",
    )


@dataclass
class TrainConfig:
    max_steps: int = opt(0, "optimizer steps to run; 0 means run num_epochs epochs")
    num_epochs: int = opt(1, "epochs to run when max_steps is 0")
    global_batch_size: int = opt(64, "samples per optimizer step, whatever the world size")
    micro_batch_size: int = opt(0, "samples per rank per forward pass; 0 means global/world (no accumulation)")
    lr: float = opt(1e-3, "peak learning rate (AdamW)")
    min_lr_ratio: float = opt(0.1, "final learning rate as a fraction of lr (linear, cosine)")
    schedule: str = opt("cosine", "learning-rate schedule: constant, linear, cosine, step, warmup_decay")
    warmup_fraction: float = opt(0.05, "fraction of the planned samples spent warming up linearly")
    step_milestones: str = opt("0.5,0.75", "step schedule: progress fractions where lr is multiplied by step_gamma")
    step_gamma: float = opt(0.1, "step schedule: factor applied at each milestone")
    reconfigure_scheduler: bool = opt(
        False,
        "on resume with a new plan (steps, epochs, samples): re-plan the "
        "LR decay from the current point to the new end (default: "
        "keep the old curve)",
    )
    scale_lr: bool = opt(False, "on resume with a new global batch size: scale the LR linearly with it")
    weight_decay: float = opt(0.01, "AdamW weight decay")
    grad_clip: float = opt(1.0, "clip the global gradient norm to this; 0 disables")
    eval_interval: int = opt(100, "validate every this many steps (and at the end); 0: only at the end")
    eval_batch_size: int = opt(64, "validation examples per rank per forward pass")
    log_interval: int = opt(10, "write a metrics line every this many steps")
    seed: int = opt(0, "seed of the model initialisation and of dropout")
    device: str = opt("auto", "auto (cuda when available), cpu or cuda")
    precision: str = opt("auto", "auto (bf16 on cuda, fp32 on cpu), fp32 or bf16")
    step_timeout: float = opt(
        300.0,
        "seconds a rank waits for the next step boundary (saves and evaluation "
        "not counted) before it decides a live rank is stuck and exits, so "
        "the launcher restarts the job (2+ ranks); 0 disables",
    )
    heartbeat_timeout: float = opt(
        60.0,
        "seconds a rank goes without hearing from the next rank, in any "
        "phase (steps, saves, evaluation), before it decides that rank "
        "is stopped or unreachable and exits, so the launcher restarts "
        "the job (2+ ranks); 0 disables",
    )


@dataclass
class CheckpointConfig:
    interval_steps: int = opt(100, "save every this many steps; 0 disables")
    interval_epochs: int = opt(0, "save at every this many completed epochs; 0 disables")
    interval_seconds: float = opt(
        0.0, "save once this many seconds passed since the last save (rank 0's clock, agreed by all ranks); 0 disables"
    )
    keep_last: int = opt(3, "keep this many newest committed checkpoints, plus best and keep_every; 0 keeps all")
    keep_every: int = opt(0, "also keep checkpoints whose step is a multiple of this; 0 disables")
    async_save: bool = opt(False, "write interval saves in the background (final saves stay synchronous)")
    verify: bool = opt(
        True, "check every byte a load reads against the manifest's checksums (sizes are always checked)"
    )
    save_best: bool = opt(True, "save when validation MSE reaches a new best (tagged best)")
    endpoint_url: str = opt(
        "", "S3 endpoint URL for every file of the run; empty: AWS_ENDPOINT_URL and the usual AWS configuration"
    )
    storage_timeout: float = opt(20.0, "seconds one storage request (S3) may take before it is retried")
    storage_retries: int = opt(3, "attempts per storage request (S3) before the job stops with an error")
    lease_seconds: float = opt(
        60.0,
        "the run directory's lease expires this long after its holder stops "
        "renewing it (a second job is refused while it is held)",
    )
    save_on_signal: bool = opt(True, "on a stop signal, all ranks save at the next step boundary and exit 75")
    stop_signals: str = opt("SIGTERM,SIGUSR1,SIGINT", "signals that ask the job to save and stop")
    grace_seconds: float = opt(
        0.0,
        "after a stop signal, exit at once if not done within this many "
        "seconds; 0: no deadline (a second signal always exits at once)",
    )


@dataclass
class MetricsConfig:
    tensorboard: bool = opt(False, "also write the train and eval scalars as TensorBoard event files (rank 0)")
    tensorboard_dir: str = opt(
        "", "where the event files go; empty: RUN/tensorboard (a local directory: needed for s3:// runs)"
    )


SECTIONS = {
    "model": ModelConfig,
    "data": DataConfig,
    "train": TrainConfig,
    "checkpoint": CheckpointConfig,
    "metrics": MetricsConfig,
}
SCHEDULES = ("constant", "linear", "cosine", "step", "warmup_decay")
RESUME_CHOICES = ("latest", "best", "never", "restart")


@dataclass
class ExperimentConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    preset_name: str = "small"

    @classmethod
    def preset(cls, name: str) -> ExperimentConfig:
        """The named preset: tiny, small (the default), medium or large."""
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
        config = cls(preset_name=name)
        for section, entries in PRESETS[name].items():
            for key, value in entries.items():
                config.set(f"{section}.{key}", value, f"preset {name}")
        return config

    @classmethod
    def from_dict(cls, values: dict, source: str = "config") -> ExperimentConfig:
        """A config from ``{"preset": NAME, "model": {...}, ...}``, e.g. a run's config.json."""
        preset = values.get("preset", "small")
        if not isinstance(preset, str):
            raise ConfigError(f"preset {preset!r} in {source} is not a name; choose one of {', '.join(PRESETS)}")
        config = cls.preset(preset)
        for dotted, value in dotted_items(values, source).items():
            config.set(dotted, value, source)
        return config

    def set(self, dotted: str, value, source: str = "config") -> None:
        section, _, key = dotted.partition(".")
        target = getattr(self, section, None) if section in SECTIONS else None
        names = [f.name for f in dataclasses.fields(SECTIONS[section])] if target else []
        if key not in names:
            raise ConfigError(f"unknown key {dotted!r} in {source}{_suggest(dotted, all_keys())}")
        kind = type(getattr(SECTIONS[section](), key))
        try:
            setattr(target, key, _convert(kind, value))
        except (TypeError, ValueError, OverflowError):
            raise ConfigError(f"{dotted}={value!r} in {source}: expected {kind.__name__}") from None

    def to_dict(self) -> dict:
        return {
            "preset": self.preset_name,
            **{section: dataclasses.asdict(getattr(self, section)) for section in SECTIONS},
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def fingerprint(self) -> str:
        return hashlib.sha256(self.to_json().encode()).hexdigest()[:16]


PRESETS: dict[str, dict] = {
    # Seconds on a CPU: the test-suite's model.
    "tiny": {
        "model": {"width": 32, "layers": 2, "heads": 2},
        "data": {"points": 16, "train_samples": 4096, "val_samples": 64},
        "train": {
            "global_batch_size": 16,
            "max_steps": 50,
            "eval_interval": 25,
            "log_interval": 5,
            "eval_batch_size": 32,
        },
    },
    # The default run: a few minutes on a 2-core CPU.
    "small": {},
    # GPU sizes.
    "medium": {
        "model": {"width": 512, "layers": 8, "heads": 8},
        "data": {"points": 256, "train_samples": 1_000_000},
        "train": {"global_batch_size": 256, "lr": 3e-4},
    },
    "large": {
        "model": {"width": 1024, "layers": 24, "heads": 16},
        "data": {"points": 512, "train_samples": 4_000_000},
        "train": {"global_batch_size": 256, "lr": 2e-4},
    },
}


def dotted_items(values: dict, source: str) -> dict:
    """``{"section.key": value}`` of a ``{"preset": ..., "section": {key: value}}`` dict."""
    out = {}
    for section, entries in values.items():
        if section == "preset":
            continue
        if section not in SECTIONS:
            raise ConfigError(f"unknown section {section!r} in {source}; sections are {', '.join(SECTIONS)}")
        if not isinstance(entries, dict):
            raise ConfigError(
                f"section {section!r} in {source} is a {type(entries).__name__}; "
                f"it must be a table of keys, e.g. [{section}]"
            )
        out.update({f"{section}.{key}": value for key, value in entries.items()})
    return out


def all_keys() -> list[str]:
    return [f"{s}.{f.name}" for s, cls in SECTIONS.items() for f in dataclasses.fields(cls)]


def _suggest(key: str, candidates: list[str]) -> str:
    close = difflib.get_close_matches(key, candidates, n=1)
    return f"; did you mean {close[0]!r}?" if close else "; run with --help for the list"


def _convert(kind: type, value):
    if not isinstance(value, (str, int, float, bool)):
        raise TypeError(value)
    if kind is bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("0", "false", "no", "off"):
            return False
        raise ValueError(value)
    if kind is int and isinstance(value, float) and not value.is_integer():
        raise ValueError(value)
    if kind in (int, float) and isinstance(value, bool):
        raise TypeError(value)  # true is not a number
    if kind is str and not isinstance(value, str):
        raise TypeError(value)
    if kind is int and isinstance(value, str):
        return int(float(value)) if "e" in value.lower() else int(value)  # 1e5 is an int
    return kind(value)


def load_file(path: str) -> dict:
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"config file {path!r} does not exist; pass an existing TOML or JSON file")
    try:
        text = file.read_text()
        values = json.loads(text) if file.suffix == ".json" else tomllib.loads(text)
    except (ValueError, tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise ConfigError(
            f"config file {path!r} is not valid {'JSON' if file.suffix == '.json' else 'TOML'}: "
            f"{str(error).splitlines()[0]}"
        ) from None
    except OSError as error:
        raise ConfigError(f"config file {path!r} cannot be read: {error.strerror}") from None
    if not isinstance(values, dict):
        raise ConfigError(
            f"config file {path!r} holds a {type(values).__name__}; it must hold sections "
            'such as [train] (TOML) or {"train": {...}} (JSON)'
        )
    if "preset" in values and (not isinstance(values["preset"], str) or values["preset"] not in PRESETS):
        raise ConfigError(
            f"config file {path!r}: preset {values['preset']!r} is unknown; choose one of {', '.join(PRESETS)}"
        )
    return values


def validate(config: ExperimentConfig, world_size: int | None = None) -> None:
    """Raise ``ConfigError`` for the first value that cannot work."""
    m, d, t, ck = config.model, config.data, config.train, config.checkpoint
    for section in SECTIONS:
        for key, value in dataclasses.asdict(getattr(config, section)).items():
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"--{section}.{key}={value} is not a finite number")
            if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 2**63:
                raise ConfigError(f"--{section}.{key}={value} is too large; use a value below 2**63")
    positive = {
        "model.width": m.width,
        "model.layers": m.layers,
        "model.heads": m.heads,
        "model.mlp_ratio": m.mlp_ratio,
        "data.dim": d.dim,
        "data.points": d.points,
        "data.min_components": d.min_components,
        "data.train_samples": d.train_samples,
        "data.val_samples": d.val_samples,
        "data.box": d.box,
        "data.min_snr": d.min_snr,
        "data.weight_concentration": d.weight_concentration,
        "train.global_batch_size": t.global_batch_size,
        "train.lr": t.lr,
        "train.eval_batch_size": t.eval_batch_size,
        "train.log_interval": t.log_interval,
    }
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"--{key}={value} must be positive")
    non_negative = {
        "train.max_steps": t.max_steps,
        "train.num_epochs": t.num_epochs,
        "train.micro_batch_size": t.micro_batch_size,
        "train.grad_clip": t.grad_clip,
        "train.weight_decay": t.weight_decay,
        "train.eval_interval": t.eval_interval,
        "model.dropout": m.dropout,
        "data.seed": d.seed,
        "data.val_seed": d.val_seed,
        "train.seed": t.seed,
        "train.step_timeout": t.step_timeout,
        "train.heartbeat_timeout": t.heartbeat_timeout,
        **{
            f"checkpoint.{k}": v
            for k, v in dataclasses.asdict(config.checkpoint).items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)
        },
    }
    for key, value in non_negative.items():
        if value < 0:
            raise ConfigError(f"--{key}={value} must not be negative")
    if t.max_steps == 0 and t.num_epochs == 0:
        raise ConfigError("nothing to train: set --train.max_steps or --train.num_epochs above 0")
    if m.width % m.heads:
        raise ConfigError(
            f"--model.width={m.width} is not divisible by --model.heads={m.heads}; choose heads that divide the width"
        )
    if not 0 <= m.dropout < 1:
        raise ConfigError(f"--model.dropout={m.dropout} must be in [0, 1)")
    if d.max_components < d.min_components:
        raise ConfigError(
            f"--data.max_components={d.max_components} is below --data.min_components={d.min_components}; raise it"
        )
    if d.max_components > d.points:
        raise ConfigError(
            f"--data.max_components={d.max_components} exceeds --data.points="
            f"{d.points}; use fewer components or more points"
        )
    if d.max_snr < d.min_snr:
        raise ConfigError(f"--data.max_snr={d.max_snr} is below --data.min_snr={d.min_snr}; raise it")
    # Points lie within box * (1 + 10 / min_snr) of the origin (no normal draw passes 10 sigma); the
    # loss squares and sums them in float32, which holds 3.4e38.
    reach = d.box * (1 + 10 / d.min_snr)
    if not reach <= 1e15:
        raise ConfigError(
            f"--data.box={d.box:g} with --data.min_snr={d.min_snr:g} puts points up to {reach:.3g} "
            "from the origin, too far for float32 (the loss squares them): keep "
            "box * (1 + 10 / min_snr) under 1e15"
        )
    if not d.weight_concentration * d.max_components < 1e300:  # the Dirichlet draws' sum must be finite
        raise ConfigError(
            f"--data.weight_concentration={d.weight_concentration:g} overflows the mixture "
            "weights; any value above 1e3 already gives equal weights: use one"
        )
    if d.mode not in ("fixed", "dynamic"):
        raise ConfigError(f"--data.mode={d.mode!r} is unknown; use fixed or dynamic")
    if t.schedule not in SCHEDULES:
        raise ConfigError(f"--train.schedule={t.schedule!r} is unknown; use one of {', '.join(SCHEDULES)}")
    if not 0 <= t.warmup_fraction < 1:
        raise ConfigError(f"--train.warmup_fraction={t.warmup_fraction} must be in [0, 1)")
    if not 0 <= t.min_lr_ratio <= 1:
        raise ConfigError(f"--train.min_lr_ratio={t.min_lr_ratio} must be in [0, 1]")
    try:
        milestones = [float(x) for x in t.step_milestones.split(",") if x.strip()]
    except ValueError:
        milestones = [-1.0]
    if any(not 0 < x < 1 for x in milestones):
        raise ConfigError(
            f"--train.step_milestones={t.step_milestones!r} must be comma-separated "
            "fractions between 0 and 1, e.g. 0.5,0.75"
        )
    if t.device not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"--train.device={t.device!r} is unknown; use auto, cpu or cuda")
    if t.precision not in ("auto", "fp32", "bf16"):
        raise ConfigError(f"--train.precision={t.precision!r} is unknown; use auto, fp32 or bf16")
    stop_signals(ck.stop_signals)
    if 0 < t.heartbeat_timeout < 1:
        raise ConfigError(
            f"--train.heartbeat_timeout={t.heartbeat_timeout:g} is under a second, shorter than "
            "a live rank can be kept from its store; use at least 1, or 0 to turn it off"
        )
    if ck.storage_timeout <= 0 or ck.storage_retries < 1 or ck.lease_seconds < 3:
        raise ConfigError(
            "--checkpoint.storage_timeout must be positive, --checkpoint.storage_retries at "
            "least 1 and --checkpoint.lease_seconds at least 3"
        )
    if ck.endpoint_url:
        parts = urllib.parse.urlsplit(ck.endpoint_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(
                f"--checkpoint.endpoint_url={ck.endpoint_url!r} is not an http(s) URL; "
                "use e.g. https://s3.example.com or http://127.0.0.1:9000"
            )
    if world_size is not None:
        micro_batches(config, world_size)


UNCATCHABLE = {"SIGKILL", "SIGSTOP"}


def stop_signals(names: str) -> list[signal.Signals]:
    """The signals named in ``--checkpoint.stop_signals`` (e.g. "SIGTERM,USR1"), checked."""
    out = []
    for raw in names.split(","):
        name = raw.strip().upper()
        if not name:
            continue
        name = name if name.startswith("SIG") else f"SIG{name}"
        if name in UNCATCHABLE:
            raise ConfigError(
                f"--checkpoint.stop_signals: {name} cannot be caught by any process; "
                "use SIGTERM, SIGUSR1, SIGUSR2 or SIGINT"
            )
        number = getattr(signal.Signals, name, None) if name.isidentifier() else None
        if number is None:
            raise ConfigError(
                f"--checkpoint.stop_signals: {raw.strip()!r} is not a signal; use names such as SIGTERM,SIGUSR1"
            )
        out.append(number)
    return out


def micro_batches(config: ExperimentConfig, world_size: int) -> tuple[int, int]:
    """(micro-batch size, accumulation steps) that make the global batch on ``world_size`` ranks."""
    g, micro = config.train.global_batch_size, config.train.micro_batch_size
    if g % world_size:
        raise ConfigError(
            f"--train.global_batch_size={g} cannot be split over {world_size} ranks; use a multiple of {world_size}"
        )
    per_rank = g // world_size
    micro = micro or per_rank
    if per_rank % micro:
        raise ConfigError(
            f"--train.global_batch_size={g} on {world_size} ranks gives {per_rank} "
            f"samples per rank, not a multiple of --train.micro_batch_size={micro}; "
            f"use a global batch that is a multiple of {world_size * micro}"
        )
    return micro, per_rank // micro


class _OneLineParser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse prints the whole usage; one line is enough
        self.exit(2, f"{self.prog}: error: {message}; run with --help for the options\n")


def build_parser(prog: str, description: str) -> argparse.ArgumentParser:
    parser = _OneLineParser(
        prog=prog, description=description, allow_abbrev=False, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", choices=list(PRESETS), default=None, help="starting configuration (default: small)")
    parser.add_argument("--config", metavar="FILE", help="TOML or JSON file of [section] keys")
    parser.add_argument(
        "--run-dir",
        metavar="PATH_OR_URL",
        default="runs/default",
        help="where config, metrics, events and checkpoints go (default: runs/default)",
    )
    parser.add_argument(
        "--resume",
        default="latest",
        metavar="latest|best|STEP|never|restart",
        help="in a run directory that holds a run, continue from the newest committed "
        "checkpoint (latest), the best one, a step, or refuse (never); restart: "
        "start from step 0 in a run directory that has no committed checkpoint, "
        "leaving what is there untouched (default: latest)",
    )
    parser.add_argument(
        "--stop-at-step",
        type=int,
        metavar="N",
        help="stop after step N, saving a checkpoint, without changing the plan "
        "(the next start continues); for time-sliced jobs and tests",
    )
    for section, cls in SECTIONS.items():
        group = parser.add_argument_group(f"{section} options")
        for f in dataclasses.fields(cls):
            group.add_argument(
                f"--{section}.{f.name}",
                dest=f"{section}.{f.name}",
                default=argparse.SUPPRESS,
                metavar=type(f.default).__name__.upper(),
                help=f"{f.metadata['help']} (default: {f.default})",
            )
    return parser


@dataclass
class Settings:
    """What the user asked for: a preset and explicit values, applied over a base config.

    A new run applies them over the preset; a resumed run over its stored config.
    """

    preset: str | None = None
    values: dict = field(default_factory=dict)  # "section.key" -> value, file then command line
    sources: dict = field(default_factory=dict)  # "section.key" -> where it came from

    def apply(self, config: ExperimentConfig) -> ExperimentConfig:
        for key, value in self.values.items():
            config.set(key, value, self.sources[key])
        return config

    def resolve(self) -> ExperimentConfig:
        return self.apply(ExperimentConfig.preset(self.preset or "small"))


def parse_args(parser: argparse.ArgumentParser, argv=None) -> tuple[argparse.Namespace, Settings]:
    """Parse the command line into the namespace and the user's settings (checked)."""
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        name = unknown[0].split("=")[0]
        parser.exit(2, f"{parser.prog}: error: unknown option {name}{_suggest(name.lstrip('-'), all_keys())}\n")
    try:
        settings = Settings()
        if args.config:
            file = load_file(args.config)
            settings.preset = file.get("preset")
            settings.values = dotted_items(file, args.config)
            settings.sources = dict.fromkeys(settings.values, args.config)
        settings.preset = args.preset or settings.preset
        for key in all_keys():
            if hasattr(args, key):
                settings.values[key] = getattr(args, key)
                settings.sources[key] = "the command line"
        validate(settings.resolve())
        if args.resume not in RESUME_CHOICES and not (args.resume.isascii() and args.resume.isdigit()):
            raise ConfigError(f"--resume={args.resume!r} is not {', '.join(RESUME_CHOICES)} or a step number")
    except ConfigError as error:
        parser.exit(2, f"{parser.prog}: error: {error}\n")
    return args, settings
