"""pycomm's benchmarks, all in one place; `python -m pycomm bench` /
`bench-nccl` and the scripts in benchmarks/ only parse arguments and print.

- `cpu`: AG, RS and AG + RS on plain gloo groups and on the pool's lanes
  (overlap, overhead over plain gloo, the order check's cost);
- `nccl`: pooled NCCL lanes against torch's NCCL backend, GEMM slowdown;
- `creation_scale`: the cost of creating the all-gather groups in simulated
  worlds of up to 16,384 ranks, against megatron-core's;
- `sampling`: interleaved rounds and their medians; `report`: tables;
  `plots`: the overlap picture.
"""
