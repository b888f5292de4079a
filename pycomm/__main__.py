"""`python -m pycomm <command>`: plan, demo, bench, bench-nccl, doctor."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

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
    return int(module.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
