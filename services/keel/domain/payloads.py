"""Bases of every payload: a command asks, an event records what was decided."""

from __future__ import annotations

from typing import ClassVar, Literal

from keel.domain.envelope import Payload


class Command(Payload):
    kind: ClassVar[Literal["command", "event"]] = "command"


class Event(Payload):
    kind: ClassVar[Literal["command", "event"]] = "event"
