"""Process-local counters and gauges: each service's /metrics (served in the Prometheus text
format by prometheus_client, which this Registry feeds as a custom collector) and the OTLP
export of the same figures (the enricher's red_wire).

Kept deliberately small: a metric is a name, a help text and values by label set. Several
threads update them (the asyncio loop, the span export thread, the Kubernetes watch), so each
metric's values change under its lock, and readers take a copy under it.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported when /metrics is asked for (prometheus_client costs 50 ms at start)
    from prometheus_client.metrics_core import Metric as PrometheusFamily


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    """A sample value without losing digits (`%g` printed 1234567 as 1.23457e+06)."""
    return str(int(value)) if float(value).is_integer() else repr(float(value))


@dataclass
class Metric:
    name: str
    help: str
    kind: str  # "counter" or "gauge"
    values: dict[tuple[tuple[str, str], ...], float] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def inc(self, amount: float = 1, **labels: str) -> None:
        key = tuple(sorted(labels.items())) if labels else ()  # a count of every call: no sort
        with self.lock:
            self.values[key] = self.values.get(key, 0) + amount

    def set(self, value: float, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        with self.lock:
            self.values[key] = value

    def copy(self) -> dict[tuple[tuple[str, str], ...], float]:
        with self.lock:
            return dict(self.values)

    def get(self, **labels: str) -> float:
        return self.values.get(tuple(sorted(labels.items())), 0)

    def total(self) -> float:
        return sum(self.values.values())

    def render(self) -> Iterable[str]:
        """Prometheus text lines, integers printed as integers (a compact form tests read;
        /metrics is prometheus_client's rendering of `family`)."""
        help_text = self.help.replace("\\", "\\\\").replace("\n", "\\n")
        yield f"# HELP {self.name} {help_text}"
        yield f"# TYPE {self.name} {self.kind}"
        values = self.copy()
        if not values:
            yield f"{self.name} 0"
        for key, value in sorted(values.items()):
            label_text = ",".join(f'{k}="{_escape(v)}"' for k, v in key)
            number = _number(value)
            yield f"{self.name}{{{label_text}}} {number}" if label_text else f"{self.name} {number}"

    def family(self) -> PrometheusFamily:
        """The metric for prometheus_client: a counter's family is named without `_total`
        (its samples keep it), as the Prometheus and OpenMetrics formats want."""
        from prometheus_client.metrics_core import Metric as PrometheusFamily

        counter = self.kind == "counter" and self.name.endswith("_total")
        family = PrometheusFamily(self.name.removesuffix("_total") if counter else self.name, self.help, self.kind)
        if not counter and self.kind == "counter":
            family.type = "unknown"  # a counter not named *_total would be renamed: left untyped
        values = self.copy()
        if not values:
            family.add_sample(self.name, {}, 0.0)
        for key, value in sorted(values.items()):
            family.add_sample(self.name, dict(key), float(value))
        return family


class Registry:
    def __init__(self) -> None:
        self._metrics: dict[str, Metric] = {}
        self._creating = threading.Lock()  # two threads asking for a new metric get the same one

    def counter(self, name: str, help: str) -> Metric:
        return self._get(name, help, "counter")

    def gauge(self, name: str, help: str) -> Metric:
        return self._get(name, help, "gauge")

    def _get(self, name: str, help: str, kind: str) -> Metric:
        metric = self._metrics.get(name)
        if metric is None:
            with self._creating:
                metric = self._metrics.get(name)
                if metric is None:
                    metric = self._metrics[name] = Metric(name, help, kind)
        return metric

    def render(self) -> str:
        return "\n".join(line for metric in list(self._metrics.values()) for line in metric.render()) + "\n"

    def snapshot(self) -> dict[str, float]:
        return {name: metric.total() for name, metric in self._metrics.items()}

    def families(self) -> list[tuple[str, str, str, dict[tuple[tuple[str, str], ...], float]]]:
        """Each metric's name, help, kind and a copy of its values by label set."""
        return [(m.name, m.help, m.kind, m.copy()) for m in list(self._metrics.values())]

    def collect(self) -> Iterator[PrometheusFamily]:
        """prometheus_client's collector protocol: `generate_latest(registry)` is /metrics."""
        for metric in list(self._metrics.values()):
            yield metric.family()

    def snapshot_json(self, **about: str) -> bytes:
        """The families as JSON, with `about` (service, node): what a service publishes on
        trawl.v1.control.metrics.<service>.<node> (see trawl.service)."""
        families = [
            {
                "name": name,
                "help": help,
                "kind": kind,
                "values": [[dict(labels), value] for labels, value in values.items()],
            }
            for name, help, kind, values in self.families()
        ]
        return json.dumps({**about, "families": families}, separators=(",", ":")).encode()
