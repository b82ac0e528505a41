"""The support desk's effects: refunds and their reversals at the payments provider, e-mails at the e-mail one.

Each handler makes one POST under the effect's idempotency key, so however often Keel
retries it, the provider refunds or sends once. The providers' URLs are read from the
environment at each call (``SUPPORT_DESK_PAYMENTS_URL``, ``SUPPORT_DESK_EMAIL_URL``): one
worker image serves every environment, and a test points them at ``keel.testing.provider``.
Results name what the provider made and never hold personal data, because Keel records
them in ``EffectSucceeded`` for everyone who reads the tenant's events.
"""

from __future__ import annotations

from keel.domains import EffectCall, EffectResult
from keel.domains.http import post_json

from support_desk.messages import EmailQueued, RefundIssued, RefundReversed

PAYMENTS_URL = "SUPPORT_DESK_PAYMENTS_URL"
EMAIL_URL = "SUPPORT_DESK_EMAIL_URL"



async def issue_refund(call: EffectCall) -> EffectResult:
    """Refund at the payments provider, referenced by the refund's command: what its reversal names."""
    refund = call.event.payload
    assert isinstance(refund, RefundIssued)
    reference = str(call.event.causation_id)
    answer = await post_json(call, PAYMENTS_URL, "/v1/refunds",
                             {"amount_cents": refund.amount_cents, "currency": refund.currency, "reference": reference})
    return {"refund_id": answer.get("id"), "reference": reference, "amount_cents": refund.amount_cents,
            "currency": refund.currency}


async def reverse_refund(call: EffectCall) -> EffectResult:
    """Reverse the refund its command made; a refund the provider never made fails for good (refund_not_found)."""
    reversal = call.event.payload
    assert isinstance(reversal, RefundReversed)
    reference = str(reversal.reverses)
    answer = await post_json(call, PAYMENTS_URL, "/v1/refunds/reversals", {"reference": reference})
    return {"reversal_id": answer.get("id"), "refund_id": answer.get("refund"), "reference": reference}


async def send_email(call: EffectCall) -> EffectResult:
    """Send the queued e-mail; the address and text go to the provider and nowhere else."""
    email = call.event.payload
    assert isinstance(email, EmailQueued)
    answer = await post_json(call, EMAIL_URL, "/v1/emails",
                             {"to": email.to_address, "template": email.template, "body": email.body})
    return {"email_id": answer.get("id"), "template": email.template}
