"""A small HTTP server that lives as long as the flow it watches: the shared base of the
Prometheus exporter and the web view.

It runs on the flow's own event loop (asyncio streams, no thread), answers ``GET`` and
``HEAD`` with ``Connection: close``, and when the flow ends closes its listening socket and
every open connection, so the port is free again.

A connection is a bounded resource: one request must be read and answered within
:attr:`HttpMonitor.request_timeout` seconds of the flow's clock (an idle or trickling
client is then closed, with ``408`` if it sent nothing answerable yet), and at most
:attr:`HttpMonitor.max_connections` are open at once (the next ones get ``503`` and are
closed at once), so idle clients cannot hold file descriptors for good.  Request lines
may end in CRLF or a bare LF.  A subclass says what it serves
(:meth:`HttpMonitor._route`), may accept ``POST`` bodies (:meth:`HttpMonitor._post`,
given a ``Content-Length`` of at most :meth:`HttpMonitor._max_body` bytes, read within
the same request timeout) and may run background work beside it
(:meth:`HttpMonitor._background`).
"""

from __future__ import annotations

import asyncio
import logging
import os
from http import HTTPStatus
from typing import Any, ClassVar
from urllib.parse import urlsplit

from sluiceway.runtime.handle import FlowHandle

__all__ = ["HttpMonitor", "PostResponse", "Response"]

log = logging.getLogger("sluiceway.metrics")

Response = tuple[HTTPStatus, str, bytes]
"""Status, content type and body."""

PostResponse = tuple[HTTPStatus, str, bytes, dict[str, str]]
"""Status, content type, body and extra header lines (e.g. ``Retry-After``)."""

PLAIN = "text/plain; charset=utf-8"
_MAX_REQUEST_HEAD = 16 * 1024  # request line + headers; a scrape or a browser sends a few hundred
_MAX_PORT = 65535


class HttpMonitor:
    """A monitor serving HTTP at ``host:port`` while the flow runs (one flow at a time).

    Subclasses set :attr:`what` (for messages: ``"Prometheus metrics"``) and
    :attr:`home` (the path :attr:`url` points at), and implement :meth:`_route`.
    """

    what: ClassVar[str] = "HTTP"
    home: ClassVar[str] = "/"
    one_per_flow: ClassVar[str] = "create one per flow"
    extra_headers: ClassVar[str] = ""
    """Response header lines (each ending in CRLF) added to every answer."""
    request_timeout: float = 10.0
    """Seconds (flow clock) a connection has to send its request and take the answer."""
    max_connections: int = 64
    """Connections served at once; more are answered ``503`` and closed."""

    def __init__(self, port: int, host: str = "127.0.0.1") -> None:
        if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= _MAX_PORT:
            raise ValueError(f"port must be a whole number in 0..{_MAX_PORT}, got {port!r}")
        self.host = host
        self._port = port
        self._bound: int | None = None
        self._running = False
        self._serving = asyncio.Event()
        self._connections: set[asyncio.Task[Any]] = set()

    @property
    def port(self) -> int:
        """The port being served (the chosen one for ``port=0``), else the configured one."""
        return self._port if self._bound is None else self._bound

    @property
    def url(self) -> str:
        """``http://host:port`` and the :attr:`home` path."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}{self.home}"

    @property
    def serving(self) -> bool:
        """True while requests are answered."""
        return self._bound is not None

    async def wait_serving(self) -> int:
        """Wait until requests are answered; returns the port."""
        await self._serving.wait()
        return self.port

    async def __call__(self, handle: FlowHandle) -> None:
        if self._running:
            raise RuntimeError(
                f"this {type(self).__name__} already serves {self.url}; {self.one_per_flow}"
            )
        self._running = True  # before the first await: a second call is refused at once
        try:
            await self._serve(handle)
        finally:
            self._running = False

    # -- what a subclass provides ------------------------------------------------------

    def _start(self, handle: FlowHandle) -> None:
        """Called once before serving ``handle``'s flow."""

    def _route(
        self, handle: FlowHandle, path: str, headers: dict[str, str], query: str = ""
    ) -> Response:
        """The answer to a ``GET``/``HEAD`` of ``path`` (header names in lower case;
        ``query``: the part after ``?``, undecoded)."""
        raise NotImplementedError

    def _max_body(self, path: str) -> int | None:
        """The largest ``POST`` body accepted at ``path``, or None: no ``POST`` there."""
        return None

    def _post(
        self, handle: FlowHandle, path: str, headers: dict[str, str], body: bytes
    ) -> PostResponse:
        """The answer to a ``POST`` of ``body`` to ``path`` (see :meth:`_max_body`)."""
        raise NotImplementedError

    async def _background(self, handle: FlowHandle) -> None:
        """Work beside the server until the flow ends (default: none)."""
        await asyncio.Event().wait()

    # -- the server ----------------------------------------------------------------------

    async def _serve(self, handle: FlowHandle) -> None:
        self._start(handle)

        async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await self._serve_connection(handle, reader, writer)

        try:
            server = await asyncio.start_server(
                on_connect, self.host, self._port, limit=_MAX_REQUEST_HEAD
            )
        except OSError as exc:
            reason = os.strerror(exc.errno).lower() if exc.errno else str(exc)
            error = OSError(f"cannot serve {self.what} on {self.host}:{self._port}: {reason}")
            error.errno = exc.errno
            raise error from exc
        self._bound = int(server.sockets[0].getsockname()[1])
        self._serving.set()
        log.info("serving %s of flow %r on %s", self.what, handle.flow.name, self.url)
        ended = asyncio.ensure_future(handle.wait())
        background = asyncio.ensure_future(self._background(handle))
        try:
            await asyncio.wait({ended, background}, return_when=asyncio.FIRST_COMPLETED)
            if background.done():
                background.result()  # it never ends by itself: re-raise what broke it
        finally:
            # Everything that must happen is done before the first await: the monitor is
            # usually cancelled as the flow ends, maybe again while this cleanup waits.
            ended.cancel()
            background.cancel()
            server.close()
            connections = list(self._connections)
            self._connections.clear()
            for task in connections:
                task.cancel()
            self._bound = None
            self._serving = asyncio.Event()  # a fresh one: the next run may be another loop
            log.info("stopped serving %s of flow %r", self.what, handle.flow.name)
            closing = asyncio.ensure_future(_closed(server, [ended, background, *connections]))
            try:
                await asyncio.shield(closing)
            except asyncio.CancelledError:
                await closing  # quick: every task in it is cancelled already
                raise

    async def _serve_connection(
        self, handle: FlowHandle, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        assert task is not None
        if len(self._connections) >= self.max_connections:
            log.debug("%s: %d connections open, refusing one more", self.what, self.max_connections)
            self._answer(writer, _busy(self.max_connections), b"GET")
            writer.close()
            return
        self._connections.add(task)
        clock = handle.clock
        expired = False
        answered = False

        def expire() -> None:
            nonlocal expired
            expired = True
            task.cancel()

        timer = clock.call_at(clock.monotonic() + self.request_timeout, expire)
        try:
            lines = await _read_head(reader)
            if lines is None:
                return  # the client left, or sent no HTTP request we can read
            if lines:
                method = lines[0].partition(" ")[0].encode("latin-1")
                status, content_type, body, extra = await self._respond(handle, lines, reader)
                answered = True
                self._answer(writer, (status, content_type, body), method, extra)
            else:
                answered = True
                self._answer(writer, _TOO_LARGE, b"GET")
            await writer.drain()
        except asyncio.CancelledError:
            if not expired or task.uncancel() > 0:
                raise  # the flow ended (perhaps as well)
            # our own deadline: close this one connection, nothing else
            log.debug("%s: closed a connection after %gs", self.what, self.request_timeout)
            if not answered:
                self._answer(writer, _TIMED_OUT, b"GET")
        except ConnectionError:
            return  # the client left mid-response: nothing to tell it
        finally:
            timer.cancel()
            writer.close()
            self._connections.discard(task)

    def _answer(
        self,
        writer: asyncio.StreamWriter,
        answer: Response,
        method: bytes,
        extra: dict[str, str] | None = None,
    ) -> None:
        status, content_type, body = answer
        extra_lines = "".join(f"{k}: {v}\r\n" for k, v in (extra or {}).items())
        writer.write(
            (
                f"HTTP/1.1 {status.value} {status.phrase}\r\n"
                f"Content-Type: {content_type}\r\n"
                f"Content-Length: {len(body)}\r\n"
                f"{self.extra_headers}"
                f"{extra_lines}"
                "Connection: close\r\n\r\n"
            ).encode("latin-1")
        )
        if method != b"HEAD":
            writer.write(body)

    async def _respond(
        self, handle: FlowHandle, lines: list[str], reader: asyncio.StreamReader
    ) -> PostResponse:
        """Route one request (``lines``: the request line and the header lines), reading a
        ``POST`` body from ``reader`` first."""
        parts = lines[0].split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/"):  # method, target, version
            return HTTPStatus.BAD_REQUEST, PLAIN, b"bad request line\n", {}
        method, target, _ = parts
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if sep:
                headers[name.strip().lower()] = value.strip()
        split = urlsplit(target)
        path = split.path
        limit = self._max_body(path)
        if method == "POST" and limit is not None:
            body = await _read_body(headers, reader, limit)
            if isinstance(body, tuple):
                return body
            try:
                return self._post(handle, path, headers, body)
            except Exception as exc:  # a failed request must not stop the flow: answer 500
                log.exception("answering %s %s failed", method, target)
                return _failed(exc)
        if method not in ("GET", "HEAD"):
            allowed = "GET, HEAD" + (", POST" if limit is not None else "")
            return (
                HTTPStatus.METHOD_NOT_ALLOWED,
                PLAIN,
                f"only {allowed} at {path}\n".encode(),
                {"Allow": allowed},
            )
        try:
            status, content_type, data = self._route(handle, path, headers, split.query)
        except Exception as exc:  # a failed request must not stop the flow: answer 500
            log.exception("answering %s %s failed", method, target)
            return _failed(exc)
        return status, content_type, data, {}


def _failed(exc: Exception) -> PostResponse:
    return HTTPStatus.INTERNAL_SERVER_ERROR, PLAIN, f"failed: {exc!r}\n".encode(), {}


_TIMED_OUT: Response = (HTTPStatus.REQUEST_TIMEOUT, PLAIN, b"no complete request in time\n")
_TOO_LARGE: Response = (
    HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE,
    PLAIN,
    f"request head over {_MAX_REQUEST_HEAD} bytes\n".encode(),
)


def _busy(limit: int) -> Response:
    return HTTPStatus.SERVICE_UNAVAILABLE, PLAIN, f"more than {limit} connections\n".encode()


async def _read_head(reader: asyncio.StreamReader) -> list[str] | None:
    """The request line and header lines (CRLF or bare LF endings, RFC 9112 2.2);
    None if the client left first; ``[]`` for a head too large to read."""
    lines: list[str] = []
    size = 0
    while True:
        try:
            line = await reader.readline()
        except ValueError:  # one line longer than the stream's limit
            return []
        except ConnectionError:
            return None
        if not line.endswith(b"\n"):
            return None  # end of input before the end of the head
        size += len(line)
        if size > _MAX_REQUEST_HEAD:
            return []
        text = line.rstrip(b"\r\n").decode("latin-1")
        if not text:
            if lines:
                return lines
            continue  # empty lines before the request line are allowed (RFC 9112 2.2)
        lines.append(text)


async def _read_body(
    headers: dict[str, str], reader: asyncio.StreamReader, limit: int
) -> bytes | PostResponse:
    """The body of a ``POST`` (``Content-Length`` bytes, at most ``limit``), or the answer
    that refuses it."""
    if "chunked" in headers.get("transfer-encoding", "").lower():
        return (
            HTTPStatus.LENGTH_REQUIRED,
            PLAIN,
            b"send the body with a Content-Length, not chunked\n",
            {},
        )
    raw = headers.get("content-length")
    if raw is None:
        return HTTPStatus.LENGTH_REQUIRED, PLAIN, b"a POST needs a Content-Length header\n", {}
    if not raw.isdigit():
        message = f"Content-Length must be a whole number of bytes, got {raw!r}\n"
        return HTTPStatus.BAD_REQUEST, PLAIN, message.encode(), {}
    length = int(raw)
    if length > limit:
        message = f"the body is {length} bytes; at most {limit} are accepted here\n"
        return HTTPStatus.REQUEST_ENTITY_TOO_LARGE, PLAIN, message.encode(), {}
    try:
        return await reader.readexactly(length)
    except asyncio.IncompleteReadError as exc:
        message = f"the body ended after {len(exc.partial)} of {length} bytes\n"
        return HTTPStatus.BAD_REQUEST, PLAIN, message.encode(), {}


async def _closed(server: asyncio.Server, tasks: list[asyncio.Future[Any]]) -> None:
    """Wait for cancelled ``tasks`` and a closed ``server`` to finish."""
    await asyncio.gather(*tasks, return_exceptions=True)
    await server.wait_closed()
