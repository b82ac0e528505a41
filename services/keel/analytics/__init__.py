"""The analytics engine shared across processes.

chDB lets a single process open a data path. The process that owns it serves every other
Keel process over a small ClickHouse-compatible HTTP endpoint (``keel.analytics.server``), so
``keel query``, ``keel state``, rebuilds and redaction keep working while the projector runs.
"""
