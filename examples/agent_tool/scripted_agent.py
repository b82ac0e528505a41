"""A scripted agent that uses Keel's governed actions as tools, with no language model.

It does what an agent framework does with ``keel.client.tools``: it lists the tools its
API key may use, shows the model each tool's name, description and argument schema, then
runs the model's tool calls and hands each answer back. Here the "model" is a fixed plan
of support-desk calls, so you can see every outcome an agent meets: an action executed
(with its payment effect), malformed arguments refused with the field to fix, a refund
the domain refuses, a refund parked for an approver, and (with ``--approver-key``) the
approver's decision and the refund's final state.

    python examples/agent_tool/scripted_agent.py --key <agent key> [--approver-key <admin key>]

See examples/agent_tool/README.md for the setup.
"""

from __future__ import annotations

import argparse
import json
import os
import uuid
from contextlib import nullcontext
from typing import Any

from keel.client import KeelClient, Tool, tools


def plan(subscription: str, customer: str) -> list[tuple[str, Any]]:
    """The model's tool calls, in order, with arguments as a model emits them (JSON text or objects)."""
    on = {"aggregate_id": subscription, "on_behalf_of": customer}

    def refund(amount: Any, currency: str = "EUR") -> dict[str, Any]:
        return {"amount_cents": amount, "currency": currency, "reason": "service outage"}

    return [
        ("StartSubscription", {**on, "payload": {"customer_id": customer, "plan": "pro",
                                                 "monthly_price_cents": 490_000, "currency": "EUR"}}),
        ("IssueRefund", json.dumps({**on, "payload": refund(1_500)})),  # runs: the provider pays it out
        ("IssueRefund", {**on, "payload": refund("fifteen euros")}),  # malformed: refused, naming the field
        ("IssueRefund", {**on, "payload": refund(1_500, "USD")}),  # billed in EUR: the domain refuses it
        ("IssueRefund", {**on, "payload": refund(250_000)}),  # over 1000 EUR: parked for an approver
    ]


def run(agent: KeelClient, approver: KeelClient | None, customer: str = "cust-ada") -> list[dict[str, Any]]:
    """Play the plan through the agent's tools; print and return each call's answer."""
    found: dict[str, Tool] = {tool.name: tool for tool in tools(agent, wait_s=60)}
    print(f"tools for this key: {', '.join(sorted(found))}")
    for tool in found.values():
        print(f"  {tool.name}: {tool.description.splitlines()[0]}")
        print(f"    arguments: {', '.join(tool.parameters['properties'])}")
    answers = []
    for step, (name, arguments) in enumerate(plan(f"sub-{uuid.uuid4().hex[:8]}", customer), 1):
        answer = found[name](arguments) if name in found else {"outcome": "refused", "code": "no_such_tool"}
        print(f"[{step}] {name} -> {json.dumps(answer)}")
        answers.append(answer)
    for parked in (a for a in answers if a["outcome"] == "pending_approval"):
        command_id = uuid.UUID(parked["command_id"])
        if approver is None:
            print(f"{command_id} waits for an approver: keel approve {command_id} --tenant <tenant> --as human:<admin>")
            continue
        decision = approver.wait(approver.approve(command_id, "checked the outage report").command_id)
        if decision.status != "executed":  # e.g. not_an_approver: the key's actor holds no approver role
            print(f"the approval of {command_id} was {decision.status}: {decision.reason_code} {decision.reason}")
            continue
        final = agent.wait(command_id, timeout_s=60)
        print(f"approved {command_id} -> {final.status}, effects "
              f"{[(e.provider, str(e.state)) for e in final.effects]}")
    return answers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.partition("\n")[0])
    parser.add_argument("--gateway", default=os.environ.get("KEEL_GATEWAY_URL", "http://127.0.0.1:8080"))
    parser.add_argument("--key", default=os.environ.get("KEEL_API_KEY"), help="the agent's API key")
    parser.add_argument("--approver-key", default=os.environ.get("KEEL_APPROVER_KEY"),
                        help="an admin's API key, to approve what the agent's calls park")
    parser.add_argument("--customer", default="cust-ada", help="whom the agent acts for")
    args = parser.parse_args()
    if not args.key:
        parser.error("give the agent's API key with --key or KEEL_API_KEY")
    with KeelClient(args.gateway, args.key) as agent, \
            KeelClient(args.gateway, args.approver_key) if args.approver_key else nullcontext() as approver:
        run(agent, approver, args.customer)


if __name__ == "__main__":
    main()
