"""The on-disk level of the feature cache: an SQLite file in a directory the user names.

Trust. Whoever can write the directory or its files can change every feature a fit reads from
it, so, as ssh, pip and git do for such places, a directory or file is refused
(:class:`CacheDirectoryError`) when it is writable by group or others, or owned by a user
other than this process's (or root); on platforms without ``os.getuid`` (Windows) neither is
checked. Directories this module makes are mode 0o700, files 0o600. Before a file is used its
schema must be exactly the one written here (one table ``rows`` and its primary-key index: no
view, no trigger, nothing else).

Broken directories (a regular file in place of the directory, a file that is not SQLite, a
truncated or corrupted file, one that cannot be created) raise :class:`CacheDirectoryError`
naming the path, the cause and the fix. A populated cache that this process cannot write is
used for reads (SQLite ``mode=ro``, else ``immutable=1``): misses are computed, not stored.

Recovery. The directory or its file may be removed by another process at any time (``rmtree``,
:func:`clear_directory`): the next operation recreates the directory and schema and goes on.

Locking. Missing rows of a model are computed under an exclusive lock on a file per model key,
``<directory>/skl_transfer_locks/<model key>.lock`` (``fcntl.flock``; ``msvcrt.locking`` on
Windows; no cross-process lock where neither exists: rows may then be computed twice, never
stored wrong). SQLite transactions stay short (reads, and the insert of the computed rows).
A lock not obtained within :data:`LOCK_TIMEOUT` seconds raises :class:`CacheLockTimeout`.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import socket
import sqlite3
import stat
import threading
import time
import weakref
from pathlib import Path

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None
try:
    import msvcrt
except ImportError:
    msvcrt = None

LOCK_TIMEOUT = 600.0  # seconds to wait for another process's lock on a model's missing rows
SQLITE_TIMEOUT = 60.0  # seconds to wait for SQLite's short transactions (reads, one insert)
LOCKDIR = "skl_transfer_locks"

_SCHEMA = "CREATE TABLE rows (model TEXT, row BLOB, dtype TEXT, data BLOB, PRIMARY KEY (model, row))"
_EXPECTED = {("table", "rows", "rows", _SCHEMA), ("index", "sqlite_autoindex_rows_1", "rows", None)}
_POSIX = hasattr(os, "getuid")
_INSTANCES: weakref.WeakSet = weakref.WeakSet()


class CacheDirectoryError(ValueError):
    """A feature cache directory that is not trusted, or that is broken.

    Not trusted: writable by group or others, owned by another user, or a cache file of a
    foreign schema. Broken: not a directory, not SQLite, truncated or corrupted. The message
    names the path, the cause and the fix. A ``ValueError``, raised by the first fit that
    uses the directory (``cache="/path"`` or ``cache=joblib.Memory("/path")``).

    See Also
    --------
    clear_cache : Empty a cache directory, or delete a broken cache file.
    CacheLockTimeout : Another process held a model's lock too long.

    Notes
    -----
    The directory holds ``skl_transfer_features.sqlite`` (SQLite in WAL mode, with its
    ``-wal`` and ``-shm`` files) and ``skl_transfer_locks/`` (one empty lock file per model).
    Rows go to the SQLite file as well as to each process's memory, and each distinct sample
    runs through the extractor once over all the processes that share the directory
    (``n_jobs > 1`` with loky, dask workers). The directory is not bounded.

    **Trust.** Whoever can write the directory or its files can change every feature that a
    fit reads from it, so every model fitted from it. The directory, the cache file, its
    ``-wal`` and ``-shm`` and the lock directory are therefore used only when they are owned
    by the user running the process (or by root, who can change any file anyway) and not
    writable by group or others: the rule ssh applies to ``~/.ssh`` (pip and git apply its
    ownership half to their caches and repositories). Anything else is refused with the fix:
    ``chmod go-w <path>``, or a directory of your own. The check runs when a process first
    uses the directory and again (a few ``stat`` calls) at every fit. Directories the library
    creates are mode ``0o700`` and files ``0o600``, whatever the umask. Before a file is read,
    its schema must be exactly the library's: one table ``rows`` and its primary-key index,
    no view, no trigger, no other table (a planted ``rows`` view with an ``INSTEAD OF
    INSERT`` trigger could otherwise rewrite every stored row); a file with any other schema
    is refused, naming ``skl_transfer.clear_cache(directory)``. On platforms without
    ``os.getuid`` (Windows) neither owner nor mode is checked, only the schema.

    Not protected: your own processes (and root) can write the file, so a cache is as
    trustworthy as the account that owns it; do not point ``cache=`` at a directory written
    by someone you do not trust (a group-writable shared directory is refused for that
    reason). Stored rows carry no checksum: SQLite detects damage to the file's structure,
    not a value changed inside a row.

    **A cache you can read but not write** (a read-only file, directory or file system, for
    example a cache prepared by root and shared read-only) is used for reads: hits come from
    it, misses are computed and not stored (SQLite ``mode=ro``, or ``immutable=1`` where no
    ``-shm`` file can be made there; if a non-empty ``-wal`` is left beside such a file it is
    refused instead).

    **Broken directories** fail at the first fit that uses them, each with this error:

    - the path is a regular file, or a file is on its path: not a directory; pass a
      directory, or ``cache=True`` (this process's memory only);
    - it cannot be created, read or traversed: another directory, or ``cache=True``;
    - it is not writable and holds no cache file: another directory, or ``cache=True``;
    - the cache file is not SQLite, is truncated or corrupted (found when the file is opened
      or when a damaged page is read), has another schema, or the disk is full: the message
      names the file and SQLite's diagnosis; ``skl_transfer.clear_cache(directory)``
      (deletes a file that is not an intact cache of the library's), another directory, or
      ``cache=True``;
    - another process holds a model's lock too long: :class:`CacheLockTimeout`.

    Examples
    --------
    >>> import tempfile
    >>> import numpy as np
    >>> import torch
    >>> from skl_transfer import CacheDirectoryError, LayerVariationalAdapter
    >>> X, y = np.ones((8, 3), dtype=np.float32), np.ones(8)
    >>> with tempfile.NamedTemporaryFile() as f:  # a regular file, not a directory
    ...     try:
    ...         LayerVariationalAdapter(torch.nn.Linear(3, 4), cache=f.name).fit(X, y)
    ...     except CacheDirectoryError as e:
    ...         print(str(e)[str(e).index("is not"):])
    is not a directory (a file is in its place or on its path). Fix: pass a directory ...
    """


class CacheLockTimeout(CacheDirectoryError, TimeoutError):
    """Another process held a model's cache lock for too long.

    A :class:`CacheDirectoryError` and a ``TimeoutError``, raised after
    ``skl_transfer._diskcache.LOCK_TIMEOUT`` seconds (600) of waiting; the message names the
    lock file and the holder's process id and host. Fix: wait, end that process, or
    ``clear_cache(directory)``, which removes the lock files.

    See Also
    --------
    CacheDirectoryError : The other errors of a cache directory.
    clear_cache : Empty a cache directory and remove its lock files.

    Notes
    -----
    The missing rows of one batch of one model are computed and stored under an exclusive
    lock on ``skl_transfer_locks/<model key>.lock`` (``fcntl.flock``; ``msvcrt.locking`` on
    Windows; Linux emulates ``flock`` with POSIX locks on NFS). Other models, and reads of
    rows already stored, do not wait for it, and SQLite's own transactions are short (a
    read, or one insert of a batch's rows). Each distinct sample therefore runs through the
    extractor once across all processes that share the directory (tested with loky and dask
    workers). A lock goes with its process when that process exits or is killed; a process
    that is stopped while holding one (Ctrl-Z, a debugger) makes the others wait, then raise
    this error. Where no file lock exists, two processes may compute the same rows; they
    store identical rows once.

    A child forked while other threads are inside a cached fit gets fresh locks
    (``os.register_at_fork``) and its own SQLite connection, so it never waits for a thread
    that does not exist in it; it waits only for a directory lock held by a live thread of
    the parent, released when that thread's batch is stored. (Independently of the cache,
    torch's OpenMP thread pool is not fork-safe: a child that runs parallel torch operations
    after its parent did can hang in libgomp; call ``torch.set_num_threads(1)`` first in such
    a child, or use the ``spawn`` start method.)

    Examples
    --------
    >>> from skl_transfer import CacheDirectoryError, CacheLockTimeout
    >>> issubclass(CacheLockTimeout, CacheDirectoryError), issubclass(CacheLockTimeout, TimeoutError)
    (True, True)
    """


def _fix(directory):
    return (
        f"Fix: skl_transfer.clear_cache({directory!r}) removes the cache file (its rows are "
        "recomputed), or pass another directory as cache=, or cache=True to cache in this "
        "process's memory only."
    )


def _writable(path):
    """Whether this process may write ``path`` (tests monkeypatch it: root writes anything)."""
    return os.access(path, os.W_OK)


def _check_path(path, st=None, what="directory"):
    """Refuse ``path`` (a directory or file of the cache) that others can write or own."""
    if not _POSIX:
        return
    st = os.stat(path) if st is None else st
    uid = os.getuid()
    if st.st_uid not in (uid, 0):
        raise CacheDirectoryError(
            f"The feature cache {what} {path!r} is owned by another user (uid {st.st_uid}; this "
            f"process runs as uid {uid}): its owner could change every feature read from it, so "
            "it is not used. Fix: pass a directory of your own as cache= (or cache=True to cache "
            "in this process's memory only)."
        )
    if st.st_mode & 0o022:
        who = " and ".join(w for w, bit in (("group", 0o020), ("others", 0o002)) if st.st_mode & bit)
        raise CacheDirectoryError(
            f"The feature cache {what} {path!r} is writable by {who} (mode "
            f"{oct(stat.S_IMODE(st.st_mode))}): whoever can write it could change every feature "
            f"read from it, so it is not used. Fix: chmod go-w {path!r}, or pass another directory "
            "as cache= (or cache=True to cache in this process's memory only)."
        )


def _code(exc):
    return getattr(exc, "sqlite_errorcode", 0) & 0xFF


def _retry_busy(step, timeout=SQLITE_TIMEOUT):
    """Run ``step()``, again while SQLite answers busy or locked, for up to ``timeout`` seconds.

    SQLite does not call its busy handler for every lock it takes: changing the journal mode
    of a file that another process is creating answers SQLITE_BUSY at once, whatever the
    connection's timeout (two processes opening a new cache directory together).
    """
    deadline = time.monotonic() + timeout
    pause = 0.001
    while True:
        try:
            return step()
        except sqlite3.OperationalError as exc:
            if _code(exc) not in (5, 6) or time.monotonic() + pause > deadline:  # BUSY, LOCKED
                raise
        time.sleep(pause)
        pause = min(2 * pause, 0.1)


def _lock_name(mkey):
    if re.fullmatch(r"[0-9A-Za-z_-]{1,100}", mkey):
        return f"{mkey}.lock"
    return hashlib.sha256(mkey.encode()).hexdigest() + ".lock"


def _try_lock(fd):
    """Take the exclusive lock of ``fd`` without waiting: True if taken."""
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        elif msvcrt is not None:  # pragma: no cover - Windows
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
    except OSError:
        return False
    return True


class _Kept(threading.local):
    con = None  # this thread's SQLite connection
    pid = None  # the process that opened it
    ident = None  # (device, inode, uri) of the file it opened


_ABANDONED: list = []  # in a forked child: state inherited from the parent, kept alive unused


class DiskCache:
    """Feature rows in ``<directory>/skl_transfer_features.sqlite``, shared between processes.

    ``readonly`` is True when the file exists but this process cannot write it: rows are read,
    :meth:`put` stores nothing and :meth:`lock` locks nothing.
    """

    FILENAME = "skl_transfer_features.sqlite"

    def __init__(self, directory):
        self.directory = os.path.abspath(os.fspath(directory))
        self.path = os.path.join(self.directory, self.FILENAME)
        self.lockdir = os.path.join(self.directory, LOCKDIR)
        self.readonly = False
        self._uri = None
        self._guard = threading.Lock()  # serialises (re)opening
        self._held = {}  # (model key, thread id) -> [lock fd, depth]
        self._local = _Kept()  # each thread's connection
        with self._guard:
            self._open()
        _INSTANCES.add(self)

    # -- opening, checking, recovering ---------------------------------------------------

    def _error(self, cause, fix=True):
        msg = f"The feature cache in {self.directory!r} cannot be used: {cause}."
        return CacheDirectoryError(f"{msg} {_fix(self.directory)}" if fix else msg)

    def _broken(self, exc):
        """A clear error for an SQLite or OS error on the cache file."""
        code = _code(exc)
        if code == 13:  # SQLITE_FULL
            cause = f"the disk holding {self.path!r} is full ({exc})"
        elif code in (11, 26):  # SQLITE_CORRUPT, SQLITE_NOTADB
            cause = (
                f"{self.path!r} is not an intact SQLite file ({exc}): it is truncated, corrupted "
                "or another kind of file"
            )
        else:
            cause = f"{self.path!r} failed: {exc}"
        err = self._error(cause)
        err.__cause__ = exc
        return err

    def _unreadable(self, path, exc):
        return CacheDirectoryError(
            f"The feature cache in {self.directory!r} cannot be used: {path!r} cannot be read or "
            f"created by this process ({exc}). Fix: pass a directory of your own as cache=, or cache=True to "
            "cache in this process's memory only."
        )

    def check_trusted(self):
        """Stat the directory and its files: refuse what others can write or own (cheap)."""
        try:
            st = os.stat(self.directory)
        except FileNotFoundError:
            return  # removed: the next operation recreates it
        except NotADirectoryError:
            st = None
        except OSError as exc:
            raise self._unreadable(self.directory, exc) from exc
        if st is None or not stat.S_ISDIR(st.st_mode):
            raise CacheDirectoryError(
                f"cache={self.directory!r} is not a directory (a file is in its place or on its path). "
                "Fix: pass a directory (it is created if missing) as cache=, or cache=True to "
                "cache in this process's memory only."
            )
        _check_path(self.directory, st)
        for path in (self.path, self.path + "-wal", self.path + "-shm", self.lockdir):
            try:
                st = os.stat(path)
            except FileNotFoundError:
                continue
            except OSError as exc:
                raise self._unreadable(path, exc) from exc
            if path == self.lockdir:
                if not stat.S_ISDIR(st.st_mode):
                    raise self._error(f"{path!r} is not a directory")
                _check_path(path, st)
            else:
                if not stat.S_ISREG(st.st_mode):
                    raise self._error(f"{path!r} is not a regular file")
                _check_path(path, st, "file")

    def _make_directory(self):
        try:
            os.makedirs(self.directory, mode=0o700, exist_ok=True)
        except (NotADirectoryError, FileExistsError):
            pass  # check_trusted names it
        except OSError as exc:
            raise CacheDirectoryError(
                f"The feature cache directory {self.directory!r} cannot be created ({exc}). Fix: "
                "pass a writable directory as cache=, or cache=True to cache in this process's "
                "memory only."
            ) from exc

    def _open(self):
        """Check the directory and file, create what is missing, verify the schema."""
        if not os.path.lexists(self.directory):
            self._make_directory()
        self.check_trusted()
        exists = os.path.exists(self.path)
        if _writable(self.directory) and (not exists or _writable(self.path)):
            self._open_rw(exists)
        elif exists:
            self._open_ro()
        else:
            raise CacheDirectoryError(
                f"The feature cache directory {self.directory!r} is not writable by this process "
                "and holds no cache file. Fix: pass a writable directory as cache=, or cache=True "
                "to cache in this process's memory only."
            )

    def _verify(self, con):
        """True if the file holds exactly our schema, False if it is empty; refuse otherwise."""
        found = set(con.execute("SELECT type, name, tbl_name, sql FROM sqlite_master"))
        if not found:
            return False
        if found != _EXPECTED:
            kinds = sorted({f"{t} {n!r}" for t, n, _, s in found if (t, n, _, s) not in _EXPECTED})
            raise self._error(
                f"{self.path!r} is not a feature cache written by skl_transfer: its schema has "
                f"{', '.join(kinds) or 'other definitions'} (a view, trigger or other table would let "
                "the file change the features read or stored)"
            )
        return True

    def _open_rw(self, exists):
        if not exists:
            with contextlib.suppress(FileExistsError):
                os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        uri = Path(self.path).as_uri() + "?mode=rw"
        try:
            con = sqlite3.connect(uri, uri=True, timeout=SQLITE_TIMEOUT, isolation_level=None)
        except sqlite3.Error as exc:
            raise self._broken(exc) from exc
        try:
            _retry_busy(lambda: self._initialise(con))
        except sqlite3.Error as exc:
            if _code(exc) == 8:  # SQLITE_READONLY: a read-only file system or file
                con.close()
                return self._open_ro()
            raise self._broken(exc) from exc
        finally:
            con.close()
        self._uri, self.readonly = uri, False

    def _initialise(self, con):
        """Create the schema in WAL mode if the file is empty; switch an existing file to WAL."""
        if con.in_transaction:  # a retry after a busy error inside the transaction
            con.execute("ROLLBACK")
        if not self._verify(con):
            con.execute("PRAGMA journal_mode=WAL")
            con.execute("BEGIN IMMEDIATE")
            if not self._verify(con):  # another process may have just created it
                con.execute(_SCHEMA)
            con.execute("COMMIT")
        elif con.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
            con.execute("PRAGMA journal_mode=WAL")

    def _open_ro(self):
        base = Path(self.path).as_uri()
        wal = self.path + "-wal"
        tries = [base + "?mode=ro"]
        if not os.path.exists(wal) or os.path.getsize(wal) == 0:
            tries.append(base + "?immutable=1")  # no -shm can be made; nothing pending in a WAL
        for i, uri in enumerate(tries):
            try:
                con = sqlite3.connect(uri, uri=True, timeout=SQLITE_TIMEOUT, isolation_level=None)
                try:
                    ok = self._verify(con)
                finally:
                    con.close()
            except sqlite3.Error as exc:
                if i + 1 < len(tries) and _code(exc) in (14, 8):  # CANTOPEN, READONLY: no -shm
                    continue
                raise self._broken(exc) from exc
            if not ok:
                raise self._error(f"{self.path!r} is empty and this process cannot write it")
            self._uri, self.readonly = uri, True
            return

    def _reopen(self):
        with self._guard:
            self._open()

    def _vanished(self, exc):
        """Whether ``exc`` says the directory or file was removed or replaced meanwhile."""
        if isinstance(exc, FileNotFoundError) or not os.path.exists(self.path):
            return True
        msg = str(exc)
        return _code(exc) in (8, 14) or "no such table" in msg or "unable to open" in msg

    def _connection(self):
        """This thread's connection, kept between operations (closing an SQLite connection
        checkpoints its WAL: milliseconds); a new one if the file was replaced or removed
        (checked by one ``stat``), or in a forked child."""
        loc = self._local
        st = os.stat(self.path)  # FileNotFoundError: removed, recovered by _run
        ident = (st.st_dev, st.st_ino, self._uri)
        if loc.con is not None and (loc.pid != os.getpid() or loc.ident != ident):
            self._drop_connection()
        if loc.con is None:
            con = sqlite3.connect(self._uri, uri=True, timeout=SQLITE_TIMEOUT, isolation_level=None)
            st = os.stat(self.path)
            if (st.st_dev, st.st_ino, self._uri) != ident:  # replaced meanwhile
                con.close()
                raise FileNotFoundError(f"{self.path} was replaced")
            if not self.readonly:
                con.execute("PRAGMA synchronous=NORMAL")  # a cache: durable at checkpoints is enough
            loc.con, loc.pid, loc.ident = con, os.getpid(), ident
        return loc.con

    def _drop_connection(self):
        loc = self._local
        if loc.con is not None:
            if loc.pid == os.getpid():
                with contextlib.suppress(sqlite3.Error):
                    loc.con.close()
            else:  # inherited through fork: SQLite forbids using (or closing) it here
                _ABANDONED.append(loc.con)
        loc.con = None

    def _run(self, work):
        """``work(connection)``, again while SQLite answers busy without waiting; reopen once
        if the cache went away."""
        for attempt in (0, 1):
            try:
                return _retry_busy(lambda: work(self._connection()))
            except (sqlite3.Error, OSError) as exc:
                self._drop_connection()
                if attempt == 0 and self._vanished(exc):
                    self._reopen()
                    continue
                raise self._broken(exc) from exc

    # -- the interface of CachedExtractor ------------------------------------------------

    def get(self, mkey, keys):
        """Stored ``(dtype tag, row bytes)`` for each row key (bytes), None where absent."""

        def read(con):
            found = {}
            for start in range(0, len(keys), 500):
                chunk = keys[start : start + 500]
                marks = ",".join("?" * len(chunk))
                q = f"SELECT row, dtype, data FROM rows WHERE model = ? AND row IN ({marks})"
                for row, tag, data in con.execute(q, (mkey, *chunk)):
                    found[row] = (tag, data)
            return found

        found = self._run(read)
        return [found.get(k) for k in keys]

    def put(self, mkey, keys, tag, rows):
        """Store one row (a numpy array) per row key, all with the dtype tag ``tag``, in one
        short transaction; nothing on a read-only cache."""
        values = [(mkey, k, tag, r.tobytes()) for k, r in zip(keys, rows, strict=True)]

        def write(con):
            if self.readonly:
                return
            con.execute("BEGIN IMMEDIATE")
            try:
                con.executemany("INSERT OR IGNORE INTO rows VALUES (?, ?, ?, ?)", values)
                con.execute("COMMIT")
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    con.execute("ROLLBACK")
                raise

        if not self.readonly:
            self._run(write)

    def lock_path(self, mkey):
        """The lock file of model ``mkey``."""
        return os.path.join(self.lockdir, _lock_name(mkey))

    @contextlib.contextmanager
    def lock(self, mkey):
        """Held while the missing rows of model ``mkey`` are computed and stored, so that
        concurrent processes compute each row once; other models are not blocked.

        Re-entrant within a thread. Raises :class:`CacheLockTimeout` after
        :data:`LOCK_TIMEOUT` seconds.
        """
        if self.readonly:
            yield
            return
        me = (mkey, threading.get_ident())
        held = self._held.get(me)
        if held is not None:
            held[1] += 1
            try:
                yield
            finally:
                held[1] -= 1
            return
        fd = self._acquire(mkey)
        self._held[me] = [fd, 1]
        try:
            yield
        finally:
            self._held.pop(me, None)
            os.close(fd)  # releases the lock

    def _open_lock_file(self, path):
        flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0)
        for attempt in (0, 1):
            try:
                return os.open(path, flags, 0o600)
            except FileNotFoundError as exc:
                if attempt:
                    raise self._unreadable(path, exc) from exc
            except OSError as exc:
                raise self._unreadable(path, exc) from exc
            if not os.path.isdir(self.directory):
                self._reopen()  # the directory went away: recreate it
            try:
                os.mkdir(self.lockdir, 0o700)
            except FileExistsError:
                pass
            except OSError as exc:
                raise self._unreadable(self.lockdir, exc) from exc
            _check_path(self.lockdir)

    def _acquire(self, mkey):
        path = self.lock_path(mkey)
        deadline = time.monotonic() + LOCK_TIMEOUT
        delay = 0.001
        fd = self._open_lock_file(path)
        while True:
            if _try_lock(fd):
                try:
                    same = os.path.samestat(os.fstat(fd), os.stat(path))
                except FileNotFoundError:
                    same = False
                if same:
                    with contextlib.suppress(OSError):  # who holds it, for the timeout's message
                        os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}".encode()[:255].ljust(256), 0)
                    return fd
                os.close(fd)  # the file was removed meanwhile: lock the one now in its place
                fd = self._open_lock_file(path)
                continue
            if time.monotonic() >= deadline:
                try:
                    holder = os.pread(fd, 256, 0).decode(errors="replace").split()
                except OSError:
                    holder = []
                os.close(fd)
                who = f"process {holder[0]} on {holder[1]}" if len(holder) == 2 else "another process"
                raise CacheLockTimeout(
                    f"Timed out after {LOCK_TIMEOUT:g} s waiting for the feature cache lock "
                    f"{path!r}: {who} holds it while it computes and stores features of this model "
                    "(one batch at a time). It may still be working, or be stopped (Ctrl-Z, a "
                    "debugger) or hung. Fix: wait and retry; end that process (its lock goes with "
                    f"it); or remove the lock with skl_transfer.clear_cache({self.directory!r}); "
                    "or cache=True to cache in this process's memory only."
                )
            time.sleep(delay)
            delay = min(2 * delay, 0.05)

    def _after_fork_in_child(self):
        """In a forked child: new locks; close the inherited lock files of the parent's threads
        (the parent still holds those locks; the child must not keep them alive)."""
        self._guard = threading.Lock()
        _ABANDONED.append(self._local)  # the parent's connections: never used nor closed here
        self._local = _Kept()
        held, self._held = self._held, {}
        for fd, _ in held.values():
            with contextlib.suppress(OSError):
                os.close(fd)


def after_fork_in_child():
    """Reset the locks of every DiskCache of this process (called in a forked child)."""
    for disk in list(_INSTANCES):
        disk._after_fork_in_child()


def clear_directory(directory):
    """Empty the feature cache file in ``directory`` and remove its lock files.

    A trusted file with our schema is emptied in place by SQL (safe while other processes use
    it); any other file there (corrupted, not SQLite, a foreign schema) is deleted.
    """
    directory = os.path.abspath(os.fspath(directory))
    path = os.path.join(directory, DiskCache.FILENAME)
    if os.path.isfile(path) and not _clear_in_place(path):
        for suffix in ("-wal", "-shm", ""):
            with contextlib.suppress(FileNotFoundError):
                os.remove(path + suffix)
    lockdir = os.path.join(directory, LOCKDIR)
    if os.path.isdir(lockdir):
        for name in os.listdir(lockdir):
            if name.endswith(".lock"):
                with contextlib.suppress(FileNotFoundError):
                    os.remove(os.path.join(lockdir, name))


def _clear_in_place(path):
    try:
        _check_path(os.path.dirname(path))
        for p in (path, path + "-wal", path + "-shm"):
            if os.path.exists(p):
                _check_path(p, what="file")
        if not _writable(path):
            return False
        con = sqlite3.connect(Path(path).as_uri() + "?mode=rw", uri=True, timeout=SQLITE_TIMEOUT)
        con.isolation_level = None
        try:
            if set(con.execute("SELECT type, name, tbl_name, sql FROM sqlite_master")) != _EXPECTED:
                return False
            con.execute("BEGIN IMMEDIATE")
            con.execute("DELETE FROM rows")
            con.execute("COMMIT")
            with contextlib.suppress(sqlite3.Error):
                con.execute("VACUUM")
                con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        finally:
            con.close()
    except (sqlite3.Error, CacheDirectoryError, OSError):
        return False
    return True
