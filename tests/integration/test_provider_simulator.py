"""The provider simulator as a process: idempotency as payment APIs keep it, reversals, each fault, the counts."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import aiohttp
import httpx
import pytest

from keel.errors import InfraError
from keel.testing.provider import Fault, Faults, ProviderSimulator

pytestmark = pytest.mark.integration

REFUND = {"amount_cents": 2000, "currency": "EUR", "reference": "cmd-1"}


@pytest.fixture(scope="module")
def provider() -> Iterator[ProviderSimulator]:
    with ProviderSimulator() as simulator:
        yield simulator


@pytest.fixture
def http(provider: ProviderSimulator) -> Iterator[httpx.Client]:
    """A client of a simulator with nothing performed and no faults."""
    provider.reset()
    with httpx.Client(base_url=provider.url, timeout=10.0) as client:
        yield client


def post(http: httpx.Client, path: str, body: dict[str, Any], key: str | None, *, tenant: str = "acme",
         timeout: float = 10.0) -> httpx.Response:
    headers = {"X-Keel-Tenant": tenant, "X-Keel-Agent": "support-bot"}
    if key is not None:
        headers["Idempotency-Key"] = key
    return http.post(path, json=body, headers=headers, timeout=timeout)


def code(response: httpx.Response) -> str:
    return str(response.json()["error"]["code"])


def test_the_first_request_performs_and_a_repeat_is_replayed(provider: ProviderSimulator,
                                                             http: httpx.Client) -> None:
    first = post(http, "/v1/refunds", REFUND, "key-1")
    again = post(http, "/v1/refunds", REFUND, "key-1")

    assert first.status_code == 201 and "Idempotent-Replayed" not in first.headers
    assert first.json() | REFUND == first.json()  # the request's fields are echoed
    assert first.json()["id"] == "act_1" and first.json()["idempotency_key"] == "key-1"
    assert first.json()["path"] == "/v1/refunds"
    assert (again.status_code, again.json()) == (201, first.json())
    assert again.headers["Idempotent-Replayed"] == "true"
    action = provider.performed()["key-1"]
    assert (action.id, action.count, action.path, action.body) == ("act_1", 1, "/v1/refunds", REFUND)
    assert (action.tenant, action.agent) == ("acme", "support-bot")
    stats = provider.stats()
    assert (stats.requests, stats.performed, stats.replays, stats.conflicts) == (2, 1, 1, 0)


def test_an_action_needs_a_key_and_a_json_object(provider: ProviderSimulator, http: httpx.Client) -> None:
    keyless = post(http, "/v1/refunds", REFUND, None)
    listed = http.post("/v1/refunds", json=[REFUND], headers={"Idempotency-Key": "key-1"})

    assert (keyless.status_code, code(keyless)) == (400, "missing_idempotency_key")
    assert (listed.status_code, code(listed)) == (400, "invalid_json")
    assert provider.performed() == {}
    assert provider.stats().rejected == 2


def test_a_key_reused_for_another_request_is_refused(provider: ProviderSimulator, http: httpx.Client) -> None:
    post(http, "/v1/refunds", REFUND, "key-1")
    other_body = post(http, "/v1/refunds", {**REFUND, "amount_cents": 1}, "key-1")
    other_path = post(http, "/v1/emails", REFUND, "key-1")

    assert (other_body.status_code, code(other_body)) == (422, "idempotency_key_reused")
    assert (other_path.status_code, code(other_path)) == (422, "idempotency_key_reused")
    assert provider.performed()["key-1"].body == REFUND
    assert provider.stats().conflicts == 2


def test_a_repeat_while_the_first_is_in_progress_is_refused(provider: ProviderSimulator,
                                                            http: httpx.Client) -> None:
    provider.set_faults(Faults(slow_rate=1.0, slow_ms=1000))
    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(post, http, "/v1/refunds", REFUND, "key-1")
        while provider.stats().requests == 0:
            time.sleep(0.01)
        repeat = post(http, "/v1/refunds", REFUND, "key-1")
        assert (repeat.status_code, code(repeat)) == (409, "request_in_progress")
        assert first.result().status_code == 201
    assert post(http, "/v1/refunds", REFUND, "key-1").headers["Idempotent-Replayed"] == "true"
    assert provider.performed()["key-1"].count == 1


def test_a_reversal_reverses_a_performed_refund_of_the_same_tenant(provider: ProviderSimulator,
                                                                   http: httpx.Client) -> None:
    early = post(http, "/v1/refunds/reversals", {"reference": "cmd-1"}, "reversal-1")
    refund = post(http, "/v1/refunds", REFUND, "refund-1")
    elsewhere = post(http, "/v1/refunds/reversals", {"reference": "cmd-1"}, "reversal-2", tenant="globex")
    reversal = post(http, "/v1/refunds/reversals", {"reference": "cmd-1"}, "reversal-1")

    assert (early.status_code, code(early)) == (404, "refund_not_found")
    assert (elsewhere.status_code, code(elsewhere)) == (404, "refund_not_found")
    # A refusal keeps no answer under its key: the same key performs once the refund exists.
    assert reversal.status_code == 201 and "Idempotent-Replayed" not in reversal.headers
    assert reversal.json()["refund"] == refund.json()["id"]
    assert sorted(provider.performed()) == ["refund-1", "reversal-1"]


def test_latency_and_slow_requests_delay_the_answers(provider: ProviderSimulator, http: httpx.Client) -> None:
    provider.set_faults(Faults(latency_ms=200))
    started = time.monotonic()
    assert post(http, "/v1/refunds", REFUND, None).status_code == 400
    assert post(http, "/v1/refunds", REFUND, "key-1").status_code == 201
    assert post(http, "/v1/refunds", REFUND, "key-1").status_code == 201
    assert time.monotonic() - started >= 0.6

    provider.set_faults(Faults(slow_rate=1.0, slow_ms=400))
    started = time.monotonic()
    assert post(http, "/v1/refunds", REFUND, "key-2").status_code == 201
    assert time.monotonic() - started >= 0.4
    assert provider.stats().faults == {Fault.SLOW: 1}


def test_errors_perform_half_the_time_and_retries_under_the_key_perform_once(
        provider: ProviderSimulator, http: httpx.Client) -> None:
    keys = [f"key-{n}" for n in range(40)]
    provider.set_faults(Faults(error_rate=1.0, seed=3))
    failed = {key: post(http, "/v1/refunds", {**REFUND, "reference": key}, key).status_code for key in keys}
    performed = set(provider.performed())
    provider.clear_faults()
    retried = {key: post(http, "/v1/refunds", {**REFUND, "reference": key}, key) for key in keys}

    assert set(failed.values()) == {500, 503}
    assert performed == {key for key, status in failed.items() if status == 500}
    assert all(answer.status_code == 201 for answer in retried.values())
    assert {key for key, answer in retried.items() if "Idempotent-Replayed" in answer.headers} == performed
    assert {key: action.count for key, action in provider.performed().items()} == {key: 1 for key in keys}
    faults = provider.stats().faults
    assert faults[Fault.ERROR_500] == len(performed) and faults[Fault.ERROR_503] == len(keys) - len(performed)


def test_a_timeout_performs_and_hangs_past_the_caller(provider: ProviderSimulator, http: httpx.Client) -> None:
    provider.set_faults(Faults(timeout_rate=1.0, hang_s=5))
    with pytest.raises(httpx.ReadTimeout):
        post(http, "/v1/refunds", REFUND, "key-1", timeout=0.5)
    provider.clear_faults()
    retry = post(http, "/v1/refunds", REFUND, "key-1")

    assert retry.status_code == 201 and retry.headers["Idempotent-Replayed"] == "true"
    assert provider.performed()["key-1"].count == 1
    assert provider.stats().faults == {Fault.TIMEOUT: 1}


def test_a_seed_repeats_the_faults(provider: ProviderSimulator, http: httpx.Client) -> None:
    def statuses() -> list[int]:
        provider.reset()
        provider.set_faults(Faults(error_rate=0.3, timeout_rate=0.2, hang_s=0.01, seed=11))
        return [post(http, "/v1/emails", {"n": n}, f"key-{n}").status_code for n in range(30)]

    first = statuses()
    assert first == statuses()
    assert {201, 500, 503} <= set(first)


def test_faults_are_checked_and_reset_clears_everything(provider: ProviderSimulator, http: httpx.Client) -> None:
    refused = http.post("/_control/faults", json={"error_rate": 0.8, "timeout_rate": 0.5})
    assert (refused.status_code, code(refused)) == (400, "invalid_faults")
    post(http, "/v1/refunds", REFUND, "key-1")
    provider.set_faults(Faults(latency_ms=10_000))
    provider.reset()

    started = time.monotonic()
    again = post(http, "/v1/refunds", REFUND, "key-1")
    assert time.monotonic() - started < 5
    assert again.json()["id"] == "act_1" and "Idempotent-Replayed" not in again.headers
    assert list(provider.performed()) == ["key-1"] and provider.stats().requests == 1


def test_concurrent_requests_wait_out_their_latency_together(provider: ProviderSimulator,
                                                             http: httpx.Client) -> None:
    provider.set_faults(Faults(latency_ms=50))

    async def burst() -> list[int]:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=100)) as session:
            async def one() -> int:
                headers = {"Idempotency-Key": str(uuid.uuid4())}
                async with session.post(f"{provider.url}/v1/emails", json={}, headers=headers) as answer:
                    return answer.status
            return await asyncio.gather(*(one() for _ in range(500)))

    started = time.monotonic()
    statuses = asyncio.run(burst())
    assert statuses == [201] * 500
    assert time.monotonic() - started < 10  # one at a time would take 25 s
    assert len(provider.performed()) == 500


def test_a_simulator_that_cannot_listen_says_why() -> None:
    with pytest.raises(InfraError, match="exited"), ProviderSimulator(host="203.0.113.7"):
        pass
