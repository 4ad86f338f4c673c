"""dtrain: fault-tolerant FSDP2 training of Gaussian-mixture transformers."""
from .config import ConfigError, ExperimentConfig

__all__ = ["ConfigError", "ExperimentConfig"]
__version__ = "0.1.0"
