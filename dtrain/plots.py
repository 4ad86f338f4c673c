"""Loss and validation curves of a run, from metrics.jsonl, with resumes and interruptions marked."""

from __future__ import annotations

from pathlib import Path

from .report import check_run
from .rundir import METRICS, RunDirectory


def plot_run(run: RunDirectory | str, path: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run = run if isinstance(run, RunDirectory) else RunDirectory(run)
    metrics = run.read_jsonl(METRICS)

    def numbers(record, *keys):
        return all(isinstance(record.get(k), (int, float)) and not isinstance(record.get(k), bool) for k in keys)

    train = [r for r in metrics if r.get("kind") == "train" and numbers(r, "step", "loss")]
    evals = [
        r for r in metrics if r.get("kind") == "eval" and numbers(r, "step", "val_mse", "kmeans_mse", "trivial_mse")
    ]
    report = check_run(run)
    spent = report.get("goodput")
    figure, (ax, bar) = plt.subplots(2, 1, figsize=(9, 6), height_ratios=[5, 1] if spent else [5, 0.01])
    if spent:  # where the wall-clock went (dtrain/goodput.py), one stacked bar
        left = 0.0
        parts = {"productive": spent["productive_s"], **{k: max(v, 0.0) for k, v in spent["badput_s"].items()}}
        for name, seconds in parts.items():
            bar.barh(0, seconds, left=left, label=f"{name} {seconds:.1f} s")
            left += seconds
        bar.set_yticks([])
        bar.set_xlabel(f"wall-clock seconds: goodput {spent['goodput']:.1%}")
        bar.legend(fontsize=7, ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.9))
    else:
        bar.set_axis_off()
    ax.plot([r["step"] for r in train], [r["loss"] for r in train], lw=1, alpha=0.7, label="training loss (MSE)")
    if evals:
        ax.plot([r["step"] for r in evals], [r["val_mse"] for r in evals], "o-", ms=3, label="validation MSE")
        ax.axhline(evals[-1]["kmeans_mse"], color="green", ls=":", label="k-means (true K), validation")
        ax.axhline(evals[-1]["trivial_mse"], color="gray", ls=":", label="set mean, validation")
    for i, leg in enumerate(report["legs"]):
        if "replica_id" in leg:  # replica groups (docs/fault-tolerance.md): mark where a group healed
            if leg["how"] == "healed":
                ax.axvline(leg["from_step"], color="tab:green", ls=":", lw=1, label="a replica group healed")
            continue
        if i:
            ax.axvline(leg["from_step"], color="tab:blue", ls="--", lw=1, label="resume" if i == 1 else None)
        if leg["ended"] != "finished" and i + 1 < len(report["legs"]):
            style = {"color": "tab:red", "ls": "-."} if leg["ended"] == "killed" else {"color": "tab:purple"}
            ax.axvline(
                leg["last_step"],
                lw=1.5,
                **style,
                label=f"{'kill' if leg['ended'] == 'killed' else 'preemption (saved)'}",
            )
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles))
    ax.legend(unique.values(), unique.keys(), fontsize=8)
    ax.set_yscale("log")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("mean squared error")
    ax.set_title(f"{run.url}: {report['interruptions']} interruption(s), {report['steps_lost']} step(s) lost")
    figure.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110, format="png")  # exactly ``path``, whatever its suffix
    plt.close(figure)
    return Path(path)
