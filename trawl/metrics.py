"""Process-local counters and gauges rendered as Prometheus text on each service's /metrics.

Kept deliberately small: labels are fixed at creation, values are plain ints/floats that the
single asyncio thread updates; the OTLP export of the same figures lives in the enricher.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


@dataclass
class Metric:
    name: str
    help: str
    kind: str  # "counter" or "gauge"
    values: dict[tuple[tuple[str, str], ...], float] = field(default_factory=dict)

    def inc(self, amount: float = 1, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        self.values[key] = self.values.get(key, 0) + amount

    def set(self, value: float, **labels: str) -> None:
        self.values[tuple(sorted(labels.items()))] = value

    def get(self, **labels: str) -> float:
        return self.values.get(tuple(sorted(labels.items())), 0)

    def total(self) -> float:
        return sum(self.values.values())

    def render(self) -> Iterable[str]:
        yield f"# HELP {self.name} {self.help}"
        yield f"# TYPE {self.name} {self.kind}"
        if not self.values:
            yield f"{self.name} 0"
        for key, value in sorted(self.values.items()):
            label_text = ",".join(f'{k}="{_escape(v)}"' for k, v in key)
            yield f"{self.name}{{{label_text}}} {value:g}" if label_text else f"{self.name} {value:g}"


class Registry:
    def __init__(self) -> None:
        self._metrics: dict[str, Metric] = {}

    def counter(self, name: str, help: str) -> Metric:
        return self._get(name, help, "counter")

    def gauge(self, name: str, help: str) -> Metric:
        return self._get(name, help, "gauge")

    def _get(self, name: str, help: str, kind: str) -> Metric:
        metric = self._metrics.get(name)
        if metric is None:
            metric = self._metrics[name] = Metric(name, help, kind)
        return metric

    def render(self) -> str:
        return "\n".join(line for metric in self._metrics.values() for line in metric.render()) + "\n"

    def snapshot(self) -> dict[str, float]:
        return {name: metric.total() for name, metric in self._metrics.items()}

    def families(self) -> list[tuple[str, str, str, dict[tuple[tuple[str, str], ...], float]]]:
        """Each metric's name, help, kind and a copy of its values by label set."""
        return [(m.name, m.help, m.kind, dict(m.values)) for m in list(self._metrics.values())]

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
