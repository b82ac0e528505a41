"""What an effect worker reads of a record, told by its headers, and the envelope of a type it does not know."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from keel.contracts.codec import EnvelopeCodec
from keel.domain.commands import OpenProviderBreaker
from keel.domain.envelope import Actor, ActorKind, new_command
from keel.domains.registry import Registry, build
from keel.effects.intake import EnvelopeShell, Interest, interest
from keel.errors import DecodeError
from tests.effects_domain import make_domain


@pytest.fixture
def registry(tmp_path: Path) -> Registry:
    return build([make_domain(tmp_path)], check_schemas=False)


@pytest.mark.parametrize(("headers", "wanted"), [
    ({"keel-type": b"Charged", "keel-effect": b"cards"}, Interest.TRIGGER),
    ({"keel-type": b"Charged"}, Interest.TRIGGER),  # a local handler is enough
    ({"keel-type": b"Shipped", "keel-effect": b"post"}, Interest.TRIGGER),  # no handler here: held, not skipped
    ({"keel-type": b"ChargeRefunded", "keel-effect": b"cards"}, Interest.TRIGGER | Interest.COMPENSATION),
    ({"keel-type": b"EffectSucceeded"}, Interest.OUTCOME),
    ({"keel-type": b"EffectCancelled"}, Interest.OUTCOME),
    ({"keel-type": b"EffectRetried"}, Interest.RETRY),
    ({"keel-type": b"KillSwitchEngaged", "keel-command-type": b"SetKillSwitch"}, Interest.NONE),
    ({}, Interest.NONE),
])
def test_only_triggers_outcomes_retries_and_compensations_are_decoded(
        registry: Registry, headers: dict[str, bytes | None], wanted: Interest) -> None:
    assert interest(headers, registry) == wanted


def test_the_envelope_of_any_record_reads_without_its_payload() -> None:
    codec = EnvelopeCodec()
    cause = uuid.uuid4()
    command = new_command(OpenProviderBreaker(provider="cards", reason="r"), tenant_id="acme", aggregate_id="controls",
                          actor=Actor(kind=ActorKind.SERVICE, id="keel-effects"), causation_id=cause)
    shell = EnvelopeShell(codec).read(codec.encode(command))
    assert (shell["id"], shell["tenant_id"], shell["aggregate_id"], shell["type"], shell["causation_id"]) == (
        command.id, "acme", "controls", "OpenProviderBreaker", cause)
    assert "payload" not in shell
    with pytest.raises(DecodeError):
        EnvelopeShell(codec).read(b"not a keel message")
