"""WAL checkpoints of the daemon's database, run beside the writer instead of inside it.

In WAL mode every committed page is written twice: appended to the log, then copied into
the database file by a checkpoint. SQLite's default runs that copy inside a commit, every
1000 pages, with the write lock held, and syncs the log and the database around it: a record
batch then waits for the copy of earlier ones. Here the writer's commits only append and
report the log's size (a WAL hook); a thread with its own connection copies the log into the
database once the writer has been idle for `IDLE_SECONDS`, or at once when the log passes
`BUSY_BYTES` or a quarter of the disk's free space (a daemon that is never idle still
checkpoints, and a log never holds much of a filling disk), then restarts the log, holding
the writer back (through the transaction lock `Database` shares with it) only for what was
committed during the copy (`_checkpoint`). While the log grows, the thread
syncs it ahead every `SYNC_AHEAD_BYTES`, so that the fsync of a volume image's commit
(synchronous=FULL) finds little left to write. The writer checkpoints itself only if the log
ever reaches `BACKSTOP_BYTES` (the thread stalled behind a long reader, say).

Durability does not depend on the checkpoint: a commit is durable once the log holding it is
synced; a crash during a checkpoint is recovered by SQLite from the log.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from pathlib import Path

import apsw

log = logging.getLogger("replicore.store")

IDLE_SECONDS = 1.0
BUSY_BYTES = 768 * 1024 * 1024
BACKSTOP_BYTES = 2 * BUSY_BYTES
SYNC_AHEAD_BYTES = 64 * 1024 * 1024
#: How long restarting the log may wait for readers still on it (the writer waits meanwhile).
TRUNCATE_WAIT_MS = 200
#: The restart copies what was committed since the last copy with the writer held back: the
#: copy beside the writer is repeated (at most CATCH_UP_ROUNDS times) until that is this small.
RESTART_BYTES = 16 * 1024 * 1024
CATCH_UP_ROUNDS = 8


def sync_file(path: str) -> None:
    """fdatasync `path` (a missing file has nothing to sync)."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        try:
            os.fdatasync(fd)
        finally:
            os.close(fd)


class Checkpointer:
    """Owns the WAL hook of the writer connection, and a thread and connection of its own."""

    def __init__(
        self,
        path: Path,
        writer: apsw.Connection,
        own: apsw.Connection,
        busy_timeout_ms: int,
        writer_lock: threading.Lock,
    ) -> None:
        page_size = int(writer.execute("PRAGMA page_size").fetchone()[0])
        self._path = str(path)
        self._wal_path = f"{path}-wal"
        self._directory = str(path.parent)
        self._page_size = page_size
        self._backstop_pages = BACKSTOP_BYTES // page_size
        self._sync_pages = SYNC_AHEAD_BYTES // page_size
        self._restart_pages = RESTART_BYTES // page_size
        self._conn = own
        self._busy_timeout_ms = busy_timeout_ms
        self._writer_lock = writer_lock  # held by the writer around each of its transactions
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = False
        self._pages = 0  # pages in the log, as the writer's last commit reported
        self._commits = 0
        self._last_commit = time.monotonic()
        # What the thread waits for besides its timeout: a commit at all (when nothing is
        # pending) or the log reaching a size; other commits do not wake it (a wake-up per
        # commit cost the writer a thread switch each time).
        self._waiting_forever = False
        self._wake_at_pages = 0
        writer.set_wal_hook(self._on_commit)
        self._thread = threading.Thread(target=self._run, name="wal-checkpoint", daemon=True)
        self._thread.start()

    def _on_commit(self, conn: apsw.Connection, _name: str, pages: int) -> int:
        with self._lock:
            self._pages = pages
            self._commits += 1
            self._last_commit = time.monotonic()
            wake = self._waiting_forever or pages >= self._wake_at_pages
            if wake:
                self._waiting_forever, self._wake_at_pages = False, self._backstop_pages
        if wake:
            self._wake.set()
        if pages >= self._backstop_pages:
            # Never raise here: the commit is done, an error would fail it in the caller's
            # eyes. BUSY: the thread is checkpointing.
            with contextlib.suppress(apsw.Error):
                conn.wal_checkpoint(mode=apsw.SQLITE_CHECKPOINT_PASSIVE)
        return apsw.SQLITE_OK

    def _run(self) -> None:
        while not self._stopping:
            try:
                self._loop()
            except Exception:
                log.exception("the WAL checkpoint thread failed; restarting it")
                time.sleep(IDLE_SECONDS)
        self._conn.close()

    def _loop(self) -> None:
        synced = 0  # log pages known to be on disk
        checkpointed = 0  # commits copied into the database
        retry_at = 0.0
        while not self._stopping:
            self._wake.clear()
            with self._lock:
                pages, commits, last_commit = self._pages, self._commits, self._last_commit
            now = time.monotonic()
            if pages < synced:  # the log was restarted from its beginning
                synced = 0
            busy_pages = self._busy_pages()
            timeout = None
            if commits != checkpointed:
                due = max(last_commit + IDLE_SECONDS, retry_at)
                if now >= due or (pages >= busy_pages and now >= retry_at):
                    if self._checkpoint(idle=now >= due):
                        checkpointed, synced = commits, pages
                    else:
                        retry_at = now + IDLE_SECONDS
                    continue
                timeout = due - now
            if pages - synced >= self._sync_pages:
                sync_file(self._wal_path)
                synced = pages
            with self._lock:
                if self._commits != commits:
                    continue  # a commit came meanwhile: look again
                self._waiting_forever = timeout is None
                self._wake_at_pages = min(synced + self._sync_pages, busy_pages)
            self._wake.wait(timeout)

    def _busy_pages(self) -> int:
        """Log pages at which to copy it into the database even while the writer is busy."""
        try:
            found = os.statvfs(self._directory)
            free = found.f_bavail * found.f_frsize
        except OSError:
            free = BUSY_BYTES
        return min(BUSY_BYTES, free // 4) // self._page_size

    def _checkpoint(self, *, idle: bool) -> bool:
        """Copy the log into the database, then restart it; True when done. The copy runs
        beside the writer; the restart holds the writer back only while it copies what was
        committed meanwhile, and gives up after TRUNCATE_WAIT_MS if a reader still uses the
        log (the next try comes a second later). Without the restart a log written to
        without pause would never start over and would grow without end. When the writer is
        `idle`, the log file is also cut to nothing: frames (16 KiB pages behind 24-byte
        headers) straddle the file's 4 KiB pages, and writing over an old log whose pages
        the page cache has dropped meanwhile reads each of them from disk first (a push
        after an idle time took up to 0.7 s longer in its commits); appended to an empty
        file, they read nothing. While busy the log's pages are still cached: it is
        restarted in place, which costs the writer nothing (cutting a log of hundreds of MiB
        would hold it 0.4-0.8 s; SQLite's default journal_size_limit never cuts it)."""
        try:
            copied_to = -1
            for _ in range(CATCH_UP_ROUNDS):  # a busy writer appends while this copies
                log_pages, _ = self._conn.wal_checkpoint(mode=apsw.SQLITE_CHECKPOINT_PASSIVE)
                if log_pages - copied_to <= self._restart_pages:
                    break
                copied_to = log_pages
            if log_pages == 0:
                return True
            sync_file(self._path)  # the copy's dirty pages go to disk before the writer waits
            self._conn.set_busy_timeout(TRUNCATE_WAIT_MS)
            try:
                mode = apsw.SQLITE_CHECKPOINT_TRUNCATE if idle else apsw.SQLITE_CHECKPOINT_RESTART
                with self._writer_lock:
                    self._conn.wal_checkpoint(mode=mode)
            finally:
                self._conn.set_busy_timeout(self._busy_timeout_ms)
        except apsw.BusyError:
            return False  # a reader (or the writer's own backstop) holds it: try again later
        except apsw.Error as error:
            log.warning("WAL checkpoint failed: %s", error)
            return False
        return True

    def close(self) -> None:
        """Stop the thread (after the checkpoint it may be running) and close its connection."""
        self._stopping = True
        self._wake.set()
        self._thread.join()
