"""Bounded tenant labels (keel.observability.tenants): pure logic, no registry, no I/O."""

from __future__ import annotations

from hypothesis import given, settings, strategies as st

from keel.observability.tenants import OTHER, TenantLabels, parse_allow_list


def test_an_allow_list_names_exactly_its_tenants() -> None:
    labels = TenantLabels(allow=parse_allow_list(" acme, globex ,,"), top=1)
    assert [labels.label(t, 1000) for t in ("acme", "globex", "initech", "acme")] == \
        ["acme", "globex", OTHER, "acme"]
    assert labels.named == frozenset({"acme", "globex"})


def test_top_zero_names_nobody() -> None:
    assert TenantLabels(top=0).label("acme", 10) == OTHER


def test_a_thousand_small_tenants_share_other_beyond_the_top_n() -> None:
    labels = TenantLabels(top=5)
    evicted: list[str] = []
    labels.on_evict(evicted.append)
    seen = {labels.label(f"t{i % 1000}", 1) for i in range(20_000)}
    assert len(seen) == 6 and OTHER in seen  # five names and `other`, however many tenants
    assert evicted == []  # equal small tenants never churn the names
    assert len(labels._counts) <= labels.capacity  # the volume summary stays bounded


def test_a_noisy_newcomer_takes_the_smallest_label_and_the_loser_is_evicted() -> None:
    labels = TenantLabels(top=3)
    evicted: list[str] = []
    labels.on_evict(evicted.append)
    for tenant, volume in (("a", 50), ("b", 10), ("c", 40)):
        assert labels.label(tenant, volume) == tenant
    assert labels.label("noisy", 15) == OTHER  # not yet twice the smallest named (b: 10)
    assert labels.label("noisy", 10) == "noisy"  # 25 >= 2 * 10
    assert evicted == ["b"] and labels.named == frozenset({"a", "c", "noisy"})
    assert labels.label("b", 1) == OTHER


def test_one_noisy_tenant_among_many_gets_its_label_after_the_names_are_taken() -> None:
    labels = TenantLabels(top=10)
    for i in range(500):
        labels.label(f"small-{i}", 1)
    for _ in range(10):
        last = labels.label("noisy", 100)
    assert last == "noisy"


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 300), st.integers(1, 50)), max_size=400), st.integers(1, 8))
def test_labels_in_use_never_exceed_top_plus_other(traffic: list[tuple[int, int]], top: int) -> None:
    labels = TenantLabels(top=top)
    live: set[str] = set()
    labels.on_evict(live.discard)
    for tenant, volume in traffic:
        live.add(labels.label(f"t{tenant}", volume))
        assert len(live) <= top + 1
        assert len(labels.named) <= top
