"""Shared fixtures: real services (see ``services.py`` for the rules), the guard that
keeps a failing test from crashing pytest on CPython 3.11.7 (``pytest_guard.py``), and a
private config directory for the whole session.

Checkpoints are signed with a key that, when none is configured, is created once in the
user's config directory (``sluiceway.checkpoint.keys``).  The suite must never write to
the real ``~/.config``: ``XDG_CONFIG_HOME`` points at a fresh temporary directory from
here on -- set at import, before any test is collected or run, so flows in this process
and in the subprocesses the tests start (they inherit the environment) all use it -- and
checkpoint-key settings of the user's shell are dropped.
"""

import atexit
import os
import shutil
import tempfile

from keyed_backends import keyed_backend
from services import own_redis, redis_prefix, redis_url
from sluiceway.checkpoint.keys import load_keys

_CONFIG_HOME = tempfile.mkdtemp(prefix="sluiceway-tests-config-")
os.environ["XDG_CONFIG_HOME"] = _CONFIG_HOME
for _name in (
    "SLUICEWAY_CHECKPOINT_KEY",
    "SLUICEWAY_CHECKPOINT_KEY_FILE",
    "SLUICEWAY_CHECKPOINT_TRUST_UNAUTHENTICATED",
):
    os.environ.pop(_name, None)
atexit.register(shutil.rmtree, _CONFIG_HOME, ignore_errors=True)
# The default key, made now: a flow that would create it (two fsyncs) inside a test's
# timing window -- a stop after 0.2 s of real time -- would start late on a busy machine.
load_keys()

pytest_plugins = ["pytest_guard"]

__all__ = ["keyed_backend", "own_redis", "redis_prefix", "redis_url"]
