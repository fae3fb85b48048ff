"""TLS and credentials for the broker connectors: one small vocabulary for all of them.

Every broker connector takes the same shapes, and passes them to its client library
(nothing here speaks a protocol):

* :class:`Tls` -- ``Tls(ca=, cert=, key=, key_password=, verify=True, server_name=None)``:
  which CA to trust (default: the system's), a client certificate, whether to check the
  server's certificate and name.  ``tls=True`` means ``Tls()``.
* :class:`Secret` -- a password or token: ``Secret("pw")``, ``Secret.env("NAME")`` or
  ``Secret.file("/run/secrets/pw")``, read when the connector connects.  Its ``repr``
  never shows the value, and once read, :func:`sluiceway.errors.redact` masks the value
  in every log line and error message.  Wherever a connector takes a password, a plain
  ``str`` is accepted too (it becomes a ``Secret``).
* :class:`Sasl` -- Kafka's SASL login (PLAIN, SCRAM-SHA-256, SCRAM-SHA-512).

>>> Secret("hunter22")
Secret('***')
>>> Secret.env("REDIS_PASSWORD")
Secret.env('REDIS_PASSWORD')
>>> Tls(ca="ca.pem", verify=True)
Tls(ca='ca.pem')
"""

from __future__ import annotations

import errno
import os
import re
import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from sluiceway.errors import hide, redact

__all__ = [
    "Sasl",
    "Secret",
    "SecretLike",
    "Tls",
    "TlsLike",
    "auth_refused",
    "secret",
    "tls_failure",
    "tls_option",
]

StrPath = str | os.PathLike[str]


class Secret:
    """A password, token or key passphrase that is never shown.

    ``Secret(value)`` holds it in the flow's code; ``Secret.env(name)`` reads an
    environment variable and ``Secret.file(path)`` a file (one trailing newline
    dropped), each time the connector connects -- so a rotated file is picked up at the
    next connection.  ``repr`` and ``str`` show where it comes from, never the value.

    >>> s = Secret.file("/run/secrets/pg")
    >>> s
    Secret.file('/run/secrets/pg')
    >>> f"{Secret('pw-1234')}"
    "Secret('***')"
    """

    __slots__ = ("_env", "_file", "_value")

    def __init__(self, value: str) -> None:
        if not isinstance(value, str):
            raise TypeError(f"Secret value must be a str, got {type(value).__name__}")
        self._value: str | None = value
        self._env: str | None = None
        self._file: Path | None = None

    @classmethod
    def env(cls, name: str) -> Secret:
        """The value of the environment variable ``name``, read at each connection."""
        if not (isinstance(name, str) and name):
            raise ValueError(f"Secret.env needs a variable name, got {name!r}")
        s = cls("")
        s._value, s._env = None, name
        return s

    @classmethod
    def file(cls, path: StrPath) -> Secret:
        """The content of the file at ``path`` (one trailing newline dropped), read at
        each connection."""
        if not isinstance(path, str | os.PathLike) or not os.fspath(path):
            raise ValueError(f"Secret.file needs a path, got {path!r}")
        s = cls("")
        s._value, s._file = None, Path(path)
        return s

    def reveal(self, what: str = "secret") -> str:
        """The value, read now; from then on :func:`~sluiceway.errors.redact` masks it.

        Raises:
            LookupError: the environment variable is not set (names it and ``what``).
            FileNotFoundError / PermissionError: the file cannot be read (names it).
        """
        if self._env is not None:
            value = os.environ.get(self._env)
            if value is None:
                raise LookupError(
                    f"{what}: the environment variable {self._env} is not set "
                    f"(the connector reads its secret from it: set it, or pass another Secret)"
                )
        elif self._file is not None:
            try:
                value = self._file.read_text(encoding="utf-8")
            except OSError as exc:
                raise type(exc)(
                    exc.errno,
                    f"{what}: cannot read the secret file {self._file} ({exc.strerror})",
                    str(self._file),
                ) from None
            value = value.removesuffix("\n").removesuffix("\r")
        else:
            assert self._value is not None
            value = self._value
        hide(value)
        return value

    def __repr__(self) -> str:
        if self._env is not None:
            return f"Secret.env({self._env!r})"
        if self._file is not None:
            return f"Secret.file({str(self._file)!r})"
        return "Secret('***')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Secret):
            return NotImplemented
        return (self._value, self._env, self._file) == (other._value, other._env, other._file)

    def __hash__(self) -> int:
        return hash((self._value, self._env, self._file))


SecretLike = Secret | str


def secret(value: SecretLike | None, what: str) -> Secret | None:
    """``value`` as a :class:`Secret` (a ``str`` is wrapped); ValueError otherwise."""
    if value is None or isinstance(value, Secret):
        return value
    if isinstance(value, str):
        hide(value)  # given in the code: mask it from now on, whatever shows it
        return Secret(value)
    raise TypeError(
        f"{what} must be a str, a Secret (Secret.env('NAME'), Secret.file(path)) or None, "
        f"got {type(value).__name__}"
    )


def _path(value: object, what: str) -> Path | None:
    if value is None:
        return None
    if isinstance(value, str | os.PathLike) and os.fspath(value):
        return Path(value)
    raise TypeError(f"{what} must be a file path or None, got {value!r}")


@dataclass(frozen=True, slots=True)
class Tls:
    """How a connector speaks TLS to its server.

    Args:
        ca: a PEM file of the CA certificates to trust; None: the system's trust store.
        cert: a PEM file with this client's certificate (mutual TLS), optionally
            followed by its key.
        key: the client's private key, when not in ``cert``.
        key_password: the passphrase of an encrypted ``key``.
        verify: check the server's certificate and its name (default).  ``False``
            still encrypts but trusts any server: for tests only.
        server_name: the name the server's certificate must carry, when it differs from
            the host connected to (NATS only; other clients check the host they
            connect to, and refuse this option).

    Files are checked when the connector opens: a missing one fails the flow's start
    naming the file.

    >>> Tls(ca="/etc/ssl/our-ca.pem", cert="client.pem", key="client.key")
    Tls(ca='/etc/ssl/our-ca.pem', cert='client.pem', key='client.key')
    """

    ca: StrPath | None = None
    cert: StrPath | None = None
    key: StrPath | None = None
    key_password: SecretLike | None = field(default=None, repr=False)
    verify: bool = True
    server_name: str | None = None

    def __post_init__(self) -> None:
        for name in ("ca", "cert", "key"):
            _path(getattr(self, name), f"Tls {name}")
        if self.key is not None and self.cert is None:
            raise ValueError("Tls key= needs cert= (the client certificate it belongs to)")
        if not isinstance(self.verify, bool):
            raise TypeError(f"Tls verify must be True or False, got {self.verify!r}")
        if self.server_name is not None and not (
            isinstance(self.server_name, str) and self.server_name
        ):
            raise ValueError(f"Tls server_name must be a host name, got {self.server_name!r}")
        object.__setattr__(self, "key_password", secret(self.key_password, "Tls key_password"))

    def __repr__(self) -> str:
        shown = [
            f"{name}={str(getattr(self, name))!r}"
            for name in ("ca", "cert", "key")
            if getattr(self, name) is not None
        ]
        if self.key_password is not None:
            shown.append(f"key_password={self.key_password!r}")
        if not self.verify:
            shown.append("verify=False")
        if self.server_name is not None:
            shown.append(f"server_name={self.server_name!r}")
        return f"Tls({', '.join(shown)})"

    def files(self, what: str) -> tuple[str | None, str | None, str | None]:
        """``(ca, cert, key)`` as absolute paths, each checked to be a readable file.

        Raises:
            FileNotFoundError: a file is missing (the message names which and where).
        """
        out: list[str | None] = []
        for name in ("ca", "cert", "key"):
            path = _path(getattr(self, name), f"{what} tls {name}")
            if path is None:
                out.append(None)
                continue
            if not path.is_file():
                raise FileNotFoundError(
                    errno.ENOENT,
                    f"{what}: the TLS {name} file {str(path)!r} does not exist"
                    + ("" if path.is_absolute() else f" (relative to {os.getcwd()})"),
                    str(path),
                )
            out.append(str(path.resolve()))
        return out[0], out[1], out[2]

    def password(self, what: str) -> str | None:
        """The key passphrase, read now (see :meth:`Secret.reveal`)."""
        pw = self.key_password
        assert not isinstance(pw, str)  # __post_init__ made it a Secret
        return None if pw is None else pw.reveal(f"{what} tls key_password")

    def context(self, what: str, factory: type[ssl.SSLContext] = ssl.SSLContext) -> ssl.SSLContext:
        """An :class:`ssl.SSLContext` for a client: the CA (or the system's), the client
        certificate, and the checks ``verify`` asks for.

        ``factory`` is the context's class (a subclass of :class:`ssl.SSLContext`).

        Raises:
            FileNotFoundError: a file is missing.
            ssl.SSLError: a file is not a certificate or key (the message names it).
        """
        ca, cert, key = self.files(what)
        # what ssl.create_default_context(SERVER_AUTH) makes, of the class asked for
        ctx = factory(ssl.PROTOCOL_TLS_CLIENT)  # checks the certificate and the host name
        if ca is None:
            ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
        else:
            try:
                ctx.load_verify_locations(cafile=ca)
            except ssl.SSLError as exc:
                raise ssl.SSLError(
                    exc.errno, f"{what}: the TLS ca file {ca} holds no usable certificate: {exc}"
                ) from None
        if cert is not None:
            try:
                ctx.load_cert_chain(cert, key, self.password(what))
            except ssl.SSLError as exc:
                raise ssl.SSLError(
                    exc.errno,
                    f"{what}: cannot load the TLS client certificate {cert}"
                    f"{'' if key is None else ' / key ' + key}: {redact(exc)}",
                ) from None
        if not self.verify:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        return ctx

    def no_server_name(self, what: str) -> None:
        """Refuse ``server_name`` for a client library that cannot set it."""
        if self.server_name is not None:
            raise ValueError(
                f"{what}: Tls(server_name=...) is not supported by this connector's client "
                "library: connect to the host name the server's certificate carries instead"
            )


TlsLike = Tls | bool | None


def tls_option(value: TlsLike, what: str) -> Tls | None:
    """``tls=`` as given to a connector: True -> ``Tls()``, False/None -> None."""
    if value is None or value is False:
        return None
    if value is True:
        return Tls()
    if isinstance(value, Tls):
        return value
    raise TypeError(f"{what} tls must be a sw.Tls(...), True or None, got {value!r}")


@dataclass(frozen=True, slots=True)
class Sasl:
    """A SASL login (Kafka): ``Sasl("SCRAM-SHA-256", "alice", Secret.env("KAFKA_PW"))``.

    >>> Sasl("PLAIN", "alice", "pw-5678")
    Sasl(mechanism='PLAIN', username='alice', password=Secret('***'))
    """

    mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"]
    username: str
    password: SecretLike

    def __post_init__(self) -> None:
        if self.mechanism not in ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"):
            raise ValueError(
                "Sasl mechanism must be 'PLAIN', 'SCRAM-SHA-256' or 'SCRAM-SHA-512', "
                f"got {self.mechanism!r}"
            )
        if not (isinstance(self.username, str) and self.username):
            raise ValueError(f"Sasl username must be a non-empty str, got {self.username!r}")
        object.__setattr__(self, "password", secret(self.password, "Sasl password"))


# -- telling a refused login or a failed handshake from an outage ------------------------

# What a client library says when the handshake itself failed (libpq and librdkafka give
# text, not ssl exceptions).  Not a TLS connection cut mid-stream: that is an outage.
_TLS_TEXT = re.compile(
    r"certificate verify failed|tlsv1 alert|sslv3 alert|wrong version number|"
    r"server does not support SSL|handshake failure|unknown ca|bad certificate",
    re.IGNORECASE,
)
# ssl errors of a connection that was cut, not refused
_CUT = (
    ssl.SSLEOFError,
    ssl.SSLZeroReturnError,
    ssl.SSLSyscallError,
    ssl.SSLWantReadError,
    ssl.SSLWantWriteError,
)


def tls_failure(exc: BaseException | None) -> bool:
    """True when ``exc`` (or what caused it) is a failed TLS handshake: an untrusted or
    misnamed certificate, a plaintext server, a refused client certificate.  Trying
    again cannot help, so connectors fail at once instead of backing off."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, ssl.SSLError | ssl.CertificateError) and not isinstance(exc, _CUT):
            return True
        if _TLS_TEXT.search(str(exc)):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


_AUTH_TEXT = re.compile(
    r"authentication failed|authorization violation|WRONGPASS|invalid username-password|"
    r"NOAUTH|not authori[sz]ed|bad user ?name or password|ACCESS_REFUSED|"
    r"password authentication failed|Authentication failure",
    re.IGNORECASE,
)


def auth_refused(exc: BaseException | None) -> bool:
    """True when ``exc`` (or what caused it) says the server refused the credentials."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if _AUTH_TEXT.search(str(exc)):
            return True
        exc = exc.__cause__ or exc.__context__
    return False
