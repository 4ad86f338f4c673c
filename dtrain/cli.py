"""The ``dtrain`` command: ``dtrain train [options]`` (same options as ``python -m dtrain.train``)."""
from __future__ import annotations

import sys

from . import train

COMMANDS = {"train": "train a model (dtrain train --help for its options)"}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: dtrain COMMAND [options]\n\ncommands:")
        for name, text in COMMANDS.items():
            print(f"  {name:10s} {text}")
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"dtrain: error: unknown command {command!r}; use one of {', '.join(COMMANDS)}",
              file=sys.stderr)
        return 2
    return train.main(rest, prog=f"dtrain {command}")


if __name__ == "__main__":
    sys.exit(main())
