"""Asking the registered aggregate what a command yields: Keel's side of a domain's ``decide``.

Keel checks what holds for every domain (the command is a registered type, addressed to an
aggregate of its kind with a valid id, at the version it expects), then calls the team's
pure ``decide``. A ``Rejected`` it raises, an exception, or a result that is not one of the
aggregate's events becomes a ``CommandRejected`` with a code, never a crashed partition:
``decide`` is pure, so a replay refuses the same command the same way.
"""

from __future__ import annotations

import functools
import re

from keel.domain.aggregate import AggregateState
from keel.domain.envelope import Envelope, Payload
from keel.domain.events import CommandRejected
from keel.domains.model import Rejected
from keel.domains.registry import Registry, current


def reject(command: Envelope, code: str, reason: str) -> CommandRejected:
    """A rejection outcome for ``command``."""
    return CommandRejected(command_type=command.type, code=code, reason=reason)


@functools.cache
def _compiled(pattern: str) -> re.Pattern[str]:
    """An aggregate's id pattern, compiled once (``re``'s own cache costs a look-up of its key per call)."""
    return re.compile(pattern)


def decide(command: Envelope, state: AggregateState, registry: Registry | None = None) -> list[Payload]:
    """What ``command`` yields against ``state``: the domain's events, or one ``CommandRejected``.

    ``registry``: whose aggregates decide (default: this process's, ``keel.testing`` passes its own).
    """
    owner = (registry or current()).aggregate_of.get(command.type)
    if owner is None or command.payload.kind != "command":
        return [reject(command, "unsupported_command", f"{command.type} is no command of a registered domain")]
    if state.aggregate is not None and state.aggregate != owner.name:
        return [reject(command, "wrong_aggregate_type",
                       f"{command.aggregate_id} is a {state.aggregate}; {command.type} acts on a {owner.name}")]
    if _compiled(owner.id_pattern).fullmatch(command.aggregate_id) is None:
        return [reject(command, "invalid_aggregate_id",
                       f"{command.aggregate_id!r} is not a valid {owner.name} id ({owner.id_pattern})")]
    if command.expected_version is not None and command.expected_version != state.version:
        return [reject(command, "version_conflict",
                       f"expected version {command.expected_version}, aggregate is at {state.version}")]
    base = state.domain if state.aggregate == owner.name else owner.initial
    try:
        produced: list[Payload] = list(owner.decide(base, command))
    except Rejected as refusal:
        return [reject(command, refusal.code, refusal.reason)]
    except Exception as exc:  # a team's bug: refuse this command, keep deciding the others
        return [reject(command, "decide_failed", f"{owner.name}.decide raised {type(exc).__name__}: {exc}")]
    strays = [type(p).__name__ for p in produced if type(p) not in owner.events]
    if strays:
        return [reject(command, "decide_failed", f"{owner.name}.decide returned {', '.join(strays)}, "
                                                 f"which are not events of a {owner.name}")]
    return produced
