"""Models out of a run: consolidate a checkpoint's shards in one process, export, load any format.

No process group is needed: DCP reads every shard of the requested tensors into
full-size tensors of a plain (unsharded) model, whatever world size wrote them.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import torch
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import get_state_dict

from .checkpoint.dcp_io import UnsafeCheckpointError
from .checkpoint.state import load_parts
from .checkpoint.storage import Storage, cause, guard
from .config import ExperimentConfig
from .errors import CheckpointError, ConfigError, DtrainError, StorageError
from .model import ClusterTransformer, build_model
from .rundir import RunDirectory

EXPORT_FORMAT = "dtrain-model"


def load_from_run(
    run_url: str, which: str = "latest", optimizer: bool = False, storage: Storage | None = None, verify: bool = True
):
    """``(model, optimizer state dict or None, manifest, config)`` consolidated from a run's checkpoint."""
    run = RunDirectory(run_url, storage)
    catalog = run.catalog()
    manifest = catalog.choose(which, verify)
    config = (
        ExperimentConfig.from_dict(manifest.config, source=f"{manifest.directory}/manifest.json")
        if manifest.config
        else run.stored_config()[0]
    )
    model = build_model(config.model, config.data.dim)
    wanted = {"model": model.state_dict()}
    if optimizer:
        optim = torch.optim.AdamW(model.parameters(), lr=config.train.lr, weight_decay=config.train.weight_decay)
        _, wanted["optimizer"] = get_state_dict(model, optim)  # creates AdamW's state to fill
    url = f"{catalog.url}/{manifest.directory}"
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.simplefilter("ignore", UserWarning)
        reader = catalog.storage.reader(url)
        try:
            with guard("loading checkpoint", url):
                reader.read_metadata()
            loaded = load_parts(reader, wanted, no_dist=True)
        except (UnsafeCheckpointError, CheckpointException) as error:
            raise CheckpointError(f"loading {url} failed: {cause(error)}") from None
    model.load_state_dict(loaded["model"])
    if not all(torch.isfinite(v).all() for v in model.state_dict().values() if v.is_floating_point()):
        raise CheckpointError(f"{url} holds non-finite weights (a diverged run); pick an earlier step")
    return model.eval(), loaded.get("optimizer"), manifest, config


def export(
    run_url: str,
    out: str,
    which: str = "latest",
    fmt: str = "pt",
    separate: bool = False,
    storage: Storage | None = None,
) -> list[Path]:
    """Write a consolidated model (``.pt`` or ``.safetensors``), or model.pt + optimizer.pt in ``out``."""
    target = _output_path(run_url, out, separate)
    model, optim, manifest, config = load_from_run(run_url, which, optimizer=separate, storage=storage)
    weights = {k: v.contiguous() for k, v in model.state_dict().items()}
    header = {
        "format": EXPORT_FORMAT,
        "version": 1,
        "config": config.to_dict(),
        "step": manifest.step,
        "checkpoint": manifest.directory,
    }
    if separate:
        written = [
            _write(target / "model.pt", lambda f: torch.save({**header, "model": weights}, f)),
            _write(target / "optimizer.pt", lambda f: torch.save({**header, "optimizer": optim}, f)),
        ]
        return written
    if fmt == "safetensors":
        from safetensors.torch import save_file

        metadata = {"format": EXPORT_FORMAT, "config": json.dumps(header["config"]), "step": str(manifest.step)}
        return [_write(target, lambda f: save_file(weights, str(f), metadata=metadata))]
    return [_write(target, lambda f: torch.save({**header, "model": weights}, f))]


def _output_path(run_url: str, out: str, separate: bool) -> Path:
    """Where an export goes: a local path, never a file of a run directory (except RUN/exports/)."""
    if not str(out).strip() or "://" in str(out):
        raise ConfigError(f"--out={out!r}: give a local file path (exports are written locally)")
    target = Path(out).expanduser().absolute()
    if "://" not in run_url:
        run = Path(run_url).expanduser().absolute()
        inside = target == run or run in target.parents
        if inside and (run / "exports") not in [target, *target.parents]:
            raise ConfigError(
                f"--out={out} is inside the run directory {run}: it could overwrite the run's "
                f"files; write to {run / 'exports'} or elsewhere"
            )
    if not separate and target.is_dir():
        raise ConfigError(f"--out={out} is a directory; give a file name such as {target / 'model.pt'}")
    if separate and target.exists() and not target.is_dir():
        raise ConfigError(f"--out={out} is a file; --separate writes a directory")
    return target


def _write(path: Path, save) -> Path:
    """``save(temporary)`` then rename onto ``path``: an export appears whole or not at all."""
    temporary = path.with_name(f"{path.name}.tmp.{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        save(temporary)
        os.replace(temporary, path)
    except (OSError, RuntimeError) as error:
        temporary.unlink(missing_ok=True)
        raise StorageError(f"writing {path} failed: {cause(error)}") from None
    return path


def load_model(
    source: str, which: str = "latest", config: ExperimentConfig | None = None, storage: Storage | None = None
) -> tuple[ClusterTransformer, ExperimentConfig]:
    """A model for inference from a run directory, an export, or a plain ``torch.save`` file.

    A plain file may hold the model's state dict itself, or a dict with it under
    ``model`` / ``model_state_dict``; such files do not record the architecture,
    so ``config`` must be given for them.
    """
    if "://" in source or Path(source).is_dir():
        model, _, _, run_cfg = load_from_run(source, which, storage=storage)
        return model, run_cfg
    if not Path(source).is_file():
        raise ConfigError(f"{source} is neither a run directory nor a file")
    try:
        return _load_file(source, config)
    except DtrainError:
        raise
    except Exception as error:  # what a file that is not a model can raise while being read
        raise CheckpointError(
            f"{source} is not a dtrain export, a torch.save of a model state dict, or a run "
            f"directory ({type(error).__name__}: {' '.join(str(error).split())[:160]})"
        ) from None


def _load_file(source: str, config: ExperimentConfig | None) -> tuple[ClusterTransformer, ExperimentConfig]:
    if source.endswith(".safetensors"):
        from safetensors import safe_open
        from safetensors.torch import load_file

        with safe_open(source, "pt") as f:
            config = ExperimentConfig.from_dict(json.loads(f.metadata()["config"]))
        weights = load_file(source)
    else:
        blob = torch.load(source, map_location="cpu", weights_only=True)
        if blob.get("format") == EXPORT_FORMAT:
            config = ExperimentConfig.from_dict(blob["config"])
        weights = blob.get("model", blob.get("model_state_dict", blob))
        if config is None:
            raise ConfigError(
                f"{source} is a plain state dict without the model's configuration; "
                "pass config=ExperimentConfig.preset(...) matching it"
            )
    model = build_model(config.model, config.data.dim)
    model.load_state_dict(weights)
    return model.eval(), config


def load_separate(directory: str, model: ClusterTransformer, optimizer: torch.optim.Optimizer) -> dict:
    """Fill a fresh model and optimizer from ``export --separate`` files; returns the header.

    ``optimizer.pt`` is keyed by parameter names (as ``get_state_dict`` writes it), so it
    loads into any optimizer built over the same model, whatever order it lists parameters in.
    """
    from torch.distributed.checkpoint.state_dict import set_state_dict

    weights = torch.load(Path(directory, "model.pt"), map_location="cpu", weights_only=True)
    optim = torch.load(Path(directory, "optimizer.pt"), map_location="cpu", weights_only=True)
    set_state_dict(model, optimizer, model_state_dict=weights["model"], optim_state_dict=optim["optimizer"])
    return {k: v for k, v in weights.items() if k != "model"}
