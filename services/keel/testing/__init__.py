"""Testing a domain the way Keel will run it.

* ``scenario(domain)``: given/when/then over the domain's ``decide`` and ``evolve``, called
  through Keel's own side of them (versions, expected versions, aggregate ids, rejections),
  in memory and fast::

      opened = scenario(domain).given(OpenAccount(...), aggregate="acct-1")
      opened.when(GrantPoints(points=500, ...)).then(PointsGranted(points=500, ...))
      opened.when(RevokeGrant(grant=uuid.uuid4(), ...)).then_rejected("nothing_to_revoke")

* ``keel.testing.pipeline``: the same commands through the real producer, broker and
  processor (governance included); ``keel.testing.pytest_plugin`` provides it as the
  ``keel_pipeline`` fixture. See ``docs/domains.md``.
"""

from keel.testing.scenario import Decided, Scenario, scenario

__all__ = ["Decided", "Scenario", "scenario"]
