"""dtrain: fault-tolerant FSDP2 training of Gaussian-mixture transformers."""

from .config import ConfigError, ExperimentConfig

__all__ = ["ConfigError", "ExperimentConfig", "ExperimentManager", "ModelManager"]
__version__ = "0.1.0"


def __getattr__(name: str):
    # Imported on first use: `python -m dtrain.train` must not find dtrain.train half-imported.
    if name == "ExperimentManager":
        from .experiment import ExperimentManager

        return ExperimentManager
    if name == "ModelManager":
        from .inference import ModelManager

        return ModelManager
    raise AttributeError(name)
