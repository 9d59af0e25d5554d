"""Feature cache: an extractor runs on each distinct sample once per process (or per directory).

A feature row is stored under two keys:

* the *model key*: the extractor's digest (:mod:`._fingerprint`: its code, hooks,
  parameters, buffers and attributes), the device it runs on, and the dtype and per-sample
  shape of the inputs;
* the *row key*: a 128-bit hash of the input row's bytes (:func:`row_keys`, keyed per
  process, computed for all of X at once; in a directory, SHA-256, the same in every process).

A changed weight, buffer, input value, device or dtype is therefore a miss. Rows are kept
in the extractor's output precision (bfloat16 as float32, exactly), so a cached feature
converts to the same float64 value as a fresh one. Two levels:

* :class:`MemoryCache`, one per process, bounded in bytes (default 1 GiB;
  :func:`set_cache_limit`): per model key, an index of row keys (sorted numpy runs) and the
  rows in contiguous chunks; everything it holds is counted (:func:`cache_info`), and whole
  least-recently-used chunks are evicted;
* :class:`DiskCache`, an SQLite file in a directory the user names (``cache="dir"``), shared
  by all processes that see the directory (joblib's loky workers, dask workers on one
  machine or on a shared file system with working file locks), unbounded: clear it with
  :func:`clear_cache` or delete the directory.

Missing rows are computed while holding a lock per model key (a thread lock, and a file lock
in a directory, :mod:`._diskcache`), so concurrent threads or processes never run the
extractor twice on the same sample, and other models do not wait.
"""

from __future__ import annotations

import collections
import hashlib
import os
import threading
import time
from collections import OrderedDict

import numpy as np
import torch

from . import _diskcache, _frozen
from ._diskcache import DiskCache
from ._fingerprint import fingerprint, forget
from ._torch import from_host_bits, host_bits, numpy_dtype

DEFAULT_LIMIT = 1 << 30  # bytes of feature rows kept in memory per process

AUTO = "auto"
# cache="auto" caches a model when the cache's measured cost per row is at most this share of
# computing the row (the extractor, and the estimator's work on its features), so that a first
# fit costs at most about 1 + AUTO_SHARE times an uncached one
AUTO_SHARE = 0.3
# what the cache does per row (hash, index, store, the moments key, bookkeeping) against what
# choose() times of it on the first batch (hash, sort of the keys, copy of the rows);
# benchmarks/bench_cache.py measures the real share
_AUTO_COST_FACTOR = 2.5
_AUTO_SAMPLE_ROWS = 128  # rows of the first batch that choose() times the cache's work on
_CHOICES = OrderedDict()  # model key -> whether cache="auto" caches it (this process)
_CHOICES_MAX = 4096
_CHOICES_GUARD = threading.Lock()


def _worth_caching(cache_seconds, compute_seconds):
    """``cache="auto"``'s rule, per row: cache when the cache costs at most AUTO_SHARE of computing."""
    return cache_seconds <= AUTO_SHARE * compute_seconds


_MEASURING = {}  # model key -> (thread id, Event set when that thread's measurement ends)
_MEASURE_WAIT = 600.0  # seconds a fit waits for another thread's measurement, at most


def auto_choice(mkey):
    """``(choice, claim)``: whether ``cache="auto"`` caches this model, True or False; or
    ``None``: not known yet, and the caller is to measure it, holding ``claim`` (None if this
    thread already measures it in another fit). While another thread measures the same model,
    waits for its choice, so that concurrent fits compute each row once."""
    deadline = time.monotonic() + _MEASURE_WAIT
    me = threading.get_ident()
    while True:
        with _CHOICES_GUARD:
            choice = _CHOICES.get(mkey)
            if choice is not None:
                return choice, None
            claim = _MEASURING.get(mkey)
            if claim is None:
                claim = _MEASURING[mkey] = (me, threading.Event())
                return None, claim
            if claim[0] == me or time.monotonic() > deadline:
                return None, None
        claim[1].wait(1.0)


def _end_measuring(mkey, choice, claim):
    """Record the choice (None: the measurement was abandoned) and, for the fit that holds
    the ``claim``, wake the fits waiting for it."""
    with _CHOICES_GUARD:
        if choice is not None:
            _CHOICES[mkey] = choice
            _CHOICES.move_to_end(mkey)
            while len(_CHOICES) > _CHOICES_MAX:
                _CHOICES.popitem(last=False)
        if claim is not None and _MEASURING.get(mkey) is claim:
            del _MEASURING[mkey]
            claim[1].set()


def model_key(digest, device, input_dtype, input_shape, input_kind):
    """Key of everything that decides the features of a row, apart from the row itself."""
    parts = (digest, str(device), str(input_dtype), str(tuple(input_shape)), input_kind)
    return hashlib.blake2b("\0".join(parts).encode(), digest_size=20).hexdigest()


def row_keys(rows):
    """One 128-bit key per row of a C-contiguous numpy array, as an (n, 2) uint64 array.

    Rows of up to :data:`_MULTILINEAR_BYTES` bytes are hashed all at once by the multilinear
    family (Lemire and Kaser, 2014): the row, zero-padded to 32-bit words ``w_j``, gives in
    each of four lanes ``(k_0 + sum_j k_j w_j mod 2**64) >> 32``, one integer matrix product
    for a block of rows. The 64-bit keys ``k`` are drawn from ``os.urandom`` once per process
    (the memory cache lives in one process), so the family is strongly universal: two given
    distinct rows of one width collide with probability 2**-128, whatever their contents, and
    the keys cannot be known to whoever chose the data. Wider rows are hashed one by one
    with SHA-256 (truncated to 128 bits), which then costs little next to their bytes.
    Rows of different widths never share a cache (the model key holds the input shape).
    """
    flat = rows.reshape(rows.shape[0], -1)
    if flat.dtype == object:
        raise TypeError("object arrays cannot be hashed for the feature cache; pass a numeric X.")
    raw = flat.view(np.uint8)
    n, width = raw.shape
    out = np.empty((n, 2), np.uint64)
    if width > _MULTILINEAR_BYTES:
        view = out.view(np.uint8)
        for i, r in enumerate(raw):
            view[i] = np.frombuffer(hashlib.sha256(r).digest()[:16], np.uint8)
        return out
    if width % 4:
        raw = np.concatenate([raw, np.zeros((n, 4 - width % 4), np.uint8)], axis=1)
    words = raw.view("<u4")
    m = words.shape[1]
    K, k0 = _multilinear_keys(m)
    # uint64 products and sums wrap modulo 2**64, as the family needs
    if m <= 4:  # narrow rows: a few whole-column operations beat a product's inner loops
        lanes = np.empty((4, n), np.uint64)
        step = 1 << 14
        tmp = np.empty(min(n, step), np.uint64)
        for start in range(0, n, step):
            cols = np.ascontiguousarray(words[start : start + step].T, dtype=np.uint64)
            t = tmp[: cols.shape[1]]
            for lane in range(4):
                acc = lanes[lane, start : start + step]
                acc.fill(k0[lane])
                for j in range(m):
                    np.multiply(cols[j], K[j, lane], out=t)
                    acc += t
        lanes = lanes.T
    else:
        lanes = np.empty((n, 4), np.uint64)
        step = max(1, (1 << 17) // m)
        for start in range(0, n, step):
            np.matmul(words[start : start + step].astype(np.uint64), K, out=lanes[start : start + step])
        lanes += k0
    lanes >>= np.uint64(32)
    out[:, 0] = (lanes[:, 0] << np.uint64(32)) | lanes[:, 1]
    out[:, 1] = (lanes[:, 2] << np.uint64(32)) | lanes[:, 3]
    return out


_MULTILINEAR_BYTES = 2048  # wider rows: SHA-256 per row (as fast per byte as the product here)
_MULTILINEAR_SEED = os.urandom(32)
_MULTILINEAR_KEYS = {}  # number of 32-bit words -> (K (m, 4), k_0 (4,)) uint64


def _multilinear_keys(m):
    keys = _MULTILINEAR_KEYS.get(m)
    if keys is None:
        rng = np.random.default_rng(list(_MULTILINEAR_SEED + m.to_bytes(4, "little")))
        K = np.frombuffer(rng.bytes(8 * 4 * (m + 1)), "<u8").reshape(m + 1, 4).astype(np.uint64)
        keys = _MULTILINEAR_KEYS.setdefault(m, (K[1:], K[0].copy()))
    return keys


def disk_keys(rows):
    """SHA-256 of each row's bytes (32 bytes): the directory cache's row keys, the same in
    every process (the memory keys of :func:`row_keys` are drawn per process)."""
    flat = rows.reshape(rows.shape[0], -1)
    return [hashlib.sha256(memoryview(r)).digest() for r in flat.view(np.uint8)]


def to_storage(Z):
    """Features (n, *shape) as (tag, flattened numpy rows of the same bits).

    The tag is ``"<dtype>|<per-sample shape>"``; bfloat16 is kept as int16 bits.
    """
    tag = f"{str(Z.dtype).removeprefix('torch.')}|{','.join(map(str, Z.shape[1:]))}"
    return tag, host_bits(Z.reshape(Z.shape[0], -1))


def tag_shape(tag):
    """Per-sample feature shape recorded in a storage tag."""
    shape = tag.split("|")[1]
    return tuple(int(v) for v in shape.split(",")) if shape else ()


def from_storage(tag, rows):
    """The inverse of :func:`to_storage`: a CPU tensor (n, *shape) in the extractor's dtype."""
    t = from_host_bits(rows, tag.split("|")[0])
    return t.reshape(t.shape[0], *tag_shape(tag))


def _storage_dtype(tag):
    return numpy_dtype(tag.split("|")[0])


# Bytes of Python objects per unit of the memory cache, beyond its numpy arrays' nbytes
# (measured with tracemalloc: object, numpy headers, LRU entry; tests/test_cache_memory.py).
_CHUNK_OVERHEAD = 700
_SEGMENT_OVERHEAD = 500
_SHELF_OVERHEAD = 1500
_MOMENTS_OVERHEAD = 1200
_CHUNK_BYTES = 4 << 20  # feature bytes per chunk (the unit of eviction), at most
_RESERVED, _LIVE, _EVICTED = 0, 1, 2
_SLOT_BITS = 32
_SLOT_MASK = (1 << _SLOT_BITS) - 1


def _argsort_keys(hi):
    """``(np.argsort(hi), hi sorted)`` for random 64-bit keys: a plain sort of the keys with
    their low bits replaced by the index (numpy's vectorised sort, faster than an argsort on
    a busy machine), checked."""
    n = len(hi)
    bits = max(1, (n - 1).bit_length())
    if n >= 2 and bits <= 40:
        low = np.uint64((1 << bits) - 1)
        packed = hi & ~low
        packed |= np.arange(n, dtype=np.uint64)
        packed.sort()
        order = (packed & low).astype(np.int64)
        sh = hi[order]
        if bool((sh[1:] >= sh[:-1]).all()):
            return order, sh
    order = np.argsort(hi)  # keys equal in their high bits (rare), or tiny n
    return order, hi[order]


class _Chunk:
    """Stored rows of slots ``[no * R, no * R + len(data))`` of a segment."""

    __slots__ = ("seg", "no", "data", "filled", "n_filled", "nbytes")

    def __init__(self, seg, no, rows, width, dtype):
        self.seg, self.no, self.n_filled = seg, no, 0
        self.data = np.empty((rows, width), dtype)
        self.filled = np.zeros(rows, bool)
        self.nbytes = self.data.nbytes + self.filled.nbytes + _CHUNK_OVERHEAD

    def drop(self, cache):
        seg = self.seg
        seg.chunks.pop(self.no, None)
        seg.state[self.no] = _EVICTED
        cache.nbytes -= self.nbytes
        cache.rows -= self.n_filled
        shelf = seg.shelf
        shelf.n_dead += len(self.filled)
        if not seg.chunks and bool((seg.state == _EVICTED).all()):
            shelf.segments.pop(seg.id, None)  # its index entries are dead: dropped at the next merge
            shelf.resize(cache)


class _Segment:
    """The slots reserved for the rows that one :class:`CachedExtractor` found missing, in the
    order of its X; stored in chunks of ``shelf.R`` rows, allocated when first filled."""

    __slots__ = ("shelf", "id", "size", "chunks", "state")

    def __init__(self, shelf, id, size):
        self.shelf, self.id, self.size, self.chunks = shelf, id, size, {}
        self.state = None if shelf.R is None else np.zeros(-(-size // shelf.R), np.int8)


class _Shelf:
    """Everything the memory cache holds for one model key: an index from row key to slot
    (sorted runs of keys, searched with ``np.searchsorted``) and the segments of slots."""

    __slots__ = ("mkey", "alive", "runs", "segments", "next_id", "tag", "dtype", "width", "R")
    __slots__ += ("n_dead", "nbytes")

    def __init__(self, mkey):
        self.mkey, self.alive, self.runs, self.segments, self.next_id = mkey, True, [], {}, 0
        self.tag = self.dtype = self.width = self.R = None
        self.n_dead, self.nbytes = 0, 0

    def resize(self, cache):
        """Recount the index's bytes (runs, segments) into the cache's total."""
        nbytes = _SHELF_OVERHEAD + sum(a.nbytes for run in self.runs for a in run)
        nbytes += sum(
            _SEGMENT_OVERHEAD + (0 if s.state is None else s.state.nbytes) for s in self.segments.values()
        )
        cache.nbytes += nbytes - self.nbytes
        self.nbytes = nbytes

    def drop(self, cache):
        self.alive = False
        for seg in list(self.segments.values()):
            for chunk in list(seg.chunks.values()):
                cache._lru.pop(chunk, None)
                chunk.drop(cache)
        self.segments.clear()
        self.runs = []
        cache.nbytes -= self.nbytes
        self.nbytes = 0
        cache._shelves.pop(self.mkey, None)

    def live(self, loc):
        """Whether the slots ``loc`` are still held (reserved or stored, not evicted)."""
        if self.R is None or self.n_dead == 0:
            return np.ones(len(loc), bool)
        seg_ids = loc >> _SLOT_BITS
        chunk_no = (loc & _SLOT_MASK) // self.R
        out = np.zeros(len(loc), bool)
        for sid in np.unique(seg_ids):
            seg = self.segments.get(int(sid))
            if seg is not None:
                at = seg_ids == sid
                out[at] = seg.state[chunk_no[at]] != _EVICTED
        return out

    def lookup(self, hi, lo):
        """Slot of each key (``-1`` where none is held), searched in every run."""
        loc = np.full(len(hi), -1, np.int64)
        for rh, rl, rloc in self.runs:
            todo = np.flatnonzero(loc < 0)
            if not todo.size:
                break
            if not len(rh):  # every entry of the run was dropped (evicted)
                continue
            q = hi[todo]
            pos = np.minimum(np.searchsorted(rh, q), len(rh) - 1)
            eq = rh[pos] == q
            ok = eq & (rl[pos] == lo[todo])
            for i in np.flatnonzero(eq & ~ok):  # another key with the same high word (rare)
                j = pos[i] + 1
                while j < len(rh) and rh[j] == q[i]:
                    if rl[j] == lo[todo[i]]:
                        ok[i], pos[i] = True, j
                        break
                    j += 1
            cand = rloc[pos[ok]]
            live = self.live(cand)
            loc[todo[ok][live]] = cand[live]
        return loc

    def add_run(self, run):
        """Add a sorted run of new keys; merge runs so that their sizes at least double
        from newest to oldest (a few runs, each key copied O(log n) times), dropping the
        entries of evicted chunks."""
        self.runs.append(run)
        compact = self.n_dead * 2 > sum(len(r[0]) for r in self.runs)
        while len(self.runs) >= 2 and (compact or len(self.runs[-2][0]) <= 2 * len(self.runs[-1][0])):
            b, a = self.runs.pop(), self.runs.pop()
            self.runs.append(self._merge(a, b))
        if compact:
            self.n_dead = 0  # every run merged into one, without the dead entries

    def _merge(self, *runs):
        hi, lo, loc = (np.concatenate(parts) for parts in zip(*runs, strict=True))
        keep = self.live(loc)
        if not keep.all():
            self.n_dead = max(0, self.n_dead - int((~keep).sum()))
            hi, lo, loc = hi[keep], lo[keep], loc[keep]
        order = np.argsort(hi, kind="stable")  # timsort: a linear merge of sorted runs
        return hi[order], lo[order], loc[order]


class _MomentsEntry:
    __slots__ = ("key", "value", "nbytes")

    def __init__(self, key, value):
        self.key, self.value = key, value
        self.nbytes = value.nbytes + _MOMENTS_OVERHEAD  # the entry says what its arrays hold

    def drop(self, cache):
        cache._moments.pop(self.key, None)
        cache.nbytes -= self.nbytes


class MemoryCache:
    """This process's feature rows, bounded in bytes, least recently used evicted first.

    Per model key, a *shelf*: the keys of all rows it has seen, in a few sorted runs (the
    128-bit keys as two uint64 arrays, and each key's slot), and the rows themselves in
    contiguous chunks. :meth:`reserve` looks up all of X at once and reserves a slot for
    each distinct missing key, in the order of X (a *segment*); whoever computes a slot's
    row first fills it (:meth:`store`), so that threads sharing rows compute each once.

    The bound counts everything the cache holds: each chunk's rows and fill mask, each
    index's arrays, the moments of whole fits (:meth:`put_moments`), and a measured
    overhead per Python object. Eviction drops whole least-recently-used units: a chunk
    (up to ``_CHUNK_BYTES`` of rows), a moments entry, and lastly a whole shelf, which is
    always used after its own chunks.
    """

    def __init__(self, max_bytes=DEFAULT_LIMIT):
        self.max_bytes = max_bytes
        self.nbytes = 0
        self.rows = 0
        self._lru = OrderedDict()  # unit (chunk, shelf, moments entry) -> None, oldest first
        self._shelves = {}  # model key -> _Shelf
        self._moments = {}  # (model key, data key) -> _MomentsEntry
        self._guard = threading.Lock()
        self._locks = {}

    def reset_locks(self):
        """Fresh locks (in a forked child: the parent's threads that held them are gone)."""
        self._guard = threading.Lock()
        self._locks = {}

    def lock(self, mkey):
        lock = self._locks.get(mkey)
        if lock is None:
            with self._guard:
                lock = self._locks.setdefault(mkey, threading.RLock())
        return lock

    def _touch(self, unit):
        self._lru.move_to_end(unit)

    def _evict(self):
        while self.nbytes > self.max_bytes and self._lru:
            unit, _ = self._lru.popitem(last=False)
            unit.drop(self)

    def clear(self):
        with self._guard:
            for unit in list(self._lru):
                if isinstance(unit, _Shelf):
                    unit.alive = False
            self._lru.clear()
            self._shelves.clear()
            self._moments.clear()
            self.nbytes = self.rows = 0

    # -- rows ----------------------------------------------------------------------------

    def reserve(self, mkey, keys):
        """``(shelf, slots)`` for the rows with these keys ((n, 2) uint64): the slot of each
        key held, a new slot (reserved, in the order of first appearance) for each other
        distinct key. ``(None, None)`` when the cache is off."""
        hi, lo = keys[:, 0], keys[:, 1]
        with self._guard:
            if self.max_bytes <= 0:
                return None, None
            shelf = self._shelves.get(mkey)
            if shelf is None:
                shelf = self._shelves[mkey] = _Shelf(mkey)
                self._lru[shelf] = None
            everything = not shelf.runs  # a model key seen for the first time: no lookup
            if everything:
                loc, miss, mh, ml = None, None, hi, lo
            else:
                loc = shelf.lookup(hi, lo)
                miss = np.flatnonzero(loc < 0)
                mh, ml = hi[miss], lo[miss]
            if len(mh):
                order, sh = _argsort_keys(mh)
                sl = ml[order]
                if bool(((sh[1:] == sh[:-1]) & (sl[1:] != sl[:-1])).any()):
                    order = np.lexsort((ml, mh))  # equal high words of different keys (rare)
                    sh, sl = mh[order], ml[order]
                first = np.ones(len(order), bool)
                first[1:] = (sh[1:] != sh[:-1]) | (sl[1:] != sl[:-1])
                distinct = bool(first.all())
                if distinct:  # the common case: slot i for the i-th missing row
                    starts = order
                    n_new = len(order)
                else:  # slots in the order of X: each distinct key at its first appearance
                    group = np.cumsum(first) - 1
                    starts = np.minimum.reduceat(order, np.flatnonzero(first))
                    is_start = np.zeros(len(order), bool)
                    is_start[starts] = True
                    rank = (np.cumsum(is_start) - 1)[starts]  # slot of each distinct key
                    n_new = len(starts)
                seg = _Segment(shelf, shelf.next_id, n_new)
                shelf.next_id += 1
                shelf.segments[seg.id] = seg
                base = seg.id << _SLOT_BITS
                if distinct:
                    new_loc = base + np.arange(len(order), dtype=np.int64)
                    run_loc = base + order
                else:
                    run_loc = base + rank
                    new_loc = np.empty(len(order), np.int64)
                    new_loc[order] = run_loc[group]
                if everything:
                    loc = new_loc
                else:
                    loc[miss] = new_loc
                shelf.add_run((sh, sl, run_loc) if distinct else (sh[first], sl[first], run_loc))
                shelf.resize(self)
            elif everything:
                loc = np.empty(0, np.int64)
            self._touch(shelf)
            self._evict()
            return shelf, loc

    def read(self, shelf, loc):
        """``(rows, found)``: the stored rows of the slots ``loc`` ((b, width), rows not found
        left uninitialised) or None when the shelf has stored nothing, and which were found."""
        found = np.zeros(len(loc), bool)
        with self._guard:
            if not shelf.alive or shelf.R is None:
                return None, found
            out = np.empty((len(loc), shelf.width), shelf.dtype)
            for at, seg, no, off in self._chunks_of(shelf, loc):
                if seg.state[no] != _LIVE:
                    continue
                chunk = seg.chunks[no]
                has = chunk.filled[off]
                if has.all():
                    out[at] = chunk.data[off]
                    found[at] = True
                elif has.any():
                    out[at[has]] = chunk.data[off[has]]
                    found[at[has]] = True
                self._touch(chunk)
            self._touch(shelf)
        return out, found

    def read_range(self, shelf, loc0, b):
        """The rows of the ``b`` consecutive slots from ``loc0`` when all are stored (a copy),
        False when none is, None when some are or they span chunks (use :meth:`read`)."""
        with self._guard:
            if not shelf.alive or shelf.R is None:
                return False
            seg = shelf.segments.get(loc0 >> _SLOT_BITS)
            slot = loc0 & _SLOT_MASK
            no = slot // shelf.R
            if (slot + b - 1) // shelf.R != no:
                return None
            if seg is None or seg.state[no] != _LIVE:
                return False
            chunk = seg.chunks[no]
            off = slot - no * shelf.R
            has = chunk.filled[off : off + b]
            self._touch(chunk)
            self._touch(shelf)
            if has.all():
                return chunk.data[off : off + b].copy()
            return None if has.any() else False

    def store_range(self, shelf, loc0, tag, rows):
        """:meth:`store` for consecutive slots from ``loc0``."""
        b = len(rows)
        R = shelf.R
        slot = loc0 & _SLOT_MASK
        if R is None or (slot + b - 1) // R != slot // R:
            return self.store(shelf, loc0 + np.arange(b), tag, rows)
        with self._guard:
            if not shelf.alive or self.max_bytes <= 0:
                return
            if (tag, rows.dtype, rows.shape[1]) != (shelf.tag, shelf.dtype, shelf.width):
                return
            seg = shelf.segments.get(loc0 >> _SLOT_BITS)
            no = slot // R
            if seg is None or seg.state[no] == _EVICTED:
                return
            chunk = self._chunk(shelf, seg, no)
            if chunk is None:
                return
            off = slot - no * R
            new = b - int(np.count_nonzero(chunk.filled[off : off + b]))
            chunk.data[off : off + b] = rows
            chunk.filled[off : off + b] = True
            chunk.n_filled += new
            self.rows += new
            self._touch(shelf)

    def _chunk(self, shelf, seg, no):
        """Chunk ``no`` of ``seg`` to fill: the stored one (touched), or a new one; None when
        it was evicted at once."""
        chunk = seg.chunks.get(no)
        if chunk is None:
            return self._allocate(shelf, seg, no)
        self._touch(chunk)
        return chunk

    def _allocate(self, shelf, seg, no):
        """A new chunk (evicting as needed), or None when it was evicted at once."""
        n = min(shelf.R, seg.size - no * shelf.R)
        chunk = seg.chunks[no] = _Chunk(seg, no, n, shelf.width, shelf.dtype)
        seg.state[no] = _LIVE
        self._lru[chunk] = None
        self.nbytes += chunk.nbytes
        self._touch(shelf)
        self._evict()
        return chunk if shelf.alive and seg.state[no] == _LIVE else None

    def store(self, shelf, loc, tag, rows):
        """Fill the slots ``loc`` (distinct) with ``rows`` ((k, width) in storage dtype);
        slots of evicted chunks are left out."""
        with self._guard:
            if not shelf.alive or self.max_bytes <= 0:
                return
            if shelf.R is None:
                shelf.tag, shelf.dtype, shelf.width = tag, rows.dtype, rows.shape[1]
                row_bytes = max(1, rows.shape[1] * rows.dtype.itemsize)
                fit = max(1, min(_CHUNK_BYTES, self.max_bytes // 32) // row_bytes)
                shelf.R = 1 << (fit.bit_length() - 1)  # a power of two: chunk = slot >> log2(R)
                for seg in shelf.segments.values():
                    seg.state = np.zeros(-(-seg.size // shelf.R), np.int8)
                shelf.resize(self)
            elif (tag, rows.dtype, rows.shape[1]) != (shelf.tag, shelf.dtype, shelf.width):
                return  # not the rows stored so far (their shape changed): not cached
            for at, seg, no, off in self._chunks_of(shelf, loc):
                if not shelf.alive or seg.state[no] == _EVICTED:
                    continue
                chunk = self._chunk(shelf, seg, no)
                if chunk is None:
                    continue
                fresh = off[~chunk.filled[off]]
                if len(fresh) > 1 and not bool((fresh[1:] > fresh[:-1]).all()):
                    fresh = np.unique(fresh)  # a sample repeated in the batch
                new = len(fresh)
                chunk.data[off] = rows[at]
                chunk.filled[off] = True
                chunk.n_filled += new
                self.rows += new
            if shelf.alive:
                self._touch(shelf)

    @staticmethod
    def _chunks_of(shelf, loc):
        """``(positions, segment, chunk number, offsets)`` for each chunk that slots ``loc`` fall in."""
        seg_ids = loc >> _SLOT_BITS
        slots = loc & _SLOT_MASK
        chunk_no = slots // shelf.R
        unit = (seg_ids << _SLOT_BITS) | chunk_no
        if len(unit) and unit[0] == unit[-1] and bool((unit == unit[0]).all()):
            groups = [(unit[0], slice(None))]
        else:
            values, inverse = np.unique(unit, return_inverse=True)
            groups = [(u, np.flatnonzero(inverse == i)) for i, u in enumerate(values)]
        out = []
        for u, at in groups:
            seg = shelf.segments.get(int(u) >> _SLOT_BITS)
            if seg is None:
                continue
            no = int(u) & _SLOT_MASK
            pos = np.arange(len(loc))[at]
            out.append((pos, seg, no, slots[at] - no * shelf.R))
        return out

    # -- moments -------------------------------------------------------------------------

    def get_moments(self, mkey, key):
        with self._guard:
            entry = self._moments.get((mkey, key))
            if entry is None:
                return None
            self._touch(entry)
            return entry.value

    def put_moments(self, mkey, key, value):
        with self._guard:
            if self.max_bytes <= 0 or (mkey, key) in self._moments:
                return
            entry = self._moments[(mkey, key)] = _MomentsEntry((mkey, key), value)
            self._lru[entry] = None
            self.nbytes += entry.nbytes
            self._evict()


_MEMORY = MemoryCache()
_DISKS: dict[str, DiskCache] = {}
_DISKS_GUARD = threading.Lock()


def set_cache_limit(max_bytes):
    """Bound the in-memory feature cache of this process.

    The default is 1 GiB. The bound counts everything the cache holds: feature rows, the
    index of their keys (24 bytes a row) and the moments of whole fits, Python objects
    included. Lowering it evicts the least recently used chunks of rows.

    Parameters
    ----------
    max_bytes : int
        The most bytes the cache may hold, >= 0; 0 disables the in-memory cache.

    See Also
    --------
    cache_info : What the cache holds now.
    clear_cache : Empty the cache.

    Notes
    -----
    Each input row gets a 128-bit key, computed with numpy for all of X at once: a
    multilinear hash whose keys are drawn from ``os.urandom`` in each process, so two distinct
    rows collide with probability 2^-128 and whoever chose the data cannot know the keys
    (SHA-256 for rows wider than 2 KiB, and in a cache directory). The keys of all of X are
    looked up at once in sorted numpy arrays; rows are stored in the extractor's dtype in
    contiguous chunks, with no Python object per row. The bound counts the rows, 24 bytes a
    row of index, the ``d x d`` moments of each whole fit that a search reuses, and each
    object's overhead; ``cache_info()["bytes"]`` is within 1 % of the growth that
    ``tracemalloc`` measures (tested). Whole least-recently-used chunks are evicted. A cache
    directory (``cache="/path"``) is not bounded: empty it with
    ``clear_cache(directory)``.

    Examples
    --------
    >>> from skl_transfer import cache_info, set_cache_limit
    >>> set_cache_limit(256 * 2**20)  # 256 MiB
    >>> cache_info()["max_bytes"]
    268435456
    >>> set_cache_limit(2**30)  # back to the default, 1 GiB
    """
    if max_bytes < 0:
        raise ValueError(f"max_bytes must be >= 0, got {max_bytes}.")
    with _MEMORY._guard:
        _MEMORY.max_bytes = int(max_bytes)
        _MEMORY._evict()
    with _KEYS_GUARD:  # the inputs kept with their row keys: at most a quarter of the bound
        while _KEYS_MEMO and _keys_memo_bytes() > min(_KEYS_MEMO_BYTES, int(max_bytes) // 4):
            _KEYS_MEMO.popitem(last=False)


def clear_cache(directory=None):
    """Empty this process's in-memory feature cache, and the cache in a directory if given.

    It also forgets this process's ``cache="auto"`` choices and the determinism verdicts of
    the models seen so far. A cache file written by skl_transfer in a trusted directory is
    emptied in place (other processes using it go on); any other file in its place
    (corrupted, not SQLite, a foreign schema) is deleted. The per-model lock files are
    removed too. This is the fix that the errors of a broken cache directory name.

    Parameters
    ----------
    directory : str, os.PathLike or None, default=None
        A cache directory (the ``cache=`` of an estimator) to empty as well.

    See Also
    --------
    cache_info : What the in-memory cache holds.
    CacheDirectoryError : The errors of a cache directory, each naming this fix.

    Notes
    -----
    An intact cache file is emptied by an SQL ``DELETE`` then ``VACUUM``, safe while other
    processes use it. Deleting the directory (``rm -rf``, ``shutil.rmtree``) works too, also
    while other processes hold it open: each process, loky's reused workers and dask workers
    included, recreates the directory (mode ``0o700``) and the schema at its next read, lock
    or write and goes on, recomputing the rows it needs (tested with the removal done in the
    same process and in another one). While processes are writing, prefer ``clear_cache``:
    deleting SQLite's files under a writer can, in a window of microseconds, pair a new file
    with the old ``-wal``, which is then reported as a corrupted file (fixed by
    ``clear_cache(directory)``).

    Examples
    --------
    >>> from skl_transfer import cache_info, clear_cache
    >>> clear_cache()
    >>> cache_info()["rows"]
    0
    """
    _MEMORY.clear()
    forget()  # the determinism verdicts of the models seen so far
    _frozen.forget()  # the frozen copies kept for the next fit of each extractor
    with _KEYS_GUARD:
        _KEYS_MEMO.clear()  # and the arrays whose row keys are kept
    with _CHOICES_GUARD:
        _CHOICES.clear()  # and the "auto" choices
    if directory is not None:
        directory = os.path.abspath(os.fspath(directory))
        with _DISKS_GUARD:
            _DISKS.pop(os.path.join(directory, DiskCache.FILENAME), None)
        _diskcache.clear_directory(directory)


def cache_info():
    """Report the rows and bytes held by this process's in-memory feature cache.

    The bytes count everything the cache holds (rows, their index, the moments of whole
    fits, Python objects included), as the bound of :func:`set_cache_limit` does, and the
    copies of the last wide-rowed inputs kept with their row keys (at most a quarter of the
    bound, and 256 MiB: a search hashes each fold once).

    Returns
    -------
    info : dict
        ``"rows"``: feature rows held; ``"bytes"``: bytes held; ``"max_bytes"``: the bound.

    See Also
    --------
    set_cache_limit : Change the bound.
    clear_cache : Empty the cache.

    Examples
    --------
    >>> from skl_transfer import cache_info
    >>> sorted(cache_info())
    ['bytes', 'max_bytes', 'rows']
    """
    with _KEYS_GUARD:
        kept = _keys_memo_bytes()
    with _MEMORY._guard:
        return {"rows": _MEMORY.rows, "bytes": _MEMORY.nbytes + kept, "max_bytes": _MEMORY.max_bytes}


def resolve(cache):
    """The estimator's ``cache`` parameter -> (memory cache: False, True or ``"auto"``;
    DiskCache or None).

    A directory's DiskCache is made once per process (its checks raise
    :class:`~skl_transfer._diskcache.CacheDirectoryError`); its trust is re-checked (a few
    ``stat`` calls) on every use.
    """
    if cache is False or cache is None:
        return False, None
    if cache is True or cache == AUTO:
        return cache, None
    location = getattr(cache, "location", cache)  # joblib.Memory
    if location is None:
        return True, None
    try:
        location = os.fspath(location)
    except TypeError:
        raise TypeError(
            f"cache must be 'auto', True, False, a directory (str or path) or a joblib.Memory; got {cache!r}."
        ) from None
    location = os.fsdecode(location)
    if not location:
        raise ValueError("cache='' names no directory; pass a directory, True (memory only) or False.")
    directory = os.path.abspath(location)
    path = os.path.join(directory, DiskCache.FILENAME)
    with _DISKS_GUARD:
        disk = _DISKS.get(path)
        if disk is None:
            disk = _DISKS[path] = DiskCache(directory)
    disk.check_trusted()
    return True, disk


_KEYS_MEMO: collections.OrderedDict = collections.OrderedDict()  # id -> (copy of X, its keys)
_KEYS_MEMO_BYTES = 256 << 20  # the copies held, at most
_KEYS_GUARD = threading.Lock()


def _keys_of(X):
    """:func:`row_keys` of every row of X.

    Rows wider than :data:`_MULTILINEAR_BYTES` (images, spectrograms) are hashed one by one
    with SHA-256; for those, the keys of the last numpy arrays hashed are kept with a copy of
    them: the fits of a search hash the same folds again and again (each a new array, sliced
    from the data by sklearn), and comparing X bitwise with a copy costs a fraction of hashing
    it. At most :data:`_KEYS_MEMO_BYTES`, and a quarter of the memory cache's bound, are held
    (the least recently used arrays are dropped); :func:`cache_info` counts them.
    """
    limit = min(_KEYS_MEMO_BYTES, _MEMORY.max_bytes // 4)
    if (
        not isinstance(X, np.ndarray)
        or X.dtype == object
        or X.nbytes > limit // 4
        or X.nbytes <= _MULTILINEAR_BYTES * max(1, X.shape[0])
    ):
        return _hash_rows(X)
    bits = X.view(f"u{X.dtype.itemsize}") if X.dtype.itemsize in (1, 2, 4, 8) else None
    if bits is None:
        return _hash_rows(X)
    with _KEYS_GUARD:
        held = [(k, v) for k, v in _KEYS_MEMO.items() if v[0].shape == X.shape and v[0].dtype == bits.dtype]
    for k, (copy, keys) in held:
        ends = np.array_equal(copy[0], bits[0]) and np.array_equal(copy[-1], bits[-1])
        if ends and np.array_equal(copy, bits):
            with _KEYS_GUARD:
                if k in _KEYS_MEMO:
                    _KEYS_MEMO.move_to_end(k)
            return keys.copy()
    keys = _hash_rows(X)
    with _KEYS_GUARD:
        _KEYS_MEMO[object()] = (bits.copy(), keys.copy())
        while _keys_memo_bytes() > limit:
            _KEYS_MEMO.popitem(last=False)
    return keys


def _keys_memo_bytes():
    return sum(copy.nbytes + keys.nbytes for copy, keys in _KEYS_MEMO.values())


def _hash_rows(X):
    """:func:`row_keys` of every row of X, hashed in blocks of a few MiB."""
    n = X.shape[0]
    row_bytes = max(1, int(np.prod(X.shape[1:], dtype=np.int64)) * X.dtype.itemsize)
    step = int(min(1 << 16, max(1, (4 << 20) // row_bytes)))
    keys = np.empty((n, 2), np.uint64)
    for start in range(0, n, step):
        keys[start : start + step] = row_keys(np.ascontiguousarray(host_bits(X[start : start + step])))
    return keys


class CachedExtractor:
    """Features of rows of X through the caches; misses go through ``compute(rows)``.

    Row keys are computed, and looked up in the memory cache, once for all of X: each row
    gets a slot (held, or reserved for it). :meth:`moments_key` names the sufficient
    statistics of a whole fit, so that the fits of a search that share a training set (every
    candidate of a fold) compute them once.
    """

    def __init__(self, cache, net, device, input_dtype, X, digest=None):
        memory, self.disk = resolve(cache)
        self.use_memory = bool(memory)
        kind = f"tensor:{X.dtype}" if isinstance(X, torch.Tensor) else f"numpy:{X.dtype.str}"
        self.digest = fingerprint(net) if digest is None else digest
        self.mkey = model_key(self.digest, device, input_dtype, X.shape[1:], kind)
        self.keys = None
        self._shelf = self._slots = self._run_start = None
        # cache="auto": ``off`` once this model is known not to pay for the cache; while
        # ``_pending`` is a dict, the model is being measured (its first fit in this process):
        # rows are computed and kept here until choose() decides
        choice, self._claim = auto_choice(self.mkey) if memory == AUTO else (True, None)
        self.off = choice is False
        self._pending = {} if choice is None else None
        self._timed = [0.0, 0, None]  # extractor seconds, rows, slice of the first batch
        self.check = None  # the determinism probe of a measured model: () -> may cache
        if choice:
            self._index(X)

    def abandon(self):
        """End a measurement without a choice (the fit stopped before its first batch was
        used, or had none): another fit of the model measures it."""
        if self._pending is not None:
            self._pending = None
            self.off = True
            _end_measuring(self.mkey, None, self._claim)

    def __del__(self):
        try:
            self.abandon()
        except Exception:  # noqa: BLE001 (interpreter shutdown)
            pass

    @property
    def measuring(self):
        """Whether ``cache="auto"`` is measuring this model (see :meth:`choose`)."""
        return self._pending is not None

    def _index(self, X):
        """Hash all of X and reserve a slot for each row in the memory cache."""
        self.keys = _keys_of(X)
        if self.use_memory:
            self._shelf, self._slots = _MEMORY.reserve(self.mkey, self.keys)
        if self._slots is not None and len(self._slots):
            # run_start[i]: where the run of consecutive slots that ends at row i starts, so
            # that a batch of consecutive slots (a first fit's) takes the fast path
            s = self._slots
            brk = np.ones(len(s), bool)
            brk[1:] = s[1:] != s[:-1] + 1
            self._run_start = np.maximum.accumulate(np.where(brk, np.arange(len(s)), 0))

    def choose(self, X, consumer_seconds):
        """``cache="auto"``, on a model's first fit: after the first batch (and the estimator's
        work on it, ``consumer_seconds``), time what the cache would do with those rows, and
        cache the model from now on only if that is at most :data:`AUTO_SHARE` of computing
        them; the rows computed so far are then stored. No-op otherwise."""
        pending, self._pending = self._pending, None
        seconds, n_rows, sl = self._timed
        if pending is None or sl is None:
            self._pending = pending
            return
        m = min(n_rows, _AUTO_SAMPLE_ROWS)
        start = time.perf_counter()
        keys = _hash_rows(X[sl.start : sl.start + m])  # what hashing costs (no kept keys)
        _argsort_keys(keys[:, 0].copy())
        pending[sl.start, sl.stop][1][:m].copy()
        cache_row = _AUTO_COST_FACTOR * (time.perf_counter() - start) / m
        compute_row = (seconds + consumer_seconds) / n_rows
        chosen = _worth_caching(cache_row, compute_row)
        if chosen and self.check is not None:
            chosen = self.check()  # the determinism probe
        if chosen:
            self._index(X)
            for (a, b), (tag, rows) in pending.items():
                self.features(X, slice(a, b), lambda idx, rows=rows, tag=tag: from_storage(tag, rows[idx]))
        else:
            self.off = True
        _end_measuring(self.mkey, chosen, self._claim)  # the rows are stored: wake the waiting fits

    def moments_key(self, *arrays):
        """Key of the moments of these rows with these targets, weights and prior (None while
        ``cache="auto"`` is measuring this model: nothing of it is cached yet)."""
        if self.keys is None:
            return _Deferred(arrays)
        h = hashlib.sha256(self.mkey.encode())  # SHA-256: about twice BLAKE2's speed here
        h.update(self.keys.tobytes())
        for a in arrays:
            a = np.ascontiguousarray(a)
            h.update(f"{a.dtype.str}{a.shape}".encode())
            h.update(a.tobytes())
        return h.hexdigest()

    def get_moments(self, key):
        if not self.use_memory or isinstance(key, _Deferred):
            return None
        return _MEMORY.get_moments(self.mkey, key)

    def put_moments(self, key, moments):
        if isinstance(key, _Deferred):  # measured during this fit: cached if chosen since
            if self.keys is None or self.off:
                return
            key = self.moments_key(*key.arrays)
        if self.use_memory:
            _MEMORY.put_moments(self.mkey, key, moments)

    def features(self, X, sl, compute):
        """Features of rows ``sl`` of X as a CPU tensor (n, *shape) in the extractor's output dtype.

        ``compute(indices)`` runs the extractor on the rows ``sl`` at those positions.
        """
        if self.off:
            return compute(slice(None))
        if self._pending is not None:  # cache="auto", measuring: compute, keep, time
            span = (sl.start, sl.stop)
            held = self._pending.get(span)
            if held is not None:
                return from_storage(*held)
            start = time.perf_counter()
            held = self._pending[span] = to_storage(compute(slice(None)))
            if self._timed[2] is None:  # the first batch
                self._timed = [time.perf_counter() - start, sl.stop - sl.start, sl]
            return from_storage(*held)
        rng = range(X.shape[0])[sl]
        b = len(rng)
        shelf = self._shelf
        with _MEMORY.lock(self.mkey):
            if shelf is not None and b and rng.step == 1 and self._run_start[rng[-1]] <= rng[0]:
                loc0 = int(self._slots[rng[0]])
                got = _MEMORY.read_range(shelf, loc0, b)
                if got is False:  # none stored (a first fit): compute, store, done
                    tag, rows = self._rows(X, sl, np.arange(b), compute)
                    _MEMORY.store_range(shelf, loc0, tag, rows)
                    return from_storage(tag, rows)
                if got is not None:
                    return from_storage(shelf.tag, got)
            out, slots = None, None
            if shelf is not None:
                slots = self._slots[sl]
                out, found = _MEMORY.read(shelf, slots)
                missing = np.flatnonzero(~found)
            else:
                missing = np.arange(b)
            if not missing.size:
                return from_storage(shelf.tag, out)
            tag, rows = self._rows(X, sl, missing, compute)
            if out is not None and (tag, rows.dtype, rows.shape[1]) != (shelf.tag, out.dtype, out.shape[1]):
                # the extractor's output changed shape: nothing cached fits, run it on all rows
                return from_storage(*to_storage(compute(np.arange(b))))
            if out is None:
                out = np.empty((b, rows.shape[1]), rows.dtype)
            out[missing] = rows
            if shelf is not None:
                _MEMORY.store(shelf, slots[missing], tag, rows)
        return from_storage(tag, out)

    def on_disk(self, X, i):
        """Whether the directory cache holds row ``i`` of X (stored by another process, which
        ran the determinism probe on this model)."""
        if self.disk is None or self.off:
            return False
        keys = disk_keys(np.ascontiguousarray(host_bits(X[i : i + 1])))
        return self.disk.get(self.mkey, keys)[0] is not None

    def _rows(self, X, sl, idx, compute):
        """``(tag, rows)`` of rows ``idx`` of X[sl]: from the directory cache, else computed."""
        if self.disk is None:
            tag, rows = to_storage(compute(idx))
            return tag, rows
        keys = disk_keys(np.ascontiguousarray(host_bits(X[sl]))[idx])
        found = [None] * len(idx)
        self._read_disk(found, range(len(idx)), keys)
        missing = [i for i, f in enumerate(found) if f is None]
        if missing:
            with self.disk.lock(self.mkey):  # misses of one model computed once across processes
                self._read_disk(found, missing, keys)  # another process may have just stored them
                missing = [i for i in missing if found[i] is None]
                if missing:
                    tag, new = to_storage(compute(idx[missing]))
                    self.disk.put(self.mkey, [keys[i] for i in missing], tag, new)
                    for i, row in zip(missing, new, strict=True):
                        found[i] = (tag, row)
        tag = found[0][0]
        return tag, np.stack([f[1] for f in found])

    def _read_disk(self, found, idx, keys):
        idx = list(idx)
        got = self.disk.get(self.mkey, [keys[i] for i in idx])
        for i, f in zip(idx, got, strict=True):
            if f is not None:
                found[i] = (f[0], np.frombuffer(f[1], dtype=_storage_dtype(f[0])))


class _Deferred:
    """A moments key not computed yet (``cache="auto"`` measuring the model)."""

    __slots__ = ("arrays",)

    def __init__(self, arrays):
        self.arrays = arrays


def _reset_locks_after_fork():
    """In a forked child, no thread of the parent runs on: locks they held would never be
    released, so the child gets fresh ones (and closes the parent's inherited lock files)."""
    global _DISKS_GUARD, _CHOICES_GUARD, _KEYS_GUARD
    _DISKS_GUARD = threading.Lock()
    _CHOICES_GUARD = threading.Lock()
    _KEYS_GUARD = threading.Lock()
    _MEASURING.clear()  # measurements of the parent's threads never end here
    _diskcache.after_fork_in_child()
    _MEMORY.reset_locks()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_locks_after_fork)
