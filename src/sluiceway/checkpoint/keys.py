"""Checkpoint keys: where the secret that authenticates checkpoints comes from.

Every checkpoint part is signed (HMAC-SHA256, :mod:`sluiceway.checkpoint.codec`) with a
key that lives *outside* the checkpoint store, so that someone who can write the store
but cannot read the key cannot make a restore load bytes of their own.  The keys, in
order of precedence:

1. ``Checkpoints(..., key_file=PATH)``: a key file named by the flow's code;
2. ``SLUICEWAY_CHECKPOINT_KEY``: the key itself, in the environment;
3. ``SLUICEWAY_CHECKPOINT_KEY_FILE``: the path of a key file, in the environment;
4. otherwise the user's own key, ``$XDG_CONFIG_HOME/sluiceway/checkpoint.key`` (by
   default ``~/.config/sluiceway/checkpoint.key``), created on first use with mode 0600:
   one machine is protected without any setup.

A key is at least :data:`MIN_KEY_CHARS` characters without whitespace (make one with
``python -c "import secrets; print(secrets.token_urlsafe(32))"``).  A key file or the
variable may hold several keys, one per line (or separated by whitespace): the *first*
signs new checkpoints, every one of them is accepted for reading -- that is how a key is
rotated.  Lines starting with ``#`` are comments.  A key file must not be readable or
writable by group or others (like ``ssh`` keys), must belong to the user running the
flow (or root), and must not be inside the checkpoint directory.

Each key has an *id*, the first 16 hex digits of a hash of it, written in every part it
signs: it tells which key a checkpoint needs without revealing the key.

>>> ring = KeyRing.parse("k" * 32 + "\\n# an old one\\n" + "o" * 32, source="test")
>>> ring.current.id == CheckpointKey.of("k" * 32).id, len(ring.keys)
(True, 2)
>>> ring.find(CheckpointKey.of("o" * 32).id) is ring.keys[1]
True
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from sluiceway.errors import CheckpointKeyError

__all__ = [
    "DEFAULT_KEY_FILENAME",
    "ENV_KEY",
    "ENV_KEY_FILE",
    "MIN_KEY_CHARS",
    "CheckpointKey",
    "KeyRing",
    "default_key_path",
    "generate_key",
    "load_keys",
]

ENV_KEY: Final = "SLUICEWAY_CHECKPOINT_KEY"
"""The environment variable holding the checkpoint key(s) themselves."""

ENV_KEY_FILE: Final = "SLUICEWAY_CHECKPOINT_KEY_FILE"
"""The environment variable holding the path of a key file."""

DEFAULT_KEY_FILENAME: Final = "checkpoint.key"
MIN_KEY_CHARS: Final = 32
_KEY_ID_HEX: Final = 16
_ID_SALT: Final = b"sluiceway checkpoint key id\x00"
_PRIVATE: Final = 0o077  # group and other permission bits: none allowed on a key file


@dataclass(frozen=True, slots=True)
class CheckpointKey:
    """One secret key and its public id (the key never appears in a repr or a message)."""

    id: str
    secret: bytes = field(repr=False)

    @classmethod
    def of(cls, text: str, *, where: str = "the key") -> CheckpointKey:
        """A key from its text form.

        Raises:
            CheckpointKeyError: shorter than :data:`MIN_KEY_CHARS` or holding whitespace.
        """
        if len(text) < MIN_KEY_CHARS or any(c.isspace() for c in text):
            raise CheckpointKeyError(
                f"{where} is not a usable checkpoint key: a key is at least "
                f"{MIN_KEY_CHARS} characters without whitespace (got {len(text)} "
                'characters); make one with `python -c "import secrets; '
                'print(secrets.token_urlsafe(32))"`'
            )
        secret = text.encode("utf-8")
        key_id = hashlib.sha256(_ID_SALT + secret).hexdigest()[:_KEY_ID_HEX]
        return cls(key_id, secret)


@dataclass(frozen=True, slots=True)
class KeyRing:
    """The keys available: the first signs, every one verifies.

    Attributes:
        keys: at least one key; ``keys[0]`` signs new checkpoints.
        source: where they came from, for messages (a file's path or a variable's name).
    """

    keys: tuple[CheckpointKey, ...]
    source: str

    def __post_init__(self) -> None:
        if not self.keys:
            raise CheckpointKeyError(f"{self.source} holds no checkpoint key")

    @property
    def current(self) -> CheckpointKey:
        """The key that signs new checkpoints."""
        return self.keys[0]

    def find(self, key_id: str) -> CheckpointKey | None:
        """The key with this id, or None."""
        for key in self.keys:
            if key.id == key_id:
                return key
        return None

    def describe(self) -> str:
        """The ids and source, for messages: ``key 1a2b... (+1 older) from SOURCE``."""
        older = f" (+{len(self.keys) - 1} older for reading)" if len(self.keys) > 1 else ""
        return f"key {self.current.id}{older} from {self.source}"

    @classmethod
    def parse(cls, text: str, *, source: str) -> KeyRing:
        """Keys from the text of a key file or variable: one per line or whitespace-separated;
        ``#`` starts a comment line.

        Raises:
            CheckpointKeyError: no key, or one too short (named by its position).
        """
        keys: list[CheckpointKey] = []
        for line_no, line in enumerate(text.splitlines(), 1):
            stripped = line.strip()
            if not stripped or stripped.startswith("#"):
                continue
            for word in stripped.split():
                keys.append(CheckpointKey.of(word, where=f"{source}, line {line_no}"))
        return cls(tuple(keys), source)


def default_key_path(env: Mapping[str, str] | None = None) -> Path:
    """``$XDG_CONFIG_HOME/sluiceway/checkpoint.key``, by default under ``~/.config``.

    Raises:
        CheckpointKeyError: no ``XDG_CONFIG_HOME`` and no home directory.
    """
    env = os.environ if env is None else env
    base = env.get("XDG_CONFIG_HOME") or ""
    if os.path.isabs(base):
        return Path(base) / "sluiceway" / DEFAULT_KEY_FILENAME
    try:
        home = Path.home()
    except RuntimeError as exc:  # no HOME and no password entry (some containers)
        raise CheckpointKeyError(
            f"cannot find your home directory for the default checkpoint key ({exc}); set "
            f"XDG_CONFIG_HOME, {ENV_KEY} or {ENV_KEY_FILE}, or pass Checkpoints(key_file=...)"
        ) from exc
    return home / ".config" / "sluiceway" / DEFAULT_KEY_FILENAME


def generate_key() -> str:
    """A new random key (256 bits, URL-safe text)."""
    return secrets.token_urlsafe(32)


def load_keys(
    *,
    key_file: str | os.PathLike[str] | None = None,
    checkpoint_dir: str | os.PathLike[str] | None = None,
    create: bool = True,
    env: Mapping[str, str] | None = None,
) -> KeyRing | None:
    """The checkpoint keys, from the first place that has them (see the module docstring).

    Args:
        key_file: a key file named explicitly (``Checkpoints(key_file=...)``, ``--key-file``).
        checkpoint_dir: the checkpoint directory; a key file inside it is refused.
        create: create the user's default key if no key is configured and it does not
            exist yet (False: return None instead; ``checkpoints list`` creates nothing).
        env: the environment (default ``os.environ``).

    Raises:
        CheckpointKeyError: a key that cannot be used, naming where it came from and the fix.
    """
    env = os.environ if env is None else env
    if key_file is not None:
        return _from_file(Path(key_file).expanduser(), "the key file", checkpoint_dir)
    text = env.get(ENV_KEY)
    path = env.get(ENV_KEY_FILE)
    if text is not None and path is not None:
        raise CheckpointKeyError(
            f"both {ENV_KEY} and {ENV_KEY_FILE} are set; set one of them (the key, or the "
            "path of a file holding it)"
        )
    if text is not None:
        return KeyRing.parse(text, source=f"the environment variable {ENV_KEY}")
    if path is not None:
        if not path:
            raise CheckpointKeyError(f"{ENV_KEY_FILE} is set but empty; give a key file's path")
        return _from_file(Path(path).expanduser(), f"the key file ({ENV_KEY_FILE})", checkpoint_dir)
    default = default_key_path(env)
    if not default.exists():
        if not create:
            return None
        _check_outside(default, checkpoint_dir, "the default key file")
        _create_key_file(default)
    return _from_file(default, "the default key file", checkpoint_dir)


def _from_file(path: Path, what: str, checkpoint_dir: str | os.PathLike[str] | None) -> KeyRing:
    _check_outside(path, checkpoint_dir, what)
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        raise CheckpointKeyError(
            f"{what} {path} does not exist; write a key into it (chmod 600), or unset the "
            "setting that names it"
        ) from None
    except OSError as exc:
        raise CheckpointKeyError(f"cannot read {what} {path}: {exc.strerror}") from exc
    with os.fdopen(fd, "r", encoding="utf-8") as f:
        _check_private(path, os.fstat(f.fileno()), what)
        try:
            text = f.read()
        except (OSError, UnicodeDecodeError) as exc:
            raise CheckpointKeyError(f"cannot read {what} {path}: {exc}") from exc
    return KeyRing.parse(text, source=f"{what} {path}")


def _check_private(path: Path, st: os.stat_result, what: str) -> None:
    """Refuse a key file that others could read (and forge with) or replace."""
    if os.name != "posix":  # pragma: no cover - POSIX permissions only
        return
    if not stat.S_ISREG(st.st_mode):
        raise CheckpointKeyError(f"{what} {path} is not a regular file")
    mode = stat.S_IMODE(st.st_mode)
    if mode & _PRIVATE:
        raise CheckpointKeyError(
            f"{what} {path} is accessible to group or others (mode {mode:04o}): whoever can "
            "read it can forge checkpoints that this flow would load. Make it private: "
            f"chmod 600 {path}"
        )
    if st.st_uid not in {os.geteuid(), 0}:
        raise CheckpointKeyError(
            f"{what} {path} belongs to another user (uid {st.st_uid}): they could replace "
            "the key. Use a key file of your own (or root's)"
        )


def _check_outside(path: Path, checkpoint_dir: str | os.PathLike[str] | None, what: str) -> None:
    """A key inside the checkpoint directory protects nothing: whoever can write the
    checkpoints could replace it."""
    if checkpoint_dir is None or (
        isinstance(checkpoint_dir, str) and checkpoint_dir.startswith(("postgresql:", "postgres:"))
    ):
        return  # a store in PostgreSQL: no file of it can be a key file
    key = Path(os.path.abspath(path)).resolve()
    directory = Path(os.path.abspath(checkpoint_dir)).resolve()
    if key == directory or directory in key.parents:
        raise CheckpointKeyError(
            f"{what} {path} is inside the checkpoint directory {checkpoint_dir}: whoever can "
            "write the checkpoints could replace the key too. Keep the key elsewhere "
            f"(the default {default_key_path()} or a secrets mount)"
        )


_KEY_FILE_HEADER: Final = """\
# sluiceway checkpoint key (docs/checkpoints.md, "Security").
# The first key signs new checkpoints; keys on later lines are accepted for reading
# (rotation: put a new key first, keep the old one below until no checkpoint needs it).
# Keep this file private (chmod 600) and out of the checkpoint directory.
"""


def _create_key_file(path: Path) -> None:
    """Create ``path`` holding a new key, mode 0600, atomically and only once: the key is
    written and fsynced under a temporary name, then hard-linked to ``path`` (which fails
    if another process made it first: theirs is kept and used)."""
    directory = path.parent
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = directory / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(_KEY_FILE_HEADER + generate_key() + "\n")
                f.flush()
                os.fsync(f.fileno())
            with contextlib.suppress(FileExistsError):
                os.link(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        dfd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError as exc:
        raise CheckpointKeyError(
            f"cannot create the default checkpoint key {path}: {exc.strerror or exc}; "
            f"set {ENV_KEY} or {ENV_KEY_FILE}, or pass Checkpoints(key_file=...)"
        ) from exc
