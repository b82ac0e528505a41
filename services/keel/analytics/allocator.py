"""The embedded engine's allocator options, set before chDB loads into a process.

chDB allocates with jemalloc, which keeps a cache of freed blocks per thread (blocks up to
32 KiB, 200 of a size: MiBs a thread) and trims it only when that thread allocates again. The
engine keeps 100+ idle pool threads after bursts of concurrent queries, so their caches grew
for the projector's whole life: 65 MiB after 15 minutes of the soak (``tcache_bytes`` in
``system.jemalloc_stats``), the growth that failed it. Caching blocks up to 1 KiB, 16 of a
size, bounds a thread's cache to ~140 KiB; the rebuild rate of ``benchmarks/replay.py`` did not
move (no cache at all cost it 7 %).
"""

from __future__ import annotations

import os

ENV = "JE_MALLOC_CONF"
OPTIONS = "tcache_max:1024,tcache_nslots_small_max:16"


def configure() -> None:
    """Set the options unless the environment has its own. jemalloc reads them once, when chDB's
    library loads, so this runs before anything in the process imports chDB."""
    os.environ.setdefault(ENV, OPTIONS)
