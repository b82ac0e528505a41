"""The effects benchmark's own domain: one command, one event, and a no-op async effect on it.

``Poke`` on a ``probe`` aggregate records ``Poked``, whose effect ``noop`` returns at once
without I/O, so an effect worker running it spends its time on Keel's own work alone:
reading the event, scheduling, the attempt's bookkeeping and report, and the outcome command.

The schemas live in a throwaway folder, ``home()``: ``KEEL_BENCH_EFFECTS_DIR`` when set,
else a folder of this process in the temporary directory. The benchmark writes them there
(``write_schemas``) and names the module in ``KEEL_DOMAINS`` before anything loads the
registry, then deletes the folder at the end.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from pydantic import Field

from keel.contracts.evolution import freeze, owner_of
from keel.domains import Aggregate, Command, Domain, Effect, EffectCall, EffectResult, Envelope, Event

DIR_ENV = "KEEL_BENCH_EFFECTS_DIR"
PROVIDER = "noop"


class Poke(Command):
    """Ask the probe to record one ``Poked``."""

    n: int = Field(ge=0, description="The poke's number within the run.")


class Poked(Event):
    n: int


def decide(state: int, command: Envelope) -> list[Event]:
    match command.payload:
        case Poke(n=n):
            return [Poked(n=n)]
    raise AssertionError(command.type)


def evolve(state: int, event: Envelope) -> int:
    return state + 1


async def noop(call: EffectCall) -> EffectResult:
    """The effect that does nothing: what is left is the worker's own cost."""
    return None


def home() -> Path:
    """Where the domain's schemas are."""
    named = os.environ.get(DIR_ENV)
    return Path(named) if named else Path(tempfile.gettempdir()) / f"keel-bench-effects-{os.getpid()}"


def make_domain(folder: Path) -> Domain:
    """The domain, its schemas under ``folder``."""
    probes = Aggregate(name="probe", initial=0, commands=(Poke,), events=(Poked,), decide=decide, evolve=evolve)
    return Domain(name="bench_effects", home=folder, aggregates=(probes,),
                  effects=(Effect(on=Poked, handler=noop, provider=PROVIDER),))


def write_schemas(folder: Path) -> None:
    """Write the domain's schemas under ``folder`` (as ``keel schemas freeze`` would)."""
    freeze([owner_of(make_domain(folder))])


domain = make_domain(home())
