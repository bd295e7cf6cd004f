"""Tests of the products' page-cache release (kspec_fluxcal._page_cache)."""

import collections
import os

import pytest

from kspec_fluxcal import _page_cache


@pytest.fixture
def advice(monkeypatch):
    """The advice given, as (file name, offset, length, advice), with a fresh list of kept
    files."""
    given = []

    def record(fd, offset, length, what):
        given.append((os.path.basename(os.readlink(f"/proc/self/fd/{fd}")), offset, length,
                      what))

    monkeypatch.setattr(_page_cache, "_ADVISE", record)
    monkeypatch.setattr(_page_cache, "_KEPT", collections.deque(maxlen=2))
    return given


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="names fds through /proc")
def test_written_files_start_writeback_and_the_last_two_are_dropped_later(advice, tmp_path):
    """A written file is advised at once (its writeback starts); the two written last are
    advised again before the next write; a file removed since is skipped."""
    dont = os.POSIX_FADV_DONTNEED
    names = ["a.fits", "b.fits", "c.fits"]
    for name in names:
        (tmp_path / name).write_bytes(b"x" * 10000)
    _page_cache.written(tmp_path / "a.fits")
    assert advice == [("a.fits", 0, 0, dont)]
    _page_cache.written(tmp_path / "b.fits")
    _page_cache.written(tmp_path / "c.fits")
    del advice[:]
    _page_cache.release_earlier()
    assert advice == [("b.fits", 0, 0, dont), ("c.fits", 0, 0, dont)]
    (tmp_path / "b.fits").unlink()
    del advice[:]
    _page_cache.release_earlier()
    assert advice == [("c.fits", 0, 0, dont)]


def test_nothing_is_done_without_posix_fadvise(monkeypatch, tmp_path):
    monkeypatch.setattr(_page_cache, "_ADVISE", None)
    monkeypatch.setattr(_page_cache, "_KEPT", collections.deque(maxlen=2))
    path = tmp_path / "a.fits"
    path.write_bytes(b"x")
    _page_cache.written(path)
    _page_cache.release_earlier()
    assert not _page_cache._KEPT


@pytest.mark.skipif(_page_cache._ADVISE is None, reason="no posix_fadvise here")
def test_advised_files_keep_their_contents(monkeypatch, tmp_path):
    """The real advice, given while a file's pages are dirty and again later, changes no byte
    of it."""
    monkeypatch.setattr(_page_cache, "_KEPT", collections.deque(maxlen=2))
    data = os.urandom(3 << 20)
    path = tmp_path / "product.fits"
    path.write_bytes(data)
    _page_cache.written(path)
    _page_cache.release_earlier()
    assert path.read_bytes() == data
