"""Interleaved sampling for the benchmarks: every variant is measured in turn,
round after round, so drift on a noisy machine hits all of them alike; the
order within a round reverses every other round, so no variant always runs
first. Medians summarise the rounds; a ratio of two variants is the median of
their per-round ratios (paired samples, taken moments apart, so a burst of
load elsewhere scales both sides of a pair)."""

from __future__ import annotations

import statistics
from typing import Callable, Hashable, Mapping, TypeVar

Key = TypeVar("Key", bound=Hashable)


def interleaved_samples(
    samplers: Mapping[Key, Callable[[], float]], iterations: int
) -> dict[Key, list[float]]:
    """Runs each sampler once to warm up (connections, allocations, kernel
    choice), then all of them in turn `iterations` times. A sampler measures
    one run and returns its time; every rank must call the samplers in the
    same order (they are collectives)."""
    for sample in samplers.values():
        sample()
    order = list(samplers)
    samples: dict[Key, list[float]] = {key: [] for key in order}
    for round_index in range(iterations):
        for key in order if round_index % 2 == 0 else reversed(order):
            samples[key].append(samplers[key]())
    return samples


def interleaved_medians(
    samplers: Mapping[Key, Callable[[], float]], iterations: int
) -> dict[Key, float]:
    """The median of each sampler's interleaved samples."""
    return {key: statistics.median(values) for key, values in interleaved_samples(samplers, iterations).items()}


def paired_ratio(numerators: list[float], denominators: list[float]) -> float:
    """The median over rounds of numerator / denominator."""
    return statistics.median(n / d for n, d in zip(numerators, denominators, strict=True))
