"""The deploys domain's effects: promotions and rollbacks carried out at the deploy target.

Each handler makes one POST under the effect's idempotency key, so however often Keel
retries it, the target shifts the traffic once. The target's URL is read from
``DEPLOYS_TARGET_URL`` at each call: one worker image serves every environment, and a test
points it at ``keel.testing.provider``.
"""

from __future__ import annotations

from keel.domains import EffectCall, EffectResult
from keel.domains.http import post_json

from deploys.messages import ReleasePromoted, ReleaseRolledBack

TARGET_URL = "DEPLOYS_TARGET_URL"



async def promote(call: EffectCall) -> EffectResult:
    """Send the promoted share of the service's traffic to the release."""
    promotion = call.event.payload
    assert isinstance(promotion, ReleasePromoted)
    answer = await post_json(call, TARGET_URL, "/v1/deployments",
                             {"service": call.event.aggregate_id, "release": promotion.release,
                              "percent": promotion.percent, "previous_percent": promotion.previous_percent})
    return {"deployment_id": answer.get("id"), "release": promotion.release, "percent": promotion.percent}


async def roll_back(call: EffectCall) -> EffectResult:
    """Return the release's share of the traffic to what it was before the promotion it undoes."""
    rollback = call.event.payload
    assert isinstance(rollback, ReleaseRolledBack)
    answer = await post_json(call, TARGET_URL, "/v1/rollbacks",
                             {"service": call.event.aggregate_id, "release": rollback.release,
                              "from_percent": rollback.from_percent, "percent": rollback.percent,
                              "reverses": str(rollback.reverses)})
    return {"rollback_id": answer.get("id"), "release": rollback.release, "percent": rollback.percent}
