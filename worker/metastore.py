"""The worker's metadata store: a bounded memory LRU in front of SQLite on the cache disk.

What it holds, for the paths this worker owns:
- statuses by URI: a file's or directory's FileStatus, or a negative entry (the path did
  not exist), each with the wall-clock time it was fetched from the UFS;
- directory listings, written page by page while they stream from the UFS and served a
  page at a time by name, so a listing of millions of entries is never held in memory.

Freshness is not decided here: every entry carries its fetch time and the caller compares
it with the TTL of the request (a mount's own setting), so one store serves mounts with
different freshness needs. Times are wall-clock seconds because they must survive a
restart of the worker.

Why SQLite directly rather than diskcache: listings need ordered range scans
(`name > after ORDER BY name LIMIT n`) and the status rows need nothing but a primary
key, so `WITHOUT ROWID` tables keyed by the URI store an entry in about half the bytes of
a pickled diskcache row (bench/metastore.py measures both).

Subtleties:
- A listing is visible only once complete: its rows are written under a fresh generation
  number and the `listing` row pointing at that generation is written last. Rows of the
  previous generation are deleted when the new one lands; rows of fills interrupted by a
  crash are found through the `filling` table and deleted at start.
- Writes run in one thread at a time (a CapacityLimiter of 1, their own connection), never
  on the trio loop. Point lookups and listing pages run on the loop on a second, read-only
  connection: WAL lets it read while the writer writes, and an indexed query on a cached
  B-tree (about 10 µs) is far cheaper than a thread hop (about 60 µs; bench/metastore.py).
- A disk error never fails a request: the store logs once, counts the error and carries on
  with the memory level alone; a database that cannot be opened is moved aside and
  recreated (it is only a cache).
"""

from __future__ import annotations

import bisect
import logging
import sqlite3
import time
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import trio

from dorafs.ufs import FileStatus, join

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
FILE, DIRECTORY, MISSING = 0, 1, 2

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS status (
    uri TEXT PRIMARY KEY, fetched REAL NOT NULL, kind INTEGER NOT NULL,
    size INTEGER NOT NULL, mtime REAL NOT NULL, version TEXT NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS listing (
    dir TEXT PRIMARY KEY, gen INTEGER NOT NULL, fetched REAL NOT NULL, count INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS entry (
    dir TEXT NOT NULL, gen INTEGER NOT NULL, name TEXT NOT NULL, kind INTEGER NOT NULL,
    size INTEGER NOT NULL, mtime REAL NOT NULL, version TEXT NOT NULL,
    PRIMARY KEY (dir, gen, name)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS filling (dir TEXT NOT NULL, gen INTEGER NOT NULL, PRIMARY KEY (dir, gen)) WITHOUT ROWID;
"""


def now() -> float:
    return time.time()


@dataclass(frozen=True)
class Cached:
    """A status as cached: `status` is None for a negative entry (the path was missing)."""

    status: FileStatus | None
    fetched: float
    level: str  # "memory" or "disk": where it (or the parent listing it came from) was held


@dataclass(frozen=True)
class Listing:
    """A complete listing: its generation, fetch time and size; `entries` when in memory."""

    dir: str
    gen: int
    fetched: float
    count: int
    entries: list[FileStatus] | None = None


def _row(status: FileStatus | None) -> tuple:
    if status is None:
        return (MISSING, 0, 0.0, "")
    return (DIRECTORY if status.is_dir else FILE, status.size, status.mtime, status.version)


def _status(name: str, kind: int, size: int, mtime: float, version: str) -> FileStatus | None:
    if kind == MISSING:
        return None
    return FileStatus(name=name, is_dir=kind == DIRECTORY, size=size, mtime=mtime, version=version)


def _name(uri: str) -> str:
    return uri.rstrip("/").rpartition("/")[2] if "://" in uri else uri


def _prefix_range(uri: str) -> tuple[str, str]:
    """[low, high) bounds of every URI strictly under `uri` ('/' + 1 is '0')."""
    base = uri.rstrip("/")
    return base + "/", base + "0"


class MetaStore:
    def __init__(self, path: Path, memory_entries: int):
        self.path = Path(path)
        self.memory_entries = max(1, memory_entries)
        # A listing is kept in memory only if small enough not to crowd out statuses.
        self.memory_listing_max = max(1, self.memory_entries // 4)
        self._statuses: OrderedDict[str, tuple[float, FileStatus | None]] = OrderedDict()
        self._listings: OrderedDict[str, Listing] = OrderedDict()
        self._listing_entries = 0  # entries held by _listings, counted against memory_entries
        self._db: sqlite3.Connection | None = None  # writes, in the store's thread
        self._reader: sqlite3.Connection | None = None  # reads, on the trio loop
        self._limiter = trio.CapacityLimiter(1)
        self.disk_errors = 0
        self._gen = 0

    # -- lifecycle ----------------------------------------------------------------------

    def load(self) -> None:
        """Open (or recreate) the database and clear interrupted fills. Blocking."""
        try:
            self._db = self._connect()
        except sqlite3.DatabaseError as exc:
            aside = self.path.with_name(self.path.name + f".broken-{int(now())}")
            log.warning("metadata store %s is unreadable (%s); moved to %s and starting empty", self.path, exc, aside)
            for suffix in ("", "-wal", "-shm"):
                src = Path(str(self.path) + suffix)
                if src.exists():
                    src.rename(Path(str(aside) + suffix))
            self._db = self._connect()
        self._gen = int(self._db.execute("SELECT coalesce(max(gen), 0) FROM listing").fetchone()[0])
        self._gen = max(self._gen, int(self._db.execute("SELECT coalesce(max(gen), 0) FROM filling").fetchone()[0]))
        with self._db:
            leftovers = self._db.execute("SELECT dir, gen FROM filling").fetchall()
            for d, g in leftovers:
                self._db.execute("DELETE FROM entry WHERE dir = ? AND gen = ?", (d, g))
            self._db.execute("DELETE FROM filling")
        if leftovers:
            log.info("metadata store: dropped %d listing(s) interrupted by the last stop", len(leftovers))
        self._reader = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, check_same_thread=False,
                                       isolation_level=None)

    def _connect(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")  # a crash may lose the last entries, never corrupt
            db.executescript(_SCHEMA)
            row = db.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()
            if row is None:
                db.execute("INSERT INTO meta VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
            elif row[0] != str(SCHEMA_VERSION):
                raise sqlite3.DatabaseError(f"schema version {row[0]}, expected {SCHEMA_VERSION}")
            db.execute("PRAGMA quick_check(1)").fetchone()
        except BaseException:
            db.close()
            raise
        self.path.chmod(0o600)
        return db

    def close(self) -> None:
        for db in (self._reader, self._db):
            if db is not None:
                db.close()
        self._db = self._reader = None

    async def _run(self, fn, *args, default=None):
        """Run a blocking write in the store's thread; a disk error yields `default`."""
        if self._db is None:
            return default
        try:
            return await trio.to_thread.run_sync(fn, *args, limiter=self._limiter)
        except sqlite3.Error as exc:
            self._failed(exc)
            return default

    def _query(self, sql: str, args: tuple, *, many: bool = False, default=None):
        """A read on the loop's connection; a disk error yields `default`."""
        if self._reader is None:
            return default
        try:
            cursor = self._reader.execute(sql, args)
            return cursor.fetchall() if many else cursor.fetchone()
        except sqlite3.Error as exc:
            self._failed(exc)
            return default

    def _failed(self, exc: sqlite3.Error) -> None:
        self.disk_errors += 1
        if self.disk_errors == 1 or self.disk_errors % 1000 == 0:
            log.warning("metadata store error (%d so far; serving from memory and the UFS): %s",
                        self.disk_errors, exc)

    def memory_size(self) -> int:
        return len(self._statuses) + self._listing_entries

    # -- statuses -----------------------------------------------------------------------

    def memory_status(self, uri: str) -> Cached | None:
        item = self._statuses.get(uri)
        if item is None:
            return None
        self._statuses.move_to_end(uri)
        return Cached(item[1], item[0], "memory")

    async def disk_status(self, uri: str) -> Cached | None:
        row = self._query("SELECT fetched, kind, size, mtime, version FROM status WHERE uri = ?", (uri,))
        if row is None:
            return None
        fetched, kind, size, mtime, version = row
        status = _status(_name(uri), kind, size, mtime, version)
        self._remember(uri, fetched, status)
        return Cached(status, fetched, "disk")

    async def put_status(self, uri: str, status: FileStatus | None, fetched: float) -> None:
        self._remember(uri, fetched, status)

        def write():
            self._db.execute("INSERT OR REPLACE INTO status VALUES (?, ?, ?, ?, ?, ?)", (uri, fetched, *_row(status)))

        await self._run(write)

    def _remember(self, uri: str, fetched: float, status: FileStatus | None) -> None:
        self._statuses[uri] = (fetched, status)
        self._statuses.move_to_end(uri)
        self._trim()

    def _trim(self) -> None:
        while len(self._statuses) + self._listing_entries > self.memory_entries and self._statuses:
            self._statuses.popitem(last=False)
        while self._listing_entries > self.memory_entries - min(len(self._statuses), self.memory_entries // 2) \
                and self._listings:
            _, dropped = self._listings.popitem(last=False)
            self._listing_entries -= len(dropped.entries or ())

    # -- listings -----------------------------------------------------------------------

    async def listing(self, dir: str) -> tuple[Listing | None, str]:
        """The current complete listing of `dir` and the level it came from."""
        held = self._listings.get(dir)
        if held is not None:
            self._listings.move_to_end(dir)
            return held, "memory"

        row = self._query("SELECT gen, fetched, count FROM listing WHERE dir = ?", (dir,))
        if row is None:
            return None, "miss"
        return Listing(dir, row[0], row[1], row[2]), "disk"

    async def batch(self, listing: Listing, after: str, limit: int) -> list[FileStatus]:
        """Up to `limit` entries named after `after`, in name order."""
        if listing.entries is not None:
            start = bisect.bisect_right(_Names(listing.entries), after) if after else 0
            return listing.entries[start:start + limit]

        rows = self._query("SELECT name, kind, size, mtime, version FROM entry WHERE dir = ? AND gen = ? AND name > ? "
                           "ORDER BY name LIMIT ?", (listing.dir, listing.gen, after, limit), many=True)
        if rows is None:
            raise sqlite3.OperationalError("listing rows unreadable")
        return [_status(*row) for row in rows]

    async def child(self, dir: str, name: str) -> Cached | None:
        """A child's status from a complete listing of `dir` held here (None: no listing).

        A name missing from a complete listing is a negative entry as old as the listing.
        """
        listing, level = await self.listing(dir)
        if listing is None:
            return None
        if listing.entries is not None:
            entries = listing.entries
            i = bisect.bisect_left(_Names(entries), name)
            found = entries[i] if i < len(entries) and entries[i].name == name else None
            return Cached(found, listing.fetched, level)

        row = self._query("SELECT name, kind, size, mtime, version FROM entry WHERE dir = ? AND gen = ? AND name = ?",
                          (dir, listing.gen, name), default=False)
        if row is False:
            return None
        status = _status(*row) if row else None
        self._remember(join(dir, name), listing.fetched, status)  # the next lookup stays in memory
        return Cached(status, listing.fetched, level)

    def new_generation(self) -> int:
        self._gen += 1
        return self._gen

    async def begin_fill(self, dir: str, gen: int) -> None:
        await self._run(lambda: self._db.execute("INSERT OR REPLACE INTO filling VALUES (?, ?)", (dir, gen)))

    async def add_entries(self, dir: str, gen: int, entries: Iterable[FileStatus]) -> None:
        rows = [(dir, gen, e.name, *_row(e)) for e in entries]

        def write():
            with self._db:
                self._db.executemany("INSERT OR REPLACE INTO entry VALUES (?, ?, ?, ?, ?, ?, ?)", rows)

        await self._run(write)

    async def finish_fill(self, dir: str, gen: int, fetched: float, count: int,
                          entries: list[FileStatus] | None) -> Listing:
        """Make the filled generation the current listing and drop the previous one."""
        def write():
            with self._db:
                old = self._db.execute("SELECT gen FROM listing WHERE dir = ?", (dir,)).fetchone()
                self._db.execute("INSERT OR REPLACE INTO listing VALUES (?, ?, ?, ?)", (dir, gen, fetched, count))
                self._db.execute("DELETE FROM filling WHERE dir = ? AND gen = ?", (dir, gen))
                if old is not None and old[0] != gen:
                    self._db.execute("DELETE FROM entry WHERE dir = ? AND gen = ?", (dir, old[0]))
            return True

        stored = await self._run(write, default=False)
        if not stored and entries is None:
            raise sqlite3.OperationalError(f"listing of {dir} could not be stored")
        if entries is not None and len(entries) > self.memory_listing_max:
            entries = None
        listing = Listing(dir, gen, fetched, count, entries)
        self._drop_memory_listing(dir)
        if entries is not None:
            self._listings[dir] = listing
            self._listing_entries += len(entries)
            self._trim()
        return listing

    async def abort_fill(self, dir: str, gen: int) -> None:
        def write():
            with self._db:
                self._db.execute("DELETE FROM entry WHERE dir = ? AND gen = ?", (dir, gen))
                self._db.execute("DELETE FROM filling WHERE dir = ? AND gen = ?", (dir, gen))

        await self._run(write)

    def _drop_memory_listing(self, dir: str) -> None:
        held = self._listings.pop(dir, None)
        if held is not None:
            self._listing_entries -= len(held.entries or ())

    # -- invalidation -------------------------------------------------------------------

    async def invalidate(self, uris: Iterable[str], *, recursive_under: str | None = None,
                         listings: Iterable[str] = ()) -> tuple[list[tuple[str, FileStatus]], int]:
        """Drop statuses of `uris` (and of everything under `recursive_under`) and the
        listings of `listings` (and under `recursive_under`).

        Returns the dropped file statuses (uri, status), for their pages, and the number of
        listings dropped.
        """
        uris, listings = list(uris), list(listings)
        low, high = _prefix_range(recursive_under) if recursive_under else ("", "")
        dropped: dict[str, FileStatus] = {}

        def under(key: str) -> bool:
            return bool(recursive_under) and low <= key < high

        for key in [k for k in self._statuses if k in uris or under(k)]:
            status = self._statuses.pop(key)[1]
            if status is not None and not status.is_dir:
                dropped[key] = status
        dropped_listings = {d for d in self._listings if d in listings or under(d)}
        for d in dropped_listings:
            self._drop_memory_listing(d)

        def write():
            found: list[tuple] = []
            gone: list[str] = []
            with self._db:
                for uri in uris:
                    found += [(uri, *r) for r in self._db.execute(
                        "SELECT kind, size, mtime, version FROM status WHERE uri = ?", (uri,))]
                    self._db.execute("DELETE FROM status WHERE uri = ?", (uri,))
                if recursive_under:
                    found += self._db.execute(
                        "SELECT uri, kind, size, mtime, version FROM status WHERE uri >= ? AND uri < ?",
                        (low, high)).fetchall()
                    self._db.execute("DELETE FROM status WHERE uri >= ? AND uri < ?", (low, high))
                    gone += [r[0] for r in self._db.execute(
                        "SELECT dir FROM listing WHERE dir >= ? AND dir < ?", (low, high))]
                for d in listings:
                    if self._db.execute("SELECT 1 FROM listing WHERE dir = ?", (d,)).fetchone():
                        gone.append(d)
                for d in gone:
                    self._db.execute("DELETE FROM listing WHERE dir = ?", (d,))
                    self._db.execute("DELETE FROM entry WHERE dir = ?", (d,))
            return found, gone

        found, gone = await self._run(write, default=([], []))
        for uri, kind, size, mtime, version in found:
            status = _status(_name(uri), kind, size, mtime, version)
            if status is not None and not status.is_dir:
                dropped.setdefault(uri, status)
        return sorted(dropped.items()), len(dropped_listings | set(gone))


class _Names:
    """Sequence view of entry names, for bisect without building a second list."""

    def __init__(self, entries: list[FileStatus]):
        self._entries = entries

    def __len__(self) -> int:
        return len(self._entries)

    def __getitem__(self, i: int) -> str:
        return self._entries[i].name
