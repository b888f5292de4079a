"""`python -m pycomm <command>`: plan, demo, bench, bench-nccl, doctor."""

from __future__ import annotations

import argparse
import importlib
import logging
import signal
import sys

from pycomm.errors import PycommError

# Each command is a module of pycomm.cli with add_arguments(parser) and
# run(args) -> int; imported only when chosen, so `plan` starts fast.
COMMANDS = {
    "plan": "print the dp-cp / expert-dp / all-gather groups of a layout (no processes)",
    "demo": "train a small FSDP2 model on a local CPU world through the pool",
    "bench": "overlap and overhead benchmark of the pool's lanes",
    "bench-nccl": "GPU benchmark: pooled NCCL lanes vs torch's NCCL backend, GEMM slowdown",
    "doctor": "what this installation can do, and why not",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pycomm", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, help_text in COMMANDS.items():
        module = importlib.import_module(f"pycomm.cli.{name.replace('-', '_')}")
        command = sub.add_parser(name, help=help_text, description=module.__doc__)
        module.add_arguments(command)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    module = importlib.import_module(f"pycomm.cli.{args.command.replace('-', '_')}")
    try:
        return int(module.run(args) or 0)
    except (KeyboardInterrupt, SystemExit) as stop:
        # The launcher's signal exceptions carry the signal: it has already
        # stopped every rank, so a line says so instead of a traceback.
        signum = getattr(stop, "signum", None)
        if signum is None:
            raise
        print(f"pycomm {args.command}: {signal.Signals(signum).name}: every rank was stopped", file=sys.stderr)
        return 128 + signum
    except PycommError as error:
        logging.getLogger("pycomm").debug("pycomm %s failed", args.command, exc_info=True)
        print(f"pycomm {args.command}: {type(error).__name__}: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
