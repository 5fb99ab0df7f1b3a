"""Prometheus text-format metrics: counters, gauges and histograms with labels.

Small on purpose: one registry per server, label values as tuples, exposition on demand.
Gauges may be computed at scrape time (`callback`) so hot paths never update them.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Iterable

LATENCY_BUCKETS_S = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    """A sample value, exactly: `%g` would print 1234567 as 1.23457e+06."""
    value = float(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if value.is_integer() and abs(value) < 2**53:
        return str(int(value))
    return repr(value)


def _labels(names: tuple[str, ...], values: tuple[str, ...], extra: str = "") -> str:
    parts = [f'{n}="{_escape(v)}"' for n, v in zip(names, values, strict=True)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


class Counter:
    """A monotonically increasing value per label set."""

    kind = "counter"

    def __init__(self, name: str, help_text: str, labels: tuple[str, ...] = ()) -> None:
        self.name, self.help, self.label_names = name, help_text, labels
        self.values: dict[tuple[str, ...], float] = {}

    def inc(self, *labels: str, amount: float = 1.0) -> None:
        """Add `amount` to the series `labels`."""
        self.values[labels] = self.values.get(labels, 0.0) + amount

    def get(self, *labels: str) -> float:
        """The current value of one series."""
        return self.values.get(labels, 0.0)

    def lines(self) -> Iterable[str]:
        """Exposition lines."""
        for labels, value in sorted(self.values.items()):
            yield f"{self.name}{_labels(self.label_names, labels)} {_number(value)}"


class Gauge(Counter):
    """A value that goes up and down, set directly or computed at scrape time."""

    kind = "gauge"

    def __init__(
        self,
        name: str,
        help_text: str,
        labels: tuple[str, ...] = (),
        callback: Callable[[], dict[tuple[str, ...], float]] | None = None,
    ) -> None:
        super().__init__(name, help_text, labels)
        self.callback = callback

    def set(self, *labels: str, value: float) -> None:
        """Set the series `labels` to `value`."""
        self.values[labels] = value

    def lines(self) -> Iterable[str]:
        """Exposition lines (from the callback when there is one)."""
        if self.callback is not None:
            self.values = self.callback()
        return super().lines()


class Histogram:
    """Cumulative buckets, sum and count per label set."""

    kind = "histogram"

    def __init__(
        self,
        name: str,
        help_text: str,
        labels: tuple[str, ...] = (),
        buckets: tuple[float, ...] = LATENCY_BUCKETS_S,
    ) -> None:
        self.name, self.help, self.label_names = name, help_text, labels
        self.buckets = buckets
        self.series: dict[tuple[str, ...], list[float]] = {}  # bucket counts..., sum, count

    def observe(self, value: float, *labels: str) -> None:
        """Record one observation."""
        series = self.series.get(labels)
        if series is None:
            series = self.series[labels] = [0.0] * (len(self.buckets) + 2)
        index = bisect.bisect_left(self.buckets, value)
        if index < len(self.buckets):  # past the last bound it counts only in +Inf
            series[index] += 1
        series[-2] += value
        series[-1] += 1

    def count(self, *labels: str) -> int:
        """Observations in one series."""
        series = self.series.get(labels)
        return int(series[-1]) if series else 0

    def lines(self) -> Iterable[str]:
        """Exposition lines: cumulative buckets, +Inf, sum, count."""
        for labels, series in sorted(self.series.items()):
            cumulative = 0.0
            for bound, n in zip(self.buckets, series, strict=False):
                cumulative += n
                le = _labels(self.label_names, labels, f'le="{bound:g}"')
                yield f"{self.name}_bucket{le} {_number(cumulative)}"
            le = _labels(self.label_names, labels, 'le="+Inf"')
            yield f"{self.name}_bucket{le} {_number(series[-1])}"
            yield f"{self.name}_sum{_labels(self.label_names, labels)} {_number(series[-2])}"
            yield f"{self.name}_count{_labels(self.label_names, labels)} {_number(series[-1])}"


Metric = Counter | Gauge | Histogram


class MetricsRegistry:
    """Every metric of one server, rendered together."""

    def __init__(self) -> None:
        self._metrics: dict[str, Metric] = {}

    def add(self, metric: Metric) -> Metric:
        """Register a metric (names are unique)."""
        if metric.name in self._metrics:
            raise ValueError(f"duplicate metric {metric.name}")
        self._metrics[metric.name] = metric
        return metric

    def counter(self, name: str, help_text: str, labels: tuple[str, ...] = ()) -> Counter:
        """Register and return a counter."""
        metric = Counter(name, help_text, labels)
        self.add(metric)
        return metric

    def histogram(self, name: str, help_text: str, labels: tuple[str, ...] = ()) -> Histogram:
        """Register and return a histogram."""
        metric = Histogram(name, help_text, labels)
        self.add(metric)
        return metric

    def gauge(
        self,
        name: str,
        help_text: str,
        labels: tuple[str, ...] = (),
        callback: Callable[[], dict[tuple[str, ...], float]] | None = None,
    ) -> Gauge:
        """Register and return a gauge."""
        metric = Gauge(name, help_text, labels, callback)
        self.add(metric)
        return metric

    def render(self) -> str:
        """The Prometheus text exposition of every metric."""
        out: list[str] = []
        for metric in self._metrics.values():
            help_text = metric.help.replace("\\", "\\\\").replace("\n", "\\n")
            out.append(f"# HELP {metric.name} {help_text}")
            out.append(f"# TYPE {metric.name} {metric.kind}")
            out.extend(metric.lines())
        return "\n".join(out) + "\n"
