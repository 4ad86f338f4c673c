"""The finiteness guard: a step whose loss or gradient norm is not finite on any rank is never
applied, no non-finite state is loaded, and the run stops with one line saying where to resume
(exit 65, docs/reliability.md)."""

from __future__ import annotations

import torch

from .errors import TrainingDiverged


def nonfinite_state(model, optimizer) -> list[str]:
    """This rank's shards of the model and optimizer state that hold NaN or inf, as one problem."""
    bad = [name for name, p in model.named_parameters() if not torch.isfinite(p.to_local()).all()]
    for state in optimizer.state.values():
        for key, value in state.items():
            if torch.is_tensor(value) and value.is_floating_point():
                local = value.to_local() if hasattr(value, "to_local") else value
                bad += [] if torch.isfinite(local).all() else [f"optimizer {key}"]
    return [f"non-finite values in {', '.join(sorted(set(bad))[:3])}"] if bad else []


def diverged(what: str, last_committed: str | None, lr: float) -> TrainingDiverged:
    """The one line a diverged run ends with: what, and how to go on with a lower learning rate."""
    if last_committed:
        step = last_committed.split("_")[1].lstrip("0") or "0"
        where = f"resume from {last_committed} with a lower --train.lr (now {lr:g}), e.g. --resume {step} "
    else:
        where = f"start again in a new --run-dir with a lower --train.lr (now {lr:g}), e.g. "
    return TrainingDiverged(f"training diverged: {what}; nothing non-finite was saved; {where}--train.lr={lr / 10:g}")
