"""The ``dtrain`` command: train, and look after the checkpoints of a run.

dtrain train [options]                  same as python -m dtrain.train
dtrain inspect RUN [--step N]           checkpoints of a run, or one checkpoint's tensors
dtrain verify RUN [STEP]                check checkpoints against their manifests
dtrain export RUN --out PATH [--step latest|best|N] [--format pt|safetensors] [--separate]
dtrain report RUN [--json]              interruptions, steps lost, per-epoch sample coverage
dtrain plot RUN --out curves.png        loss and validation curves, resumes and kills marked
dtrain evaluate RUN|EXPORT [--step best] [--visualize examples.png]
dtrain status RUN                       how the run's last start ended, as an exit code (0, 65, 75, 1)
"""

from __future__ import annotations

import argparse
import json
import sys

from . import train
from .checkpoint.catalog import Listing
from .checkpoint.dcp_io import UnsafeCheckpointError
from .checkpoint.storage import STORAGE_EXCEPTIONS, Storage, cause
from .errors import EXIT_CRASH, EXIT_DIVERGED, EXIT_OK, EXIT_PREEMPTED, CheckpointError, ConfigError, DtrainError
from .rundir import RunDirectory


def _run(args) -> RunDirectory:
    run = RunDirectory(args.run, Storage(endpoint_url=args.endpoint_url))
    run.check_holds_run()
    return run


def _selected(listing: Listing, step: str | None):
    """(committed manifests, other directory names) that ``step`` names; all when None."""
    others = sorted(set(listing.names) - {m.directory for m in listing.committed})
    if step is None:
        return listing.committed, others
    if step in ("latest", "best"):
        return listing.candidates(step)[:1], []
    if not (step.isascii() and step.isdigit()):
        raise ConfigError(f"step {step!r} is not latest, best or a step number")
    prefix = f"step_{int(step):08d}"
    return (
        [m for m in listing.committed if m.step == int(step)],
        [n for n in others if n == prefix or n.startswith(prefix + "_")],
    )


def _state(listing: Listing, name: str) -> tuple[str, str]:
    """(status, why) of a directory that is not a committed checkpoint."""
    if name in listing.damaged:
        return "damaged", listing.damaged[name]
    if name in listing.rejected:
        return "rejected", f"quarantined: {listing.rejected[name]}"
    if listing.torn[name]:
        return "torn", (
            "DCP files complete but no manifest (a lost manifest, or a save killed while committing); "
            "never loaded, never removed automatically"
        )
    return "torn", "no manifest: the save never finished; never loaded, and the next commit's retention removes it"


def inspect(args) -> int:
    catalog = _run(args).catalog()
    listing = catalog.scan()
    if args.step is not None:
        chosen, _ = _selected(listing, args.step)
        if not chosen:
            print(f"dtrain inspect: error: no committed checkpoint {args.step!r} in {catalog.url}", file=sys.stderr)
            return 2
        manifest = chosen[0]
        try:
            metadata = catalog.storage.reader(f"{catalog.url}/{manifest.directory}").read_metadata()
        except UnsafeCheckpointError as error:
            raise CheckpointError(f"{catalog.url}/{manifest.directory}/{error}") from None
        print(
            f"{manifest.directory}: step {manifest.step}, tags {','.join(manifest.tags) or '-'}, "
            f"world size {manifest.world_size}, progress {manifest.progress}"
        )
        for key, entry in sorted(metadata.state_dict_metadata.items()):
            if hasattr(entry, "size"):
                print(f"  {key:60s} {str(entry.properties.dtype).replace('torch.', ''):9s} {tuple(entry.size)}")
            else:
                print(f"  {key:60s} (object)")
        return 0
    if not listing.names:
        print(f"no checkpoints in {catalog.url}")
        return 0
    print(f"{'directory':22s} {'status':9s} {'step':>7s} {'tags':18s} {'world':>5s} {'MB':>9s} {'val_mse':>9s}")
    committed = {m.directory: m for m in listing.committed}
    newest = listing.candidates("latest")[0].directory if listing.committed else None
    for name in listing.names:
        m = committed.get(name)
        if m is None:
            status, why = _state(listing, name)
            size = sum(catalog.fs.du(catalog.directory(name), total=False).values()) / 1e6
            print(f"{name:22s} {status:9s} {'':>7s} {'':18s} {'':>5s} {size:9.2f} {'':>9s}  {why}")
            continue
        size = sum(f["size"] for f in m.files.values()) / 1e6
        mse = m.metrics.get("val_mse")
        tags = ",".join(m.tags + (["latest"] if name == newest else [])) or "-"
        print(
            f"{name:22s} {'committed':9s} {m.step:7d} {tags:18s} {m.world_size:5d} "
            f"{size:9.2f} {'' if mse is None else f'{mse:9.4f}'}"
        )
    return 1 if listing.damaged or listing.rejected else 0


def verify(args) -> int:
    catalog = _run(args).catalog()
    listing = catalog.scan()
    chosen, others = _selected(listing, args.step)
    if not chosen and not others:
        print(f"dtrain verify: error: nothing to verify for {args.step or 'all'} in {catalog.url}", file=sys.stderr)
        return 2
    bad = 0
    for m in chosen:
        problems = catalog.problems(m)
        bad += bool(problems)
        print(
            f"{m.directory}: "
            + (
                "CORRUPT: " + "; ".join(problems)
                if problems
                else f"ok ({len(m.files)} files, sizes and checksums match)"
            )
        )
    for name in others:
        status, why = _state(listing, name)
        bad += status in ("damaged", "rejected")
        print(f"{name}: {status.upper() if status != 'torn' else status}: {why}")
    for name, why in sorted(listing.foreign.items()):
        print(f"{name}: not a checkpoint ({why}); dtrain never touches it")
    return 1 if bad else 0


def status(args) -> int:
    """The exit code the run's last start would have had: for launch scripts under torchrun,
    whose own exit code is 1 for any worker failure (a preemption included)."""
    run = _run(args)
    events = run.events()
    starts = [i for i, e in enumerate(events) if e["event"] in ("start", "resume") and e["time"] >= args.since]
    if not starts:
        print(
            f"{run.url}: no start of training since {args.since:.0f} (the job stopped before it: bad "
            "configuration, run directory in use, storage unreachable; its output says which) (exit 2)"
        )
        return 2
    last = events[starts[-1] :]
    ending = next((e for e in reversed(last) if e.get("event") in ("end", "stop", "diverged")), None)
    if ending is None:
        code, words = EXIT_CRASH, "the last start ended without a stop or an end (killed, crashed or running)"
    elif ending["event"] == "end":
        code, words = EXIT_OK, f"finished at step {ending.get('step')}"
    elif ending["event"] == "diverged":
        code, words = EXIT_DIVERGED, f"diverged after step {ending.get('step')}"
    elif ending.get("reason"):
        code, words = EXIT_PREEMPTED, f"stopped on {ending['reason']} at step {ending.get('step')} with a checkpoint"
    else:
        code, words = EXIT_OK, f"stopped as asked at step {ending.get('step')}"
    print(f"{run.url}: {words} (exit {code})")
    return code


def export(args) -> int:
    from .export import export as write_export

    paths = write_export(args.run, args.out, args.step, args.format, args.separate, _run(args).storage)
    for path in paths:
        print(f"wrote {path}")
    return 0


def report(args) -> int:
    from .report import check_run, format_report

    result = check_run(_run(args))
    print(json.dumps(result, indent=2) if args.json else format_report(result))
    return 0 if result["ok"] else 1


def plot(args) -> int:
    from .plots import plot_run

    print(f"wrote {plot_run(_run(args), args.out)}")
    return 0


def evaluate(args) -> int:
    from .inference import ModelManager

    manager = ModelManager.load(args.run, which=args.step)
    print(json.dumps(manager.evaluate(args.num_samples), indent=2))
    if args.visualize:
        print(f"wrote {manager.visualize(args.visualize)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dtrain", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.add_parser("train", help="train or continue a run (dtrain train --help)", add_help=False)
    for name, function, text in (
        ("inspect", inspect, "list a run's checkpoints, or one's tensors"),
        ("verify", verify, "check checkpoints against their manifests"),
        ("export", export, "write a consolidated model for inference"),
        ("report", report, "interruptions, lost steps, sample coverage, checkpoints"),
        ("plot", plot, "loss and validation curves to PNG, resumes marked"),
        ("evaluate", evaluate, "a checkpoint or export against k-means and the set mean"),
        ("status", status, "how the last start ended, as its exit code"),
    ):
        sub = commands.add_parser(name, help=text, description=text)
        sub.set_defaults(function=function)
        sub.add_argument("run", metavar="RUN", help="run directory (path or URL); evaluate also takes an export")
        sub.add_argument("--endpoint-url", default="", help="S3 endpoint (default: AWS_ENDPOINT_URL)")
    commands.choices["inspect"].add_argument("--step", help="latest, best or a step: list its tensors")
    commands.choices["verify"].add_argument("step", nargs="?", help="latest, best or a step (default: all)")
    commands.choices["report"].add_argument("--json", action="store_true", help="machine-readable output")
    commands.choices["status"].add_argument(
        "--since",
        type=float,
        default=0.0,
        metavar="EPOCH_SECONDS",
        help="only a start at or after this time counts (e.g. $(date +%%s) taken before launching)",
    )
    commands.choices["plot"].add_argument("--out", required=True, help="PNG file to write")
    evaluator = commands.choices["evaluate"]
    evaluator.add_argument("--step", default="latest", help="latest, best or a step (runs only)")
    evaluator.add_argument("--num-samples", type=int, default=1000)
    evaluator.add_argument("--visualize", metavar="PNG", help="also draw a few examples to this PNG")
    exporter = commands.choices["export"]
    exporter.add_argument("--step", default="latest", help="latest, best or a step (default: latest)")
    exporter.add_argument("--out", required=True, help="output file, or directory with --separate")
    exporter.add_argument("--format", choices=("pt", "safetensors"), default="pt")
    exporter.add_argument(
        "--separate", action="store_true", help="write OUT/model.pt and OUT/optimizer.pt (full, unsharded state dicts)"
    )
    return parser


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "train":
        train.exit_now(train.main(argv[1:], prog="dtrain train"))
    args = build_parser().parse_args(argv)
    if args.command is None:
        build_parser().print_help()
        return 2
    try:
        return args.function(args)
    except DtrainError as error:
        print(f"dtrain {args.command}: error: {error}", file=sys.stderr)
        return 1 if error.exit_code == EXIT_CRASH else error.exit_code
    except STORAGE_EXCEPTIONS as error:
        print(f"dtrain {args.command}: error: {args.run}: {cause(error)}", file=sys.stderr)
        return 74
    except ValueError as error:
        print(f"dtrain {args.command}: error: {' '.join(str(error).split())[:300]}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
