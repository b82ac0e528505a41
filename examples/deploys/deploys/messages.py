"""The deploys domain's commands and events: an agent shipping a release of one service.

Each class matches ``schemas/{commands,events}/<Name>/v<N>.avsc`` (``keel schemas check``
proves it). Nothing here is personal data: releases and commits name code, not people.
"""

from __future__ import annotations

import uuid

from pydantic import Field

from keel.domains import Command, Event

_Release = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,99}$", description="The release's name, e.g. v1.4.2.")
_Reason = Field(min_length=1, max_length=1000)


class DeployPreview(Command):
    """Deploy a release to the service's preview environment: no user traffic yet."""

    release: str = _Release
    commit_sha: str = Field(pattern=r"^[0-9a-f]{7,40}$", description="The commit the release was built from.")


class PromoteRelease(Command):
    """Send ``percent`` of the service's traffic to a previewed release."""

    release: str = _Release
    percent: int = Field(ge=1, le=100)


class RollBack(Command):
    """Undo a promotion: the compensation of PromoteRelease."""

    promotion_id: uuid.UUID = Field(description="The PromoteRelease command being undone.")
    reason: str = _Reason


class PreviewDeployed(Event):
    release: str
    commit_sha: str


class ReleasePromoted(Event):
    release: str
    percent: int
    previous_percent: int


class ReleaseRolledBack(Event):
    release: str
    from_percent: int
    percent: int
    reverses: uuid.UUID
    reason: str
