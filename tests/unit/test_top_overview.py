"""``keel top``'s pure parts on recorded metric text: parsing, rates across two scrapes, and the frame."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from keel.observability.exporter import Target
from keel.observability.overview import frame
from keel.observability.scrape import Samples, Scrape, parse, rate, scrape

PROCESSOR_1 = """\
# HELP keel_commands_received_total Commands the processor read.
# TYPE keel_commands_received_total counter
keel_commands_received_total{tenant="acme"} 10.0
keel_commands_received_total{tenant="other"} 4.0
keel_commands_received_created{tenant="acme"} 1.79e+09
# TYPE keel_decisions_total counter
keel_decisions_total{code="",outcome="accepted",tenant="acme"} 8.0
keel_decisions_total{code="refund_exceeds_paid",outcome="rejected",tenant="acme"} 1.0
keel_decisions_total{code="",outcome="pending",tenant="acme"} 1.0
keel_decisions_total{code="",outcome="accepted",tenant="other"} 4.0
# TYPE keel_dead_letters_total counter
keel_dead_letters_total{code="undecodable"} 1.0
# TYPE keel_consumer_lag_records gauge
keel_consumer_lag_records{group="keel.processor",partition="0",topic="keel.commands"} 3.0
keel_consumer_lag_records{group="keel.processor",partition="1",topic="keel.commands"} 2.0
# TYPE keel_outbox_published_total counter
keel_outbox_published_total 0.0
# TYPE keel_effects_buffered gauge
"""
PROCESSOR_2 = (PROCESSOR_1.replace('{tenant="acme"} 10.0', '{tenant="acme"} 30.0')
               .replace('outcome="accepted",tenant="acme"} 8.0', 'outcome="accepted",tenant="acme"} 28.0')
               .replace('partition="0",topic="keel.commands"} 3.0', 'partition="0",topic="keel.commands"} 0.0')
               .replace('partition="1",topic="keel.commands"} 2.0', 'partition="1",topic="keel.commands"} 0.0')
               .replace('{code="undecodable"} 1.0', '{code="undecodable"} 3.0'))
PROCESSOR_B = """\
# TYPE keel_commands_received_total counter
keel_commands_received_total{tenant="globex"} 6.0
# TYPE keel_decisions_total counter
keel_decisions_total{code="",outcome="accepted",tenant="globex"} 6.0
"""
APPROVALS = """\
# TYPE keel_watcher_events_total counter
keel_watcher_events_total{watcher="approvals"} 40.0
# TYPE keel_approvals_pending gauge
keel_approvals_pending{tenant="acme"} 2.0
# TYPE keel_approvals_oldest_pending_age_seconds gauge
keel_approvals_oldest_pending_age_seconds{tenant="acme"} 125.0
# TYPE keel_approvals_overdue gauge
keel_approvals_overdue{tenant="acme"} 0.0
"""
EFFECTS = """\
# TYPE keel_effect_attempts_total counter
keel_effect_attempts_total{provider="payments"} 5.0
# TYPE keel_effect_outcomes_total counter
keel_effect_outcomes_total{outcome="succeeded",provider="payments",tenant="acme"} 4.0
# TYPE keel_effect_breaker_open gauge
keel_effect_breaker_open{provider="payments",tenant="acme"} 1.0
keel_effect_breaker_open{provider="email",tenant="other"} 3.0
# TYPE keel_effects_buffered gauge
keel_effects_buffered{worker="e1"} 7.0
# TYPE keel_consumer_lag_records gauge
keel_consumer_lag_records{group="keel.effects",partition="0",topic="keel.events"} 0.0
"""
PROJECTOR = """\
# TYPE keel_projected_rows_total counter
keel_projected_rows_total{table="events"} 100.0
keel_projected_rows_total{table="commands"} 50.0
# TYPE keel_projection_lag_seconds gauge
keel_projection_lag_seconds{table="events"} 4.5
keel_projection_lag_seconds{table="commands"} 0.0
"""


def target(service: str, instance: str = "0", pid: int = 100) -> Target:
    return Target(service, instance, f"127.0.0.1:{pid}", pid, Path(f"/run/metrics/keel.{service}.{instance}.json"))


def answered(service: str, text: str, at: float, instance: str = "0", pid: int = 100) -> Scrape:
    return Scrape(target(service, instance, pid), at, parse(text))


def test_parse_keeps_every_sample_by_its_full_name_and_labels() -> None:
    samples = parse(PROCESSOR_1)
    assert samples.values["keel_commands_received_total", (("tenant", "acme"),)] == 10.0
    assert samples.total("keel_decisions_total", tenant="acme") == 10.0
    assert samples.total("keel_decisions_total", outcome="accepted") == 12.0
    assert samples.total("keel_consumer_lag_records") == 5.0
    assert samples.has("keel_outbox_published_total") and not samples.has("keel_effects_buffered")
    with pytest.raises(ValueError):
        parse("keel_x{tenant=acme 1\n")


def test_a_rate_is_the_increase_per_second_between_two_scrapes_of_one_process() -> None:
    before, now = answered("processor", PROCESSOR_1, 100.0), answered("processor", PROCESSOR_2, 102.0)
    assert rate(now, before, "keel_commands_received_total") == 10.0  # (30 + 4 - 10 - 4) / 2 s
    assert rate(now, before, "keel_commands_received_total", tenant="other") == 0.0
    assert rate(now, None, "keel_commands_received_total") is None  # one scrape: no rate yet
    # a series that appeared since counts from 0
    assert rate(now, answered("processor", "", 100.0), "keel_dead_letters_total") == 1.5


def test_a_restarted_process_counts_its_whole_value_as_the_increase() -> None:
    before = answered("processor", PROCESSOR_2, 100.0)
    shrunk = answered("processor", PROCESSOR_1, 102.0)  # same pid, counters went down: a reset
    # per series, as Prometheus: acme's 30 -> 10 is a reset (+10), other's 4 -> 4 is +0
    assert rate(shrunk, before, "keel_commands_received_total") == 5.0
    restarted = answered("processor", PROCESSOR_2, 102.0, pid=200)  # another process under the same name
    assert rate(restarted, before, "keel_commands_received_total") == 17.0  # (30 + 4) / 2


def test_a_frame_sums_tenants_over_processors_and_shows_each_service_with_its_lag() -> None:
    before = [answered("processor", PROCESSOR_1, 100.0, "m1"), answered("processor", PROCESSOR_B, 100.0, "m2"),
              answered("approval-watcher", APPROVALS, 100.0)]
    now = [answered("processor", PROCESSOR_2, 102.0, "m1"), answered("processor", PROCESSOR_B, 102.0, "m2"),
           answered("approval-watcher", APPROVALS, 102.0), answered("effects", EFFECTS, 102.0, "e1"),
           answered("projector", PROJECTOR, 102.0),
           Scrape(target("relay"), 102.0, None, "refused")]
    view = frame(now, before)

    rows = {(row.service, row.instance): row for row in view.services}
    assert rows["processor", "m1"].rate == 10.0 and rows["processor", "m1"].unit == "commands"
    assert rows["processor", "m1"].lag == 0.0
    assert rows["processor", "m2"].rate == 0.0 and rows["processor", "m2"].lag is None  # no lag reported
    assert rows["approval-watcher", "0"].unit == "events" and rows["approval-watcher", "0"].rate == 0.0
    assert rows["effects", "e1"].rate is None and rows["effects", "e1"].unit == "calls"  # no earlier scrape
    assert not rows["relay", "0"].up and rows["relay", "0"].error == "refused"
    assert [row.service for row in view.down] == ["relay"]

    tenants = {row.tenant: row for row in view.tenants}
    assert [row.tenant for row in view.tenants] == ["acme", "globex", "other"]  # busiest first, `other` last
    acme = tenants["acme"]
    assert (acme.rate, acme.accepted, acme.rejected, acme.parked, acme.waiting, acme.oldest_s) == (
        10.0, 28.0, 1.0, 1.0, 2.0, 125.0)
    assert (tenants["globex"].accepted, tenants["globex"].waiting, tenants["globex"].oldest_s) == (6.0, 0.0, None)
    assert tenants["other"].accepted == 4.0

    assert view.dead_letters == {"undecodable": 3.0} and view.dead_letter_rate == 1.0
    assert view.breakers == [("acme", "payments", 1.0), ("other", "email", 3.0)]
    assert view.effects_held == 7.0 and view.effects_settled_rate is None
    assert view.projection_lag_s == {"events": 4.5, "commands": 0.0}
    assert view.approvals_overdue == 0.0
    assert view.as_json()["breakers"] == [("acme", "payments", 1.0), ("other", "email", 3.0)]


def test_a_frame_of_nothing_is_empty_not_an_error() -> None:
    view = frame([])
    assert view.services == [] and view.tenants == [] and view.dead_letters == {}
    assert view.dead_letter_rate is None and view.breakers == []


def test_a_scrape_that_fails_is_a_down_service_with_the_reason() -> None:
    def answer(request: httpx.Request) -> httpx.Response:
        port = request.url.port
        if port == 1:
            raise httpx.ConnectError("refused", request=request)
        if port == 2:
            raise httpx.ReadTimeout("slow", request=request)
        if port == 3:
            return httpx.Response(503)
        if port == 4:
            return httpx.Response(200, text="keel_x{tenant=acme 1\n")
        return httpx.Response(200, text=PROJECTOR)

    with httpx.Client(transport=httpx.MockTransport(answer)) as client:
        results = [scrape(target("s", str(port), port), client) for port in (1, 2, 3, 4, 5)]
    assert [(r.up, r.error) for r in results] == [
        (False, "refused"), (False, "timeout"), (False, "HTTP 503"), (False, "bad metrics"), (True, "")]
    assert isinstance(results[-1].samples, Samples)
    assert results[-1].samples.total("keel_projected_rows_total") == 150.0
