"""The ``dtrain`` command: train, and look after the checkpoints of a run.

    dtrain train [options]                  same as python -m dtrain.train
    dtrain inspect RUN [--step N]           checkpoints of a run, or one checkpoint's tensors
    dtrain verify RUN [STEP]                check checkpoints against their manifests
    dtrain export RUN --out PATH [--step latest|best|N] [--format pt|safetensors] [--separate]
    dtrain report RUN [--json]              interruptions, steps lost, per-epoch sample coverage
    dtrain plot RUN --out curves.png        loss and validation curves, resumes and kills marked
    dtrain evaluate RUN|EXPORT [--step best] [--visualize examples.png]
"""
from __future__ import annotations

import argparse
import json
import sys

from . import train
from .checkpoint.catalog import CheckpointCatalog
from .checkpoint.manifest import find_problems
from .checkpoint.storage import reader


def _catalog(args) -> CheckpointCatalog:
    return CheckpointCatalog(f"{args.run.rstrip('/')}/checkpoints", args.endpoint_url)


def _selected(catalog: CheckpointCatalog, step: str | None):
    committed, torn = catalog.scan()
    if step is None:
        return committed, torn
    chosen = catalog.candidates(step)[:1] if step in ("latest", "best") else [
        m for m in committed if m.step == int(step)]
    return chosen, [t for t in torn if step.isdigit() and t.startswith(f"step_{int(step):08d}")]


def inspect(args) -> int:
    catalog = _catalog(args)
    if args.step is not None:
        chosen, _ = _selected(catalog, args.step)
        if not chosen:
            print(f"dtrain inspect: error: no committed checkpoint {args.step!r} in {catalog.url}", file=sys.stderr)
            return 2
        manifest = chosen[0]
        metadata = reader(f"{catalog.url}/{manifest.directory}", args.endpoint_url).read_metadata()
        print(f"{manifest.directory}: step {manifest.step}, tags {','.join(manifest.tags) or '-'}, "
              f"world size {manifest.world_size}, progress {manifest.progress}")
        for key, entry in sorted(metadata.state_dict_metadata.items()):
            if hasattr(entry, "size"):
                print(f"  {key:60s} {str(entry.properties.dtype).replace('torch.', ''):9s} {tuple(entry.size)}")
            else:
                print(f"  {key:60s} (object)")
        return 0
    committed, torn = catalog.scan()
    if not committed and not torn:
        print(f"no checkpoints in {catalog.url}")
        return 0
    print(f"{'directory':22s} {'status':9s} {'step':>7s} {'tags':11s} {'world':>5s} {'MB':>9s} {'val_mse':>9s}")
    rows = [(m.directory, m) for m in committed] + [(name, None) for name in torn]
    for name, m in sorted(rows, key=lambda row: row[0]):
        if m is None:
            size = sum(catalog.fs.du(catalog.directory(name), total=False).values()) / 1e6
            print(f"{name:22s} {'torn':9s} {'':>7s} {'':11s} {'':>5s} {size:9.2f} {'':>9s}")
            continue
        size = sum(f["size"] for f in m.files.values()) / 1e6
        mse = m.metrics.get("val_mse")
        print(f"{name:22s} {'committed':9s} {m.step:7d} {','.join(m.tags) or '-':11s} {m.world_size:5d} "
              f"{size:9.2f} {'' if mse is None else f'{mse:9.4f}'}")
    return 0


def verify(args) -> int:
    catalog = _catalog(args)
    chosen, torn = _selected(catalog, args.step)
    if not chosen and not torn:
        print(f"dtrain verify: error: nothing to verify for {args.step or 'all'} in {catalog.url}", file=sys.stderr)
        return 2
    bad = 0
    for m in chosen:
        problems = find_problems(catalog.fs, catalog.directory(m.directory), m)
        bad += bool(problems)
        print(f"{m.directory}: " + ("CORRUPT: " + "; ".join(problems) if problems else
                                    f"ok ({len(m.files)} files, sizes and SHA-256 match)"))
    for name in torn:
        print(f"{name}: torn (no manifest: the save never committed; it is never loaded, "
              "and the next commit's retention removes it)")
    return 1 if bad else 0


def export(args) -> int:
    from .checkpoint.export import export as write_export
    paths = write_export(args.run, args.out, args.step, args.format, args.separate, args.endpoint_url)
    for path in paths:
        print(f"wrote {path}")
    return 0


def report(args) -> int:
    from .report import check_run, format_report
    result = check_run(args.run, args.endpoint_url)
    print(json.dumps(result, indent=2) if args.json else format_report(result))
    return 0 if result["ok"] else 1


def plot(args) -> int:
    from .plots import plot_run
    print(f"wrote {plot_run(args.run, args.out)}")
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
    for name, function, text in (("inspect", inspect, "list a run's checkpoints, or one's tensors"),
                                 ("verify", verify, "check checkpoints against their manifests"),
                                 ("export", export, "write a consolidated model for inference"),
                                 ("report", report, "interruptions, lost steps, sample coverage, checkpoints"),
                                 ("plot", plot, "loss and validation curves to PNG, resumes marked"),
                                 ("evaluate", evaluate, "a checkpoint or export against k-means and the set mean")):
        sub = commands.add_parser(name, help=text, description=text)
        sub.set_defaults(function=function)
        sub.add_argument("run", metavar="RUN", help="run directory (path or URL); evaluate also takes an export")
        sub.add_argument("--endpoint-url", default="", help="S3 endpoint (default: AWS_ENDPOINT_URL)")
    commands.choices["inspect"].add_argument("--step", help="latest, best or a step: list its tensors")
    commands.choices["verify"].add_argument("step", nargs="?", help="latest, best or a step (default: all)")
    commands.choices["report"].add_argument("--json", action="store_true", help="machine-readable output")
    commands.choices["plot"].add_argument("--out", required=True, help="PNG file to write")
    evaluator = commands.choices["evaluate"]
    evaluator.add_argument("--step", default="latest", help="latest, best or a step (runs only)")
    evaluator.add_argument("--num-samples", type=int, default=1000)
    evaluator.add_argument("--visualize", metavar="PNG", help="also draw a few examples to this PNG")
    exporter = commands.choices["export"]
    exporter.add_argument("--step", default="latest", help="latest, best or a step (default: latest)")
    exporter.add_argument("--out", required=True, help="output file, or directory with --separate")
    exporter.add_argument("--format", choices=("pt", "safetensors"), default="pt")
    exporter.add_argument("--separate", action="store_true",
                          help="write OUT/model.pt and OUT/optimizer.pt (full, unsharded state dicts)")
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
    except (FileNotFoundError, ValueError) as error:
        print(f"dtrain {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
