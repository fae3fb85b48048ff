"""Push ingestion with admission: sources a service feeds, answered at once.

Every other source is *pulled*: the flow asks for records when it has room.  A service
that receives records (an HTTP handler, a callback from a library) cannot wait for the
flow, so :class:`Push` puts a bounded buffer between the two and answers each producer
right away:

* ``offer(record) -> bool`` (and ``offer_all(records)``, all or nothing) never waits:
  ``True`` means **accepted**, ``False`` means **rejected** -- the buffer is full, load
  shedding is on (see ``LoadPolicy``), or the source is closed/stopping.  The reason of
  the last refusal is in :attr:`Push.refusal`.
* ``await put(record, timeout=...)`` waits on the flow's clock up to ``timeout`` seconds
  for room, then answers the same way.

**The bound.**  Records accepted but not yet pulled by the flow never exceed
``capacity``: a full buffer rejects, it never grows.  The flow pulls the buffer on
credit like any source, so a slow flow fills it and producers are told to come back
later (HTTP 429 with ``Retry-After``), instead of memory growing.

**What "accepted" guarantees.**  An accepted record is in this process's memory and is
handed to the flow exactly once, in acceptance order.  A graceful stop (``handle.stop()``,
SIGINT/SIGTERM) first closes intake (later offers are rejected, the HTTP endpoint answers
503) and then drains every accepted record through the flow before the flow ends.  A
crash, or a forced stop past the grace period, loses what was still buffered (a forced
stop lists it in ``FlowCancelledError.unflushed``).  Push sources cannot resume from a
checkpoint, so a flow with checkpoints refuses them: for ingestion that must survive a
crash, have the endpoint write to a broker (Redis Streams, NATS, RabbitMQ) and read that.

:class:`HttpIngest` is a :class:`Push` that the flow's web view
(:class:`~sluiceway.metrics.web.WebView`) serves at ``POST /api/ingest/<source name>``.

>>> import asyncio, sluiceway as sw
>>> inbox = sw.sources.Push(capacity=2)
>>> [inbox.offer("a"), inbox.offer("b"), inbox.offer("c")]
[True, True, False]
>>> inbox.refusal
'full: 2 of 2 records waiting to be pulled'
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Iterable
from typing import Any, Generic, TypeVar

from sluiceway.core.contract import Source, SourceContext
from sluiceway.core.messages import Batch
from sluiceway.time import Clock, SystemClock

__all__ = ["HttpIngest", "Push"]

T = TypeVar("T")


class Push(Source, Generic[T]):
    """A source fed by the application: ``offer``/``put`` records, the flow pulls them.

    Args:
        capacity: the most records accepted and not yet pulled (>= 1).
        retry_after: seconds a rejected producer is told to wait (HTTP ``Retry-After``,
            rounded up to whole seconds there); > 0.

    Raises:
        ValueError: ``capacity`` below 1 or ``retry_after`` not > 0.
    """

    def __init__(self, capacity: int = 1000, *, retry_after: float = 1.0) -> None:
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"Push capacity must be a whole number >= 1, got {capacity!r}")
        if isinstance(retry_after, bool) or not isinstance(retry_after, int | float):
            raise ValueError(f"Push retry_after must be > 0 seconds, got {retry_after!r}")
        if not retry_after > 0:
            raise ValueError(f"Push retry_after must be > 0 seconds, got {retry_after!r}")
        self.capacity = capacity
        self.retry_after = float(retry_after)
        self._buffer: deque[T] = deque()
        self._clock: Clock = SystemClock()
        self._closed = False
        self._shedding: str | None = None
        self._readable: asyncio.Future[None] | None = None
        self._room: asyncio.Future[None] | None = None
        self.accepted = 0
        """Records accepted so far."""
        self.rejected = 0
        """Records refused so far (each record of a refused ``offer_all`` counts)."""
        self.refusal: str | None = None
        """Why the last refused offer was refused (None if none was)."""
        self.name = "push"

    # -- the producer's side ------------------------------------------------------------

    def offer(self, record: T) -> bool:
        """Accept ``record`` if admission allows it now; never waits."""
        return self.offer_all((record,))

    def offer_all(self, records: Iterable[T]) -> bool:
        """Accept every record of ``records`` or none of them; never waits.

        All or nothing, so that a producer that is refused can send the same records
        again without doubling any.
        """
        batch = list(records)
        reason = self.admission(len(batch))
        if reason is not None:
            self.rejected += len(batch)
            self.refusal = reason
            return False
        self._buffer.extend(batch)
        self.accepted += len(batch)
        _wake(self._readable)
        return True

    async def put(self, record: T, timeout: float | None = None) -> bool:  # noqa: ASYNC109 - on the flow clock
        """Accept ``record``, waiting up to ``timeout`` seconds (None: no limit) on the
        flow's clock for room; False if it was refused (closed, shedding, or no room in
        time).  Only a full buffer is waited on: shedding and a closed source refuse at
        once."""
        if timeout is not None and not timeout >= 0:
            raise ValueError(f"Push.put timeout must be >= 0 seconds or None, got {timeout!r}")
        clock = self._clock
        deadline = None if timeout is None else clock.monotonic() + timeout
        while True:
            if self.offer(record):
                return True
            if self._closed or self._shedding is not None:
                return False
            if deadline is not None and clock.monotonic() >= deadline:
                return False
            if self._room is None or self._room.done():
                self._room = asyncio.get_running_loop().create_future()
            await clock.wait_until(self._room, deadline)

    def end(self) -> None:
        """End of input: refuse further records; the flow ends once it has pulled the
        ones already accepted."""
        self._closed = True
        _wake(self._readable)
        _wake(self._room)

    # -- admission ----------------------------------------------------------------------

    def admission(self, n: int = 1) -> str | None:
        """Why ``n`` more records would be refused now, or None if they would be accepted."""
        if self._closed:
            return "closed: the source takes no more records (the flow is stopping or ended)"
        if self._shedding is not None:
            return f"shedding load: {self._shedding}"
        waiting = len(self._buffer)
        if n > self.capacity:
            return f"too many: {n} records at once, the capacity is {self.capacity}"
        if waiting + n > self.capacity:
            return f"full: {waiting} of {self.capacity} records waiting to be pulled"
        return None

    def shed(self, reason: str | None) -> None:
        """Refuse every offer with ``reason`` (a load rule's doing), or accept again with
        None.  What is already accepted is still delivered."""
        self._shedding = reason
        if reason is not None:
            _wake(self._room)  # waiting puts are refused now

    @property
    def closed(self) -> bool:
        """True once :meth:`end` was called (or a graceful stop began)."""
        return self._closed

    @property
    def waiting(self) -> int:
        """Records accepted and not yet pulled by the flow."""
        return len(self._buffer)

    # -- the flow's side -----------------------------------------------------------------

    async def open(self, ctx: SourceContext) -> None:
        self._clock = ctx.clock
        self.name = ctx.name

    async def next_batch(self, max_records: int) -> Batch | None:
        while not self._buffer:
            if self._closed:
                return None
            if self._readable is None or self._readable.done():
                self._readable = asyncio.get_running_loop().create_future()
            await self._readable  # cancellation-safe: nothing taken yet
        buf = self._buffer
        n = min(max_records, len(buf))
        values = [buf.popleft() for _ in range(n)]
        _wake(self._room)
        return Batch(values)

    def stop_intake(self) -> bool:
        """A graceful stop: refuse new records, and be drained of the accepted ones."""
        self.end()
        return True

    def backlog(self) -> int:
        return len(self._buffer)

    async def close(self) -> None:
        """The flow has ended: refuse from now on (a producer is told at once)."""
        self.end()

    def describe(self) -> str:
        return f"{type(self).__name__}(capacity={self.capacity})"


class HttpIngest(Push[Any]):
    """A :class:`Push` source that the flow's web view serves over HTTP.

    Run the flow with ``monitor=WebView(port)``; producers then ``POST`` to
    ``/api/ingest/<source name>`` a JSON array of records (or one JSON object: one
    record).  Answers:

    ========  ===========================================================================
    202       every record of the request was accepted (``{"accepted": n}``)
    400       the body is not valid JSON (the message names the line and column), or is
              a JSON value that is neither an array nor an object
    404       no ``HttpIngest`` source of that name (the answer lists them)
    413       the body is larger than ``max_body`` bytes, or holds more records than
              ``capacity``
    429       refused for now -- the buffer is full or a load rule sheds load -- with
              ``Retry-After`` (seconds); nothing of the request was accepted, send it again
    503       the flow is stopping: nothing accepted, and nothing will be
    ========  ===========================================================================

    A request is accepted all or nothing, so a refused one can be sent again as is.

    Args:
        capacity: as for :class:`Push`.
        retry_after: as for :class:`Push`.
        max_body: the largest request body read, in bytes (default 1 MiB).
    """

    def __init__(
        self, capacity: int = 1000, *, retry_after: float = 1.0, max_body: int = 1 << 20
    ) -> None:
        super().__init__(capacity, retry_after=retry_after)
        if isinstance(max_body, bool) or not isinstance(max_body, int) or max_body < 1:
            raise ValueError(f"HttpIngest max_body must be >= 1 byte, got {max_body!r}")
        self.max_body = max_body


def _wake(fut: asyncio.Future[None] | None) -> None:
    if fut is not None and not fut.done():
        fut.set_result(None)
