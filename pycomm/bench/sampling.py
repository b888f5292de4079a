"""Interleaved sampling for the benchmarks: every variant is measured in turn,
round after round, so drift on a noisy machine hits all of them alike. The
order within a round is shuffled anew each round, the same on every rank (the
run's seed and the round's index make it): a fixed or merely reversed order
gives each variant the same neighbours every round, and what ran just before
a sample (which threads are awake, on which core) shifts it by 10 % and more
on a 2-core machine. Medians summarise the rounds; a ratio of two variants is
the median of their per-round ratios (paired samples, taken moments apart,
so a burst of load elsewhere scales both sides of a pair)."""

from __future__ import annotations

import math
import random
import statistics
from typing import Callable, Hashable, Mapping, TypeVar

Key = TypeVar("Key", bound=Hashable)


def round_order(keys: list[Key], round_index: int, seed: int = 0) -> list[Key]:
    """The order of one round: a shuffle of `keys` that depends only on
    `keys`, `round_index` and `seed`, so every rank runs the same collectives
    in the same order."""
    order = list(keys)
    random.Random(f"{seed}:{round_index}").shuffle(order)
    return order


def interleaved_samples(
    samplers: Mapping[Key, Callable[[], float]], iterations: int, seed: int = 0
) -> dict[Key, list[float]]:
    """Runs each sampler once to warm up (connections, allocations, kernel
    choice), then all of them `iterations` times, one round at a time in the
    order round_order() gives. A sampler measures one run and returns its
    time; every rank must pass the samplers in the same order and the same
    seed (they are collectives)."""
    for sample in samplers.values():
        sample()
    keys = list(samplers)
    samples: dict[Key, list[float]] = {key: [] for key in keys}
    for round_index in range(iterations):
        for key in round_order(keys, round_index, seed):
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


# Two-sided 95 % quantiles of Student's t by degrees of freedom (1 to 30);
# beyond 30 the normal quantile is within 4 % of them.
_T975 = (
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
    2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
    2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
)


def ratio_over_runs(ratios: list[float]) -> tuple[float, tuple[float, float] | None]:
    """The geometric mean of one ratio measured in independent runs, and its
    95 % confidence interval (None for fewer than two runs): a t interval on
    the ratios' logarithms, whose spread from run to run is what one run's
    figure is worth on this machine."""
    logs = [math.log(r) for r in ratios]
    centre = statistics.fmean(logs)
    if len(logs) < 2:
        return math.exp(centre), None
    df = len(logs) - 1
    t = _T975[df - 1] if df <= len(_T975) else statistics.NormalDist().inv_cdf(0.975)
    half = t * statistics.stdev(logs) / math.sqrt(len(logs))
    return math.exp(centre), (math.exp(centre - half), math.exp(centre + half))
