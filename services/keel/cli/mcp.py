"""``keel mcp``: serve the gateway's actions to MCP agents, over stdio or streamable HTTP."""

from __future__ import annotations

import os
from enum import StrEnum
from typing import Annotated

import typer

from keel.domains.registry import current
from keel.errors import ConfigError

KEY_VAR = "KEEL_API_KEY"


class Transport(StrEnum):
    STDIO = "stdio"
    HTTP = "http"


def register(app: typer.Typer) -> None:
    """Add ``keel mcp`` to ``app``."""
    app.command("mcp")(mcp)


def mcp(gateway: Annotated[str, typer.Option(help="The gateway's base URL, e.g. http://127.0.0.1:8080.",
                                             envvar="KEEL_GATEWAY_URL")],
        transport: Annotated[Transport, typer.Option(help="stdio: one agent, its key in KEEL_API_KEY; "
                                                          "http: many agents, each sends its own key.")
                             ] = Transport.STDIO,
        host: Annotated[str, typer.Option(help="Interface to bind (http).")] = "127.0.0.1",
        port: Annotated[int, typer.Option(help="Port to listen on (http); the endpoint is /mcp.")] = 8765) -> None:
    """Run an MCP server whose tools list, explain, submit and follow actions through the gateway."""
    from keel.mcp.server import build_server

    if transport is Transport.STDIO:
        key = os.environ.get(KEY_VAR, "").strip()
        if not key:
            raise ConfigError(f"set {KEY_VAR} to the agent's API key (`keel keys create`)", code="missing_key",
                              field=KEY_VAR)
        build_server(gateway, current().domains, key=key).run("stdio")
        return
    build_server(gateway, current().domains, key=None).run("streamable-http", host=host, port=port,
                                                           stateless_http=True)
