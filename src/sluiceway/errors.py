"""Every exception sluiceway raises, in one place.

The tree::

    SluicewayError
    ├── FlowDefinitionError        the flow is not valid; raised while building or before
    │                              anything runs (also a ValueError)
    ├── BadInputError              a source met a malformed record; names where (file:line)
    ├── FlowFailedError            a running flow stopped because of an error
    │   ├── OperatorError          user code raised under the `fail` policy; carries the record
    │   ├── ConnectorOpenError     a source or sink could not open (a missing file or
    │   │                          directory, an unreachable server, a missing table)
    │   └── ChannelOverflowError   an edge with ``overflow=Overflow.FAIL`` was full
    ├── FlowCancelledError         the flow was cancelled before it drained (grace period over,
    │                              or a second stop signal); carries what was not flushed
    │                              and why (CancelReason)
    ├── StateStorageError          on-disk keyed state could not be created, read or written
    │                              (a directory not writable, the disk full); names the path
    ├── CheckpointError            a checkpoint could not be written or restored
    │   ├── CheckpointCorruptError a stored checkpoint fails its checks (torn, truncated,
    │   │                          not a checkpoint store, a format this version can't read)
    │   ├── CheckpointAuthError    a checkpoint part is not authenticated by an available
    │   │                          key (wrong key, altered, forged, or written before
    │   │                          checkpoints were authenticated); nothing of it was loaded
    │   ├── CheckpointKeyError     the checkpoint key cannot be used (too short, a key file
    │   │                          others can read, a key inside the checkpoint directory)
    │   └── CheckpointMismatchError  the checkpoint belongs to a different flow (operators
    │                              added, removed or changed since it was taken)
    └── channel endings
        ├── EndOfStream            every writer closed and the channel is empty
        ├── ClosedResourceError    this side was already closed by us
        └── BrokenResourceError    the other side went away

    CliError                       how a ``sluiceway`` command ends: a one-line message and
                                   an exit code (not a SluicewayError: only the command line
                                   raises it, and its ``main`` prints it)

Messages quote the bad value and say where it came from, e.g.
``operator 'map_parse' failed on record {'id': 7} (ValueError: bad amount)``.
"""

from __future__ import annotations

import enum
import re
import signal
from typing import Any

__all__ = [
    "BadInputError",
    "BrokenResourceError",
    "CancelReason",
    "ChannelOverflowError",
    "CheckpointAuthError",
    "CheckpointCorruptError",
    "CheckpointError",
    "CheckpointKeyError",
    "CheckpointMismatchError",
    "CliError",
    "ClosedResourceError",
    "ConnectorOpenError",
    "EndOfStream",
    "FlowCancelledError",
    "FlowDefinitionError",
    "FlowFailedError",
    "OperatorError",
    "SluicewayError",
    "StateStorageError",
    "hide",
    "redact",
    "short_repr",
]

_REPR_LIMIT = 200


def short_repr(value: object, limit: int = _REPR_LIMIT) -> str:
    """``repr(value)`` cut to ``limit`` characters, for error messages.

    >>> short_repr("x" * 500, limit=12)
    "'xxxxxxxx..."
    """
    try:
        text = repr(value)
    except Exception as exc:  # noqa: BLE001 - a broken __repr__ must not hide the real error
        text = f"<unrepresentable {type(value).__name__}: {exc!r}>"
    if len(text) > limit:
        text = text[: max(0, limit - 3)] + "..."
    return text


# scheme://user:password@  (a password, possibly empty user: redis://:pw@host)
_URL_PASSWORD = re.compile(r"(?P<head>\b[A-Za-z][A-Za-z0-9+.-]*://[^\s:/@]*):[^\s@]*@")
# nats://token@host: NATS takes a token alone as the user part
_NATS_TOKEN = re.compile(r"(?P<head>\b(?:nats|tls)://)[^\s:/@]+@")
# password=secret or password='se cret' in a libpq keyword string
_KEYWORD_PASSWORD = re.compile(r"(?P<head>\bpassword\s*=\s*)(?:'(?:[^'\\]|\\.)*'|[^\s'\"]+)")


def redact(text: object) -> str:
    """``str(text)`` with every credential in it masked, for messages and logs.

    Every connector passes what it shows of a URL, a DSN or a client library's error
    through this one function, so a password never reaches a log line or an exception:
    one inside a URL or DSN, and every secret given to a connector as an option (see
    :func:`hide`).

    >>> redact("NATS at nats://ann:s3cret@host:4222,nats://tok3n@other unavailable")
    'NATS at nats://ann:***@host:4222,nats://***@other unavailable'
    >>> redact("redis://:pw@localhost:6379/0 and amqp://guest:guest@rabbit/")
    'redis://:***@localhost:6379/0 and amqp://guest:***@rabbit/'
    >>> redact("host=db user=ann password='a b' dbname=x")
    'host=db user=ann password=*** dbname=x'
    """
    shown = str(text)
    for value in _hidden:  # longest first: a secret that contains another is masked whole
        if value in shown:
            shown = shown.replace(value, "***")
    shown = _URL_PASSWORD.sub(r"\g<head>:***@", shown)
    shown = _NATS_TOKEN.sub(r"\g<head>***@", shown)
    return _KEYWORD_PASSWORD.sub(r"\g<head>***", shown)


class CliError(Exception):
    """An ending of the command: a one-line message, an exit code, maybe a detail line.

    Here rather than in ``cli.py`` so that the subcommands' modules
    (``sluiceway.checkpoint.cli``) raise it without importing the command that wires them.
    """

    def __init__(self, message: str, code: int, detail: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.detail = detail


# Secrets given to connectors as options (not in a URL): redact masks them wherever they
# appear.  Values shorter than this are left alone -- masking every "ab" would garble
# messages (and a password that short protects nothing).
_HIDE_MIN = 4
_hidden: list[str] = []


def hide(value: str) -> None:
    """Make :func:`redact` mask ``value`` wherever it appears from now on.

    The connectors call it for every password, token and key passphrase they are given
    as an option (``sw.Secret``), so a client library's error that quotes one is masked
    like a password in a URL.

    >>> hide("pa55-word-x")
    >>> redact("login as ann with pa55-word-x refused")
    'login as ann with *** refused'
    """
    if len(value) >= _HIDE_MIN and value not in _hidden:
        _hidden.append(value)
        _hidden.sort(key=len, reverse=True)


class SluicewayError(Exception):
    """Base class of every sluiceway exception."""


class FlowDefinitionError(SluicewayError, ValueError):
    """The flow is not valid (a dangling stream, a reused sink, a bad argument...)."""


class BadInputError(SluicewayError):
    """A source read a record it cannot decode.

    Attributes:
        where: a human-readable position, e.g. ``events.jsonl:12``.
        raw: the raw input (a line of text, a CSV row), truncated in messages only.
        reason: what was wrong with it.
    """

    def __init__(self, where: str, raw: object, reason: str) -> None:
        self.where = where
        self.raw = raw
        self.reason = reason
        super().__init__(f"bad input at {where}: {reason} (input: {short_repr(raw)})")


class FlowFailedError(SluicewayError):
    """A running flow stopped because of an error.  ``__cause__`` holds the original."""

    def __init__(self, message: str, *, flow: str, operator: str | None = None) -> None:
        self.flow = flow
        self.operator = operator
        super().__init__(message)


class OperatorError(FlowFailedError):
    """User code raised inside an operator whose error policy is ``fail``.

    Attributes:
        record: the record being processed (the full object; the message truncates it).
        attempts: how many times the operator tried it.
    """

    def __init__(
        self, *, flow: str, operator: str, record: Any, cause: BaseException, attempts: int = 1
    ) -> None:
        self.record = record
        self.attempts = attempts
        tries = f" after {attempts} attempts" if attempts > 1 else ""
        super().__init__(
            f"operator {operator!r} in flow {flow!r} failed{tries} on record "
            f"{short_repr(record)}: {type(cause).__name__}: {cause}",
            flow=flow,
            operator=operator,
        )


class ConnectorOpenError(FlowFailedError):
    """A source or sink could not open, so the flow never started.

    The message names the connector, the flow and, where it can tell, the fix; the
    connector's own exception is ``__cause__``.

    Attributes:
        kind: ``"source"``, ``"sink"`` or ``"dead-letter sink"``.
    """

    def __init__(
        self, *, flow: str, operator: str, kind: str, connector: str, cause: BaseException
    ) -> None:
        self.kind = kind
        text = " ".join(redact(cause).split()) or type(cause).__name__
        if f"'{operator}'" in text:  # the connector's message already names itself
            what = f"flow {flow!r} could not start: {text}"
        else:
            what = (
                f"{kind} {operator!r} ({connector}) of flow {flow!r} could not open: "
                f"{type(cause).__name__}: {text}"
            )
        hint = _open_hint(cause, kind)
        super().__init__(f"{what}{'; ' + hint if hint else ''}", flow=flow, operator=operator)


def _open_hint(cause: BaseException, kind: str) -> str:
    """What to do about a connector that failed to open, when the exception tells."""
    import os  # noqa: PLC0415 - only for this rare path

    filename = getattr(cause, "filename", None)
    if isinstance(cause, FileNotFoundError) and filename:
        path = os.path.abspath(os.fsdecode(filename))
        folder = os.path.dirname(path)
        if kind != "source" and not os.path.isdir(folder):
            return f"the directory {folder} does not exist: create it, or fix the path"
        return f"no file at {path}: check the path (relative paths start at {os.getcwd()})"
    if isinstance(cause, PermissionError) and filename:
        return f"check the permissions of {os.fsdecode(filename)}"
    if isinstance(cause, IsADirectoryError) and filename:
        return f"{os.fsdecode(filename)} is a directory: give a file path"
    if isinstance(cause, ConnectionError | TimeoutError) or "unreachable" in str(cause):
        return "check that the server is running and the address in the URL is right"
    return ""


class ChannelOverflowError(FlowFailedError):
    """An edge with ``overflow=Overflow.FAIL`` received more records than it could hold.

    ``incoming`` is how many records were refused (the records of the same batch that
    found room, while the reader kept up, were queued)."""

    def __init__(self, *, flow: str, edge: str, capacity: int, incoming: int) -> None:
        self.edge = edge
        self.capacity = capacity
        self.incoming = incoming
        super().__init__(
            f"channel {edge!r} in flow {flow!r} overflowed: capacity {capacity} records, "
            f"{incoming} more arrived while it was full (overflow=Overflow.FAIL); "
            "raise the capacity or choose a dropping or blocking overflow policy",
            flow=flow,
            operator=edge,
        )


class StateStorageError(SluicewayError):
    """On-disk keyed state (``sw.state.OnDisk``) could not be created, read or written:
    the message names the file or directory and the cause (not writable, disk full)."""


class CancelReason(enum.Enum):
    """Why a flow was cancelled instead of drained."""

    GRACE_PERIOD = "grace_period"
    """A graceful stop took longer than the grace period."""
    SIGNAL = "signal"
    """A second SIGINT/SIGTERM arrived while the flow was draining."""
    FORCED = "forced"
    """Code called ``FlowHandle.force_stop()``."""
    MONITOR = "monitor"
    """A monitor running beside the flow failed."""


class FlowCancelledError(SluicewayError):
    """The flow was cancelled before it had drained.

    Attributes:
        unflushed: records that were still in flight, by the channel or operator holding them.
        reason: why (:class:`CancelReason`).
        signal: the signal that forced it, when ``reason`` is ``CancelReason.SIGNAL``.
    """

    def __init__(
        self,
        message: str,
        unflushed: dict[str, int],
        *,
        reason: CancelReason = CancelReason.FORCED,
        signal: signal.Signals | None = None,
    ) -> None:
        self.unflushed = dict(unflushed)
        self.reason = reason
        self.signal = signal
        lost = ", ".join(f"{k}: {v}" for k, v in sorted(unflushed.items()) if v) or "nothing"
        super().__init__(f"{message}; not flushed: {lost}")


class EndOfStream(SluicewayError):
    """Every writer of a channel has closed and nothing is left to read."""


class ClosedResourceError(SluicewayError):
    """This end of a channel was already closed by its owner."""


class BrokenResourceError(SluicewayError):
    """The other end of a channel went away (its reader stopped)."""


class CheckpointError(SluicewayError):
    """A checkpoint could not be written, read or restored."""


class CheckpointCorruptError(CheckpointError):
    """A stored checkpoint fails its checks: torn or truncated, altered bytes, not a
    sluiceway checkpoint store, or written in a format this version cannot read."""


class CheckpointAuthError(CheckpointError):
    """A part of a checkpoint does not verify under the checkpoint keys available: signed
    with another key, altered or forged, or written without authentication by an older
    sluiceway.  Raised before anything of the checkpoint is unpickled; the message names
    the checkpoint, the operator, why, and what to do (docs/checkpoints.md, "Security")."""


class CheckpointKeyError(CheckpointError):
    """The checkpoint key cannot be used: missing, too short, in a key file that others can
    read or write, or inside the checkpoint directory.  The message names the key's
    source (never the key) and the fix."""


class CheckpointMismatchError(CheckpointError):
    """The latest checkpoint was taken by a different flow: operators were added, removed,
    renamed or changed kind since.  The message lists the differences."""
