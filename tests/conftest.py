"""Fixtures for the real backing services live in tests/backends/ and are shared by every suite."""

pytest_plugins = ["tests.backends.postgres", "tests.backends.redis"]
