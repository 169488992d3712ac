"""Reading /metrics in tests: one scrape parsed by prometheus_client's own parser into plain values."""

from __future__ import annotations

from typing import Any

from prometheus_client.parser import text_string_to_metric_families

Samples = dict[tuple[str, frozenset], float]


def scrape(client: Any, token: str, url: str = "/metrics") -> tuple[dict[str, str], Samples]:
    """(type by family name, value by (sample name, labels)) of one scrape with the metrics token."""
    response = client.get(url, headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    types, samples = {}, {}
    for family in text_string_to_metric_families(response.text):
        types[family.name] = family.type
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return types, samples


def value(samples: Samples, name: str, **labels: str) -> float:
    """The one sample `name` with exactly these labels."""
    return samples[(name, frozenset(labels.items()))]


def labelled(samples: Samples, name: str) -> dict[frozenset, float]:
    """Every sample `name`, by its label set."""
    return {labels: v for (sample, labels), v in samples.items() if sample == name}
