"""Operator tools over the topics: dead letters, lookups for approvals and undo."""
