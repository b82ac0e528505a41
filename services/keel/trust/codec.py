"""The envelope codec with the encrypt stage: seal personal fields before encoding, open after decoding.

A drop-in ``EnvelopeCodec`` for the edges (SDK, gateway, processor). ``decode`` opens the
raw Avro record *before* validation, so a command whose personal field has a format rule
(an e-mail address, say) validates its plaintext, which then lives only in memory;
``encode`` seals with the envelope's own id as associated data, so the processor's
events are re-sealed under their event ids. Consumers that must never see plaintext
(the projector, the chainer) keep the plain codec and store ciphertext.
"""

from __future__ import annotations

from keel.contracts.catalog import Catalog
from keel.contracts.codec import EnvelopeCodec, parse_envelope
from keel.domain.envelope import Envelope
from keel.trust.fields import FieldCipher


class SealingCodec(EnvelopeCodec):
    """Single-object Avro with personal fields sealed on the wire."""

    def __init__(self, cipher: FieldCipher, catalog: Catalog | None = None) -> None:
        super().__init__(catalog or cipher.catalog)
        self.cipher = cipher

    def encode(self, envelope: Envelope) -> bytes:
        """Seal, then encode."""
        return super().encode(self.cipher.seal(envelope))

    def decode(self, data: bytes) -> Envelope:
        """Decode the raw record, open its personal fields (or mark them erased), then validate."""
        record = self.read(data)
        if self.cipher.personal(record["type"]):  # most types have none: no copy of the payload
            record["payload"] = self.cipher.open_payload(
                record["payload"], tenant=record["tenant_id"], subject=record.get("on_behalf_of"),
                envelope_id=str(record["id"]), message_type=record["type"])
        return parse_envelope(record)
