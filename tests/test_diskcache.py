"""The cache directory: trusted only when it is safe, clear when it is broken, recovered when
removed, and locked per model (issue 12, items B6-B10).

This suite and CI run as root, for whom permission bits do not restrict access: ownership is
tested with ``os.chown`` to another uid, "not writable" by monkeypatching the one check the
cache uses (``_diskcache._writable``, i.e. ``os.access``) and, as root, honestly too in a forked
child that drops to the ``nobody`` uid. Oracles: the same fit with ``cache=False``.
"""

import os
import shutil
import signal
import sqlite3
import stat
import tempfile
import threading
import time
import traceback

import numpy as np
import pytest
import torch
from conftest import CountingModule
from numpy.testing import assert_array_equal
from torch import nn

from skl_transfer import LayerVariationalAdapter, _cache, _diskcache, clear_cache

FILE = "skl_transfer_features.sqlite"
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0
needs_fork = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")


def _data(n=60, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, 5))
    return X, np.tanh(X @ rng.normal(size=5)) + 0.1 * rng.normal(size=n)


class _Gate:
    """Calls ``fn`` (a test sets it) at every forward of a Gated module. An object of a plain
    class: the extractor's fingerprint keys its type only, not the test's changing ``fn``."""

    fn = None

    def __call__(self):
        if self.fn is not None:
            self.fn()


_GATE = _Gate()


class Gated(nn.Module):
    """A small float64 extractor whose forward first calls ``_GATE``."""

    def __init__(self, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.net = nn.Sequential(nn.Linear(5, 12, dtype=torch.float64), nn.Tanh())
        with torch.no_grad():
            for p in self.net.parameters():
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))

    def forward(self, x):
        _GATE()
        return self.net(x)


@pytest.fixture(autouse=True)
def _no_gate():
    _GATE.fn = None
    yield
    _GATE.fn = None


def _fit(body, X, y, cache):
    return LayerVariationalAdapter(body, alpha=0.1, cache=cache).fit(X, y)


def _assert_fit_equals_oracle(est, body, X, y):
    plain = _fit(body, X, y, cache=False)
    assert_array_equal(est.coef_, plain.coef_)
    assert_array_equal(est.intercept_, plain.intercept_)
    assert_array_equal(est.predict(X), plain.predict(X))


def _forget(directory):
    """As a fresh process sees it: no in-memory rows, no DiskCache object for ``directory``."""
    clear_cache()
    with _cache._DISKS_GUARD:
        _cache._DISKS.pop(os.path.join(os.path.abspath(directory), FILE), None)


def _holding_disk_lock():
    """Whether this thread holds a DiskCache lock (today's per-model lock, or the SQLite
    transaction that the code before issue 12 held as its lock)."""
    for disk in list(_cache._DISKS.values()):
        held = getattr(disk, "_held", None)
        if isinstance(held, dict):
            if any(key[1] == threading.get_ident() for key in list(held)):
                return True
        elif getattr(held, "con", None) is not None:
            return True
    return False


def _fork(child):
    """Run ``child()`` in a forked process (exit code 0 if it returned).

    The child runs torch on one thread: torch's OpenMP pool (libgomp) is not fork-safe, and a
    child's first parallel region hangs after the parent used it, whatever this library does.
    """
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        code = 1
        try:
            torch.set_num_threads(1)
            child()
            code = 0
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    return pid


def _wait(pid, timeout):
    """The child's exit code, or None (and the child killed) after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.02)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    return None


def _schema(path):
    con = sqlite3.connect(path)
    try:
        return sorted(con.execute("SELECT type, name FROM sqlite_master"))
    finally:
        con.close()


def _n_rows(path):
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return con.execute("SELECT count(*) FROM rows").fetchone()[0]
    finally:
        con.close()


# -- B6: trust -----------------------------------------------------------------------------


def test_planted_view_with_trigger_is_refused_and_clear_cache_fixes_it(tmp_path):
    d = tmp_path / "features"
    d.mkdir(mode=0o700)
    con = sqlite3.connect(d / FILE)  # planted before any fit: owned by us, mode 0o644
    con.executescript(
        "CREATE TABLE store (model TEXT, row BLOB, dtype TEXT, data BLOB);"
        "CREATE VIEW rows AS SELECT model, row, dtype, data FROM store;"
        "CREATE TRIGGER zero INSTEAD OF INSERT ON rows BEGIN INSERT INTO store "
        "VALUES (NEW.model, NEW.row, NEW.dtype, zeroblob(length(NEW.data))); END;"
    )
    con.close()
    body, (X, y) = Gated(), _data()
    with pytest.raises(ValueError, match=r"not a feature cache written by skl_transfer") as err:
        _fit(body, X, y, str(d))
    msg = str(err.value)
    assert str(d / FILE) in msg and "trigger 'zero'" in msg and "view 'rows'" in msg
    assert f"skl_transfer.clear_cache({str(d)!r})" in msg
    assert _schema(d / FILE) == [("table", "store"), ("trigger", "zero"), ("view", "rows")]  # untouched
    clear_cache(d)
    _assert_fit_equals_oracle(_fit(body, X, y, str(d)), body, X, y)
    _forget(d)  # a second process: reads every row from the file
    _assert_fit_equals_oracle(_fit(body, X, y, str(d)), body, X, y)
    assert _schema(d / FILE) == [("index", "sqlite_autoindex_rows_1"), ("table", "rows")]


@pytest.mark.skipif(os.name != "posix", reason="permission bits")
@pytest.mark.parametrize("mode, who", [(0o777, "group and others"), (0o770, "group"), (0o702, "others")])
def test_directory_writable_by_others_is_refused(tmp_path, mode, who):
    d = tmp_path / "shared"
    d.mkdir()
    os.chmod(d, mode)
    body, (X, y) = Gated(), _data()
    with pytest.raises(ValueError, match=f"is writable by {who}") as err:
        _fit(body, X, y, str(d))
    assert repr(str(d)) in str(err.value) and "chmod go-w" in str(err.value)
    assert not (d / FILE).exists()
    os.chmod(d, 0o755)  # the fix
    _assert_fit_equals_oracle(_fit(body, X, y, str(d)), body, X, y)


@pytest.mark.skipif(os.name != "posix", reason="permission bits")
@pytest.mark.parametrize("name", [FILE, FILE + "-wal", "skl_transfer_locks"])
def test_cache_file_writable_by_others_is_refused(tmp_path, name):
    d = tmp_path / "features"
    body, (X, y) = Gated(), _data()
    _fit(body, X, y, str(d))
    (d / name).touch()
    os.chmod(d / name, 0o666)
    _forget(d)
    with pytest.raises(ValueError, match="writable by group and others") as err:
        _fit(body, X, y, str(d))
    assert str(d / name) in str(err.value)


@pytest.mark.skipif(not IS_ROOT, reason="chown to another uid needs root")
@pytest.mark.parametrize("what", ["directory", "file"])
def test_cache_owned_by_another_user_is_refused(tmp_path, what):
    d = tmp_path / "theirs"
    body, (X, y) = Gated(), _data()
    _fit(body, X, y, str(d))
    _forget(d)
    os.chown(d if what == "directory" else d / FILE, 12345, 12345)  # mode stays 0o700 / 0o600
    with pytest.raises(ValueError, match=r"owned by another user \(uid 12345") as err:
        _fit(body, X, y, str(d))
    assert f"{what} {str(d) if what == 'directory' else str(d / FILE)!r}" in str(err.value)
    # the check runs again on every use of a directory already opened by this process
    os.chown(d if what == "directory" else d / FILE, 0, 0)
    _fit(body, X, y, str(d))
    os.chown(d if what == "directory" else d / FILE, 12345, 12345)
    with pytest.raises(ValueError, match="owned by another user"):
        _fit(body, X, y, str(d))


@pytest.mark.skipif(os.name != "posix", reason="permission bits")
def test_created_directories_and_files_are_private(tmp_path):
    old = os.umask(0)  # the modes are the library's own, not the umask's
    try:
        d = tmp_path / "a" / "features"
        _fit(Gated(), *_data(), str(d))
        con = sqlite3.connect(d / FILE)  # keeps the -wal and -shm files while it is open
        con.execute("SELECT count(*) FROM rows").fetchone()
        modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in [d, *d.iterdir()]}
        con.close()
    finally:
        os.umask(old)
    assert modes.pop("features") == 0o700 and modes.pop("skl_transfer_locks") == 0o700
    assert {FILE, FILE + "-wal", FILE + "-shm"} == set(modes)
    assert set(modes.values()) == {0o600}, modes
    assert {stat.S_IMODE(p.stat().st_mode) for p in (d / "skl_transfer_locks").iterdir()} == {0o600}


# -- B7: broken directories ----------------------------------------------------------------


def _checkpoint(d):
    """Everything in the main file, no -wal or -shm left (no connection is open)."""
    con = sqlite3.connect(os.path.join(d, FILE))
    con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    con.close()
    for name in (FILE + "-wal", FILE + "-shm"):
        if os.path.exists(os.path.join(d, name)):
            os.remove(os.path.join(d, name))


def _populate(d, n=600):
    body, (X, y) = Gated(), _data(n)
    _fit(body, X, y, str(d))
    _forget(d)
    _checkpoint(d)
    return body, X, y


@pytest.mark.parametrize("kind", ["regular_file", "not_sqlite", "truncated", "corrupted", "dir_as_file"])
def test_broken_cache_fails_clearly_and_the_named_fix_works(tmp_path, kind):
    d = tmp_path / "features"
    body, (X, y) = Gated(), _data()
    if kind == "regular_file":
        d.write_text("not a directory")
        named = d
    elif kind == "dir_as_file":
        (d / FILE).mkdir(parents=True)
        named = d / FILE
    elif kind == "not_sqlite":
        d.mkdir(mode=0o700)
        (d / FILE).write_bytes(b"this is not an SQLite file\n" * 100)
        named = d / FILE
    else:
        body, X, y = _populate(d)
        data = bytearray((d / FILE).read_bytes())
        assert len(data) > 20 * 4096
        if kind == "truncated":
            data = data[: len(data) // 3]
        else:  # an invalid b-tree page type at the head of every page after the first
            for start in range(4096, len(data), 4096):
                data[start] = 0xEE
        (d / FILE).write_bytes(bytes(data))
        named = d / FILE
    with pytest.raises(ValueError) as err:
        _fit(body, X, y, str(d))
    assert isinstance(err.value, _diskcache.CacheDirectoryError)
    msg = str(err.value)
    assert repr(str(named)) in msg and "cache=True" in msg, msg
    if kind == "regular_file":
        assert "is not a directory" in msg
        _assert_fit_equals_oracle(_fit(body, X, y, str(tmp_path / "other")), body, X, y)
        return
    assert f"skl_transfer.clear_cache({str(d)!r})" in msg
    if kind in ("truncated", "corrupted", "not_sqlite"):
        assert "not an intact SQLite file" in msg
    if kind == "dir_as_file":
        shutil.rmtree(d / FILE)
    else:
        clear_cache(d)
    _assert_fit_equals_oracle(_fit(body, X, y, str(d)), body, X, y)


def test_directory_that_cannot_be_written_is_refused(tmp_path, monkeypatch):
    # Simulated: as root nothing is unwritable; the cache asks _writable (os.access) alone.
    monkeypatch.setattr(_diskcache, "_writable", lambda path: False, raising=False)
    d = tmp_path / "empty"
    d.mkdir(mode=0o700)
    with pytest.raises(ValueError, match="not writable by this process and holds no cache file") as err:
        _fit(Gated(), *_data(), str(d))
    assert repr(str(d)) in str(err.value) and "cache=True" in str(err.value)


def test_read_only_populated_cache_is_read_but_not_written(tmp_path, monkeypatch):
    d = tmp_path / "features"
    body = CountingModule(Gated())
    X, y = _data(80)
    _fit(body, X[:50], y[:50], str(d))
    assert _n_rows(d / FILE) == 50
    _forget(d)
    before = (d / FILE).read_bytes()
    # Simulated: as root nothing is unwritable; the cache asks _writable (os.access) alone.
    monkeypatch.setattr(_diskcache, "_writable", lambda path: False, raising=False)
    rows = body.rows_seen
    est = _fit(body, X, y, str(d))
    assert _cache.resolve(str(d))[1].readonly
    assert body.rows_seen == rows + 30  # the 50 stored rows were read, the 30 others computed
    plain = _fit(body, X, y, cache=False)  # rows computed in other batches: last-bit rounding
    np.testing.assert_allclose(est.coef_, plain.coef_, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(est.predict(X), plain.predict(X), rtol=1e-12, atol=1e-14)
    assert (d / FILE).read_bytes() == before and _n_rows(d / FILE) == 50  # nothing stored
    clear_cache()
    rows = body.rows_seen
    _fit(body, X, y, str(d))
    assert body.rows_seen == rows + 30


@needs_fork
@pytest.mark.skipif(not IS_ROOT or os.name != "posix", reason="drops root to the nobody uid")
def test_read_only_cache_of_another_trusted_owner_really_unwritable():
    """Honest: a child as uid 65534 (nobody) reads a root-owned cache (root is trusted, as by
    ssh) that it cannot write; no -shm can be made there, so SQLite opens it immutable."""
    d = tempfile.mkdtemp(prefix="skl_transfer_ro_")  # /tmp: a path nobody can traverse
    try:
        os.chmod(d, 0o755)
        body, (X, y) = CountingModule(Gated()), _data(80)
        _fit(body, X[:50], y[:50], d)
        _forget(d)
        _checkpoint(d)  # no -shm: one cannot be made there by nobody, so SQLite must open it immutable
        os.chmod(os.path.join(d, FILE), 0o644)
        os.mkdir(os.path.join(d, "empty"), 0o755)
        out = os.path.join(d, "result.npy")
        os.close(os.open(out, os.O_CREAT | os.O_WRONLY, 0o666))
        os.chmod(out, 0o666)

        def child():
            os.setgid(65534)
            os.setuid(65534)
            rows = body.rows_seen
            est = _fit(body, X, y, d)
            assert _cache.resolve(d)[1].readonly and body.rows_seen == rows + 30
            with open(out, "wb") as f:
                np.save(f, np.r_[est.coef_.ravel(), est.intercept_])
            with pytest.raises(ValueError, match="not writable by this process and holds no cache"):
                _fit(body, X, y, os.path.join(d, "empty"))
            with pytest.raises(ValueError, match="cannot be read or created by this process"):
                _fit(body, X, y, os.path.join(d, "skl_transfer_locks"))  # root's, mode 0o700

        assert _wait(_fork(child), 60) == 0
        plain = _fit(body, X, y, cache=False)
        np.testing.assert_allclose(np.load(out), np.r_[plain.coef_.ravel(), plain.intercept_], rtol=1e-12)
        assert _n_rows(os.path.join(d, FILE)) == 50
    finally:
        shutil.rmtree(d)


# -- B8: the directory goes away -----------------------------------------------------------


@pytest.mark.parametrize("how", ["rmtree", "files_only"])
def test_directory_removed_between_fits_is_recreated(tmp_path, how):
    d = tmp_path / "features"
    body = CountingModule(Gated())
    X, y = _data()
    _fit(body, X, y, str(d))
    first = body.rows_seen  # every row, and what else a fit with nothing cached runs
    disk = _cache.resolve(str(d))[1]
    if how == "rmtree":
        shutil.rmtree(d)
    else:  # what clear_cache(d) did before issue 12
        for name in (FILE, FILE + "-wal", FILE + "-shm"):
            if (d / name).exists():
                os.remove(d / name)
    clear_cache()  # this process's memory only: the same DiskCache object goes on
    est = _fit(body, X, y, str(d))
    assert _cache.resolve(str(d))[1] is disk
    assert body.rows_seen == 2 * first
    _assert_fit_equals_oracle(est, body, X, y)
    assert _n_rows(d / FILE) == len(X)
    assert stat.S_IMODE(d.stat().st_mode) == 0o700 or os.name != "posix"


@pytest.mark.parametrize("first", ["get", "lock", "put"])
def test_each_operation_recovers_a_removed_directory(tmp_path, first):
    d = tmp_path / "features"
    disk = _cache.resolve(str(d))[1]
    row = np.arange(4.0)
    disk.put("m", [b"k1"], "float64|4", [row])
    shutil.rmtree(d)
    if first == "get":
        assert disk.get("m", [b"k1"]) == [None]
    elif first == "lock":
        with disk.lock("m"):
            assert disk.get("m", [b"k1"]) == [None]
    disk.put("m", [b"k2"], "float64|4", [2 * row])
    assert disk.get("m", [b"k1", b"k2"]) == [None, ("float64|4", (2 * row).tobytes())]


@needs_fork
@pytest.mark.parametrize("how", ["clear_cache", "rmtree"])
def test_directory_removed_by_another_process_is_recreated(tmp_path, how):
    d = tmp_path / "features"
    body = CountingModule(Gated())
    X, y = _data()
    _fit(body, X, y, str(d))
    first = body.rows_seen
    disk = _cache.resolve(str(d))[1]
    # the documented ways to empty it, run by another process
    assert _wait(_fork(lambda: clear_cache(d) if how == "clear_cache" else shutil.rmtree(d)), 30) == 0
    assert _n_rows(d / FILE) == 0 if how == "clear_cache" else not d.exists()
    clear_cache()  # this process's memory only
    est = _fit(body, X, y, str(d))
    assert _cache.resolve(str(d))[1] is disk and body.rows_seen == 2 * first
    assert _n_rows(d / FILE) == len(X)
    _assert_fit_equals_oracle(est, body, X, y)


# -- B9: fork ------------------------------------------------------------------------------


@needs_fork
@pytest.mark.parametrize("on_disk", [False, True])
def test_fork_while_another_thread_is_inside_a_cached_fit(tmp_path, on_disk):
    cache = str(tmp_path / "features") if on_disk else True
    body, (X, y) = Gated(), _data()
    release, inside = threading.Event(), threading.Event()
    holder = []

    def gate():  # the holder thread stops inside its fit, holding the cache's locks
        if threading.current_thread() is holder[0] and (not on_disk or _holding_disk_lock()):
            inside.set()
            release.wait(30)

    holder.append(threading.Thread(target=_fit, args=(body, X, y, cache)))
    _GATE.fn = gate
    holder[0].start()
    try:
        assert inside.wait(10)
        out = tmp_path / "child.npy"

        def child():
            est = _fit(body, X, y, cache)
            np.save(out, np.r_[est.coef_.ravel(), est.intercept_])

        pid = _fork(child)
        # The child's own locks are free at once; a disk lock is the parent's, released soon.
        threading.Timer(0.3, release.set).start()
        assert _wait(pid, 20) == 0, "the forked child hung on a lock held by the parent's thread"
    finally:
        release.set()
        holder[0].join(30)
    plain = _fit(body, X, y, cache=False)
    np.testing.assert_allclose(np.load(out), np.r_[plain.coef_.ravel(), plain.intercept_], rtol=1e-12)


# -- B10: a lock per model, a timeout with a clear error -----------------------------------


def test_two_models_do_not_wait_for_each_other(tmp_path):
    cache = str(tmp_path / "features")
    (X, y), a, b = _data(), Gated(seed=1), CountingModule(nn.Linear(5, 7, dtype=torch.float64))
    release, inside = threading.Event(), threading.Event()
    slow = []

    def gate():  # model a stops inside its locked computation
        if threading.current_thread() is slow[0] and _holding_disk_lock():
            inside.set()
            release.wait(30)

    _GATE.fn = gate
    slow.append(threading.Thread(target=_fit, args=(a, X, y, cache)))
    slow[0].start()
    try:
        assert inside.wait(10)
        result = []
        other = threading.Thread(target=lambda: result.append(_fit(b, X, y, cache)))
        t0 = time.monotonic()
        other.start()
        other.join(8)
        assert result, "a fit of another model waited for the lock of the first"
        assert time.monotonic() - t0 < 5
    finally:
        release.set()
        slow[0].join(30)
        other.join(30)
    _assert_fit_equals_oracle(result[0], b, X, y)
    assert _n_rows(tmp_path / "features" / FILE) == 2 * len(X)


@needs_fork
def test_a_stopped_holder_times_out_with_a_clear_error(tmp_path, monkeypatch):
    d = str(tmp_path / "features")
    body, (X, y) = Gated(), _data()
    parent = os.getpid()

    def gate():  # in the child: stop (as Ctrl-Z does) while holding the model's lock
        if os.getpid() != parent and _holding_disk_lock():
            os.kill(os.getpid(), signal.SIGSTOP)

    _GATE.fn = gate
    pid = _fork(lambda: _fit(body, X, y, d))
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            done, status = os.waitpid(pid, os.WNOHANG | os.WUNTRACED)
            if done:
                assert os.WIFSTOPPED(status), "the child did not stop holding the lock"
                break
            time.sleep(0.02)
        else:
            pytest.fail("the child neither stopped nor ended")
        monkeypatch.setattr(_diskcache, "LOCK_TIMEOUT", 0.3, raising=False)
        errors = []

        def fit():
            try:
                _fit(body, X, y, d)
            except Exception as exc:
                errors.append(exc)

        waiter = threading.Thread(target=fit)
        t0 = time.monotonic()
        waiter.start()
        waiter.join(10)
        elapsed = time.monotonic() - t0
        assert not waiter.is_alive(), "the fit waited for the stopped process without a timeout"
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        waiter.join(30)
    assert len(errors) == 1, (elapsed, errors)
    assert isinstance(errors[0], TimeoutError) and isinstance(errors[0], ValueError)
    msg = str(errors[0])
    assert 0.3 <= elapsed < 5
    assert os.path.join(d, "skl_transfer_locks") in msg and f"process {pid} on " in msg, msg
    assert "end that process" in msg and f"skl_transfer.clear_cache({d!r})" in msg
    _assert_fit_equals_oracle(_fit(body, X, y, d), body, X, y)  # the lock went with the process


def test_opening_a_new_directory_while_another_process_creates_it_waits(tmp_path):
    # another process has created the empty file and holds its write lock (it is creating the
    # schema, its WAL mode not yet written); changing the journal mode then answers "database is
    # locked" at once, without SQLite's busy timeout: the open must wait for the other process,
    # not fail (a GridSearchCV with n_jobs=2 on a new cache directory failed one fit so in CI)
    d = tmp_path / "features"
    d.mkdir(mode=0o700)
    path = d / FILE
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    plain = sqlite3.connect(path, isolation_level=None, timeout=5)
    with pytest.raises(sqlite3.OperationalError, match="locked"):
        plain.execute("PRAGMA journal_mode=WAL")  # the premise: no busy wait here
    plain.close()
    opened, errors = [], []

    def open_cache():
        try:
            opened.append(_diskcache.DiskCache(str(d)))
        except Exception as exc:  # noqa: BLE001 (reported by the assertion below)
            errors.append(exc)

    t = threading.Thread(target=open_cache)
    t.start()
    time.sleep(0.3)
    assert not errors and not opened  # waiting for the lock
    other.execute(_diskcache._SCHEMA)
    other.execute("COMMIT")
    other.close()
    t.join(30)
    assert not errors, errors
    assert opened and not opened[0].readonly
    con = sqlite3.connect(path)
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    con.close()
