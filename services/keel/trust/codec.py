"""The envelope codec with the encrypt stage: seal personal fields before encoding, open after decoding.

A drop-in ``EnvelopeCodec`` for the edges (SDK, gateway, processor). ``decode`` opens the
raw Avro record *before* validation, so a command whose personal field has a format rule
(an e-mail address, say) validates its plaintext, which then lives only in memory;
``encode`` seals with the envelope's own id as associated data, so the processor's
events are re-sealed under their event ids. Consumers that must never see plaintext
(the projector, the chainer) keep the plain codec and store ciphertext.
"""

from __future__ import annotations

import json
from collections.abc import Iterable

from keel.contracts.catalog import Catalog
from keel.contracts.codec import ENVELOPE_BUILDER, EnvelopeCodec, parse_envelope
from keel.domain.envelope import Envelope
from keel.domain.events import ApprovalRequested
from keel.trust.fields import FieldCipher


class SealingCodec(EnvelopeCodec):
    """Single-object Avro with personal fields sealed on the wire.

    An ``ApprovalRequested`` carries the whole parked command as JSON, decided from its
    opened (plaintext) form: its personal fields are sealed inside that JSON too, under the
    parked command's own id, and opened again when the event is decoded here.
    """

    def __init__(self, cipher: FieldCipher, catalog: Catalog | None = None) -> None:
        super().__init__(catalog or cipher.catalog)
        self.cipher = cipher

    def encode(self, envelope: Envelope) -> bytes:
        """Seal, then encode."""
        sealed = self.cipher.seal(envelope)
        if type(sealed.payload) is ApprovalRequested:  # identity: a failed class check on a model goes through ABCMeta
            parked = parse_envelope(json.loads(sealed.payload.command))
            inner = self.cipher.seal(parked)
            if inner is not parked:
                sealed = sealed.model_copy(update={"payload": sealed.payload.model_copy(
                    update={"command": inner.model_dump_json()})})
        return super().encode(sealed)

    def prefetch(self, records: Iterable[bytes | None]) -> None:
        """Read the keys that opening ``records`` needs, a few statements for all of them."""
        self.cipher.prefetch(records)

    def prepare(self, envelopes: Iterable[Envelope]) -> None:
        """Fetch, or create, the keys sealing ``envelopes`` needs, a few statements for all of them."""
        self.cipher.prepare(envelopes)

    def decode(self, data: bytes) -> Envelope:
        """Decode the raw record, open its personal fields (or mark them erased), then validate."""
        record = self.read(data)
        if self.cipher.personal(record["type"]):  # most types have none: no copy of the payload
            record["payload"] = self.cipher.open_payload(
                record["payload"], tenant=record["tenant_id"], subject=record.get("on_behalf_of"),
                envelope_id=str(record["id"]), message_type=record["type"])
        if record["type"] == "ApprovalRequested":
            parked = json.loads(record["payload"]["command"])
            if self.cipher.personal(parked["type"]):
                parked["payload"] = self.cipher.open_payload(
                    parked["payload"], tenant=parked["tenant_id"], subject=parked.get("on_behalf_of"),
                    envelope_id=str(parked["id"]), message_type=parked["type"])
                record["payload"] = {**record["payload"], "command": json.dumps(parked, separators=(",", ":"))}
        return parse_envelope(record, builder=ENVELOPE_BUILDER)
