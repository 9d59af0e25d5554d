"""The on-disk level of the feature cache: an SQLite file in a directory the user names."""

from __future__ import annotations

import os
import sqlite3


class DiskCache:
    """Feature rows in ``<directory>/skl_transfer_features.sqlite``, shared between processes."""

    FILENAME = "skl_transfer_features.sqlite"

    def __init__(self, directory):
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

    def get(self, con, mkey, keys):
        found = {}
        for start in range(0, len(keys), 500):
            chunk = keys[start : start + 500]
            q = f"SELECT row, dtype, data FROM rows WHERE model = ? AND row IN ({','.join('?' * len(chunk))})"
            for row, tag, data in con.execute(q, (mkey, *chunk)):
                found[row] = (tag, data)
        return [found.get(k) for k in keys]

    def put(self, con, mkey, keys, rows):
        con.executemany(
            "INSERT OR IGNORE INTO rows VALUES (?, ?, ?, ?)",
            [(mkey, k, tag, r.tobytes()) for k, (tag, r) in zip(keys, rows, strict=True)],
        )
