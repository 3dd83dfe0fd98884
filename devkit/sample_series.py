"""A task run's stored samples as the protocol defines them (docs/protocol.md, "The accounting
rule"): each a rate over the interval that ends at its timestamp, the first interval starting
when the task's process did, the last one (the closing sample, from HALT's totals) ending when
the task read its totals.

:func:`closing_share` tells how much of a run its closing sample carries. The closing sample
is whatever of the task's totals the periodic samples did not count, so it absorbs any
undercount of theirs and the run still adds up; its share of the run's CPU, set beside its
interval's share of the run's time, is what shows such an undercount.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Interval:
    from_ms: float
    to_ms: float
    value: float  # the sample: a rate over the interval (cpu: percent of one core)

    @property
    def seconds(self) -> float:
        return max(self.to_ms - self.from_ms, 0.0) / 1000

    @property
    def amount(self) -> float:
        """The rate times the interval (cpu: CPU-seconds, once divided by 100)."""
        return self.value * self.seconds


def intervals(points: list[tuple[float, float]], started_ms: float) -> list[Interval]:
    """(timestamp ms, value) samples of one run, in time order, as their intervals."""
    found, previous = [], started_ms
    for stamp, value in points:
        found.append(Interval(previous, stamp, value))
        previous = stamp
    return found


@dataclass(frozen=True)
class ClosingShare:
    cpu_share: float  # the closing sample's CPU-seconds over the run's (from its samples)
    time_share: float  # the closing interval (last periodic sample to the end) over the run's duration
    closing_cpu_s: float
    run_cpu_s: float
    closing_s: float
    run_s: float
    periodic: int  # samples before the closing one

    @property
    def excess(self) -> float:
        """How far the closing sample's share of the CPU exceeds its share of the time."""
        return self.cpu_share - self.time_share


def closing_share(cpu_points: list[tuple[float, float]], started_ms: float) -> ClosingShare:
    """The closing sample's share of a run, from its cpu samples (the last is the closing one;
    a run with one sample is all closing sample: both shares are 1)."""
    spans = intervals(cpu_points, started_ms)
    if not spans:
        raise ValueError("a run without samples has no closing sample")
    closing = spans[-1]
    run_cpu = sum(i.amount for i in spans) / 100
    run_s = sum(i.seconds for i in spans)
    return ClosingShare(cpu_share=closing.amount / 100 / run_cpu if run_cpu > 0 else 1.0,
                        time_share=closing.seconds / run_s if run_s > 0 else 1.0,
                        closing_cpu_s=closing.amount / 100, run_cpu_s=run_cpu,
                        closing_s=closing.seconds, run_s=run_s, periodic=len(spans) - 1)
