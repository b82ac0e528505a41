"""Governance as data: policies (RBAC + rules), guardrail controls, parked approvals."""
