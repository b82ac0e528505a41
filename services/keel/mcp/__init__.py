"""``keel mcp``: the gateway's actions as MCP tools, so any MCP agent can use Keel with its own API key.

The server holds no key and no tenant of its own: each call carries the agent's key to the
gateway, which decides what that key may do.
"""
