"""Argument and output conventions shared by the CLI commands.

Every value is checked where argparse reads it (the `type=` callables below
raise argparse.ArgumentTypeError), so a bad argument ends the command with
one line and exit code 2 before torch is imported or any rank starts: a
mistake costs a fraction of a second, not a world's start-up or a whole run.
Checks that need two arguments, or the world a launcher describes, go
through `usage_error`, which reports the same way."""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
# The benchmarks move float32 tensors: a size must be whole elements.
ELEMENT_BYTES = 4


def parse_size(text: str) -> int:
    """'64K' -> 65536, '16M', '1G', '4096' (binary units, as nccl-tests' -b/-e)."""
    match = re.fullmatch(r"\s*(\d+)\s*([KMG]?)I?B?\s*", text.upper())
    if not match:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (use e.g. 64K, 16M, 1G)")
    return int(match.group(1)) * _UNITS[match.group(2)]


def size_text(nbytes: int) -> str:
    for unit, factor in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if nbytes >= factor and nbytes % factor == 0:
            return f"{nbytes // factor}{unit}"
    return str(nbytes)


def buffer_size(text: str) -> int:
    """A size the benchmarks can make a float32 tensor of: > 0, whole elements."""
    nbytes = parse_size(text)
    if nbytes <= 0:
        raise argparse.ArgumentTypeError(f"a size must be > 0, got {text!r}")
    if nbytes % ELEMENT_BYTES:
        raise argparse.ArgumentTypeError(
            f"{text!r} is {nbytes} bytes: use a multiple of {ELEMENT_BYTES} (float32 elements)"
        )
    return nbytes


def _comma_list(text: str, parse_item: Callable[[str], int], what: str) -> list[int]:
    items = [item.strip() for item in text.split(",")]
    if not all(items):
        raise argparse.ArgumentTypeError(f"an empty entry in {text!r}: use e.g. {what}")
    values = [parse_item(item) for item in items]
    repeated = sorted({v for v in values if values.count(v) > 1})
    if repeated:
        # Rows of the same point are combined as runs of one measurement.
        raise argparse.ArgumentTypeError(f"{', '.join(map(str, repeated))} given twice in {text!r}")
    return values


def buffer_sizes(text: str) -> list[int]:
    """'64K,1M' -> [65536, 1048576]: distinct sizes, each a buffer_size."""
    return _comma_list(text, buffer_size, "64K,1M")


def int_at_least(minimum: int, reason: str = "") -> Callable[[str], int]:
    """An argparse type: an integer >= `minimum`; `reason` says why, in the
    error, when the bound is not obvious."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if value < minimum:
            why = f" ({reason})" if reason else ""
            raise argparse.ArgumentTypeError(f"must be >= {minimum}{why}, got {value}")
        return value

    return parse


# Every command that spawns a world compares or overlaps collectives between
# ranks; on one rank there is nothing to send, so its figures would mean nothing.
RANKS_REASON = "a world of one rank has no peer to exchange data with"
rank_count = int_at_least(2, RANKS_REASON)


def rank_counts(text: str) -> list[int]:
    """'2,4' -> [2, 4]: distinct world sizes, each a rank_count."""
    return _comma_list(text, rank_count, "2,4")


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _check_can_write_in(directory: Path, shown: str) -> None:
    # A file made and removed at once answers for permissions, read-only
    # mounts and quotas alike, as the run's own writes would meet them.
    try:
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as e:
        raise argparse.ArgumentTypeError(f"cannot write in {shown}: {e.strerror}") from None


def output_dir(file_names: Sequence[str]) -> Callable[[str], Path]:
    """An argparse type for --out: a folder that exists or can be made, that
    this process can write in, where none of `file_names` is a folder. Checked
    before the run so that its results are never lost at the end of it; the
    folder itself is made only when the results are written."""

    def check(text: str) -> Path:
        path = Path(text).expanduser()
        if not path.exists():
            ancestor = _nearest_existing(path)
            if not ancestor.is_dir():
                raise argparse.ArgumentTypeError(f"cannot create {text}: {ancestor} is not a folder")
            _check_can_write_in(ancestor, f"{ancestor} (to create {text})")
            return path
        if not path.is_dir():
            raise argparse.ArgumentTypeError(f"{text} exists and is not a folder")
        _check_can_write_in(path, text)
        for name in file_names:
            if (path / name).is_dir():
                raise argparse.ArgumentTypeError(f"cannot write {path / name}: it is a folder")
        return path

    return check


def add_output_arguments(parser: argparse.ArgumentParser, default_dir: str, file_names: Sequence[str]) -> None:
    parser.add_argument(
        "--out", default=default_dir, type=output_dir(file_names),
        help=f"output folder, checked before the run (default: {default_dir})",
    )
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON instead of tables")
    # For checks of several arguments together, made in run(): the same
    # one-line message and exit code 2 as a bad single value.
    parser.set_defaults(usage_error=parser.error)


def usage_error(args: argparse.Namespace, message: str) -> NoReturn:
    """Ends the command as argparse ends it for a bad value: the usage, one
    line naming the problem, exit code 2."""
    args.usage_error(message)
    raise AssertionError("argparse's error() returns only by raising SystemExit")


def print_json(value: Any) -> None:
    json.dump(value, sys.stdout, indent=2)
    sys.stdout.write("\n")
