"""API keys: created, listed and revoked by the operator, checked on every inference request.

Kept in SQLite (`keys.sqlite3` in the queen's --data-dir), which survives restarts. Only a
SHA-256 hash of each key is stored. A slow password hash (bcrypt, scrypt) exists to make
guessing a *human-chosen* secret expensive; these keys are 32 random bytes, so guessing one is
hopeless either way, and a fast hash lets every request be checked in about a microsecond.

Requests are checked against an in-memory copy of the table (one hash, one dict look-up), so
the hot path never touches the disk. Usage counts (requests, tokens, last use) are added up in
memory and written in one transaction every few seconds and at shutdown.
"""

from __future__ import annotations

import hashlib
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from rbee.common.errors import Conflict, NotFound, Unavailable
from rbee.contracts.keys import ApiKeyInfo, KeyCreated

KEY_PREFIX = "rbee_sk_"
DB_NAME = "keys.sqlite3"
SCHEMA = """
CREATE TABLE IF NOT EXISTS api_keys (
    name TEXT PRIMARY KEY,
    hash TEXT NOT NULL UNIQUE,
    created REAL NOT NULL,
    expires REAL,
    last_used REAL,
    requests INTEGER NOT NULL DEFAULT 0,
    tokens INTEGER NOT NULL DEFAULT 0
)
"""


def hash_key(secret: bytes) -> str:
    return hashlib.sha256(secret).hexdigest()


def _when(epoch: float | None) -> datetime | None:
    return None if epoch is None else datetime.fromtimestamp(epoch, UTC)


@dataclass
class _Key:
    name: str
    hash: str
    created: float
    expires: float | None
    last_used: float | None
    requests: int
    tokens: int

    def info(self) -> ApiKeyInfo:
        return ApiKeyInfo(
            name=self.name,
            created=datetime.fromtimestamp(self.created, UTC),
            expires=_when(self.expires),
            last_used=_when(self.last_used),
            requests=self.requests,
            tokens=self.tokens,
        )


@dataclass
class _Usage:
    requests: int = 0
    tokens: int = 0
    last_used: float | None = None


class KeyStore:
    """Opened on first use, so a queen that never sees an API key never touches the disk."""

    def __init__(self, data_dir: Path, *, clock: Callable[[], float] = time.time) -> None:
        self.path = data_dir / DB_NAME
        self._clock = clock
        self._db: sqlite3.Connection | None = None
        self._lock = threading.Lock()  # one connection, used from worker threads
        self._by_hash: dict[str, _Key] = {}
        self._pending: dict[str, _Usage] = {}

    # -- storage -------------------------------------------------------------------------

    def _open(self) -> sqlite3.Connection:
        if self._db is not None:
            return self._db
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute(SCHEMA)
            rows = db.execute(
                "SELECT name, hash, created, expires, last_used, requests, tokens FROM api_keys"
            ).fetchall()
        except (OSError, sqlite3.Error) as exc:
            raise Unavailable(
                f"cannot open the key database {self.path}: {exc}", code="key_store_unavailable"
            ) from None
        self.path.chmod(0o600)
        self._by_hash = {row[1]: _Key(*row) for row in rows}
        self._db = db
        return db

    def create(self, name: str, expires_days: int | None = None) -> KeyCreated:
        secret = KEY_PREFIX + secrets.token_urlsafe(32)
        now = self._clock()
        key = _Key(
            name=name,
            hash=hash_key(secret.encode()),
            created=now,
            expires=now + expires_days * 86400 if expires_days else None,
            last_used=None,
            requests=0,
            tokens=0,
        )
        with self._lock:
            db = self._open()
            try:
                db.execute(
                    "INSERT INTO api_keys (name, hash, created, expires) VALUES (?, ?, ?, ?)",
                    (key.name, key.hash, key.created, key.expires),
                )
            except sqlite3.IntegrityError:
                raise Conflict(f"a key named {name!r} exists already", code="key_exists") from None
            self._by_hash[key.hash] = key
        return KeyCreated(**key.info().model_dump(), key=secret)

    def list(self) -> list[ApiKeyInfo]:
        self.flush()
        with self._lock:
            self._open()
            return sorted((k.info() for k in self._by_hash.values()), key=lambda i: i.name)

    def revoke(self, name: str) -> None:
        """Ends the key at once: the next request with it is refused."""
        with self._lock:
            db = self._open()
            found = [h for h, k in self._by_hash.items() if k.name == name]
            if not found:
                raise NotFound(f"no API key named {name!r}", code="key_not_found")
            db.execute("DELETE FROM api_keys WHERE name = ?", (name,))
            for digest in found:
                del self._by_hash[digest]
            self._pending.pop(name, None)

    # -- the hot path (event loop, memory only) --------------------------------------------

    def identify(self, secret: bytes) -> str | None:
        if not secret.startswith(KEY_PREFIX.encode()):
            return None
        if self._db is None:
            with self._lock:
                self._open()
        # A dict look-up by hash: timing reveals at most the hash of a guess, never the key.
        key = self._by_hash.get(hash_key(secret))
        if key is None or (key.expires is not None and key.expires <= self._clock()):
            return None
        return key.name

    def count_request(self, name: str) -> None:
        usage = self._pending.setdefault(name, _Usage())
        usage.requests += 1
        usage.last_used = self._clock()

    def count_tokens(self, name: str, tokens: int) -> None:
        self._pending.setdefault(name, _Usage()).tokens += tokens

    # -- writing the counts ----------------------------------------------------------------

    def take_pending(self) -> dict[str, _Usage]:
        """The counts gathered since the last call (on the event loop, like the counting)."""
        pending, self._pending = self._pending, {}
        return pending

    def flush(self) -> None:
        self.write(self.take_pending())

    def write(self, pending: dict[str, _Usage]) -> None:
        """Add counts to the database in one transaction (blocking: run it in a thread)."""
        if not pending or self._db is None:
            return
        with self._lock:
            by_name = {k.name: k for k in self._by_hash.values()}
            rows = []
            for name, usage in pending.items():
                key = by_name.get(name)
                if key is None:
                    continue  # revoked meanwhile
                key.requests += usage.requests
                key.tokens += usage.tokens
                key.last_used = usage.last_used or key.last_used
                rows.append((usage.requests, usage.tokens, key.last_used, name))
            with self._db:  # one transaction: one write to disk for all the counts
                self._db.execute("BEGIN")
                self._db.executemany(
                    "UPDATE api_keys SET requests = requests + ?, tokens = tokens + ?, "
                    "last_used = ? WHERE name = ?",
                    rows,
                )

    def close(self) -> None:
        self.flush()
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None
