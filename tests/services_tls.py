"""Private servers with TLS and authentication, and a throwaway CA, for the security tests.

The rules of ``services.py`` hold: these servers are our own, on free ports, in
temporary directories, stopped (by their own PID) and removed at the end of the session;
the shared servers on the default ports are never touched.  One CA and one server per
kind serve the whole session (``tls_certs``, ``tls_redis``, ``tls_nats``,
``tls_mosquitto``, ``tls_postgres``).  Without the ``openssl`` CLI or a server binary a
test is skipped naming what is missing (a failure under ``SLUICEWAY_REQUIRE_SERVICES=1``).

Certificates: one CA signs a server certificate for ``localhost`` and ``127.0.0.1`` and
a client certificate; a second CA (``other_ca``) signs nothing the servers use, so a
client that trusts only it must refuse every server here.
"""

from __future__ import annotations

import contextlib
import getpass
import os
import pwd
import shutil
import socket
import ssl
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import pytest

from services import ServerProcess, find_binary, free_port, service_missing
from services_mqtt import MOSQUITTO_PATHS
from services_nats import NATS_SERVER_PATHS, nats_info
from services_postgres import PostgresServer
from services_rabbitmq import RabbitMQServer, _server_script

__all__ = [
    "PASSWORD",
    "USER",
    "Certs",
    "TlsKafka",
    "TlsMosquitto",
    "TlsNats",
    "TlsNatsNkey",
    "TlsNatsToken",
    "TlsPostgres",
    "TlsRabbitMQ",
    "TlsRedis",
    "tls_certs",
    "tls_kafka",
    "tls_mosquitto",
    "tls_nats",
    "tls_nats_nkey",
    "tls_nats_token",
    "tls_postgres",
    "tls_rabbitmq",
    "tls_redis",
]

USER = "alice"
PASSWORD = "tls-test-pw-7f3a9c"  # distinctive: the tests look for it in logs and errors

S = TypeVar("S", bound=ServerProcess)


@dataclass(frozen=True)
class Certs:
    """PEM files of the session's throwaway PKI."""

    dir: Path
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path


def _openssl(*args: str, cwd: Path) -> None:
    proc = subprocess.run(
        ["openssl", *args], cwd=cwd, capture_output=True, text=True, timeout=60, check=False
    )
    if proc.returncode != 0:
        raise RuntimeError(f"openssl {' '.join(args)} failed:\n{proc.stderr}")


def make_certs(where: Path) -> Certs:
    """A CA, a server and a client certificate signed by it, and an unrelated CA."""
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    for ca in ("ca", "other-ca"):
        _openssl(
            "req", "-x509", *ec, "-keyout", f"{ca}.key", "-out", f"{ca}.pem", "-days", "2",
            "-subj", f"/CN=sluiceway test {ca}", cwd=where,
        )  # fmt: skip
    (where / "server.ext").write_text(
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n"
    )
    (where / "client.ext").write_text("extendedKeyUsage=clientAuth\n")
    for name in ("server", "client"):
        _openssl(
            "req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr",
            "-subj", f"/CN={'localhost' if name == 'server' else USER}", cwd=where,
        )  # fmt: skip
        _openssl(
            "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-CAcreateserial", "-out", f"{name}.pem", "-days", "2",
            "-extfile", f"{name}.ext", cwd=where,
        )  # fmt: skip
    for key in where.glob("*.key"):
        key.chmod(0o600)
    return Certs(
        dir=where,
        ca=where / "ca.pem",
        server_cert=where / "server.pem",
        server_key=where / "server.key",
        client_cert=where / "client.pem",
        client_key=where / "client.key",
        other_ca=where / "other-ca.pem",
    )


def _tls_exchange(port: int, ca: Path, hello: bytes, timeout: float = 0.5) -> bytes | None:
    """Connect over TLS trusting ``ca``, send ``hello``, return the first reply bytes."""
    ctx = ssl.create_default_context(cafile=str(ca))
    try:
        with (
            socket.create_connection(("127.0.0.1", port), timeout=timeout) as raw,
            ctx.wrap_socket(raw, server_hostname="127.0.0.1") as s,
        ):
            s.sendall(hello)
            return s.recv(64)
    except OSError:
        return None


# -- Redis -----------------------------------------------------------------------------


class TlsRedis(ServerProcess):
    """``redis-server`` with only a TLS port, the default user off and one ACL user."""

    name = "redis-server"
    paths = ("redis-server", "/usr/bin/redis-server", "/usr/local/bin/redis-server")
    log_name = "redis.log"
    certs: Certs

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def command(self) -> list[str]:
        c = self.certs
        conf = self.dir / "redis.conf"
        conf.write_text(
            "port 0\n"
            f"tls-port {self.port}\n"
            "bind 127.0.0.1\n"
            f"tls-cert-file {c.server_cert}\n"
            f"tls-key-file {c.server_key}\n"
            f"tls-ca-cert-file {c.ca}\n"
            "tls-auth-clients optional\n"
            "user default off\n"
            f"user {USER} on >{PASSWORD} ~* &* +@all\n"
            "save ''\nappendonly no\n"
            f'dir "{self.dir}"\n'
            f'logfile "{self.dir / self.log_name}"\n',
            encoding="utf-8",
        )
        return [self.binary, str(conf)]

    def answers(self) -> bool:
        reply = _tls_exchange(self.port, self.certs.ca, b"*1\r\n$4\r\nPING\r\n", timeout=0.2)
        return reply is not None and reply[:1] in (b"+", b"-")


# -- NATS ------------------------------------------------------------------------------


class TlsNats(ServerProcess):
    """``nats-server`` with JetStream, TLS required and one user with a password."""

    name = "nats-server"
    paths = NATS_SERVER_PATHS
    log_name = "nats.log"
    certs: Certs

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def authorization(self) -> str:
        """The server's ``authorization`` block: who may log in, and how."""
        return f'users: [ {{ user: "{USER}", password: "{PASSWORD}" }} ]'

    def command(self) -> list[str]:
        c = self.certs
        conf = self.dir / "nats.conf"
        conf.write_text(
            f"listen: 127.0.0.1:{self.port}\n"
            f'jetstream {{ store_dir: "{self.dir / "store"}" }}\n'
            f'tls {{ cert_file: "{c.server_cert}", key_file: "{c.server_key}", '
            f'ca_file: "{c.ca}", timeout: 2 }}\n'
            f"authorization {{ {self.authorization()} }}\n",
            encoding="utf-8",
        )
        return [self.binary, "-c", str(conf), "-l", str(self.dir / self.log_name)]

    def answers(self) -> bool:
        info = nats_info("127.0.0.1", self.port, timeout=0.2)
        return info is not None and bool(info.get("tls_required"))


class TlsNatsToken(TlsNats):
    """``nats-server`` with JetStream, TLS required and a token login (``PASSWORD``)."""

    def authorization(self) -> str:
        return f'token: "{PASSWORD}"'


class TlsNatsNkey(TlsNats):
    """``nats-server`` with JetStream, TLS required and one NKEY user (``seed_file``)."""

    seed_file: Path
    public_key: str

    def authorization(self) -> str:
        import nkeys  # noqa: PLC0415 - the fixture skips without it

        seed = nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER)
        self.public_key = nkeys.from_seed(bytearray(seed)).public_key.decode()
        self.seed_file = self.certs.dir / "user.nk"
        self.seed_file.write_bytes(seed)
        self.seed_file.chmod(0o600)
        return f'users: [ {{ nkey: "{self.public_key}" }} ]'


# -- Mosquitto ---------------------------------------------------------------------------


class TlsMosquitto(ServerProcess):
    """``mosquitto`` with one TLS listener and a password file (no anonymous clients)."""

    name = "mosquitto"
    paths = MOSQUITTO_PATHS
    log_name = "mosquitto.log"
    certs: Certs

    def command(self) -> list[str]:
        c = self.certs
        passwd = self.dir / "passwd"
        passwd.write_text("")
        tool = shutil.which("mosquitto_passwd")
        if tool is None:
            raise RuntimeError("no mosquitto_passwd binary to write the password file")
        subprocess.run([tool, "-b", str(passwd), USER, PASSWORD], check=True, timeout=30)
        root = os.geteuid() == 0
        if root:  # mosquitto drops to the user named below, which must read these
            pw = pwd.getpwnam(getpass.getuser())
            os.chown(passwd, pw.pw_uid, pw.pw_gid)
        passwd.chmod(0o600)
        conf = self.dir / "mosquitto.conf"
        conf.write_text(
            f"listener {self.port} 127.0.0.1\n"
            f"cafile {c.ca}\ncertfile {c.server_cert}\nkeyfile {c.server_key}\n"
            "allow_anonymous false\n"
            f"password_file {passwd}\n"
            f"log_dest file {self.dir}/{self.log_name}\n"
            + (f"user {getpass.getuser()}\n" if root else ""),
            encoding="utf-8",
        )
        return [self.binary, "-c", str(conf)]

    def answers(self) -> bool:
        connect = bytes([0x10, 12, 0, 4]) + b"MQTT" + bytes([4, 2, 0, 5, 0, 0])
        reply = _tls_exchange(self.port, self.certs.ca, connect, timeout=0.2)
        return reply is not None and reply[:1] == b"\x20"  # a CONNACK (refused, but there)


# -- PostgreSQL --------------------------------------------------------------------------


class TlsPostgres(PostgresServer):
    """A private cluster with ``ssl=on``: TCP only over TLS with a password (scram),
    plaintext TCP rejected; the unix socket (trust) sets the password."""

    certs: Certs

    def configure(self, certs: Certs) -> None:
        self.certs = certs
        own = self.data / "tls"
        own.mkdir()
        for src, name in ((certs.server_cert, "server.pem"), (certs.server_key, "server.key")):
            shutil.copy(src, own / name)
        (own / "server.key").chmod(0o600)
        if self._user is not None:  # the key must belong to the server's user
            pw = pwd.getpwnam(self._user)
            for p in (own, own / "server.pem", own / "server.key"):
                os.chown(p, pw.pw_uid, pw.pw_gid)
        with (self.data / "postgresql.conf").open("a", encoding="utf-8") as f:
            f.write(
                "ssl = on\n"
                f"ssl_cert_file = '{own / 'server.pem'}'\n"
                f"ssl_key_file = '{own / 'server.key'}'\n"
                "password_encryption = 'scram-sha-256'\n"
            )
        (self.data / "pg_hba.conf").write_text(
            "local all all trust\n"
            "hostssl all all 127.0.0.1/32 scram-sha-256\n"
            "hostnossl all all 127.0.0.1/32 reject\n",
            encoding="utf-8",
        )

    @property
    def socket_dir(self) -> Path:
        """The directory of the server's unix socket (trust: no password, no TLS)."""
        return self._dir

    @property
    def host_dsn(self) -> str:
        """TCP, no password, no TLS options: the tests add them."""
        return f"host=127.0.0.1 port={self.port} user={USER} dbname=postgres"

    def set_password(self) -> None:
        import psycopg  # noqa: PLC0415 - only these tests need it

        with psycopg.connect(
            host=str(self.socket_dir), port=self.port, user="postgres", dbname="postgres",
            autocommit=True,
        ) as conn:  # fmt: skip
            conn.execute(f"CREATE ROLE {USER} LOGIN SUPERUSER PASSWORD '{PASSWORD}'")


# -- RabbitMQ ----------------------------------------------------------------------------


class TlsRabbitMQ(RabbitMQServer):
    """A private node with an AMQPS listener on :attr:`tls_port` (client certificates
    checked when sent) and one user, ``alice`` (no ``guest``); its plaintext port only
    tells the harness the node is up."""

    def __init__(self, script: str, certs: Certs) -> None:
        super().__init__(script)
        self.tls_port = free_port()
        with (self._dir / "rabbitmq.conf").open("a", encoding="utf-8") as f:
            f.write(
                f"listeners.ssl.default = 127.0.0.1:{self.tls_port}\n"
                f"ssl_options.cacertfile = {certs.ca}\n"
                f"ssl_options.certfile = {certs.server_cert}\n"
                f"ssl_options.keyfile = {certs.server_key}\n"
                "ssl_options.verify = verify_peer\n"
                "ssl_options.fail_if_no_peer_cert = false\n"
                f"default_user = {USER}\n"
                f"default_pass = {PASSWORD}\n"
            )

    @property
    def tls_url(self) -> str:
        """``amqp://`` on the TLS port, no login: the tests add ``tls=`` and the login."""
        return f"amqp://127.0.0.1:{self.tls_port}/"

    def start(self, timeout: float = 60.0) -> None:
        super().start(timeout)
        for _ in range(100):  # the TLS listener comes up with the TCP one, or just after
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.tls_port), timeout=0.2),
            ):
                return
            time.sleep(0.05)
        raise RuntimeError(f"RabbitMQ's TLS listener on {self.tls_port} did not open")


# -- Kafka -------------------------------------------------------------------------------


class TlsKafka:
    """A private KRaft broker with a ``SASL_SSL`` listener on :attr:`tls_port` (PLAIN
    and SCRAM-SHA-256 logins for ``alice``, client certificates checked when sent); its
    PLAINTEXT port only tells the harness the broker is up."""

    def __init__(self, certs: Certs) -> None:
        from services_kafka import kb  # noqa: PLC0415 - only these tests need the script

        self.dir = Path(tempfile.mkdtemp(prefix="sluiceway-kafka-tls-"))
        self.port, self.tls_port = free_port(), free_port()
        keystore = self.dir / "server-keystore.pem"
        keystore.write_text(certs.server_key.read_text() + certs.server_cert.read_text())
        keystore.chmod(0o600)
        tls_port = self.tls_port

        class Broker(kb.Broker):  # type: ignore[misc,name-defined]
            def format(self) -> None:
                host = kb.HOST
                conf = kb.server_properties(self.data, self.port, self.controller_port)
                conf = (
                    conf.replace(
                        f"listeners=PLAINTEXT://{host}:{self.port},",
                        f"listeners=PLAINTEXT://{host}:{self.port},SASL_SSL://{host}:{tls_port},",
                    )
                    .replace(
                        f"advertised.listeners=PLAINTEXT://{host}:{self.port}",
                        f"advertised.listeners=PLAINTEXT://{host}:{self.port},"
                        f"SASL_SSL://{host}:{tls_port}",
                    )
                    .replace(
                        "listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
                        "listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT,"
                        "SASL_SSL:SASL_SSL",
                    )
                )
                assert f"SASL_SSL://{host}:{tls_port}" in conf, "kafka-broker's config changed"
                conf += (
                    "sasl.enabled.mechanisms=PLAIN,SCRAM-SHA-256\n"
                    "listener.name.sasl_ssl.plain.sasl.jaas.config="
                    "org.apache.kafka.common.security.plain.PlainLoginModule required "
                    f'user_{USER}="{PASSWORD}";\n'
                    "listener.name.sasl_ssl.scram-sha-256.sasl.jaas.config="
                    "org.apache.kafka.common.security.scram.ScramLoginModule required;\n"
                    "ssl.keystore.type=PEM\n"
                    f"ssl.keystore.location={keystore}\n"
                    "ssl.truststore.type=PEM\n"
                    f"ssl.truststore.location={certs.ca}\n"
                    "ssl.client.auth=requested\n"
                )
                self.data.mkdir(parents=True, exist_ok=True)
                self.config.write_text(conf, encoding="utf-8")
                cluster = kb.new_cluster_id()
                scram = f"SCRAM-SHA-256=[name={USER},password={PASSWORD}]"
                subprocess.run(
                    [*self._java(), kb.STORAGE_TOOL, "format", "-t", cluster,
                     "-c", str(self.config), "--add-scram", scram],
                    capture_output=True, text=True, check=True, timeout=120,
                )  # fmt: skip

        self.broker = Broker(self.dir, self.port, free_port())

    @property
    def bootstrap(self) -> str:
        """The ``SASL_SSL`` listener."""
        return f"127.0.0.1:{self.tls_port}"

    def close(self) -> None:
        self.broker.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


# -- fixtures ----------------------------------------------------------------------------


@pytest.fixture(scope="session")
def tls_certs() -> Iterator[Certs]:
    """The session's throwaway CA and certificates (removed afterwards)."""
    if shutil.which("openssl") is None:
        service_missing("no openssl binary to make the test certificates")
    where = Path(tempfile.mkdtemp(prefix="sluiceway-pki-"))
    where.chmod(0o755)  # servers that drop privileges read the certificates here
    try:
        yield make_certs(where)
    finally:
        shutil.rmtree(where, ignore_errors=True)


def _start(cls: type[S], certs: Certs) -> Iterator[S]:
    binary = find_binary(cls.paths)
    if binary is None:
        service_missing(cls.missing())
    server = cls(binary)
    server.certs = certs
    try:
        server.start()
        yield server
    finally:
        server.close()


@pytest.fixture(scope="session")
def tls_redis(tls_certs: Certs) -> Iterator[TlsRedis]:
    yield from _start(TlsRedis, tls_certs)


@pytest.fixture(scope="session")
def tls_nats(tls_certs: Certs) -> Iterator[TlsNats]:
    yield from _start(TlsNats, tls_certs)


@pytest.fixture(scope="session")
def tls_nats_token(tls_certs: Certs) -> Iterator[TlsNatsToken]:
    yield from _start(TlsNatsToken, tls_certs)


@pytest.fixture(scope="session")
def tls_nats_nkey(tls_certs: Certs) -> Iterator[TlsNatsNkey]:
    """A NATS server whose one user logs in with an NKEY made for the session."""
    pytest.importorskip("nkeys", reason="the nkeys package makes NATS NKEY logins")
    yield from _start(TlsNatsNkey, tls_certs)


@pytest.fixture(scope="session")
def tls_mosquitto(tls_certs: Certs) -> Iterator[TlsMosquitto]:
    yield from _start(TlsMosquitto, tls_certs)


@pytest.fixture(scope="session")
def tls_rabbitmq(tls_certs: Certs) -> Iterator[TlsRabbitMQ]:
    script = _server_script()
    if script is None:
        service_missing("no rabbitmq-server script to start a private RabbitMQ node with TLS")
    server = TlsRabbitMQ(script, tls_certs)
    try:
        server.start()
        yield server
    finally:
        server.close()


@pytest.fixture(scope="session")
def tls_kafka(tls_certs: Certs) -> Iterator[TlsKafka]:
    from services_kafka import kb  # noqa: PLC0415

    if shutil.which("java") is None:
        service_missing("java is missing: no private Kafka broker with TLS")
    try:
        kb.fetch(quiet=True)
    except RuntimeError as exc:
        service_missing(f"the Kafka broker's jars are not cached and cannot be fetched: {exc}")
    server = TlsKafka(tls_certs)
    try:
        server.broker.start()
        yield server
    finally:
        server.close()


@pytest.fixture(scope="session")
def tls_postgres(tls_certs: Certs) -> Iterator[TlsPostgres]:
    from services_postgres import _binary  # noqa: PLC0415

    initdb, pg_ctl = _binary("initdb"), _binary("pg_ctl")
    if initdb is None or pg_ctl is None:
        service_missing("no initdb/pg_ctl binaries to start a private PostgreSQL")
    server = TlsPostgres(initdb, pg_ctl)
    try:
        server.configure(tls_certs)
        server.start()
        server.set_password()
        yield server
    finally:
        with contextlib.suppress(Exception):
            server.close()
