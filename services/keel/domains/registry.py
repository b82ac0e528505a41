"""Finding, checking and indexing every registered domain, once per process.

Domains come from the ``keel.domains`` entry point group (a team's installed package) and
from ``KEEL_DOMAINS`` (comma-separated ``module`` or ``module:attribute`` import paths;
the attribute defaults to ``domain``). Loading is all or nothing: a domain that fails to
import, a type name two domains claim, an aggregate without ``decide`` or ``evolve``, an
undo naming an unknown type, or a schema that is missing or breaks an older version stops
the process with a ``DomainError`` naming the domain and the type, so no service ever runs
with half a registry.
"""

from __future__ import annotations

import importlib
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import cache
from importlib.metadata import entry_points

from keel.domain.envelope import Payload
from keel.domain.payloads import Command, Event
from keel.domains.model import Aggregate, Domain, Effect, Undo
from keel.errors import KeelError

ENTRY_POINT_GROUP = "keel.domains"
ENV_VAR = "KEEL_DOMAINS"
PROVIDER_PATTERN = r"[a-z0-9][a-z0-9_.-]{0,63}"


class DomainError(KeelError):
    """A registered domain cannot be loaded; ``domain`` and ``type_name`` say where."""

    code = "domain_invalid"

    def __init__(self, message: str, *, domain: str, type_name: str | None = None, code: str | None = None) -> None:
        where = f"domain {domain!r}" + (f", type {type_name!r}" if type_name else "")
        super().__init__(f"{where}: {message}", code=code)
        self.domain = domain
        self.type_name = type_name


@dataclass(frozen=True)
class Source:
    """Where a domain was named: an entry point or ``KEEL_DOMAINS``, and its import path."""

    name: str
    path: str


@dataclass(frozen=True)
class Registry:
    """Every loaded domain, indexed by the names the envelope carries."""

    domains: tuple[Domain, ...] = ()
    payloads: dict[str, type[Payload]] = field(default_factory=dict)
    aggregate_of: dict[str, Aggregate[object]] = field(default_factory=dict)
    """Command and event type -> the aggregate that decides or folds it."""
    domain_of: dict[str, Domain] = field(default_factory=dict)
    undo_of: dict[str, Undo] = field(default_factory=dict)
    """Event type -> how it is undone."""
    undone_field: dict[str, str] = field(default_factory=dict)
    """Compensating event type -> the payload field naming the undone command (may be absent)."""
    effect_of: dict[str, Effect] = field(default_factory=dict)
    """Event type -> the effect that carries it into the outside world."""

    @property
    def compensating(self) -> frozenset[str]:
        """Event types that record an undoing."""
        return frozenset(u.by.__name__ for u in self.undo_of.values())

    def domain(self, name: str) -> Domain:
        """The domain called ``name``."""
        for domain in self.domains:
            if domain.name == name:
                return domain
        known = ", ".join(d.name for d in self.domains) or "none"
        raise KeelError(f"no domain {name!r} is registered (registered: {known})", code="unknown_domain")


def sources(env: str | None = None) -> list[Source]:
    """The entry points of ``keel.domains`` and the import paths in ``KEEL_DOMAINS``."""
    found = [Source(ep.name, ep.value) for ep in entry_points(group=ENTRY_POINT_GROUP)]
    named = os.environ.get(ENV_VAR, "") if env is None else env
    found += [Source(path.strip(), path.strip()) for path in named.split(",") if path.strip()]
    seen: set[str] = set()
    return [s for s in found if not (s.path in seen or seen.add(s.path))]  # type: ignore[func-returns-value]


def load(source: Source) -> Domain:
    """Import the ``Domain`` object ``source`` names."""
    module_name, _, attribute = source.path.partition(":")
    try:
        module = importlib.import_module(module_name)
        value = getattr(module, attribute or "domain")
    except Exception as exc:  # a team's import can fail any way; say which and why
        raise DomainError(f"cannot import {source.path}: {type(exc).__name__}: {exc}",
                          domain=source.name, code="domain_import_failed") from exc
    if not isinstance(value, Domain):
        raise DomainError(f"{source.path} is a {type(value).__name__}, not a keel.domains.Domain",
                          domain=source.name, code="domain_import_failed")
    return value


def build(domains: Iterable[Domain], *, check_schemas: bool = True) -> Registry:
    """A registry of ``domains``, after checking every rule in the module docstring."""
    from keel.domain.messages import CORE_PAYLOADS

    registry = Registry()
    owner: dict[str, str] = {name: "keel" for name in CORE_PAYLOADS}
    chosen: list[Domain] = []
    for domain in domains:
        if any(d.name == domain.name for d in chosen):
            raise DomainError("two registered domains have this name", domain=domain.name, code="duplicate_domain")
        _index(registry, domain, owner)
        chosen.append(domain)
    if check_schemas:
        from keel.contracts.evolution import schema_problems

        for domain in chosen:
            problems = schema_problems(domain)
            if problems:
                first = problems[0]
                more = f" (and {len(problems) - 1} more; `keel schemas check` lists them)" if len(problems) > 1 else ""
                raise DomainError(first.message + more, domain=domain.name, type_name=first.type_name,
                                  code=first.code)
    return Registry(tuple(chosen), registry.payloads, registry.aggregate_of, registry.domain_of,
                    registry.undo_of, registry.undone_field, registry.effect_of)


def _index(registry: Registry, domain: Domain, owner: dict[str, str]) -> None:
    for aggregate in domain.aggregates:
        for role in ("decide", "evolve"):
            if not callable(getattr(aggregate, role, None)):
                raise DomainError(f"aggregate {aggregate.name!r} has no {role} function", domain=domain.name,
                                  code="aggregate_incomplete")
        for kind, base, types in (("command", Command, aggregate.commands), ("event", Event, aggregate.events)):
            for cls in types:
                name = getattr(cls, "__name__", repr(cls))
                if not (isinstance(cls, type) and issubclass(cls, base)):
                    raise DomainError(f"is listed as {kind} of aggregate {aggregate.name!r} but is not a "
                                      f"keel.domains.{base.__name__} model", domain=domain.name, type_name=name,
                                      code="not_a_model")
                if name in owner:
                    raise DomainError(f"is also declared by {owner[name]!r}; type names are global",
                                      domain=domain.name, type_name=name, code="duplicate_type")
                owner[name] = domain.name
                registry.payloads[name] = cls
                registry.aggregate_of[name] = aggregate
                registry.domain_of[name] = domain
    for undone, undo in domain.undo.items():
        for role, cls in (("undone event", undone), ("compensating event", undo.by)):
            name = getattr(cls, "__name__", repr(cls))
            if registry.domain_of.get(name) is not domain or not issubclass(cls, Event):
                raise DomainError(f"the undo of {getattr(undone, '__name__', undone)} names {name} as its {role}, "
                                  "which is no event of this domain", domain=domain.name, type_name=name,
                                  code="unknown_compensation_type")
        if not callable(undo.command):
            raise DomainError("its undo has no command builder", domain=domain.name, type_name=undone.__name__,
                              code="unknown_compensation_type")
        if undo.names_undone is not None and undo.names_undone not in undo.by.model_fields:
            raise DomainError(f"its undo says {undo.by.__name__}.{undo.names_undone} names the undone command, "
                              "and there is no such field", domain=domain.name, type_name=undo.by.__name__,
                              code="unknown_compensation_type")
        registry.undo_of[undone.__name__] = undo
        if undo.names_undone is not None:
            registry.undone_field[undo.by.__name__] = undo.names_undone
    for effect in domain.effects:
        _index_effect(registry, domain, effect)


def _index_effect(registry: Registry, domain: Domain, effect: Effect) -> None:
    name = getattr(effect.on, "__name__", repr(effect.on))

    def invalid(message: str) -> DomainError:
        return DomainError(message, domain=domain.name, type_name=name, code="effect_invalid")

    if registry.domain_of.get(name) is not domain or not issubclass(effect.on, Event):
        raise invalid("has an effect but is no event of this domain")
    if name in registry.effect_of:
        raise invalid("has two effects; declare one handler that does both")
    if not callable(effect.handler):
        raise invalid("its effect has no callable handler")
    if re.fullmatch(PROVIDER_PATTERN, effect.provider) is None:
        raise invalid(f"its effect's provider {effect.provider!r} is not a name like 'payments' "
                      f"({PROVIDER_PATTERN})")
    if not (effect.timeout_s > 0 and effect.max_attempts >= 1 and 0 < effect.backoff_s <= effect.max_backoff_s):
        raise invalid("its effect needs timeout_s > 0, max_attempts >= 1 and 0 < backoff_s <= max_backoff_s")
    registry.effect_of[name] = effect


@cache
def current() -> Registry:
    """The registry of this process, loaded on first use from entry points and ``KEEL_DOMAINS``."""
    return build(load(source) for source in sources())
