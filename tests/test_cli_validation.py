"""Every command refuses a bad argument the way argparse does (one line
naming the argument and what is allowed, exit code 2) before any rank
starts, and, for a value that is wrong on its own, before torch is even
imported: a typo costs a fraction of a second, not a world's start-up, and a
folder that cannot take the results is refused before the run, not after."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

# Measured on the 2-core development machine, other work running: a refusal
# at parse time takes 0.1-0.3 s (the interpreter's start included); loading
# torch alone takes 2-7 s there, so the bound tells the two apart.
PARSE_TIME_BOUND_S = 3.0
# A layout check needs the launcher's module (it knows whether a launcher's
# world replaces --nproc-per-node), which loads torch: 3.4 s measured, where
# starting the demo's world took 20 s and more.
LAYOUT_CHECK_BOUND_S = 15.0


@dataclass(frozen=True)
class Refusal:
    returncode: int
    error_line: str
    stderr: str
    seconds: float
    imported_torch: bool


def refuse(*args: str, cwd: Path | None = None) -> Refusal:
    """Runs `python -m pycomm ARGS` as a user would; `-X importtime` lists
    every module the process imported, on stderr."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "pycomm", *args],
        capture_output=True, text=True, timeout=120, check=False, env=env, cwd=cwd,
    )
    seconds = time.perf_counter() - started
    imports = [line for line in done.stderr.splitlines() if line.startswith("import time:")]
    messages = [line for line in done.stderr.splitlines() if not line.startswith("import time:")]
    errors = [line for line in messages if ": error: " in line]
    assert len(errors) == 1, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    return Refusal(
        returncode=done.returncode,
        error_line=errors[0],
        stderr="\n".join(messages),
        seconds=seconds,
        imported_torch=any(re.search(r"\|\s+torch$", line) for line in imports),
    )


# (command line, what the one error line must say)
PARSE_TIME_REFUSALS = [
    (["bench", "--sizes", "1T"], "argument --sizes: not a size: '1T' (use e.g. 64K, 16M, 1G)"),
    (["bench", "--sizes", "0"], "argument --sizes: a size must be > 0, got '0'"),
    (["bench", "--sizes", "64K,0"], "argument --sizes: a size must be > 0, got '0'"),
    (["bench", "--sizes", "6"], "argument --sizes: '6' is 6 bytes: use a multiple of 4 (float32 elements)"),
    (["bench", "--sizes", "64K,,1M"], "argument --sizes: an empty entry in '64K,,1M'"),
    (["bench", "--sizes", "64K,64K"], "argument --sizes: 65536 given twice in '64K,64K'"),
    (["bench", "--ranks", "two"], "argument --nproc-per-node/--ranks: not an integer: 'two'"),
    (["bench", "--ranks", "0"], "argument --nproc-per-node/--ranks: must be >= 2"),
    (["bench", "--ranks", "1"],
     "argument --nproc-per-node/--ranks: must be >= 2 (a world of one rank has no peer to exchange data with), got 1"),
    (["bench", "--ranks", "2,1"], "argument --nproc-per-node/--ranks: must be >= 2"),
    (["bench", "--ranks", "2,-4"], "argument --nproc-per-node/--ranks: must be >= 2"),
    (["bench", "--ranks", "2,2"], "argument --nproc-per-node/--ranks: 2 given twice in '2,2'"),
    (["bench", "--iters", "3"], "argument --iters: must be >= 10 (medians of fewer rounds are noise"),
    (["bench", "--iters", "ten"], "argument --iters: not an integer: 'ten'"),
    (["bench", "--order-check-iters", "0"], "argument --order-check-iters: must be >= 10"),
    (["bench", "--repeat", "0"], "argument --repeat: must be >= 1, got 0"),
    (["bench", "--seed", "-1"], "argument --seed: must be >= 0, got -1"),
    (["demo", "--ep", "0"], "argument --ep: must be >= 1, got 0"),
    (["demo", "--steps", "0"], "argument --steps: must be >= 1, got 0"),
    (["demo", "--steps", "-5"], "argument --steps: must be >= 1, got -5"),
    (["demo", "--ranks", "1"], "argument --nproc-per-node/--ranks: must be >= 2"),
    (["demo", "--nproc-per-node", "four"], "argument --nproc-per-node/--ranks: not an integer: 'four'"),
    (["bench-nccl", "--gpus", "-1"], "argument --gpus: must be >= 0, got -1"),
    (["bench-nccl", "--iters", "5"], "argument --iters: must be >= 10"),
    (["bench-nccl", "--sizes", "1T"], "argument --sizes: not a size: '1T'"),
    (["bench-nccl", "--gemm-n", "0"], "argument --gemm-n: must be >= 1, got 0"),
    (["bench-nccl", "--gemm-ag-size", "0"], "argument --gemm-ag-size: a size must be > 0"),
    (["plan", "--world", "8", "--tp", "x"], "argument --tp: invalid int value: 'x'"),
]


@pytest.mark.parametrize(
    ("argv", "message"), [pytest.param(argv, message, id=" ".join(argv)) for argv, message in PARSE_TIME_REFUSALS]
)
def test_a_bad_value_is_refused_in_one_line_before_torch_loads(argv: list[str], message: str, tmp_path: Path) -> None:
    out = tmp_path / "out"
    extra = ["--out", str(out)] if argv[0] in ("bench", "demo", "bench-nccl") else []
    refusal = refuse(*argv, *extra)
    assert refusal.returncode == 2
    assert message in refusal.error_line, refusal.error_line
    assert refusal.error_line.startswith(f"python -m pycomm {argv[0]}: error: ")
    assert refusal.seconds < PARSE_TIME_BOUND_S, refusal.seconds
    assert not refusal.imported_torch
    assert not out.exists()


@pytest.fixture
def a_file(tmp_path: Path) -> Path:
    path = tmp_path / "results.txt"
    path.write_text("earlier results\n")
    return path


@pytest.mark.parametrize("command", ["bench", "demo", "bench-nccl"])
def test_an_out_that_is_a_file_is_refused_before_the_run(command: str, a_file: Path) -> None:
    refusal = refuse(command, "--out", str(a_file))
    assert refusal.returncode == 2
    assert f"argument --out: {a_file} exists and is not a folder" in refusal.error_line
    assert refusal.seconds < PARSE_TIME_BOUND_S and not refusal.imported_torch
    assert a_file.read_text() == "earlier results\n"


def test_an_out_below_a_file_is_refused(a_file: Path) -> None:
    refusal = refuse("bench", "--out", str(a_file / "bench"))
    assert refusal.returncode == 2
    assert f"argument --out: cannot create {a_file / 'bench'}: {a_file} is not a folder" in refusal.error_line


def test_an_out_where_nothing_can_be_written_is_refused() -> None:
    # /proc takes no new files, whoever asks (root included).
    refusal = refuse("demo", "--out", "/proc/pycomm-out/demo")
    assert refusal.returncode == 2
    assert "argument --out: cannot write in /proc (to create /proc/pycomm-out/demo): " in refusal.error_line
    assert refusal.seconds < PARSE_TIME_BOUND_S and not refusal.imported_torch


def test_an_out_whose_result_file_is_a_folder_is_refused(tmp_path: Path) -> None:
    (tmp_path / "bench.png").mkdir()
    refusal = refuse("bench", "--out", str(tmp_path))
    assert refusal.returncode == 2
    assert f"argument --out: cannot write {tmp_path / 'bench.png'}: it is a folder" in refusal.error_line


def test_the_default_out_is_checked_too(tmp_path: Path) -> None:
    # The default folder is relative to where the command runs.
    (tmp_path / "pycomm-out").write_text("not a folder")
    refusal = refuse("bench", cwd=tmp_path)
    assert refusal.returncode == 2
    assert "argument --out: cannot create pycomm-out/bench: pycomm-out is not a folder" in refusal.error_line


def test_an_expert_size_that_does_not_divide_the_world_is_refused_before_any_rank(tmp_path: Path) -> None:
    out = tmp_path / "out"
    refusal = refuse("demo", "--nproc-per-node", "3", "--ep", "2", "--out", str(out))
    assert refusal.returncode == 2
    assert refusal.error_line == "python -m pycomm demo: error: --ep 2 does not divide the world's 3 ranks"
    assert refusal.seconds < LAYOUT_CHECK_BOUND_S, refusal.seconds
    assert "training on" not in refusal.stderr and not out.exists()


def test_good_arguments_pass_the_checks(tmp_path: Path) -> None:
    """The types accept what the help shows (a missing --out is made later)."""
    from pycomm.__main__ import build_parser

    args = build_parser().parse_args([
        "bench", "--ranks", "2,4", "--sizes", "64K, 1MiB,4096", "--iters", "10",
        "--order-check-iters", "10", "--out", str(tmp_path / "new" / "folder"),
    ])
    assert args.ranks == [2, 4] and args.sizes == [65536, 1 << 20, 4096]
    assert args.out == tmp_path / "new" / "folder" and not args.out.exists()
    args = build_parser().parse_args(["demo", "--out", str(tmp_path)])
    assert (args.ranks, args.steps, args.ep, args.out) == (4, 20, None, tmp_path)
    args = build_parser().parse_args(["bench-nccl", "--out", str(tmp_path)])
    assert args.gpus == 0 and args.sizes[-1] == 1 << 30 and args.gemm_ag_size == 256 << 20


def test_nccl_sizes_must_split_into_whole_float32_shards() -> None:
    """Checked once the rank count is known (one per GPU by default), before
    any rank starts; here without a GPU, on the rule itself."""
    from pycomm.cli.bench_nccl import _unsplittable_sizes

    assert _unsplittable_sizes([1 << 20, 1 << 30], 8) == []
    assert _unsplittable_sizes([1 << 20, 96, 100], 3) == [1 << 20, 100]  # 96 = 3 shards x 8 floats
