"""API keys: created, listed and revoked by the operator, checked on every inference request.

Kept in SQLite (`keys.sqlite3` in the queen's --data-dir), which survives restarts. Only a
SHA-256 hash of each key is stored. A slow password hash (bcrypt, scrypt) exists to make
guessing a *human-chosen* secret expensive; these keys are 32 random bytes, so guessing one is
hopeless either way, and a fast hash lets every request be checked in about a microsecond.

Requests are checked against an in-memory copy of the table (one hash, one dict look-up), so
the hot path never touches the disk; the table is read in a thread the first time a request
carries a key. Usage counts (requests, tokens, last use) are added up in memory and written in
one transaction every few seconds and at shutdown.

Which side runs what: the event loop counts and takes the counts gathered so far (`flush`);
only the writing happens in a thread, on a dict the loop no longer touches. The store's files
(the database and SQLite's -wal, -shm and -journal beside it) are the owner's only (0600).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from rbee.common.errors import Conflict, NotFound, Unavailable
from rbee.common.gate import KeysNotLoaded
from rbee.contracts.keys import ApiKeyInfo, KeyCreated

KEY_PREFIX = "rbee_sk_"
DB_NAME = "keys.sqlite3"
# SQLite's files beside the database: created with its mode, but older stores have 0644 ones.
SIDE_FILES = ("-wal", "-shm", "-journal")
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

    def add(self, other: _Usage) -> None:
        self.requests += other.requests
        self.tokens += other.tokens
        self.last_used = max(self.last_used or 0.0, other.last_used or 0.0) or None


def _owner_only(path: Path) -> None:
    """The database file exists with mode 0600 before SQLite opens it: SQLite gives its -wal,
    -shm and -journal files the database's mode, whatever the umask or the directory's mode."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.fchmod(fd, 0o600)
    finally:
        os.close(fd)
    for suffix in SIDE_FILES:
        side = path.with_name(path.name + suffix)
        with contextlib.suppress(FileNotFoundError):
            os.chmod(side, 0o600)


class KeyStore:
    """Opened on first use, so a queen that never sees an API key never touches the disk."""

    def __init__(self, data_dir: Path, *, clock: Callable[[], float] = time.time) -> None:
        self.path = data_dir / DB_NAME
        self._clock = clock
        self._db: sqlite3.Connection | None = None
        self._lock = threading.Lock()  # one connection, used from worker threads
        self._by_hash: dict[str, _Key] = {}
        self._pending: dict[str, _Usage] = {}  # the event loop's only

    # -- storage (blocking: run these in a thread) ------------------------------------------

    def _open(self) -> sqlite3.Connection:
        if self._db is not None:
            return self._db
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            _owner_only(self.path)
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
        self._by_hash = {row[1]: _Key(*row) for row in rows}
        self._db = db
        return db

    def open(self) -> None:
        with self._lock:
            self._open()

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
        """The keys with the counts written so far (`flush` first for the latest ones)."""
        with self._lock:
            self._open()
            return sorted((k.info() for k in self._by_hash.values()), key=lambda i: i.name)

    def revoke(self, name: str) -> None:
        """Ends the key at once: the next request with it is refused. (Counts still pending
        for it are dropped when they are written.)"""
        with self._lock:
            db = self._open()
            found = [h for h, k in self._by_hash.items() if k.name == name]
            if not found:
                raise NotFound(f"no API key named {name!r}", code="key_not_found")
            db.execute("DELETE FROM api_keys WHERE name = ?", (name,))
            for digest in found:
                del self._by_hash[digest]

    def write(self, pending: dict[str, _Usage]) -> None:
        """Add counts to the database in one transaction. `pending` must be a dict the event
        loop no longer counts into (see `flush`)."""
        if not pending:
            return
        with self._lock:
            db = self._open()
            by_name = {k.name: k for k in self._by_hash.values()}
            counted = [(by_name[n], u) for n, u in pending.items() if n in by_name]  # not revoked
            rows = [
                (u.requests, u.tokens, u.last_used or key.last_used, key.name) for key, u in counted
            ]
            with db:  # one transaction: one write to disk for all the counts
                db.execute("BEGIN")
                db.executemany(
                    "UPDATE api_keys SET requests = requests + ?, tokens = tokens + ?, "
                    "last_used = ? WHERE name = ?",
                    rows,
                )
            for key, usage in counted:  # only once they are on disk, so a retry adds them once
                key.requests += usage.requests
                key.tokens += usage.tokens
                key.last_used = usage.last_used or key.last_used

    def close(self) -> None:
        """Close the database (counts not yet flushed are not written: `aclose` writes them)."""
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None

    # -- the event loop's side (memory only, or a thread for the disk) -------------------------

    @property
    def loaded(self) -> bool:
        return self._db is not None

    async def load(self) -> None:
        """Read the table in a thread, once (the gate's first request with a key waits here)."""
        if self._db is None:
            await asyncio.to_thread(self.open)

    def identify(self, secret: bytes) -> str | None:
        if not secret.startswith(KEY_PREFIX.encode()):
            return None
        if self._db is None:
            raise KeysNotLoaded
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

    def take_pending(self) -> dict[str, _Usage]:
        """The counts gathered since the last call; from now on the loop counts into a new dict."""
        pending, self._pending = self._pending, {}
        return pending

    async def flush(self) -> None:
        """Write the counts gathered so far: taken here on the loop, written in a thread. When
        the write fails they are put back, to be written with the next ones."""
        pending = self.take_pending()
        if not pending or self._db is None:
            return
        try:
            await asyncio.to_thread(self.write, pending)
        except BaseException:
            for name, usage in pending.items():
                self._pending.setdefault(name, _Usage()).add(usage)
            raise

    async def aclose(self) -> None:
        try:
            await self.flush()
        finally:
            await asyncio.to_thread(self.close)
