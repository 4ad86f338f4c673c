"""ModelManager: a trained model for inference, from a run, an export or a torch.save file.

No process group is needed: shards are consolidated in this one process.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .config import ExperimentConfig
from .export import load_model
from .metrics import squared_error
from .validation import baseline_sums, prediction_sums, validation_examples


class ModelManager:
    def __init__(self, model: torch.nn.Module, config: ExperimentConfig, source: str = ""):
        self.model = model.eval()
        self.config = config
        self.source = source

    @classmethod
    def load(cls, source: str, which: str = "latest", config: ExperimentConfig | None = None) -> ModelManager:
        """From a run directory (``which`` checkpoint), an export (.pt/.safetensors) or a plain state dict."""
        model, config = load_model(str(source), which=which, config=config)
        return cls(model, config, f"{source}" + (f" ({which})" if Path(source).is_dir() else ""))

    @torch.no_grad()
    def predict(self, points) -> torch.Tensor:
        """Each point's predicted cluster centre: ``[B, N, D]`` (or ``[N, D]``) in, same shape out."""
        points = torch.as_tensor(np.asarray(points) if not torch.is_tensor(points) else points, dtype=torch.float32)
        single = points.dim() == 2
        out = self.model(points[None] if single else points)
        return out[0] if single else out

    def validation_examples(self, num_samples: int | None = None, seed: int | None = None) -> dict:
        """The run's validation examples (its first ``num_samples``), or those of another seed."""
        return validation_examples(self.config.data, np.arange(num_samples or self.config.data.val_samples), seed)

    def evaluate(self, num_samples: int = 1000, seed: int | None = None, batch_size: int = 256) -> dict:
        """MSE and Wasserstein distance of the model, k-means (told the true K) and the set mean."""
        examples = self.validation_examples(num_samples, seed)
        count = len(examples["points"])
        sums = {
            **prediction_sums(self.predict, examples, batch_size),
            **baseline_sums(examples, seeds=np.arange(count)),
        }
        return {"num_samples": count, **{name: total / count for name, total in sums.items()}}

    def visualize(self, path: str, num_examples: int = 4, seed: int | None = None) -> Path:
        """A PNG of a few validation examples: points by true component, predicted and true centres."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        examples = self.validation_examples(num_examples, seed)
        predicted = self.predict(examples["points"])
        figure, axes = plt.subplots(1, num_examples, figsize=(4.2 * num_examples, 4.4), squeeze=False)
        for i, ax in enumerate(axes[0]):
            pts, k = examples["points"][i], int(examples["num_components"][i])
            ax.scatter(
                pts[:, 0],
                pts[:, 1],
                c=examples["labels"][i],
                cmap="tab10",
                vmin=0,
                vmax=9,
                s=14,
                alpha=0.55,
                label="points (colour: true component)",
            )
            ax.scatter(
                predicted[i, :, 0],
                predicted[i, :, 1],
                marker="x",
                c="black",
                s=22,
                linewidths=1,
                label="predicted centre of each point",
            )
            ax.scatter(
                examples["means"][i, :k, 0],
                examples["means"][i, :k, 1],
                marker="*",
                s=260,
                c="gold",
                edgecolors="black",
                label="true centres",
            )
            mse = squared_error(predicted[i : i + 1], examples["targets"][i : i + 1]).item()
            ax.set_title(f"K={k}, sigma={examples['sigma'][i]:.2f}, MSE={mse:.3f}", fontsize=10)
            ax.set_aspect("equal", adjustable="datalim")
        axes[0][0].legend(loc="lower left", fontsize=7, framealpha=0.8)
        figure.suptitle(f"dtrain cluster predictions: {self.source}", fontsize=11)
        figure.tight_layout()
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(path, dpi=110)
        plt.close(figure)
        return Path(path)
