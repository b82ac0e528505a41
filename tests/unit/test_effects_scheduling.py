"""Scheduling: one effect at a time per aggregate, in order; aggregates side by side; places bounded
per provider, per tenant and overall; a blocked provider or aggregate holds up no one else."""

from __future__ import annotations

import asyncio

from keel.effects.scheduler import Lanes, Limits


def test_each_aggregate_runs_its_jobs_in_order_one_at_a_time_beside_the_others() -> None:
    log: list[tuple[str, str, int]] = []
    running: dict[str, int] = {}

    async def run(job: tuple[str, int]) -> None:
        key, n = job
        running[key] = running.get(key, 0) + 1
        assert running[key] == 1, "two jobs of one aggregate at once"
        log.append(("start", key, n))
        await asyncio.sleep(0.01 * (3 - n))  # later jobs are quicker: order must not follow speed
        log.append(("end", key, n))
        running[key] -= 1

    async def main() -> Lanes[tuple[str, int]]:
        lanes: Lanes[tuple[str, int]] = Lanes(run)
        for n in range(3):
            for key in ("acme/sub-1", "acme/sub-2"):
                lanes.add(key, (key, n))
        assert lanes.queued == 6
        while lanes.queued:
            await asyncio.sleep(0.005)
        return lanes

    lanes = asyncio.run(main())
    for key in ("acme/sub-1", "acme/sub-2"):
        assert [n for what, k, n in log if k == key and what == "start"] == [0, 1, 2]
    firsts = [entry for entry in log if entry[2] == 0 and entry[0] == "start"]
    assert log[:2] == firsts  # both aggregates began before either finished
    assert lanes.error is None


def test_a_blocked_aggregate_holds_up_no_other_and_a_failing_lane_is_reported() -> None:
    release = asyncio.Event()
    done: list[str] = []

    async def run(job: str) -> None:
        if job == "blocked":
            await release.wait()
        if job == "broken":
            raise RuntimeError("bug")
        done.append(job)

    async def main() -> Lanes[str]:
        lanes: Lanes[str] = Lanes(run)
        lanes.add("acme/a", "blocked")
        lanes.add("acme/a", "behind")
        lanes.add("acme/b", "free")
        lanes.add("acme/c", "broken")
        await asyncio.sleep(0.05)
        assert done == ["free"]
        release.set()
        await asyncio.sleep(0.01)
        await lanes.close()
        return lanes

    lanes = asyncio.run(main())
    assert done == ["free", "blocked", "behind"]
    assert isinstance(lanes.error, RuntimeError)


def test_places_are_bounded_per_provider_per_tenant_and_overall_and_a_busy_tenant_stalls_no_other() -> None:
    limits = Limits(total=6, per_tenant=3, per_provider=2)
    peak: dict[str, int] = {}
    now: dict[str, int] = {}

    async def one(tenant: str, provider: str, hold: asyncio.Event) -> None:
        async with limits.place(tenant, provider):
            for key in (tenant, f"{tenant}/{provider}", "total"):
                now[key] = now.get(key, 0) + 1
                peak[key] = max(peak.get(key, 0), now[key])
            await hold.wait()
            for key in (tenant, f"{tenant}/{provider}", "total"):
                now[key] -= 1

    async def main() -> None:
        stuck, free = asyncio.Event(), asyncio.Event()
        tasks = [asyncio.create_task(one("acme", "slow", stuck)) for _ in range(4)]  # a provider that hangs
        tasks += [asyncio.create_task(one("acme", "mail", free)) for _ in range(3)]
        tasks += [asyncio.create_task(one("globex", "mail", free)) for _ in range(4)]
        await asyncio.sleep(0.05)
        # acme is at its limit (2 hung, 1 mail); globex's mail goes on beside it
        assert now == {"acme": 3, "acme/slow": 2, "acme/mail": 1, "globex": 2, "globex/mail": 2, "total": 5}
        free.set()
        await asyncio.sleep(0.05)
        assert now["acme/mail"] == now["globex/mail"] == 0 and now["acme/slow"] == 2
        stuck.set()
        await asyncio.gather(*tasks)

    asyncio.run(main())
    assert peak["acme/slow"] == 2 and peak["acme"] == 3 and peak["total"] <= 6
