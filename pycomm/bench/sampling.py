"""Interleaved sampling for the benchmarks: every variant is measured in turn,
round after round, so drift on a noisy machine hits all of them alike, and
medians summarise the rounds."""

from __future__ import annotations

import statistics
from typing import Callable, Hashable, Mapping, TypeVar

Key = TypeVar("Key", bound=Hashable)


def interleaved_medians(
    samplers: Mapping[Key, Callable[[], float]], iterations: int
) -> dict[Key, float]:
    """Runs each sampler once to warm up (connections, allocations, kernel
    choice), then all of them in turn `iterations` times; the median of each
    one's samples. A sampler measures one run and returns its time."""
    for sample in samplers.values():
        sample()
    samples: dict[Key, list[float]] = {key: [] for key in samplers}
    for _ in range(iterations):
        for key, sample in samplers.items():
            samples[key].append(sample())
    return {key: statistics.median(values) for key, values in samples.items()}
