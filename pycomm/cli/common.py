"""Argument and output conventions shared by the CLI commands."""

from __future__ import annotations

import argparse
import json
import re
import sys
from typing import Any

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def parse_size(text: str) -> int:
    """'64K' -> 65536, '16M', '1G', '4096' (binary units, as nccl-tests' -b/-e)."""
    match = re.fullmatch(r"\s*(\d+)\s*([KMG]?)i?B?\s*", text.upper())
    if not match:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (use e.g. 64K, 16M, 1G)")
    return int(match.group(1)) * _UNITS[match.group(2)]


def size_text(nbytes: int) -> str:
    for unit, factor in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if nbytes >= factor and nbytes % factor == 0:
            return f"{nbytes // factor}{unit}"
    return str(nbytes)


def add_output_arguments(parser: argparse.ArgumentParser, default_dir: str) -> None:
    parser.add_argument("--out", default=default_dir, help=f"output folder (default: {default_dir})")
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON instead of tables")


def print_json(value: Any) -> None:
    json.dump(value, sys.stdout, indent=2)
    sys.stdout.write("\n")
