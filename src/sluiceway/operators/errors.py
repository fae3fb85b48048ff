"""Applying an error policy at the moment user code fails."""

from __future__ import annotations

import inspect
import random
from collections.abc import Callable
from typing import Any

from sluiceway.core.contract import Sink
from sluiceway.core.messages import Batch
from sluiceway.errors import FlowFailedError, OperatorError
from sluiceway.metrics.registry import OperatorMetrics
from sluiceway.policies import DeadLetter, DeadLetterRecord, ErrorPolicy, Retry
from sluiceway.time import Clock

__all__ = ["DeadLetterWriter", "ErrorHandler"]


class DeadLetterWriter:
    """Writes dead letters to one sink; shared by every operator that names that sink."""

    def __init__(self, sink: Sink, flow: str) -> None:
        self.sink = sink
        self.flow = flow
        self.written = 0

    async def write(self, records: list[DeadLetterRecord]) -> None:
        try:
            await self.sink.write(Batch(list(records)))
        except Exception as exc:
            # A dead letter that cannot be written would be a lost record: stop loudly.
            raise FlowFailedError(
                f"dead-letter sink {self.sink.describe()!r} failed to write "
                f"{len(records)} record(s) from operator {records[0].operator!r}: "
                f"{type(exc).__name__}: {exc}",
                flow=self.flow,
                operator=records[0].operator,
            ) from exc
        self.written += len(records)


class ErrorHandler:
    """Carries out one operator's error policy.

    :meth:`recover` is called after the first failure of some records; it retries as the
    policy says and returns ``(True, result)`` when a retry succeeded, ``(False, None)``
    when the records went to the dead-letter sink, and raises
    :class:`~sluiceway.errors.OperatorError` when the policy (finally) says fail.
    """

    def __init__(
        self,
        policy: ErrorPolicy,
        *,
        flow: str,
        operator: str,
        clock: Clock,
        metrics: OperatorMetrics,
        dead_letters: dict[int, DeadLetterWriter],
        rng: random.Random,
    ) -> None:
        self.policy = policy
        self.flow = flow
        self.operator = operator
        self.clock = clock
        self.metrics = metrics
        self.rng = rng
        final = policy.then if isinstance(policy, Retry) else policy
        self._dead_letter = dead_letters[id(final.sink)] if isinstance(final, DeadLetter) else None

    async def recover(
        self, records: list[Any], exc: Exception, retry: Callable[[], Any]
    ) -> tuple[bool, Any]:
        """Handle a failure of ``records`` (usually one); ``retry()`` tries them again."""
        m = self.metrics
        m.errors += len(records)  # records, not tries: a retried record counts once
        m.failed_attempts += len(records)
        attempts = 1
        policy = self.policy
        if isinstance(policy, Retry):
            while attempts < policy.attempts and isinstance(exc, policy.retry_on):
                await self.clock.sleep(policy.backoff.delay(attempts, self.rng))
                attempts += 1
                m.retries += 1
                try:
                    result = retry()
                    if inspect.isawaitable(result):
                        result = await result
                except Exception as again:  # noqa: BLE001 - retried per policy
                    m.failed_attempts += len(records)
                    exc = again
                    continue
                return True, result
        if self._dead_letter is not None:
            now = self.clock.time()
            await self._dead_letter.write(
                [
                    DeadLetterRecord(
                        record=r,
                        error_type=type(exc).__name__,
                        error_message=str(exc),
                        operator=self.operator,
                        flow=self.flow,
                        attempts=attempts,
                        time=now,
                    )
                    for r in records
                ]
            )
            m.dead_letters += len(records)
            return False, None
        record: Any = records[0] if len(records) == 1 else records
        raise OperatorError(
            flow=self.flow, operator=self.operator, record=record, cause=exc, attempts=attempts
        ) from exc
