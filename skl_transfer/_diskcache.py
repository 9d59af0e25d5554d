"""The on-disk level of the feature cache: an SQLite file in a directory the user names."""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading


class DiskCache:
    """Feature rows in ``<directory>/skl_transfer_features.sqlite``, shared between processes."""

    FILENAME = "skl_transfer_features.sqlite"

    def __init__(self, directory):
        self._held = threading.local()
        os.makedirs(directory, exist_ok=True)
        self.path = os.path.join(os.fspath(directory), self.FILENAME)
        with self._connect() as con:
            con.execute("PRAGMA journal_mode=WAL")
            con.execute(
                "CREATE TABLE IF NOT EXISTS rows (model TEXT, row BLOB, dtype TEXT, data BLOB, "
                "PRIMARY KEY (model, row))"
            )

    def _connect(self):
        return sqlite3.connect(self.path, timeout=600, isolation_level=None)

    @contextlib.contextmanager
    def lock(self, mkey):
        """Held while the missing rows of model ``mkey`` are computed and stored, so that
        concurrent processes compute each row once."""
        con = self._connect()
        try:
            con.execute("BEGIN IMMEDIATE")
            self._held.con = con  # get and put inside the lock use its transaction
            yield
            con.execute("COMMIT")
        finally:
            self._held.con = None
            con.close()

    @contextlib.contextmanager
    def _connection(self):
        con = getattr(self._held, "con", None)
        if con is not None:
            yield con
            return
        con = self._connect()
        try:
            yield con
        finally:
            con.close()

    def get(self, mkey, keys):
        """Stored ``(dtype tag, row bytes)`` for each row key (bytes), None where absent."""
        found = {}
        with self._connection() as con:
            for start in range(0, len(keys), 500):
                chunk = keys[start : start + 500]
                marks = ",".join("?" * len(chunk))
                q = f"SELECT row, dtype, data FROM rows WHERE model = ? AND row IN ({marks})"
                for row, tag, data in con.execute(q, (mkey, *chunk)):
                    found[row] = (tag, data)
        return [found.get(k) for k in keys]

    def put(self, mkey, keys, tag, rows):
        """Store one row (a numpy array) per row key, all with the dtype tag ``tag``."""
        with self._connection() as con:
            con.executemany(
                "INSERT OR IGNORE INTO rows VALUES (?, ?, ?, ?)",
                [(mkey, k, tag, r.tobytes()) for k, r in zip(keys, rows, strict=True)],
            )
