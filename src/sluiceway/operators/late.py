"""The late-record side output that window operators and joins share.

``.late()`` on a window's or a join's results makes the late records a stream: the step's
last child.  Without it, late records are counted (the ``late`` metric) and dropped, with
one warning naming the operator.  A late record's type says how late it was
(:class:`Lateness`).
"""

from __future__ import annotations

import logging
from typing import ClassVar

from sluiceway.core.messages import Batch
from sluiceway.metrics.registry import OperatorMetrics
from sluiceway.operators.base import Step

__all__ = ["LateOutputStep", "Lateness"]

log = logging.getLogger("sluiceway")


class Lateness:
    """What a late record's dataclass shares: its event time, the watermark it met."""

    __slots__ = ()
    timestamp: float
    watermark: float

    @property
    def lateness(self) -> float:
        """Seconds by which the watermark had passed the record's event time."""
        return self.watermark - self.timestamp


class LateOutputStep(Step):
    """A step whose results may have a ``.late()`` side output (``late_output``).

    Subclasses gather their late records and hand each batch of them to
    :meth:`send_late`, after counting them in ``metrics.late``.
    """

    what: ClassVar[str] = "operator"
    """How the warning names the step (``"join"``, ``"window operator"``)."""

    def __init__(self, name: str, metrics: OperatorMetrics, flow: str, late_output: bool) -> None:
        super().__init__(name, metrics)
        self.flow = flow
        self.late_output = late_output
        self._outputs: tuple[list[Step], Step | None] | None = None
        self._warned = False

    def outputs(self) -> tuple[list[Step], Step | None]:
        """The children that take the results, and the one that takes late records."""
        if self._outputs is None:
            if self.late_output:
                self._outputs = (self.children[:-1], self.children[-1])
            else:
                self._outputs = (self.children, None)
        return self._outputs

    async def send_late(self, late: Batch) -> None:
        """To ``.late()``; without one, dropped (they are counted), with one warning."""
        late_child = self.outputs()[1]
        if late_child is not None:
            await late_child.push(late)
        elif not self._warned:
            self._warned = True
            log.warning(
                "%s %r in flow %r dropped late records (counted in its 'late' metric); "
                "add .late() to its results to receive them",
                self.what,
                self.name,
                self.flow,
            )
