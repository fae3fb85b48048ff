"""Shared fixtures: real services (see ``services.py`` for the rules)."""

from services import own_redis, redis_prefix, redis_url

__all__ = ["own_redis", "redis_prefix", "redis_url"]
