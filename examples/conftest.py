"""The example domains test themselves as a team would: with the fixtures of ``keel.testing``."""

pytest_plugins = ["keel.testing.pytest_plugin"]
