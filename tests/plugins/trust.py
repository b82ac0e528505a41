"""Fixtures for the trust suites (see tests/conftest.py for the shared ones)."""

from __future__ import annotations
