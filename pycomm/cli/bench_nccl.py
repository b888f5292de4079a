"""GPU benchmark of the NCCL lanes: pooled all-gather and reduce-scatter against
torch's NCCL backend from 1 MiB to 1 GiB (time, algbw and busbw as nccl-tests
defines them), the host time to issue a 64 KiB all-gather, and GEMM slowdown
while the all-gather lane runs. One rank per
visible GPU by default. Prints tables and writes bench-nccl.json (code:
pycomm.bench.nccl)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from pycomm.cli.common import (
    ELEMENT_BYTES,
    add_output_arguments,
    buffer_size,
    buffer_sizes,
    int_at_least,
    print_json,
    size_text,
    usage_error,
)

MIN_ITERATIONS = 10


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--gpus", type=int_at_least(0), default=0,
        help="ranks (default 0: one per visible GPU); more ranks than GPUs share them, "
        "which NCCL >= 2.30 allows with NCCL_MULTI_RANK_GPU_ENABLE=1",
    )
    parser.add_argument(
        "--sizes", type=buffer_sizes, default="1M,4M,16M,64M,256M,1G",
        help="comma-separated full (gathered) buffer sizes, each a multiple of 4 x ranks bytes "
        "(default: 1M to 1G)",
    )
    parser.add_argument(
        "--iters", type=int_at_least(MIN_ITERATIONS, "medians of fewer iterations are noise"), default=20,
        help=f"interleaved iterations per size, at least {MIN_ITERATIONS} (default: 20)",
    )
    parser.add_argument(
        "--gemm-n", type=int_at_least(1), default=8192, help="GEMM size n (n x n x n, bfloat16; default 8192)"
    )
    parser.add_argument(
        "--gemm-ag-size", type=buffer_size, default="256M", help="all-gather size beside the GEMMs (default 256M)"
    )
    add_output_arguments(parser, "pycomm-out/bench-nccl", ("bench-nccl.json",))


def _unsplittable_sizes(sizes: list[int], ranks: int) -> list[int]:
    """Gathered sizes whose shards would not be whole float32 elements."""
    return [size for size in sizes if size % (ELEMENT_BYTES * ranks)]


def run(args: argparse.Namespace) -> int:
    import torch
    from rich.console import Console

    from pycomm import _C
    from pycomm.launch import world_sizes

    if not _C.cuda_built or not torch.cuda.is_available():
        raise SystemExit("bench-nccl needs the CUDA build of pycomm and a GPU (see `python -m pycomm doctor`)")
    gpus = world_sizes([args.gpus or torch.cuda.device_count()])[0]
    unsplittable = _unsplittable_sizes([*args.sizes, args.gemm_ag_size], gpus)
    if unsplittable:
        usage_error(
            args, f"{', '.join(size_text(s) for s in unsplittable)} cannot be split into {gpus} shards "
            f"of whole float32 elements: use multiples of {ELEMENT_BYTES * gpus} bytes",
        )

    from pycomm.bench.nccl import bench_rank
    from pycomm.bench.report import nccl_lines, nccl_table
    from pycomm.launch import launch

    values = launch(
        bench_rank, gpus, args.sizes, args.iters, args.gemm_n, args.gemm_ag_size,
        backend="cpu:gloo,cuda:nccl", timeout_seconds=1800,
    )
    if values is None:  # another rank of a joined world; rank 0 reports
        return 0
    result = values[0]
    out_dir: Path = args.out
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "bench-nccl.json").write_text(json.dumps(result, indent=2))
    if args.json:
        print_json(result)
        return 0
    console = Console()
    console.print(nccl_table(result, args.iters))
    for line in nccl_lines(result):
        console.print(line)
    console.print(f"wrote {out_dir / 'bench-nccl.json'}")
    return 0
