"""Prometheus text exposition, hand-rolled: counters, histograms and gauges read at scrape time."""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

Labels = tuple[tuple[str, str], ...]


def _labels(labels: Labels, extra: Labels = ()) -> str:
    items = labels + extra
    if not items:
        return ""
    body = ",".join(f'{k}="{_escape(v)}"' for k, v in items)
    return "{" + body + "}"


def _escape(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


@dataclass
class Counter:
    name: str
    help: str
    values: dict[Labels, float] = field(default_factory=dict)

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        self.values[key] = self.values.get(key, 0.0) + amount

    def render(self) -> Iterable[str]:
        yield f"# HELP {self.name} {self.help}"
        yield f"# TYPE {self.name} counter"
        for key, value in sorted(self.values.items()):
            yield f"{self.name}{_labels(key)} {value:g}"


@dataclass
class Histogram:
    name: str
    help: str
    buckets: tuple[float, ...] = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    n: int = 0

    def __post_init__(self) -> None:
        self.counts = [0] * len(self.buckets)

    def observe(self, value: float) -> None:
        i = bisect.bisect_left(self.buckets, value)
        if i < len(self.counts):
            self.counts[i] += 1
        self.total += value
        self.n += 1

    def render(self) -> Iterable[str]:
        yield f"# HELP {self.name} {self.help}"
        yield f"# TYPE {self.name} histogram"
        running = 0
        for bound, count in zip(self.buckets, self.counts, strict=True):
            running += count
            yield f'{self.name}_bucket{{le="{bound:g}"}} {running}'
        yield f'{self.name}_bucket{{le="+Inf"}} {self.n}'
        yield f"{self.name}_sum {self.total:g}"
        yield f"{self.name}_count {self.n}"


@dataclass
class Gauge:
    name: str
    help: str
    read: Callable[[], dict[Labels, float]]

    def render(self) -> Iterable[str]:
        yield f"# HELP {self.name} {self.help}"
        yield f"# TYPE {self.name} gauge"
        for key, value in sorted(self.read().items()):
            yield f"{self.name}{_labels(key)} {value:g}"


class Metrics:
    def __init__(self) -> None:
        p = "rbees_orcd_"
        self.submitted = Counter(p + "jobs_submitted_total", "Jobs accepted into the queue.")
        self.rejected = Counter(p + "jobs_rejected_total", "Submissions refused at admission, by code.")
        self.finished = Counter(p + "jobs_finished_total", "Jobs that reached a terminal event, by status.")
        self.retries = Counter(p + "dispatch_retries_total", "Dispatch attempts retried on another worker.")
        self.timeouts = Counter(p + "timeouts_total", "Jobs ended by a timeout, by kind.")
        self.tokens = Counter(p + "tokens_out_total", "Tokens relayed to clients.")
        self.queue_wait = Histogram(p + "queue_wait_seconds", "Time from acceptance to dispatch.")
        self.ttft = Histogram(p + "time_to_first_token_seconds", "Time from acceptance to the first token.")
        self.gauges: list[Gauge] = []

    def gauge(self, name: str, help: str, read: Callable[[], dict[Labels, float]]) -> None:
        self.gauges.append(Gauge("rbees_orcd_" + name, help, read))

    def render(self) -> str:
        parts: list[Iterable[str]] = [
            self.submitted.render(),
            self.rejected.render(),
            self.finished.render(),
            self.retries.render(),
            self.timeouts.render(),
            self.tokens.render(),
            self.queue_wait.render(),
            self.ttft.render(),
        ]
        parts.extend(g.render() for g in self.gauges)
        return "\n".join(line for part in parts for line in part) + "\n"
