"""Translation memory: each distinct source sentence is translated once per translation context.

A context is everything that changes a sentence's translation: the checkpoint, the target language,
the beam width, the backend and the dtype (`Translator.memory_context`). Sentences are looked up
after a text is split into sentences and before anything is tokenised or batched, so a hit costs
neither. Two stores keep the pairs:

- `InProcessStore` (the default): a bounded dict for the life of one `Translator`, so a job's
  repeated lines and boilerplate are translated once.
- `SQLiteStore` (`--memory PATH`): an SQLite file in WAL mode, shared by jobs and processes at once
  (readers never block the one writer; a writer waits for another up to `BUSY_TIMEOUT_S`), so
  re-running a job or translating the same boilerplate again translates nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Protocol

from pipeline.errors import MemoryFileError

# Part of every context key: bump it when a change to splitting, bounds or decoding changes what
# a sentence translates to, so old entries are no longer found.
MEMORY_FORMAT = 1
SCHEMA = "1"   # the SQLite file's tables
IN_PROCESS_ENTRIES = 200_000   # the default store's bound: repeats within a job stay hot
BUSY_TIMEOUT_S = 60.0
LOOKUP_ROWS = 500   # sources per SELECT (SQLite caps the parameters of one statement)


def context_key(description: dict) -> str:
    """A short stable hash of a context's description."""
    text = json.dumps({"format": MEMORY_FORMAT, **description}, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


class MemoryStore(Protocol):
    def get_many(self, context: str, sources: Sequence[str]) -> dict[str, str]:
        """The stored translations of those of `sources` this context holds."""
        ...

    def put_many(self, context: str, description: dict, pairs: Sequence[tuple[str, str]]) -> None:
        """Keep (source, translation) pairs under `context`, which `description` spells out."""
        ...


class InProcessStore:
    """The most recently used pairs, in this process only."""

    def __init__(self, max_entries: int = IN_PROCESS_ENTRIES):
        self.max_entries = max_entries
        self.pairs: OrderedDict[tuple[str, str], str] = OrderedDict()
        self.lock = threading.Lock()  # a server plans on several threads: a lookup must not meet an eviction

    def get_many(self, context: str, sources: Sequence[str]) -> dict[str, str]:
        found = {}
        with self.lock:
            for source in sources:
                key = (context, source)
                if key in self.pairs:
                    self.pairs.move_to_end(key)
                    found[source] = self.pairs[key]
        return found

    def put_many(self, context: str, description: dict, pairs: Sequence[tuple[str, str]]) -> None:
        with self.lock:
            for source, target in pairs:
                self.pairs[(context, source)] = target
            while len(self.pairs) > self.max_entries:
                self.pairs.popitem(last=False)


class SQLiteStore:
    """Pairs in an SQLite file, shared safely by threads' and processes' own connections."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._pid = None
        self._db: sqlite3.Connection | None = None
        self._connection()   # a bad file is refused now, before any model loads

    def _connection(self) -> sqlite3.Connection:
        # A connection must not cross a fork, nor a pickle to another process: each opens its own.
        if self._db is not None and self._pid == os.getpid():
            return self._db
        if self.path.is_dir() or not self.path.parent.is_dir():
            raise MemoryFileError(f"cannot use {self.path} as a translation memory: "
                                  + ("it is a directory" if self.path.is_dir() else "no such directory"))
        try:
            db, schema = self._open()
        except sqlite3.Error as error:
            raise MemoryFileError(f"cannot use {self.path} as a translation memory: {error}") from None
        if schema != SCHEMA:
            db.close()
            raise MemoryFileError(f"{self.path} is a translation memory of another version (schema {schema})")
        self._db, self._pid = db, os.getpid()
        return db

    def _open(self) -> tuple[sqlite3.Connection, str]:
        """A connection set up for sharing, and the file's schema. Two processes opening a new file
        at once can meet "database is locked" at once, whatever the busy timeout (switching to WAL
        takes a lock SQLite does not wait for): that is retried until BUSY_TIMEOUT_S."""
        deadline = time.monotonic() + BUSY_TIMEOUT_S
        while True:
            db = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False)
            try:
                db.execute("PRAGMA journal_mode=WAL")
                db.execute("PRAGMA synchronous=NORMAL")   # with WAL: a crash loses no committed pair
                with _transaction(db):   # one write proves the file writable now, not halfway through a job
                    db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
                    db.execute("CREATE TABLE IF NOT EXISTS contexts (context TEXT PRIMARY KEY, description TEXT NOT NULL)")
                    db.execute("CREATE TABLE IF NOT EXISTS translations (context TEXT NOT NULL, source TEXT NOT NULL, "
                               "target TEXT NOT NULL, PRIMARY KEY (context, source)) WITHOUT ROWID")
                    db.execute("INSERT OR IGNORE INTO meta VALUES ('schema', ?)", (SCHEMA,))
                    db.execute("UPDATE meta SET value = value WHERE key = 'schema'")
                return db, db.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()[0]
            except sqlite3.OperationalError as error:
                db.close()
                if "locked" not in str(error) or time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
            except BaseException:
                db.close()
                raise

    def get_many(self, context: str, sources: Sequence[str]) -> dict[str, str]:
        db, found = self._connection(), {}
        unique = list(dict.fromkeys(sources))
        try:
            for start in range(0, len(unique), LOOKUP_ROWS):
                part = unique[start:start + LOOKUP_ROWS]
                marks = ",".join("?" * len(part))
                found.update(db.execute(
                    f"SELECT source, target FROM translations WHERE context = ? AND source IN ({marks})",
                    (context, *part)))
        except sqlite3.Error as error:   # not a row's fault: the job stops, and resumes later
            raise RuntimeError(f"translation memory {self.path}: {error}") from error
        return found

    def put_many(self, context: str, description: dict, pairs: Sequence[tuple[str, str]]) -> None:
        if not pairs:
            return
        db = self._connection()
        try:
            with _transaction(db):   # a chunk's new pairs are one write
                db.execute("INSERT OR IGNORE INTO contexts VALUES (?, ?)",
                           (context, json.dumps(description, sort_keys=True, ensure_ascii=False)))
                # OR IGNORE: another process may have translated the same sentence meanwhile.
                db.executemany("INSERT OR IGNORE INTO translations VALUES (?, ?, ?)",
                               [(context, source, target) for source, target in pairs])
        except sqlite3.Error as error:
            raise RuntimeError(f"translation memory {self.path}: {error}") from error

    def close(self) -> None:
        if self._db is not None and self._pid == os.getpid():
            self._db.close()
        self._db = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_db": None, "_pid": None}


@contextmanager
def _transaction(db: sqlite3.Connection) -> Iterator[None]:
    # IMMEDIATE takes the write lock first, so two writers queue instead of one failing on upgrade.
    db.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


def open_store(memory: "MemoryStore | str | Path | None") -> MemoryStore:
    """`memory` as a store: a path opens (or creates) an SQLite file; None is in-process only."""
    if memory is None:
        return InProcessStore()
    if isinstance(memory, (str, os.PathLike)):
        return SQLiteStore(memory)
    return memory


class TranslationMemory:
    """One translator's view of a store, counting what it found (`hits`) and what had to be
    translated (`misses`): repeats within one call count as hits too."""

    def __init__(self, store: MemoryStore):
        self.store = store
        self.hits = 0
        self.misses = 0

    @property
    def persistent(self) -> bool:
        """Whether the store outlives the process (a `--memory` file), not this translator's own."""
        return not isinstance(self.store, InProcessStore)

    def lookup(self, description: dict, sources: list[str]) -> tuple[dict[str, str], list[str]]:
        """(the translations the store holds, the other sources each once in first-seen order)."""
        known = self.store.get_many(context_key(description), sources)
        missing = [source for source in dict.fromkeys(sources) if source not in known]
        self.misses += len(missing)
        self.hits += len(sources) - len(missing)
        return known, missing

    def remember(self, description: dict, pairs: list[tuple[str, str]]) -> None:
        """Store new (source, translation) pairs."""
        if pairs:
            self.store.put_many(context_key(description), description, pairs)
