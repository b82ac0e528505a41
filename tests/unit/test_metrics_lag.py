"""Consumer lag from librdkafka's statistics JSON (keel.observability.lag): pure parsing."""

from __future__ import annotations

import json

from prometheus_client import REGISTRY

from keel.observability.lag import lag_reporter, partition_lags


def _stats(**partitions: dict[str, object]) -> dict[str, object]:
    return {"topics": {"keel.commands": {"partitions": {
        "-1": {"fetch_state": "none", "app_offset": -1001, "hi_offset": -1, "ls_offset": -1}, **partitions}}}}


def test_lag_is_the_last_stable_offset_past_the_position() -> None:
    stats = _stats(**{"0": {"fetch_state": "active", "app_offset": 90, "committed_offset": 80, "hi_offset": 120,
                            "ls_offset": 100},
                      "1": {"fetch_state": "active", "app_offset": -1001, "committed_offset": 7, "hi_offset": 10,
                            "ls_offset": -1},
                      "2": {"fetch_state": "none", "app_offset": 5, "hi_offset": 50, "ls_offset": 50},
                      "3": {"fetch_state": "active", "app_offset": -1001, "committed_offset": -1001,
                            "hi_offset": 3, "ls_offset": 3}})
    assert partition_lags(stats) == {("keel.commands", "0"): 10, ("keel.commands", "1"): 3}


def test_a_revoked_partition_loses_its_series() -> None:
    report = lag_reporter("g-lag-test")
    active = {"fetch_state": "active", "app_offset": 1, "hi_offset": 4, "ls_offset": 4}
    report(json.dumps(_stats(**{"0": active, "1": active})))
    value = REGISTRY.get_sample_value
    assert value("keel_consumer_lag_records", {"group": "g-lag-test", "topic": "keel.commands",
                                               "partition": "1"}) == 3
    report(json.dumps(_stats(**{"0": active})))
    assert value("keel_consumer_lag_records", {"group": "g-lag-test", "topic": "keel.commands",
                                               "partition": "1"}) is None
    report("not json")  # ignored, never raised into the consumer's poll
