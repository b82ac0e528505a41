"""The cyclic garbage collector's settings for a long-running service's hot loop.

Why: a service that decides, relays or answers thousands of messages a second allocates
containers far faster than CPython's default thresholds (700, 10, 10) expect. At those the
processor ran a young collection every ~80 commands and a full one every ~13,000, walking
every aggregate state it held: 6 µs of its ~80 µs a command went to the collector
(``benchmarks/README.md``, 2026-12-06). Nearly all of a hot loop's objects are freed by
reference counting the moment they are done; what outlives them is state the service keeps.
So the young generation is collected every 50,000 net allocations rather than 700, and what
exists when the service settles (start-up objects, loaded state) is frozen out of every
collection. Cyclic garbage is still collected, later: at most ~50,000 objects wait for it.
"""

from __future__ import annotations

import gc

YOUNG_THRESHOLD = 50_000
"""Net container allocations between two young collections."""
OLDER_THRESHOLDS = (20, 100)
"""Young collections per middle one, middle ones per full one (CPython also waits for the
long-lived objects to grow by a quarter before a full collection)."""


def settle() -> None:
    """Freeze every object alive now out of future collections and space them for a hot loop.

    Call it once what the service holds for its lifetime is built (after a processor loads
    its partitions, after a gateway starts); calling it again freezes what was added since.
    """
    gc.freeze()
    gc.set_threshold(YOUNG_THRESHOLD, *OLDER_THRESHOLDS)
