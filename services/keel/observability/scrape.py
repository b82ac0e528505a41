"""Reading the published metrics targets as ``keel top`` does: one concurrent round, parsed, and rates.

``keel top`` scrapes exactly what Prometheus discovers (``exporter.published``), so what it
shows and what the dashboards show come from the same series. Every target of a round is
scraped at once with a short timeout: one hung service costs the round that timeout, not
a timeout per service. A target that does not answer is a ``Scrape`` with an ``error``,
never an exception, so a dead service shows as down instead of ending the view.

Rates come from two consecutive rounds, per series, as Prometheus's ``rate`` does: a
series that shrank (its process restarted) counts its whole value as the increase.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import httpx
from prometheus_client.parser import text_string_to_metric_families

from keel.observability.exporter import Target

Labels = tuple[tuple[str, str], ...]
"""A series' labels, sorted by name (hashable)."""


@dataclass(frozen=True)
class Samples:
    """Every sample of one scrape: (sample name, labels) -> value."""

    values: Mapping[tuple[str, Labels], float] = field(default_factory=dict)

    def select(self, name: str, **match: str) -> Iterator[tuple[dict[str, str], float]]:
        """The samples named ``name`` whose labels include ``match``, with all their labels."""
        for (sample, labels), value in self.values.items():
            if sample == name:
                found = dict(labels)
                if all(found.get(key) == wanted for key, wanted in match.items()):
                    yield found, value

    def total(self, name: str, **match: str) -> float:
        """The sum of ``select(name, **match)`` (0 when there is none)."""
        return sum(value for _labels, value in self.select(name, **match))

    def has(self, name: str) -> bool:
        """Whether any sample is named ``name``."""
        return any(sample == name for sample, _labels in self.values)


def parse(text: str) -> Samples:
    """The samples of a Prometheus text exposition (``ValueError`` when it is not one)."""
    values: dict[tuple[str, Labels], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            values[sample.name, tuple(sorted(sample.labels.items()))] = float(sample.value)
    return Samples(values)


@dataclass(frozen=True)
class Scrape:
    """One target's answer in one round (``samples`` is ``None`` when it did not answer)."""

    target: Target
    at: float
    """``time.monotonic()`` when the answer came."""
    samples: Samples | None
    error: str = ""

    @property
    def up(self) -> bool:
        return self.samples is not None

    @property
    def key(self) -> tuple[str, str]:
        """The target's identity across rounds: its service and instance (a restart keeps them)."""
        return self.target.service, self.target.instance


def scrape(target: Target, client: httpx.Client) -> Scrape:
    """Read and parse ``target``'s metrics; any failure becomes the ``error`` of a down ``Scrape``."""
    try:
        answer = client.get(target.url)
        if answer.status_code != 200:
            return Scrape(target, time.monotonic(), None, f"HTTP {answer.status_code}")
        return Scrape(target, time.monotonic(), parse(answer.text))
    except httpx.TimeoutException:
        return Scrape(target, time.monotonic(), None, "timeout")
    except httpx.ConnectError:
        return Scrape(target, time.monotonic(), None, "refused")
    except httpx.HTTPError as exc:
        return Scrape(target, time.monotonic(), None, type(exc).__name__)
    except ValueError:
        return Scrape(target, time.monotonic(), None, "bad metrics")


def scrape_all(targets: Iterable[Target], timeout_s: float) -> list[Scrape]:
    """Every target scraped concurrently, each within ``timeout_s``, in the order given."""
    listed = list(targets)
    if not listed:
        return []
    with httpx.Client(timeout=timeout_s, trust_env=False) as client, \
            ThreadPoolExecutor(max_workers=min(32, len(listed))) as pool:
        return list(pool.map(lambda target: scrape(target, client), listed))


def rate(now: Scrape, before: Scrape | None, name: str, **match: str) -> float | None:
    """Per second increase of the counters ``name`` (``match``-ing) between two scrapes of one target.

    ``None`` when there is no earlier answer to compare with. A series absent before
    started from 0; a series that went down restarted, and its whole value is the increase.
    A new process (another pid) is compared with nothing but zeros for the same reason.
    """
    if before is None or now.samples is None or before.samples is None or now.at <= before.at:
        return None
    previous = before.samples if before.target.pid == now.target.pid else Samples()
    increase = 0.0
    for labels, value in now.samples.select(name, **match):
        old = previous.values.get((name, tuple(sorted(labels.items()))), 0.0)
        increase += value - old if value >= old else value
    return increase / (now.at - before.at)
