"""sluiceway: a stream processing engine for Python.

>>> import sluiceway as sw
>>> flow = sw.Flow("hello")
>>> out = sw.sinks.Collect()
>>> flow.source(sw.sources.Iterable(range(5))).filter(lambda x: x % 2 == 0).sink(out)
>>> _ = sw.run(flow)
>>> out.items
[0, 2, 4]
"""

from sluiceway import (
    agg,
    flowcontrol,
    joins,
    sinks,
    sources,
    state,
    testing,
    watermarks,
    windows,
)
from sluiceway.connectors.security import Sasl, Secret, Tls
from sluiceway.core.channel import Overflow
from sluiceway.core.messages import Batch
from sluiceway.errors import (
    BadInputError,
    CancelReason,
    ChannelOverflowError,
    CheckpointAuthError,
    CheckpointCorruptError,
    CheckpointError,
    CheckpointKeyError,
    CheckpointMismatchError,
    ConnectorOpenError,
    FlowCancelledError,
    FlowDefinitionError,
    FlowFailedError,
    OperatorError,
    SluicewayError,
    StateStorageError,
)
from sluiceway.flow import (
    Flow,
    JoinedStream,
    KeyedStream,
    Stream,
    WindowedStream,
    WindowResultStream,
)
from sluiceway.flowcontrol import Adaptive, CircuitBreaker, CircuitOpenError, LoadPolicy, LoadRule
from sluiceway.metrics import FlowSnapshot
from sluiceway.policies import Backoff, DeadLetter, DeadLetterRecord, ErrorPolicy, Fail, Retry
from sluiceway.runtime.checkpointing import Checkpoints
from sluiceway.runtime.executor import RunResult
from sluiceway.runtime.handle import FlowHandle, Monitor, run, run_async, start
from sluiceway.time import Clock, SystemClock, VirtualClock
from sluiceway.windows import LateRecord, WindowResult

__version__ = "0.1.0"

__all__ = [
    "Adaptive",
    "Backoff",
    "BadInputError",
    "Batch",
    "CancelReason",
    "ChannelOverflowError",
    "CheckpointAuthError",
    "CheckpointCorruptError",
    "CheckpointError",
    "CheckpointKeyError",
    "CheckpointMismatchError",
    "Checkpoints",
    "CircuitBreaker",
    "CircuitOpenError",
    "Clock",
    "ConnectorOpenError",
    "DeadLetter",
    "DeadLetterRecord",
    "ErrorPolicy",
    "Fail",
    "Flow",
    "FlowCancelledError",
    "FlowDefinitionError",
    "FlowFailedError",
    "FlowHandle",
    "FlowSnapshot",
    "JoinedStream",
    "KeyedStream",
    "LateRecord",
    "LoadPolicy",
    "LoadRule",
    "Monitor",
    "OperatorError",
    "Overflow",
    "Retry",
    "RunResult",
    "Sasl",
    "Secret",
    "SluicewayError",
    "StateStorageError",
    "Stream",
    "SystemClock",
    "Tls",
    "VirtualClock",
    "WindowResult",
    "WindowResultStream",
    "WindowedStream",
    "__version__",
    "agg",
    "flowcontrol",
    "joins",
    "run",
    "run_async",
    "sinks",
    "sources",
    "start",
    "state",
    "testing",
    "watermarks",
    "windows",
]
