"""This process's identity among the workers of one flow.

``sluiceway run --workers N`` starts N processes with ``SLUICEWAY_WORKER_ID`` set to
``0`` .. ``N-1``; workers started by hand (on other machines, in Kubernetes pods) set it
themselves -- any name unique among the running workers, e.g. the pod name.  The id
becomes the ``worker`` label of the Prometheus series and a suffix of the Kafka sink's
default transactional id (two producers with one transactional id fence each other).

>>> import os
>>> os.environ.pop(ENV_WORKER_ID, None) and None
>>> worker_id() is None
True
>>> os.environ[ENV_WORKER_ID] = "2"
>>> worker_id(), worker_label()
('2', 'worker 2')
>>> del os.environ[ENV_WORKER_ID]
"""

from __future__ import annotations

import os

__all__ = ["ENV_SUPERVISOR_FD", "ENV_WORKERS", "ENV_WORKER_ID", "worker_id", "worker_label"]

ENV_WORKER_ID = "SLUICEWAY_WORKER_ID"
"""This worker's id (unset: a process running alone)."""
ENV_WORKERS = "SLUICEWAY_WORKERS"
"""How many workers ``--workers`` started (informational)."""
ENV_SUPERVISOR_FD = "SLUICEWAY_SUPERVISOR_FD"
"""A pipe's read end that reaches end-of-file when the supervisor process is gone."""


def worker_id() -> str | None:
    """This process's worker id, or None when it runs alone (``SLUICEWAY_WORKER_ID``)."""
    value = os.environ.get(ENV_WORKER_ID, "").strip()
    return value or None


def worker_label() -> str | None:
    """``"worker <id>"`` for messages, or None when the process runs alone."""
    wid = worker_id()
    return None if wid is None else f"worker {wid}"
