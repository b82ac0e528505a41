"""Keel's public domain API: what a team imports to bring its own commands, events and aggregates.

A domain package declares pydantic ``Command`` and ``Event`` models (personal fields typed
``EmailAddress``, ``PersonalText`` or ``personal(...)``), one or more ``Aggregate``s with pure
``decide`` and ``evolve`` functions, the ``Undo`` of each event that can be undone, and the
``Rule``s of its default policy, the ``Effect``s that carry its events into the outside
world, and exposes them as one ``Domain`` object through the
``keel.domains`` entry point group or ``KEEL_DOMAINS``. ``keel.domains.http`` calls a provider
over HTTP from an effect handler. See ``docs/domains.md`` and ``docs/effects.md``.
"""

from keel.domain.envelope import ActorKind, Envelope
from keel.domain.governance.policy import Match, Outcome, Rule
from keel.domain.payloads import Command, Event
from keel.domain.personal import EmailAddress, PersonalText, personal
from keel.domains.model import (
    Aggregate,
    Domain,
    Effect,
    EffectCall,
    EffectResult,
    PermanentError,
    Rejected,
    RetryableError,
    Undo,
)

__all__ = [
    "ActorKind", "Aggregate", "Command", "Domain", "Effect", "EffectCall", "EffectResult", "EmailAddress",
    "Envelope", "Event", "Match", "Outcome", "PermanentError", "PersonalText", "Rejected", "RetryableError",
    "Rule", "Undo", "personal",
]
