"""Feature cache: an extractor runs on each distinct sample once per process (or per directory).

A feature row is stored under two keys:

* the *model key*: the extractor's class, its structure (``repr``), every parameter and
  buffer (name, dtype, shape and bytes), the device it runs on, and the dtype and per-sample
  shape of the inputs;
* the *row key*: a hash of the input row's bytes.

A changed weight, buffer, input value, device or dtype is therefore a miss. Rows are kept
in the extractor's output precision (bfloat16 as float32, exactly), so a cached feature
converts to the same float64 value as a fresh one. Two levels:

* :class:`MemoryCache`, one per process, least-recently-used, bounded in bytes
  (default 1 GiB; :func:`set_cache_limit`);
* :class:`DiskCache`, an SQLite file in a directory the user names (``cache="dir"``), shared
  by all processes that see the directory (joblib's loky workers, dask workers on one
  machine or on a shared file system with working file locks), unbounded: clear it with
  :func:`clear_cache` or delete the directory.

Missing rows are computed while holding a lock (a thread lock per model key, and SQLite's
write lock for a directory), so concurrent threads or processes never run the extractor
twice on the same sample.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections import OrderedDict

import numpy as np
import torch

from ._diskcache import DiskCache
from ._fingerprint import weights_digest

DEFAULT_LIMIT = 1 << 30  # bytes of feature rows kept in memory per process


def model_key(digest, device, input_dtype, input_shape, input_kind):
    """Key of everything that decides the features of a row, apart from the row itself."""
    parts = (digest, str(device), str(input_dtype), str(tuple(input_shape)), input_kind)
    return hashlib.blake2b("\0".join(parts).encode(), digest_size=20).hexdigest()


def row_keys(rows):
    """One SHA-256 hash (32 bytes) per row of a C-contiguous numpy array.

    SHA-256 runs on the CPU's hash instructions where present, about twice as fast as
    BLAKE2 here; hashing is the main cost of a fit whose features are all cached.
    """
    flat = rows.reshape(rows.shape[0], -1)
    if flat.dtype == object:
        raise TypeError("object arrays cannot be hashed for the feature cache; pass a numeric X.")
    return [hashlib.sha256(memoryview(r)).digest() for r in flat.view(np.uint8)]


def to_storage(Z):
    """Features (n, *shape) as (tag, flattened numpy rows of the same bits).

    The tag is ``"<dtype>|<per-sample shape>"``; bfloat16 is kept as int16 bits.
    """
    Z = Z.detach().cpu()
    tag = f"{str(Z.dtype).removeprefix('torch.')}|{','.join(map(str, Z.shape[1:]))}"
    Z = Z.reshape(Z.shape[0], -1)
    return tag, (Z.view(torch.int16) if Z.dtype == torch.bfloat16 else Z).numpy()


def tag_shape(tag):
    """Per-sample feature shape recorded in a storage tag."""
    shape = tag.split("|")[1]
    return tuple(int(v) for v in shape.split(",")) if shape else ()


def from_storage(tag, rows):
    """The inverse of :func:`to_storage`: a CPU tensor (n, *shape) in the extractor's dtype."""
    t = torch.from_numpy(rows)
    if tag.startswith("bfloat16|"):
        t = t.view(torch.bfloat16)
    return t.reshape(t.shape[0], *tag_shape(tag))


def _storage_dtype(tag):
    name = tag.split("|")[0]
    return np.int16 if name == "bfloat16" else torch.empty(0, dtype=getattr(torch, name)).numpy().dtype


_ENTRY_OVERHEAD = 250  # bytes of key, tuple, array header and dict slot per entry (measured ~230)


def _nbytes(entry):
    tag, value = entry
    data = sum(a.nbytes for a in value[1:5]) if tag == "moments" else value.nbytes
    return data + _ENTRY_OVERHEAD


class MemoryCache:
    """Least-recently-used map, bounded in bytes, from (model key, row key) to a stored
    feature row ``(dtype tag, array)``, and from (model key, data key) to the
    ``("moments", Moments)`` of a whole training set."""

    def __init__(self, max_bytes=DEFAULT_LIMIT):
        self.max_bytes = max_bytes
        self.nbytes = 0
        self._rows = OrderedDict()
        self._guard = threading.Lock()
        self._locks = {}

    def lock(self, mkey):
        with self._guard:
            return self._locks.setdefault(mkey, threading.RLock())

    def get(self, mkey, keys):
        out = []
        with self._guard:
            for k in keys:
                row = self._rows.get((mkey, k))
                if row is not None:
                    self._rows.move_to_end((mkey, k))
                out.append(row)
        return out

    def put(self, mkey, keys, rows):
        with self._guard:
            if self.max_bytes > 0:
                for k, row in zip(keys, rows, strict=True):
                    if (mkey, k) not in self._rows:
                        self._rows[(mkey, k)] = row
                        self.nbytes += _nbytes(row)
            self._evict()

    def _evict(self):
        while self.nbytes > self.max_bytes and self._rows:
            _, old = self._rows.popitem(last=False)
            self.nbytes -= _nbytes(old)

    def clear(self):
        with self._guard:
            self._rows.clear()
            self.nbytes = 0


_MEMORY = MemoryCache()
_DISKS: dict[str, DiskCache] = {}
_DISKS_GUARD = threading.Lock()


def set_cache_limit(max_bytes):
    """Bound the in-memory feature cache of this process (bytes; 0 disables it).

    The default is 1 GiB. Lowering the bound evicts the least recently used rows.
    """
    if max_bytes < 0:
        raise ValueError(f"max_bytes must be >= 0, got {max_bytes}.")
    with _MEMORY._guard:
        _MEMORY.max_bytes = int(max_bytes)
        _MEMORY._evict()


def clear_cache(directory=None):
    """Empty this process's in-memory feature cache, and the cache file in ``directory`` if given."""
    _MEMORY.clear()
    if directory is not None:
        path = os.path.join(os.fspath(directory), DiskCache.FILENAME)
        for suffix in ("", "-wal", "-shm"):
            if os.path.exists(path + suffix):
                os.remove(path + suffix)
        with _DISKS_GUARD:
            _DISKS.pop(path, None)


def cache_info():
    """Rows and bytes held by this process's in-memory feature cache, and its bound."""
    return {"rows": len(_MEMORY._rows), "bytes": _MEMORY.nbytes, "max_bytes": _MEMORY.max_bytes}


def resolve(cache):
    """The estimator's ``cache`` parameter -> (use memory cache, DiskCache or None)."""
    if cache is False or cache is None:
        return False, None
    if cache is True:
        return True, None
    location = getattr(cache, "location", cache)  # joblib.Memory
    if location is None:
        return True, None
    path = os.path.join(os.fspath(location), DiskCache.FILENAME)
    with _DISKS_GUARD:
        disk = _DISKS.get(path)
        if disk is None:
            disk = _DISKS[path] = DiskCache(location)
    return True, disk


def _host(rows):
    """Input rows as a numpy array of the same bytes (bfloat16 tensors as int16 bits)."""
    if not isinstance(rows, torch.Tensor):
        return np.asarray(rows)
    rows = rows.detach().cpu()
    return (rows.view(torch.int16) if rows.dtype == torch.bfloat16 else rows).numpy()


class CachedExtractor:
    """Features of rows of X through the caches; misses go through ``compute(rows)``.

    Row keys are computed once for all of X. :meth:`moments_key` names the sufficient
    statistics of a whole fit, so that the fits of a search that share a training set (every
    candidate of a fold) compute them once.
    """

    def __init__(self, cache, net, device, input_dtype, X, digest=None):
        self.use_memory, self.disk = resolve(cache)
        kind = f"tensor:{X.dtype}" if isinstance(X, torch.Tensor) else f"numpy:{X.dtype.str}"
        self.digest = weights_digest(net) if digest is None else digest
        self.mkey = model_key(self.digest, device, input_dtype, X.shape[1:], kind)
        self.keys = []
        for start in range(0, X.shape[0], 4096):
            self.keys += row_keys(np.ascontiguousarray(_host(X[start : start + 4096])))

    def moments_key(self, *arrays):
        """Key of the moments of these rows with these targets, weights and prior."""
        h = hashlib.blake2b(self.mkey.encode(), digest_size=20)
        for k in self.keys:
            h.update(k)
        for a in arrays:
            a = np.ascontiguousarray(a)
            h.update(f"{a.dtype.str}{a.shape}".encode())
            h.update(a.tobytes())
        return h.hexdigest()

    def get_moments(self, key):
        if not self.use_memory:
            return None
        entry = _MEMORY.get(self.mkey, [key])[0]
        return None if entry is None else entry[1]

    def put_moments(self, key, moments):
        if self.use_memory:
            _MEMORY.put(self.mkey, [key], [("moments", moments)])

    def features(self, X, sl, compute):
        """Features of rows ``sl`` of X as a CPU tensor (n, *shape) in the extractor's output dtype.

        ``compute(indices)`` runs the extractor on the rows ``sl`` at those positions.
        """
        keys = self.keys[sl]
        with _MEMORY.lock(self.mkey):
            found = _MEMORY.get(self.mkey, keys) if self.use_memory else [None] * len(keys)
            missing = [i for i, f in enumerate(found) if f is None]
            if missing and self.disk is not None:
                self._read_disk(found, missing, keys)
                missing = [i for i in missing if found[i] is None]
                if missing:
                    with self.disk.lock(self.mkey):  # misses of one model computed once across processes
                        self._read_disk(found, missing, keys)  # another process may have just stored them
                        idx = [i for i in missing if found[i] is None]
                        self._compute_into(found, idx, compute)
                        if idx:
                            tag = found[idx[0]][0]
                            self.disk.put(self.mkey, [keys[i] for i in idx], tag, [found[i][1] for i in idx])
            elif missing:
                self._compute_into(found, missing, compute)
            if missing and self.use_memory:
                _MEMORY.put(self.mkey, [keys[i] for i in missing], [found[i] for i in missing])
        tag = found[0][0]
        return from_storage(tag, np.stack([f[1] for f in found]))

    def _read_disk(self, found, idx, keys):
        got = self.disk.get(self.mkey, [keys[i] for i in idx])
        for i, f in zip(idx, got, strict=True):
            if f is not None:
                found[i] = (f[0], np.frombuffer(f[1], dtype=_storage_dtype(f[0])))

    def _compute_into(self, found, idx, compute):
        if not idx:
            return
        tag, new = to_storage(compute(idx))
        for i, row in zip(idx, new, strict=True):
            found[i] = (tag, row.copy())  # own copies: a view would pin its batch
