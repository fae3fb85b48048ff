"""Shared fixtures: real services (see ``services.py`` for the rules), and the guard that
keeps a failing test from crashing pytest on CPython 3.11.7 (``pytest_guard.py``)."""

from services import own_redis, redis_prefix, redis_url

pytest_plugins = ["pytest_guard"]

__all__ = ["own_redis", "redis_prefix", "redis_url"]
