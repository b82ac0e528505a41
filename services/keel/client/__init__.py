"""``keel.client``: a typed Python client of the gateway, sync and async, and agent tools.

An agent holds one API key (``keel keys create``) and talks to the gateway only: it asks
what it may send (``actions``) and what governance would say (``explain``), sends a
command (``submit``), reads its record (``status``) or follows its stream until it
settles (``wait``). Approvers list and decide parked commands (``approvals``, ``approve``,
``reject``); analysts read their tenant's projections as a DataFrame (``query``).
``KeelClient`` blocks, ``AsyncKeelClient`` awaits; both carry the same calls
(``keel.client.core``). ``keel.client.tools`` turns each action into an agent tool.
"""

from keel.client.aio import AsyncKeelClient
from keel.client.errors import EndedOtherwise, RequestRefused, WaitTimedOut
from keel.client.sync import KeelClient
from keel.client.tools import AsyncTool, Tool, async_tools, tools

__all__ = ["AsyncKeelClient", "AsyncTool", "EndedOtherwise", "KeelClient", "RequestRefused", "Tool",
           "WaitTimedOut", "async_tools", "tools"]
