"""ExperimentManager: the Python API. The command line is a thin layer over the same calls.

    exp = ExperimentManager(ExperimentConfig.preset("small"), run_dir="runs/a")
    exp.run(num_epochs=5)
    exp = ExperimentManager.load("runs/a")
    exp.resume_training(num_epochs=10, batch_size=64, reconfigure_scheduler=True)
    best = ExperimentManager.load_best_model("runs/a")
    best.get_model_manager().predict(points)

Training runs in this process as a one-rank group, or as one rank of a torchrun
job when started under torchrun (every rank runs the same script).
"""

from __future__ import annotations

import copy
from pathlib import Path

from .checkpoint.storage import Storage
from .config import ExperimentConfig, Settings, all_keys
from .export import export
from .inference import ModelManager
from .lease import RunLease
from .rundir import RunDirectory
from .train import run_training, stored_config


class ExperimentManager:
    def __init__(self, config: ExperimentConfig, run_dir: str, checkpoint: str = "latest"):
        self.config = config
        self.run_dir = str(run_dir)
        self.checkpoint = checkpoint  # which checkpoint the inference calls use: latest, best or a step
        self.metrics: dict = {}

    @classmethod
    def load(cls, run_dir: str, checkpoint: str = "latest") -> ExperimentManager:
        """A run's configuration (as of its newest checkpoint) and its ``checkpoint`` for inference."""
        config, _ = stored_config(str(run_dir))
        return cls(config, run_dir, checkpoint)

    @classmethod
    def load_latest_model(cls, run_dir: str) -> ExperimentManager:
        return cls.load(run_dir, "latest")

    @classmethod
    def load_best_model(cls, run_dir: str) -> ExperimentManager:
        return cls.load(run_dir, "best")

    # ---- training ------------------------------------------------------------------------
    def run(self, num_epochs: int | None = None, max_steps: int | None = None) -> dict:
        """Train this config in ``run_dir`` (continuing it if it already holds this run)."""
        config = copy.deepcopy(self.config)
        if num_epochs is not None:
            config.train.num_epochs, config.train.max_steps = num_epochs, 0
        if max_steps is not None:
            config.train.max_steps = max_steps
        values = config.to_dict()
        settings = Settings(
            preset=config.preset_name,
            values={key: values[key.split(".")[0]][key.split(".")[1]] for key in all_keys()},
            sources=dict.fromkeys(all_keys(), "ExperimentManager.run"),
        )
        return self._train(settings, "latest")

    def resume_training(
        self,
        num_epochs: int | None = None,
        batch_size: int | None = None,
        train_samples: int | None = None,
        reconfigure_scheduler: bool = False,
        scale_lr: bool = False,
        max_steps: int | None = None,
    ) -> dict:
        """Continue from the newest committed checkpoint; with no arguments, finish the plan.

        ``num_epochs``: that many epochs *more* than planned. ``batch_size``: a new global
        batch (same sample sequence). ``train_samples``: a new epoch length from the next
        epoch. ``reconfigure_scheduler``: re-plan the LR decay to the new end instead of
        keeping the old curve. ``scale_lr``: scale the LR with the batch size.
        """
        config, manifest = stored_config(self.run_dir)
        values = {"train.reconfigure_scheduler": reconfigure_scheduler, "train.scale_lr": scale_lr}
        if num_epochs is not None:
            if config.train.max_steps:  # a plan in steps: count the epochs it reached
                progress = manifest.progress if manifest else {"epoch": 0, "samples_in_epoch": 0}
                done = progress["epoch"] + (1 if progress["samples_in_epoch"] else 0)
                values.update({"train.max_steps": 0, "train.num_epochs": done + num_epochs})
            else:
                values["train.num_epochs"] = config.train.num_epochs + num_epochs
        if max_steps is not None:
            values["train.max_steps"] = max_steps
        if batch_size is not None:
            values["train.global_batch_size"] = batch_size
        if train_samples is not None:
            values["data.train_samples"] = train_samples
        settings = Settings(values=values, sources=dict.fromkeys(values, "resume_training"))
        return self._train(settings, "latest")

    def _train(self, settings: Settings, resume: str) -> dict:
        trainer = run_training(settings, self.run_dir, resume)
        self.config = trainer.config
        self.metrics = dict(trainer.metrics)
        return self.metrics

    def save_checkpoint(self, tag: str) -> str:
        """Pin this manager's checkpoint under ``tag``: a committed copy that retention keeps.

        No process group is needed. The run's "latest" does not change, and a job
        training the run (it holds the lease) is not raced: the copy is refused.
        """
        run = RunDirectory(self.run_dir, Storage.from_config(self.config.checkpoint))
        lease = RunLease(run, self.config.checkpoint.lease_seconds)
        lease.acquire()
        try:
            return run.catalog().copy_tagged(self.checkpoint, tag)
        finally:
            lease.release()

    # ---- inference -----------------------------------------------------------------------
    def get_model_manager(self) -> ModelManager:
        return ModelManager.load(self.run_dir, which=self.checkpoint)

    def evaluate(self, num_samples: int | None = None) -> dict:
        return self.get_model_manager().evaluate(num_samples or self.config.data.val_samples)

    def export_model(self, path: str, format: str | None = None) -> Path:
        """Consolidated weights of this manager's checkpoint: .pt, or .safetensors by suffix."""
        fmt = format or ("safetensors" if str(path).endswith(".safetensors") else "pt")
        return export(self.run_dir, str(path), which=self.checkpoint, fmt=fmt)[0]
