"""Fixtures for the analytics suites (see tests/conftest.py for the shared ones)."""

from __future__ import annotations
