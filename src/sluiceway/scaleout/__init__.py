"""Scale-out: one flow on several processes (workers), the broker splitting the input.

* :mod:`~sluiceway.scaleout.worker` -- this process's worker identity (``worker_id()``),
  set by ``sluiceway run --workers N`` or by hand (``SLUICEWAY_WORKER_ID``).
* :mod:`~sluiceway.scaleout.kinds` -- what kind of flow a worker runs: keyed state, or
  Kafka to Kafka exactly once (one task per partition), or a plain group member.
* :mod:`~sluiceway.scaleout.checks` -- which flows can run on several workers, and the
  error (naming the fix) for those that cannot.
* :mod:`~sluiceway.scaleout.supervisor` -- ``--workers N``: start N worker processes,
  forward signals to them, stop them together.

The process pool for CPU-heavy stateless code (``stream.map_in_processes``) is an
operator (:mod:`sluiceway.operators.processes`).  See docs/scaling.md.
"""

from sluiceway.scaleout.worker import worker_id, worker_label

__all__ = ["worker_id", "worker_label"]
