"""The audit log's two keys: an HMAC key for digests of sensitive values, and the Ed25519
key that signs checkpoints and HEAD.

Keep the key directory apart from the log directory (other owner or volume where you can):
whoever can read `signing.key` can re-sign an edited chain. `signing.pub` is what
`verify()` needs; keep a copy of it somewhere the log's host cannot write.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import stat
from pathlib import Path
from typing import Union

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from cluster.audit.chain import AuditError, default_key_dir, fingerprint, load_public_key  # noqa: F401 - re-exported

__all__ = ["AuditKeys", "KeyedDigest", "load_public_key", "make_private_dir"]

HMAC_FILE, SIGNING_FILE, PUBLIC_FILE = "hmac.key", "signing.key", "signing.pub"

HMAC_KEY_BYTES = 32


def _bytes(data: Union[bytes, str]) -> bytes:
    return data.encode() if isinstance(data, str) else bytes(data)


class KeyedDigest:
    """An incremental keyed digest: feed text as it streams, keep only this object."""

    def __init__(self, key: bytes, key_id: str):
        self._mac = hmac.new(key, digestmod=hashlib.sha256)
        self._key_id = key_id

    def update(self, data: Union[bytes, str]) -> "KeyedDigest":
        """Add bytes (str is taken as UTF-8)."""
        self._mac.update(_bytes(data))
        return self

    def hexdigest_str(self) -> str:
        return f"hmac-sha256:{self._key_id}:{self._mac.hexdigest()}"


class AuditKeys:
    """The HMAC key (digests) and the Ed25519 key (signatures) of one audit log. Thread-safe."""

    def __init__(self, hmac_key: bytes, signing_key: Ed25519PrivateKey):
        if len(hmac_key) != HMAC_KEY_BYTES:
            raise ValueError(f"the HMAC key must be {HMAC_KEY_BYTES} bytes, got {len(hmac_key)}")
        self._hmac_key = bytes(hmac_key)
        self._signing_key = signing_key
        self.key_id = hashlib.sha256(self._hmac_key).hexdigest()[:16]
        self.public_key: Ed25519PublicKey = signing_key.public_key()
        self.fingerprint = fingerprint(self.public_key)

    @classmethod
    def load_or_create(cls, key_dir: Path) -> "AuditKeys":
        """Load the keys in `key_dir`, creating the directory (0700) and any missing key.

        Safe when several processes start at once: each key file is created once, and a
        process that loses the race loads the winner's key.
        """
        key_dir = Path(key_dir)
        make_private_dir(key_dir)
        _create_once(key_dir / HMAC_FILE, secrets.token_bytes(HMAC_KEY_BYTES), 0o600)
        fresh = Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        _create_once(key_dir / SIGNING_FILE, fresh, 0o600)
        hmac_key = _read_private(key_dir / HMAC_FILE)
        if len(hmac_key) != HMAC_KEY_BYTES:
            raise AuditError(
                f"{key_dir / HMAC_FILE} holds {len(hmac_key)} bytes, not {HMAC_KEY_BYTES}: restore "
                "it from backup (a new key makes existing digests unmatchable)"
            )
        try:
            signing = serialization.load_pem_private_key(
                _read_private(key_dir / SIGNING_FILE), password=None
            )
        except ValueError:
            raise AuditError(
                f"{key_dir / SIGNING_FILE} is not a readable PEM private key: restore it from "
                "backup"
            ) from None
        if not isinstance(signing, Ed25519PrivateKey):
            raise AuditError(
                f"{key_dir / SIGNING_FILE} is not an Ed25519 key: restore the audit signing key"
            )
        keys = cls(hmac_key, signing)
        keys._ensure_public(key_dir / PUBLIC_FILE)
        return keys

    def _ensure_public(self, path: Path) -> None:
        pem = self.public_key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        if (
            not _create_once(path, pem, 0o644)
            and fingerprint(load_public_key(path)) != self.fingerprint
        ):
            raise AuditError(
                f"{path} does not match {path.with_name(SIGNING_FILE)}: delete {path.name} "
                "to have it written again from the private key"
            )

    def digest(self, data: Union[bytes, str]) -> str:
        """`hmac-sha256:<key_id>:<hex>`: matches equal values without letting a short value be
        guessed from a plain hash (str is taken as UTF-8)."""
        return KeyedDigest(self._hmac_key, self.key_id).update(data).hexdigest_str()

    def digest_stream(self) -> KeyedDigest:
        return KeyedDigest(self._hmac_key, self.key_id)

    def sign(self, data: bytes) -> str:
        """The Ed25519 signature of `data`, in hex."""
        return self._signing_key.sign(data).hex()


def make_private_dir(path: Path) -> None:
    """Create `path` and any missing parents with mode 0700 (mkdir(parents=True) would leave the
    parents open to the umask); existing directories are left as they are."""
    missing = []
    while not path.exists():
        missing.append(path)
        path = path.parent
    for d in reversed(missing):
        d.mkdir(mode=0o700, exist_ok=True)


def _read_private(path: Path) -> bytes:
    mode = path.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise AuditError(
            f"{path} is open to group or others (mode {stat.S_IMODE(mode):04o}): chmod 600 it"
        )
    return path.read_bytes()


def _create_once(path: Path, data: bytes, mode: int) -> bool:
    """Write `path` whole, or leave an existing one alone (False). A crash never leaves it half written."""
    if path.exists():
        return False
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, data)
        os.fchmod(fd, mode)
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.link(tmp, path)  # fails if another process created it first
    except FileExistsError:
        return False
    finally:
        tmp.unlink()
    _fsync_dir(path.parent)
    return True


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
