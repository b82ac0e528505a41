"""Trust benchmark: audit chain verification rate, and the cost of sealing personal fields.

Prints (never judges): records/s of ``verify_chain`` over an in-memory chain of real
encoded events (target: at least 500,000/s), the chainer's record-building rate, and
encode/decode time per event with personal fields sealed, as a ratio to the plain codec.
Run: ``.venv/bin/python benchmarks/trust.py [--records N] [--events N]``.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from keel.contracts.codec import EnvelopeCodec
from keel.domain.envelope import Actor, ActorKind, Authority, Envelope, new_command
from support_desk.messages import EmailQueued, IssueRefund, RefundIssued, SendEmail
from keel.domain.outcomes import to_events
from keel.trust.checkpoints import CheckpointSigner, TrustedKeys
from keel.trust.codec import SealingCodec
from keel.trust.entries import entry_from_intake
from keel.trust.fields import FieldCipher
from keel.trust.keystore import MasterKey
from keel.trust.keystore_sqlite import SqliteKeyStore
from keel.trust.record import GENESIS, seal_record
from keel.trust.verify import verify_chain

AGENT = Actor(kind=ActorKind.AGENT, id="support-bot")


def emails(n: int, subjects: int = 100) -> list[Envelope]:
    """``n`` EmailQueued events (two personal fields each) for ``subjects`` customers."""
    out = []
    for i in range(n):
        subject = f"cust-{i % subjects}"
        cmd = new_command(SendEmail(to_address=f"{subject}@example.com", template="refund", body="Sorry " * 40),
                          tenant_id="acme", aggregate_id=f"sub-{i % subjects}", actor=AGENT,
                          on_behalf_of=subject, authority=Authority(role="support"))
        out += to_events(cmd, [EmailQueued(to_address=f"{subject}@example.com", template="refund",
                                           body="Sorry " * 40)], version=i // subjects, now=cmd.occurred_at)
    return out


def refunds(n: int) -> list[Envelope]:
    """``n`` RefundIssued events: the reference workload's typical, smaller event."""
    out = []
    for i in range(n):
        cmd = new_command(IssueRefund(amount_cents=100, currency="EUR", reason="late delivery"), tenant_id="acme",
                          aggregate_id=f"sub-{i % 100}", actor=AGENT, on_behalf_of=f"cust-{i % 100}",
                          authority=Authority(role="support"))
        out += to_events(cmd, [RefundIssued(amount_cents=100, currency="EUR", reason="late delivery")],
                         version=i // 100, now=cmd.occurred_at)
    return out


def chain_rate(records: int, sample: list[Envelope]) -> tuple[float, float, int]:
    """Records/s building the chain (as the chainer does) and verifying it, and the record size."""
    codec = EnvelopeCodec()
    values = [codec.encode(e) for e in sample]
    entries = [entry_from_intake(v, "acme") for v in values]
    started = time.perf_counter()
    chain, head = [], GENESIS
    for seq in range(1, records + 1):
        raw = seal_record(seq, head, entries[seq % len(entries)])
        chain.append(raw)
        head = raw[-32:]
    built = time.perf_counter() - started
    signer = CheckpointSigner("k1", Ed25519PrivateKey.generate())
    checkpoints = [signer.sign("acme", records, head)]
    trusted = TrustedKeys({"k1": signer.key.public_key()})
    started = time.perf_counter()
    report = verify_chain("acme", chain, checkpoints, trusted)
    verified = time.perf_counter() - started
    if not report.ok:
        raise SystemExit(f"benchmark chain failed to verify: {report.summary()}")
    return records / built, records / verified, len(chain[0])


def sealing_overhead(events: int, folder: Path) -> dict[str, float]:
    """Microseconds per event to encode and decode, plain and sealed, and the ratios."""
    sample = emails(events)
    plain = EnvelopeCodec()
    with SqliteKeyStore(folder / "keys.db", MasterKey(os.urandom(32))) as keys:
        sealing = SealingCodec(FieldCipher(keys))
        for e in sample[:200]:  # create the subjects' keys outside the clock
            sealing.encode(e)

        def clock(fn: Callable[[Any], object], items: Sequence[object]) -> float:
            started = time.perf_counter()
            for item in items:
                fn(item)
            return (time.perf_counter() - started) / len(items) * 1e6

        plain_enc = clock(plain.encode, sample)
        sealed_enc = clock(sealing.encode, sample)
        plain_bytes = [plain.encode(e) for e in sample]
        sealed_bytes = [sealing.encode(e) for e in sample]
        plain_dec = clock(plain.decode, plain_bytes)
        sealed_dec = clock(sealing.decode, sealed_bytes)
    return {"plain_encode_us": plain_enc, "sealed_encode_us": sealed_enc, "encode_ratio": sealed_enc / plain_enc,
            "plain_decode_us": plain_dec, "sealed_decode_us": sealed_dec, "decode_ratio": sealed_dec / plain_dec}


def main() -> None:
    """Run both measurements and print them."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--records", type=int, default=300_000)
    parser.add_argument("--events", type=int, default=5_000)
    args = parser.parse_args()
    figures = {}
    for name, sample in (("EmailQueued", emails(1000)), ("RefundIssued", refunds(1000))):
        build, verify, size = chain_rate(args.records, sample)
        figures[f"verify_{name}_records_per_s"] = verify
        print(f"audit chain of {args.records:,} {name} records ({size} bytes each): verify {verify:,.0f} "
              f"records/s (target >= 500,000/s), build {build:,.0f} records/s")
    with tempfile.TemporaryDirectory() as folder:
        cost = sealing_overhead(args.events, Path(folder))
    print(f"sealing 2 personal fields/event: encode {cost['plain_encode_us']:.1f} -> {cost['sealed_encode_us']:.1f} "
          f"us/event (x{cost['encode_ratio']:.2f}); decode {cost['plain_decode_us']:.1f} -> "
          f"{cost['sealed_decode_us']:.1f} us/event (x{cost['decode_ratio']:.2f})")
    print(json.dumps({k: round(v, 2) for k, v in {**figures, **cost}.items()}))


if __name__ == "__main__":
    main()
