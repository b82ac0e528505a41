"""Fixtures for the postgres suites (see tests/conftest.py for the shared ones)."""

from __future__ import annotations
